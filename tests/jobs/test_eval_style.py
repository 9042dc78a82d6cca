import json

from PIL import Image

from jobs.cli import main as rdm
from rdm.toyart import STYLES

SMOKE = ["--samples-per-cell", "1", "--database-per-cell", "1", "--num-neighbors", "1", "--num-steps", "2",
         "--classifier-steps", "3", "--classifier-per-cell", "1"]


def test_eval_style_writes_results_and_grid(tmp_path):
    assert rdm(["eval-style", "--seed", "3", "--out", str(tmp_path)] + SMOKE) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("retrieval", "prompt", "text_only", "content_retrieval"):
        assert 0.0 <= results[key] <= 1.0
    assert set(results["per_style"]) == set(STYLES)
    assert set(results["per_style"]["neon"]) >= {"retrieval", "prompt", "text_only", "content_retrieval"}
    assert results["settings"]["samples_per_cell"] == 1 and results["seed"] == 3
    grid = Image.open(tmp_path / "grid.png")
    assert grid.height >= 8 * 32 and grid.width >= 3 * 6 * 32


def test_eval_style_rejects_too_many_neighbours(tmp_path, capsys):
    code = rdm(["eval-style", "--seed", "3", "--out", str(tmp_path), "--database-per-cell", "1",
                "--num-neighbors", "7"])
    assert code == 2 and "--num-neighbors" in capsys.readouterr().err
