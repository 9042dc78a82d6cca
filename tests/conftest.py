import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray reads this once, when it is first imported (which collection of any Serve test does): every Ray
# process the tests start must bind 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def pytest_addoption(parser):
    parser.addoption("--reference-dir", default=os.environ.get("RDM_REFERENCE_DIR", str(DEFAULT_REFERENCE_DIR)),
                     help="folder of CompVis conformance sets (<name>.yaml/.ckpt/.vectors.safetensors/.config.json)")


@pytest.fixture
def fake_s3(monkeypatch):
    """An in-process S3 (moto) with the bucket `rdm-unit`; for fast unit tests only."""
    import boto3
    from moto import mock_aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("RDM_S3_ENDPOINT_URL", raising=False)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="rdm-unit")
        yield
