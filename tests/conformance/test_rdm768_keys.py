"""A model built from the reference 768x768 YAML has exactly the key/shape set of a real RDM-768
checkpoint after the conversion mapping (built on the meta device: no 5 GB allocation)."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rdm.checkpoint import ldm_key_map
from rdm.config import get_config
from rdm.ldm_config import read_ldm_config
from rdm.model import RDM
from rdm.schedule import SCHEDULE_BUFFERS


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in path.read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        shapes[key] = tuple(int(s) for s in shape.split(",")) if shape else ()
    return shapes


@pytest.fixture(scope="module")
def reference_keys(reference_dir) -> dict[str, tuple[int, ...]]:
    path = reference_dir / "rdm768_state_dict.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not in this reference set")
    return read_tsv(path)


def test_model_from_yaml_has_the_checkpoint_keys(reference_dir, reference_keys):
    config = read_ldm_config(reference_dir / "rdm768.yaml")
    with torch.device("meta"):
        model = RDM(config)
    ours = model.state_dict()
    expected: dict[str, tuple[int, ...]] = {name: (1000,) for name in SCHEDULE_BUFFERS}
    expected |= {"model_ema.decay": (), "model_ema.num_updates": ()}
    for key, (raw, ema) in ldm_key_map(model).items():
        expected[raw] = tuple(ours[key].shape)
        if ema is not None:
            expected[ema] = tuple(ours[key].shape)
    assert set(expected) == set(reference_keys), (
        f"missing {sorted(set(reference_keys) - set(expected))[:5]}, "
        f"extra {sorted(set(expected) - set(reference_keys))[:5]}")
    mismatched = [k for k in expected if expected[k] != reference_keys[k]]
    assert not mismatched, mismatched[:5]


def test_parameter_counts_match_the_reference(reference_dir):
    import json
    meta = json.loads((reference_dir / "rdm768_config.json").read_text())
    with torch.device("meta"):
        model = RDM(read_ldm_config(reference_dir / "rdm768.yaml"))
    assert sum(p.numel() for p in model.unet.parameters()) == meta["unet_derived"]["num_parameters"]
    assert sum(p.numel() for p in model.autoencoder.parameters()) == meta["first_stage_derived"]["num_parameters"]


def test_shipped_rdm768_config_equals_the_yaml(reference_dir):
    assert replace(read_ldm_config(reference_dir / "rdm768.yaml"), name="rdm-768") == get_config("rdm-768")
