"""Shared fixtures of the cluster unit tests (no Ray)."""

import boto3
import pytest
from moto import mock_aws


@pytest.fixture
def fake_s3(monkeypatch):
    """An in-process S3 (moto) with the bucket `rdm-unit`; for fast unit tests only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("RDM_S3_ENDPOINT_URL", raising=False)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="rdm-unit")
        yield
