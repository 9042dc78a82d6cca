"""Where generated images go: deterministic keys spread over prefixes, the image (PNG, JPEG or WebP) plus a
metadata JSON."""

from __future__ import annotations

import hashlib
import json

from cluster.storage import ObjectStore, S3Store


def image_key(request_id: str, seed: int, extension: str = "png") -> str:
    """`images/<2 hex>/<request_id>/<seed>.<extension>`: deterministic, and spread over 256 prefixes."""
    spread = hashlib.sha1(request_id.encode()).hexdigest()[:2]
    return f"images/{spread}/{request_id}/{seed}.{extension}"


def write_image(store: ObjectStore, key: str, data: bytes, metadata: dict) -> None:
    """Metadata first (`<seed>.json` beside `<seed>.<extension>`), then the image: an image that exists always
    has its metadata."""
    store.write_bytes(key.rpartition(".")[0] + ".json", json.dumps(metadata, indent=1).encode())
    store.write_bytes(key, data)


def image_url(store: ObjectStore, key: str, *, expires_s: int) -> str:
    """A presigned URL on S3; for local outputs, the ingress's own /v1/outputs route."""
    if isinstance(store, S3Store):
        return store.presigned_url(key, expires_s)
    return f"/v1/outputs/{key}"
