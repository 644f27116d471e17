"""shadownet.secure_core: an inference under way alone takes the secure world's core; concurrent ones float,
the secure world with them."""

import os
import threading

import pytest

from shadownet.secure_core import on_secure_core

CPUS = os.sched_getaffinity(0)
pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="moving a thread needs two CPUs")


class SecureWorld:
    """Stands for tee_sim's Context: records where the secure world was asked to run."""

    def __init__(self):
        self.pinned: list[bool] = []

    def pin_secure_world(self, pinned: bool) -> None:
        self.pinned.append(pinned)


def test_the_thread_moves_and_comes_back():
    core, world = max(CPUS), SecureWorld()
    with on_secure_core(core, world):
        assert os.sched_getaffinity(0) == {core}
    assert os.sched_getaffinity(0) == CPUS and world.pinned == [True]
    with pytest.raises(RuntimeError), on_secure_core(core, world):
        raise RuntimeError("an inference failed")
    assert os.sched_getaffinity(0) == CPUS  # and after a failure too


def test_a_second_inference_sends_the_first_and_the_secure_world_back():
    core, world = min(CPUS), SecureWorld()
    inside, release = threading.Event(), threading.Event()
    first_thread: list[int] = []

    def first() -> None:
        with on_secure_core(core, world):
            first_thread.append(threading.get_native_id())
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert inside.wait(10)
        assert os.sched_getaffinity(first_thread[0]) == {core} and world.pinned == [True]
        with on_secure_core(core, world):  # a concurrent caller stays where it is, the first one moves back
            assert os.sched_getaffinity(0) == CPUS
            assert os.sched_getaffinity(first_thread[0]) == CPUS
            assert world.pinned == [True, False]
    finally:
        release.set()
        thread.join()
    with on_secure_core(core, world):  # alone again: the next caller and the secure world move back
        assert os.sched_getaffinity(0) == {core} and world.pinned == [True, False, True]


def test_a_thread_kept_off_the_core_stays_off():
    core, world = min(CPUS), SecureWorld()
    os.sched_setaffinity(0, CPUS - {core})
    try:
        with on_secure_core(core, world):
            assert os.sched_getaffinity(0) == CPUS - {core}
    finally:
        os.sched_setaffinity(0, CPUS)
