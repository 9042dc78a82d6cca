import pytest

from cluster import bulk
from cluster.bulk import BulkSettings
from cluster.prompts import read_prompts
from rdm.errors import InputError


def expand(*args) -> list[dict]:
    return bulk.expand(*args).to_pylist()


@pytest.mark.parametrize("name, text", [
    ("p.txt", "a boat\n\na tree\n"),
    ("p.csv", "prompt,database,num_images,seed\na boat,art,2,\n,art,1,\na tree,,1,9\n"),
    ("p.jsonl", '{"prompt": "a boat", "num_images": 2}\n{"prompt": " "}\n{oops\n{"prompt": "a tree", "seed": 9}\n'),
])
def test_formats_and_row_errors(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    rows, errors = read_prompts(str(path))
    assert [r.prompt for r in rows] == ["a boat", "a tree"]
    assert all(e["row"] > 0 and e["error"] for e in errors)
    assert len(errors) == {"p.txt": 1, "p.csv": 1, "p.jsonl": 2}[name]


def test_parquet_and_unknown_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a boat", "a tree"], "colour": ["red", "blue"]}), tmp_path / "p.parquet")
    rows, errors = read_prompts(str(tmp_path / "p.parquet"))
    assert rows == [] and [e["row"] for e in errors] == [1, 2] and "colour" in errors[0]["error"]


def test_unsupported_format(tmp_path):
    (tmp_path / "p.xml").write_text("<p/>")
    with pytest.raises(InputError, match="use .txt"):
        read_prompts(str(tmp_path / "p.xml"))


def test_keys_are_deterministic_and_distinct(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a boat", "num_images": 3}\n{"prompt": "a boat", "seed": 1001}\n')
    rows, _ = read_prompts(str(tmp_path / "p.jsonl"))
    items = expand(rows, BulkSettings(), "hash")
    assert [i["seed"] for i in items] == [1000, 1001, 1002, 1001]
    assert items[1]["key"] == items[3]["key"]  # same prompt and seed: the same image
    assert len({i["key"] for i in items}) == 3
    assert expand(rows, BulkSettings(num_steps=10), "hash")[0]["key"] != items[0]["key"]
    # other numerics give other images, so other keys; the fp32 reference path keeps the keys it always had
    bf16 = expand(rows, BulkSettings(precision="bf16"), "hash")
    assert bf16[0]["key"] != items[0]["key"]
    compiled = expand(rows, BulkSettings(precision="bf16", compile="default"), "hash")[0]["key"]
    assert compiled != bf16[0]["key"]
    # a dynamic batch dimension runs other kernels (and no padding rows): other keys
    assert expand(rows, BulkSettings(precision="bf16", compile="default", dynamic_batch=True), "hash")[0]["key"] \
        not in {compiled, bf16[0]["key"]}
    assert expand(rows, BulkSettings(precision="fp32"), "hash")[0]["key"] == items[0]["key"]
    bf16_flash = expand(rows, BulkSettings(precision="bf16", attention="flash"), "hash")
    assert bf16_flash[0]["key"] not in {bf16[0]["key"], items[0]["key"]}
    with pytest.raises(InputError, match="precision"):
        expand(rows, BulkSettings(precision="fp8"), "hash")


def test_an_image_size_other_than_the_models_gives_other_keys_and_its_own_is_checked(tmp_path):
    """The tiny model samples 32 x 32: asking for that (or nothing) keeps the keys jobs always had; 24 x 40
    gives other keys; a size the model cannot sample is refused before anything runs."""
    from cluster.bulk import chosen_size

    (tmp_path / "p.txt").write_text("a boat\n")
    rows, _ = read_prompts(str(tmp_path / "p.txt"))
    plain = expand(rows, BulkSettings(), "hash", chosen_size(BulkSettings()))
    assert chosen_size(BulkSettings(height=32, width=32)) is None
    wide = BulkSettings(height=24, width=40)
    assert chosen_size(wide) == (24, 40) and chosen_size(BulkSettings(width=40)) == (32, 40)
    assert expand(rows, wide, "hash", chosen_size(wide))[0]["key"] != plain[0]["key"]
    with pytest.raises(InputError, match="multiples of 8, got 30 and 32"):
        chosen_size(BulkSettings(height=30))


def test_a_row_may_set_its_own_neighbours_and_guidance(tmp_path):
    """num_neighbors and guidance_scale per row (a sweep in one job): checked like the job's, and part of the
    image's key; a row that sets neither keeps the key it always had, and a row without a database gets no
    neighbours whatever it asks."""
    (tmp_path / "p.csv").write_text("prompt,database,num_neighbors,guidance_scale\n"
                                    "a boat,art,,\n"  # the job's
                                    "a boat,art,2,1.5\n"
                                    "a boat,art,0,\n"
                                    "a boat,,7,\n"
                                    "a boat,art,2.5,\n"
                                    "a boat,art,,60\n"
                                    "a boat,art,x,\n")
    rows, errors = read_prompts(str(tmp_path / "p.csv"))
    assert [(r.num_neighbors, r.guidance_scale) for r in rows] == [(None, None), (2, 1.5), (0, None), (7, None)]
    assert {e["row"]: e["error"] for e in errors} == {
        6: "num_neighbors must be an integer in 0..20, got '2.5'",
        7: "guidance_scale must be a finite number in 0..50, got '60'",
        8: "num_neighbors must be an integer in 0..20, got 'x'"}
    items = expand(rows, BulkSettings(num_neighbors=4, guidance_scale=5.0), "hash")
    assert [(i["num_neighbors"], i["guidance_scale"]) for i in items] == [(4, 5.0), (2, 1.5), (0, 5.0), (0, 5.0)]
    assert len({i["key"] for i in items}) == 4
    (tmp_path / "same.jsonl").write_text('{"prompt": "a boat", "database": "art", "num_neighbors": 4, '
                                         f'"guidance_scale": 5, "seed": {items[0]["seed"]}}}\n')
    same, _ = read_prompts(str(tmp_path / "same.jsonl"))  # the job's values, spelt out: the same image
    assert expand(same, BulkSettings(num_neighbors=4, guidance_scale=5.0), "hash")[0]["key"] == items[0]["key"]


def test_a_row_may_name_a_negative_prompt_which_is_part_of_its_key(tmp_path):
    """`negative_prompt` per row: blank is none (a csv's empty cell), anything but text is a row error; a row
    with one gets another key, a row without keeps the key it always had."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a boat", "seed": 1}\n'
                                      '{"prompt": "a boat", "seed": 1, "negative_prompt": " a red house "}\n'
                                      '{"prompt": "a boat", "seed": 1, "negative_prompt": ""}\n'
                                      '{"prompt": "a boat", "seed": 1, "negative_prompt": 3}\n')
    rows, errors = read_prompts(str(tmp_path / "p.jsonl"))
    assert [r.negative_prompt for r in rows] == [None, "a red house", None]
    assert errors == [{"row": 4, "error": "negative_prompt must be text, got 3"}]
    items = expand(rows, BulkSettings(), "hash")
    assert items[0]["key"] == items[2]["key"] != items[1]["key"]
    assert [i["negative_prompt"] for i in items] == ["", "a red house", ""]
    before = expand(read_prompts(str(tmp_path / "p.jsonl"))[0][:1], BulkSettings(), "hash")[0]["key"]
    assert before == items[0]["key"]


def test_items_are_a_table_built_in_chunks_that_give_the_same_items(tmp_path, monkeypatch):
    """A job's items (one per image, what its driver holds) are an Arrow table of ITEM_SCHEMA, built
    ITEM_CHUNK items at a time: the chunks join into the items one pass gives."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "a boat", "num_images": 3}\n{"image": "q.png", "database": "ink"}\n'
                                      '{"prompt": "a tree", "num_images": 2, "negative_prompt": "fog"}\n')
    rows, _ = read_prompts(str(tmp_path / "p.jsonl"))
    whole = bulk.expand(rows, BulkSettings(), "hash")
    assert whole.schema == bulk.ITEM_SCHEMA and whole.num_rows == 6
    monkeypatch.setattr(bulk, "ITEM_CHUNK", 2)
    chunked = bulk.expand(rows, BulkSettings(), "hash")
    assert chunked.column("key").num_chunks == 3 and chunked.to_pylist() == whole.to_pylist()
    assert [(i["row"], i["image"], i["database"], i["num_neighbors"], i["negative_prompt"])
            for i in whole.to_pylist()][2:4] == [(1, "", "", 0, ""), (2, "q.png", "ink", 4, "")]


@pytest.mark.parametrize("text", ["a\nb", "a\n\nb\n", "a\r\nb\rc", "x\x0c\ny", "a\u2028b\n\n", "", "\n", "a\x0c",
                                  "é\n\x1cz", "a\r\n\r\n"])
def test_lines_are_read_as_they_come_and_numbered_as_splitlines_numbers_them(text):
    """A txt or jsonl prompts file is split as it is decoded, not held as a list of lines, into the lines
    str.splitlines gives: a line's number -- which seeds its images, so names their keys -- stays as it was."""
    from cluster.prompts import _lines

    assert list(_lines(text.encode())) == text.splitlines()


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl", "p.csv"])
def test_a_file_that_is_not_utf8_is_an_input_error(tmp_path, name):
    (tmp_path / name).write_bytes(b"prompt\n\xff\xfe oops\n")
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_prompts(str(tmp_path / name))
