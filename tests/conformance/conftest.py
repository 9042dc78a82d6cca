"""Discover reference sets: every <name>.ckpt with its .yaml, .vectors.safetensors and .config.json."""

from pathlib import Path

import pytest

SUFFIXES = (".yaml", ".ckpt", ".vectors.safetensors", ".config.json")


def find_reference_sets(folder: Path) -> list[str]:
    return sorted(p.name[: -len(".ckpt")] for p in folder.glob("*.ckpt")
                  if all((folder / (p.name[: -len(".ckpt")] + s)).is_file() for s in SUFFIXES))


def pytest_generate_tests(metafunc):
    if "reference_set" in metafunc.fixturenames:
        folder = Path(metafunc.config.getoption("--reference-dir"))
        names = find_reference_sets(folder) if folder.is_dir() else []
        if not names:
            raise pytest.UsageError(f"no reference sets found in {folder}; pass --reference-dir")
        metafunc.parametrize("reference_set", names, scope="module")


@pytest.fixture(scope="module")
def reference_dir(request) -> Path:
    return Path(request.config.getoption("--reference-dir"))
