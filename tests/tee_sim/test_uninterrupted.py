"""``tee_sim.uninterrupted``: SIGINT and SIGTERM held back for a block, handled as it ends."""

import os
import signal
import threading

import pytest

from tee_sim.uninterrupted import uninterrupted


def test_a_ctrl_c_in_the_block_is_raised_as_it_ends():
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")  # Python would have raised before this line
            os.kill(os.getpid(), signal.SIGINT)  # twice: raised once
            steps.append("the block's end")
    assert steps == ["after the signal", "the block's end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_apps_own_handler_runs_after_the_block_and_is_put_back():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is mine
        with pytest.raises(ZeroDivisionError), uninterrupted():  # an error in the block: handlers put back
            raise ZeroDivisionError
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_it_changes_nothing():
    errors = []

    def other():
        try:
            with uninterrupted():
                errors.append(signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        except BaseException as exc:  # noqa: BLE001 - signal.signal outside the main thread raises
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert errors == [True]


def test_shared_memory_whose_registration_is_interrupted_leaves_no_descriptor(tmp_path, monkeypatch):
    """Interrupted (or refused) in its registration with the secure world, new shared memory kept its
    descriptor and mapping for the life of the process: 65-115 MiB after 150 interrupted loads (a helper's
    probe)."""
    from tee_sim import Context

    with Context("process", home=tmp_path, timeout=30.0) as ctx:
        ctx.register_shared_memory(4096).release()  # the transport's own descriptors, opened once
        before = sorted(os.listdir("/proc/self/fd"))

        def interrupted(shm):
            raise KeyboardInterrupt

        monkeypatch.setattr(ctx, "_register", interrupted)
        for _ in range(5):
            with pytest.raises(KeyboardInterrupt):
                ctx.register_shared_memory(1 << 20)
        assert sorted(os.listdir("/proc/self/fd")) == before
