"""Reading prompt files for bulk generation: txt (one prompt per line), csv, jsonl or parquet, local or s3://.

Rows that cannot be used are returned as errors with their 1-based row numbers; they never stop a job. Besides
the prompt (or a query `image`), a row may name its `database`, `num_images`, `seed` and `negative_prompt` (what
guidance steers its images away from), and override the job's `num_neighbors` and `guidance_scale` (a sweep over
the RDM's two style knobs in one job).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from cluster.storage import open_store
from rdm.errors import InputError
from rdm.retrieval import check_num_neighbors

COLUMNS = ("prompt", "database", "num_images", "seed", "image", "num_neighbors", "guidance_scale", "negative_prompt")


@dataclass(frozen=True, slots=True)
class PromptRow:
    row: int  # 1-based line or row number
    prompt: str | None
    database: str | None
    num_images: int
    seed: int | None
    image: str | None
    num_neighbors: int | None = None  # None: the job's
    guidance_scale: float | None = None  # None: the job's
    negative_prompt: str | None = None  # what guidance steers the row's images away from (None: the null context)


def _raw_rows(name: str, data: bytes) -> Iterator[tuple[int, object]]:
    """(row number, raw row or its parse error), one at a time: a file of millions of prompts is never held
    as millions of Python objects besides the rows kept."""
    suffix = name.lower().rsplit(".", 1)[-1]
    if suffix == "txt":
        return ((i, {"prompt": line}) for i, line in enumerate(_lines(data), 1))
    if suffix == "jsonl":
        return ((i, _json_row(line)) for i, line in enumerate(_lines(data), 1) if line.strip())
    if suffix == "csv":
        return enumerate(csv.DictReader(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="")), 2)
    if suffix == "parquet":
        batches = pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=65_536)
        return enumerate((row for batch in batches for row in batch.to_pylist()), 1)
    raise InputError(f"prompts file {name!r}: use .txt, .csv, .jsonl or .parquet")


def _lines(data: bytes) -> Iterator[str]:
    """The lines `data.decode("utf-8").splitlines()` gives, decoded and split as they are read."""
    for line in io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline=None):
        yield from line.splitlines()  # also at the separators other than newlines that splitlines knows


def _json_row(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return InputError(f"invalid JSON: {err.msg}")


def _parse(row: int, raw: object, default_images: int) -> PromptRow:
    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise InputError("a row must be an object with a 'prompt' (or 'image') field")
    unknown = set(raw) - set(COLUMNS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(sorted(unknown))}; allowed: {', '.join(COLUMNS)}")
    prompt = raw.get("prompt")
    prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
    image = raw.get("image") or None
    if prompt is None and image is None:
        raise InputError("empty prompt (and no image)")
    try:
        num_images = int(raw.get("num_images") or default_images)
        seed = None if raw.get("seed") in (None, "") else int(raw["seed"])
    except (TypeError, ValueError) as err:
        raise InputError(f"num_images and seed must be integers: {err}") from err
    if not 1 <= num_images <= 64:
        raise InputError(f"num_images must be in 1..64, got {num_images}")
    if seed is not None and not 0 <= seed < 2**62:
        raise InputError(f"seed must be in 0..2**62, got {seed}")
    negative = raw.get("negative_prompt")
    if not _missing(negative) and not isinstance(negative, str):
        raise InputError(f"negative_prompt must be text, got {negative!r}")
    negative = negative.strip() if isinstance(negative, str) and negative.strip() else None
    return PromptRow(row, prompt, raw.get("database") or None, num_images, seed, image, *_overrides(raw), negative)


def _missing(value: object) -> bool:
    """Left out: absent, empty (csv) or null (a parquet column written by pandas holds NaN for nulls)."""
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _overrides(raw: dict) -> tuple[int | None, float | None]:
    """The row's num_neighbors and guidance_scale (None where left out: the job's)."""
    k, scale = raw.get("num_neighbors"), raw.get("guidance_scale")
    if _missing(k):
        k = None
    elif isinstance(k, str) and k.strip().lstrip("-").isdigit():
        k = int(k)
    elif isinstance(k, float) and k.is_integer():
        k = int(k)
    if k is not None:
        check_num_neighbors(k)  # an integer (not a bool) in range
    if _missing(scale):
        scale = None
    else:
        try:
            scale = float(scale) if not isinstance(scale, bool) else math.nan
        except (TypeError, ValueError):
            scale = math.nan
        if not math.isfinite(scale) or not 0 <= scale <= 50:
            raise InputError(f"guidance_scale must be a finite number in 0..50, got {raw['guidance_scale']!r}")
    return k, scale


def read_prompts(uri: str, *, default_images: int = 1) -> tuple[list[PromptRow], list[dict]]:
    """(good rows, errors [{row, error}]) of a prompts file."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    data = open_store(parent or ".").read_bytes(name)
    good, errors = [], []
    try:
        for row, raw in _raw_rows(name, data):
            try:
                good.append(_parse(row, raw, default_images))
            except InputError as err:
                errors.append({"row": row, "error": str(err)})
    except UnicodeDecodeError as err:
        raise InputError(f"prompts file {uri} is not UTF-8 text ({err.reason})") from None
    if not good and not errors:
        raise InputError(f"prompts file {uri} is empty")
    return good, errors
