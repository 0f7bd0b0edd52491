"""keep_freed_memory: a freed batch's memory is reused by the next one, not faulted in afresh."""
import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys, torch
from atlas.util.device import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def faults_of_one_batch():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, above glibc's largest mmap threshold
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for _ in range(3):  # the heap grows to hold a batch and its alignment slack, then stays
    faults_of_one_batch()
print(faults_of_one_batch())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_second_batch_reuses_the_first_ones_pages():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    pages = (64 << 20) // 4096
    assert faults("plain") > pages // 2  # glibc's default: fresh pages from the kernel every time
    assert faults("kept") < pages // 20  # kept: the freed block is reused
