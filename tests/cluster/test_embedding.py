import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cluster.embedding import decode_image, decode_shard, list_corpus
from cluster.errors import EmptyCorpusError


def png(color, size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_resizes_to_clip_input_in_minus_one_one():
    x = decode_image(png((255, 0, 127)), (32, 32))
    assert x.shape == (3, 32, 32) and x.dtype == np.float16
    np.testing.assert_allclose(x[:, 5, 5], [1.0, -1.0, -0.00392], atol=2e-3)


def test_undecodable_images_become_error_records(tmp_path):
    table = pa.table({"image": [png((0, 0, 0)), b"not an image", None], "caption": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "part.parquet")
    store, shards = list_corpus(str(tmp_path))
    result = decode_shard({"name": shards[0].name, "kind": "parquet", "keys": list(shards[0].keys)},
                          corpus_uri=str(tmp_path), image_size=(8, 8), antialias=False)
    import json
    rows, errors = json.loads(result["rows"]), json.loads(result["errors"])
    assert len(rows) == 1 and rows[0]["metadata"] == {"caption": "a"}
    assert [e["source_uri"].rsplit("#", 1)[1] for e in errors] == ["1", "2"]
    assert np.load(io.BytesIO(result["images"])).shape == (1, 3, 8, 8)


def test_image_folders_are_grouped_into_stable_shards(tmp_path):
    for i in range(5):
        (tmp_path / f"img{i}.png").write_bytes(png((i, i, i)))
    (tmp_path / "notes.txt").write_text("ignored")
    _, shards = list_corpus(str(tmp_path), shard_size=2)
    assert [len(s.keys) for s in shards] == [2, 2, 1]
    assert [s.name for s in shards] == [s.name for s in list_corpus(str(tmp_path), shard_size=2)[1]]


def test_empty_corpus(tmp_path):
    with pytest.raises(EmptyCorpusError, match="no parquet or image files"):
        list_corpus(str(tmp_path))
