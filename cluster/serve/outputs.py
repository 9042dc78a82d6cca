"""Where generated images go: deterministic keys spread over prefixes, PNG plus a metadata JSON."""

from __future__ import annotations

import hashlib
import json

from cluster.storage import ObjectStore, S3Store


def image_key(request_id: str, seed: int) -> str:
    """`images/<2 hex>/<request_id>/<seed>.png`: deterministic, and spread over 256 prefixes."""
    spread = hashlib.sha1(request_id.encode()).hexdigest()[:2]
    return f"images/{spread}/{request_id}/{seed}.png"


def write_image(store: ObjectStore, key: str, png: bytes, metadata: dict) -> None:
    """Metadata first, then the image: an image that exists always has its metadata."""
    store.write_bytes(key.removesuffix(".png") + ".json", json.dumps(metadata, indent=1).encode())
    store.write_bytes(key, png)


def image_url(store: ObjectStore, key: str, *, expires_s: int) -> str:
    """A presigned URL on S3; for local outputs, the ingress's own /v1/outputs route."""
    if isinstance(store, S3Store):
        return store.presigned_url(key, expires_s)
    return f"/v1/outputs/{key}"
