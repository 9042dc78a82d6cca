"""Shared fixtures of the cluster unit tests (no Ray): `fake_s3` lives in tests/conftest.py."""
