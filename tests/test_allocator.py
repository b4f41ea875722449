"""retain_freed_memory: freed batch-sized blocks are reused instead of page-faulted afresh."""

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from pipeline.model.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a batch: tensors of several sizes (20 MiB) alive together, then freed
    blocks = [np.ones(n, np.float32) for n in (2**18, 2**20, 2**19, 2**20, 2**21, 2**18)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def _page_faults(setting: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    default, retained = _page_faults("default"), _page_faults("retain")
    assert default > 10 * 2000  # every batch faults in fresh pages (measured: 46,099)
    assert retained * 5 < default  # the first batch's pages, then reuse (measured: 2,542)
