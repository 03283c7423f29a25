"""Built-in graph data sets are the same in every process for the same seed."""

import subprocess
import sys

SCRIPT = (
    "import hashlib; from services.gnn.datasets import motif_graphs_with_truth; "
    "print(hashlib.sha256(b''.join(e.tobytes() for _, e, _, _ in motif_graphs_with_truth(6, seed=1))).hexdigest())"
)


def test_motif_graphs_are_the_same_in_every_process():
    digests = {subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                              timeout=120).stdout for _ in range(2)}  # fmt: skip
    assert len(digests) == 1, digests
