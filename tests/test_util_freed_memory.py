"""keep_freed_memory: a freed batch's memory is reused by the next one, not faulted in afresh."""
import subprocess
import sys
from pathlib import Path

import pytest

# A "batch" as a forward pass makes them: a map and a smaller one after it, both above glibc's largest
# mmap threshold (32 MB), both freed at its end.
CHILD = r"""
import resource, sys, torch
from atlas.util.device import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def faults_of_one_batch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(96 << 20, dtype=torch.uint8)
    y = torch.ones(40 << 20, dtype=torch.uint8)
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the heap grows to hold a batch and its alignment slack, then stays
    faults_of_one_batch()
print(sum(faults_of_one_batch() for _ in range(5)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_later_batches_reuse_the_first_ones_pages():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages always on: the kernel faults 2 MB pages, plain or kept alike")
    pages = 5 * (136 << 20) // 4096  # five batches' bytes, in pages
    assert faults("plain") > pages // 2  # glibc's default: fresh pages from the kernel every time
    # kept: the freed blocks are reused (glibc may still fault one block in afresh now and then: 0 or
    # 10,240 of the 174,080 pages here)
    assert faults("kept") < pages // 4
