import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from jobs.cli import main as rdm
from rdm.toyart import item_id, render_item


def test_make_corpus_writes_deterministic_parquet_shards(tmp_path):
    argv = ["make-corpus", "--seed", "7", "--per-cell", "2", "--rows-per-shard", "40"]
    assert rdm(argv + ["--out", str(tmp_path / "a")]) == 0
    assert rdm(argv + ["--out", str(tmp_path / "b")]) == 0
    shards = sorted((tmp_path / "a").glob("*.parquet"))
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    for shard in shards:
        assert shard.read_bytes() == (tmp_path / "b" / shard.name).read_bytes()
    table = pq.read_table(tmp_path / "a")
    assert table.column_names == ["id", "image", "caption", "style", "content"] and table.num_rows == 96
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == 96
    for index in (0, 41, 95):  # rows are items 0..95 in order, across shards
        item, row = render_item(7, index), rows[index]
        pixels = np.asarray(Image.open(io.BytesIO(row["image"])).convert("RGB"))
        assert np.array_equal(pixels, item.image) and row["id"] == item_id(item.image)
        assert (row["caption"], row["style"], row["content"]) == (item.caption, item.style, item.content)


def test_make_corpus_writes_to_s3(tmp_path, fake_s3):
    from cluster.storage import open_store

    argv = ["make-corpus", "--seed", "7", "--per-cell", "1", "--rows-per-shard", "40"]
    assert rdm(argv + ["--out", "s3://rdm-unit/toyart"]) == 0
    assert rdm(argv + ["--out", str(tmp_path)]) == 0
    store = open_store("s3://rdm-unit/toyart")
    assert sorted(store.list()) == ["part-00000.parquet", "part-00001.parquet"]
    for key in store.list():
        assert store.read_bytes(key) == (tmp_path / key).read_bytes()
