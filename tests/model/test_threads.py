"""`release_cpu_threads`: the calling thread's idle OpenMP workers end, and torch's kernels still run after it."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import os, torch
from storygpt.model.device import release_cpu_threads
torch.set_num_threads(2)
x = torch.arange(1 << 22, dtype=torch.float64)
assert x.sum().item() == (1 << 22) * ((1 << 22) - 1) / 2  # a parallel kernel: the main thread's team starts
before = len(os.listdir("/proc/self/task"))
released = release_cpu_threads()
after = len(os.listdir("/proc/self/task"))
assert x.sum().item() == (1 << 22) * ((1 << 22) - 1) / 2  # and kernels still run (a new team)
print(released, before, after)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc (Linux)")
def test_release_cpu_threads_ends_the_idle_workers():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    released, before, after = out.stdout.split()
    assert released == "True"  # torch's OpenMP (GNU, here) has omp_pause_resource_all
    assert int(after) < int(before), (before, after)  # the main thread's worker thread has ended
