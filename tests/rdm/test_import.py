import subprocess
import sys


def test_import_rdm_pulls_in_no_cluster_dependencies():
    code = ("import rdm, sys; bad = [m for m in ('ray', 'boto3', 'faiss', 'open_clip') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
