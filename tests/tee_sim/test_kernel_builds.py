"""The TA kernels' builds (``setup.py``: baseline, AVX2, AVX-512 on x86-64): the loader takes the best one
this CPU runs, as the CPU's own flags say."""

import platform
from pathlib import Path

import pytest

from tee_sim import ta_shadownet_kernels as kernels

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(platform.machine() != "x86_64" or not CPUINFO.exists(), reason="x86-64 Linux builds")
def test_the_loaded_build_is_the_best_the_cpu_runs():
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    expected = "baseline"
    if {"avx2", "fma"} <= flags:
        expected = "avx2"
        if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
            expected = "avx512"
    builds = kernels.runnable()
    assert list(builds) == ["baseline", "avx2", "avx512"][:len(builds)]  # every build the CPU runs, in order
    assert kernels.VARIANT == expected == list(builds)[-1]
