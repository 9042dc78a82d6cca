"""The compile cache's key and its handling of blobs that are not torch.compile exports."""

import torch

from rdm.acceleration import InferenceOptions
from rdm.compile_cache import cache_key, device_signature, import_artifacts


def test_the_key_names_model_options_device_and_is_stable():
    base = cache_key("abc", InferenceOptions(compile="default"), "cpu")
    assert base == cache_key("abc", InferenceOptions(compile="default"), torch.device("cpu"))
    others = {cache_key("abd", InferenceOptions(compile="default"), "cpu"),
              cache_key("abc", InferenceOptions("bf16", compile="default"), "cpu"),
              cache_key("abc", InferenceOptions(compile="default", attention="math"), "cpu"),
              cache_key("abc", InferenceOptions(compile="max-autotune"), "cpu"),
              cache_key("abc", InferenceOptions(compile="default"), "meta")}
    assert base not in others and len(others) == 5
    assert device_signature("cpu") == f"cpu:{torch.backends.cpu.get_cpu_capability()}"


def test_a_blob_that_is_not_an_export_imports_nothing():
    assert import_artifacts(b"") == set()
    assert import_artifacts(b"not a torch.compile export at all") == set()
