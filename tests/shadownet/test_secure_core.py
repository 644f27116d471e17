"""shadownet.secure_core: the inference under way takes the secure world's core, one at a time."""

import os
import threading

import pytest

from shadownet.secure_core import on_secure_core

CPUS = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="moving a thread needs two CPUs")


def test_the_thread_moves_and_comes_back():
    core = max(CPUS)
    with on_secure_core(core):
        assert os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == CPUS
    with pytest.raises(RuntimeError), on_secure_core(core):
        raise RuntimeError("an inference failed")
    assert os.sched_getaffinity(0) == CPUS  # and after a failure too


def test_only_one_inference_at_a_time_moves():
    core = min(CPUS)
    inside, release = threading.Event(), threading.Event()
    seen: list[set[int]] = []

    def first() -> None:
        with on_secure_core(core):
            seen.append(os.sched_getaffinity(0))
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(10)
        with on_secure_core(core):  # a concurrent caller stays where it was
            assert os.sched_getaffinity(0) == CPUS
    finally:
        release.set()
        thread.join()
    assert seen == [{core}]
    with on_secure_core(core):  # the first one is done: the next caller moves again
        assert os.sched_getaffinity(0) == {core}


def test_a_thread_kept_off_the_core_stays_off():
    core = min(CPUS)
    os.sched_setaffinity(0, CPUS - {core})
    try:
        with on_secure_core(core):
            assert os.sched_getaffinity(0) == CPUS - {core}
    finally:
        os.sched_setaffinity(0, CPUS)
