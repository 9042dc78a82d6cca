import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray reads this once, when it is first imported (which collection of any Serve test does): every Ray
# process the tests start must bind 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

DEFAULT_REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def pytest_addoption(parser):
    parser.addoption("--reference-dir", default=os.environ.get("RDM_REFERENCE_DIR", str(DEFAULT_REFERENCE_DIR)),
                     help="folder of CompVis conformance sets (<name>.yaml/.ckpt/.vectors.safetensors/.config.json)")
