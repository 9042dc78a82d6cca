"""Compiled code shared through object storage (SeaweedFS S3): a process loads what an earlier one
compiled, compiles only what is new, and exports only when it compiled something new."""

import json
import os
import subprocess
import sys
from pathlib import Path

from rdm.acceleration import InferenceOptions
from rdm.compile_cache import cache_key

ROOT = Path(__file__).resolve().parents[2]

PROCESS = r"""
import json, sys
import torch
from torch._dynamo.utils import counters
from cluster.compile_cache import CompileCache
from rdm.acceleration import InferenceOptions, compile_module

options = InferenceOptions(compile="default")
cache = CompileCache(sys.argv[1], model_id="mlp", options=options, device="cpu")
loaded = cache.load()
torch.manual_seed(0)
mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
module = compile_module(mlp, options)
for rows in map(int, sys.argv[2].split(",")):
    torch.testing.assert_close(module(torch.ones(rows, 8)), mlp(torch.ones(rows, 8)))
written = cache.save_if_new()
print(json.dumps({"loaded": loaded, "written": written, "hits": counters["inductor"].get("fxgraph_cache_hit", 0),
                  "misses": counters["inductor"].get("fxgraph_cache_miss", 0)}))
"""


def compile_in_new_process(tmp_path: Path, uri: str, batch_sizes: str) -> dict:
    """A process with an empty local compile cache (as on a new replica's machine) that compiles the MLP
    for each batch size (shapes are static: one graph each)."""
    inductor = tmp_path / f"inductor-{len(list(tmp_path.iterdir()))}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROCESS, uri, batch_sizes], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_processes_share_compiled_graphs_through_s3(make_bucket, tmp_path):
    import boto3

    uri = make_bucket("rdm-compile-cache") + "/cache"
    key = cache_key("mlp", InferenceOptions(compile="default"), "cpu")

    first = compile_in_new_process(tmp_path, uri, "2")
    assert (first["loaded"], first["hits"], first["misses"]) == (0, 0, 1)
    assert first["written"].startswith(f"{key}/") and first["written"].endswith(".bin")

    client = boto3.client("s3", endpoint_url=os.environ["RDM_S3_ENDPOINT_URL"], region_name="us-east-1")
    client.put_object(Bucket="rdm-compile-cache", Key=f"cache/{key}/corrupt.bin", Body=b"not an export")

    # batch 2 comes from the cache (the corrupt export is skipped), batch 3 is new: a second export
    second = compile_in_new_process(tmp_path, uri, "2,3")
    assert second["loaded"] >= 1 and (second["hits"], second["misses"]) == (1, 1)
    assert second["written"] not in (None, first["written"])

    # everything from the cache: nothing compiled, nothing written
    third = compile_in_new_process(tmp_path, uri, "3,2")
    assert (third["hits"], third["misses"], third["written"]) == (2, 0, None)

    stored = sorted(o["Key"] for o in client.list_objects_v2(Bucket="rdm-compile-cache",
                                                             Prefix=f"cache/{key}/")["Contents"])
    assert stored == sorted([f"cache/{first['written']}", f"cache/{second['written']}",
                             f"cache/{key}/corrupt.bin", f"cache/{key}/key.json"])
    ident = json.loads(client.get_object(Bucket="rdm-compile-cache", Key=f"cache/{key}/key.json")["Body"].read())
    assert ident["model"] == "mlp" and ident["options"]["compile"] == "default" and ident["device"].startswith("cpu:")
