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


def test_every_signal_held_is_handled_and_the_last_exception_raised():
    """Two signals held in one section, each handler raising as the CLI's do: only the first one's ran
    (the CLI said 'interrupted', not 'terminated'; an app's SIGTERM shutdown never ran: a review). Each runs,
    and the last one's exception is raised, the first's as its context, as Python would have."""
    seen = []

    def cli_style(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, cli_style) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(KeyboardInterrupt), uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGINT, signal.SIGTERM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def shutdown(signum, frame):  # an app's: its Ctrl-C cancels a request, its SIGTERM exits
        raise SystemExit(143)

    previous = signal.signal(signal.SIGTERM, shutdown)
    try:
        with pytest.raises(SystemExit) as caught, uninterrupted():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        assert caught.value.code == 143 and isinstance(caught.value.__context__, KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_that_cuts_the_restore_leaves_its_handlers_working(monkeypatch):
    """A Ctrl-C right after SIGINT's handler was put back raised before SIGTERM's was: the section's own
    handler stayed, and every later SIGTERM was swallowed (a review). It hands them on now."""
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    real_signal = signal.signal

    def put_back(sig, handler):
        old = real_signal(sig, handler)
        if sig == signal.SIGINT and handler is signal.default_int_handler and not seen:
            os.kill(os.getpid(), signal.SIGINT)  # raised at the next instruction: the restore is cut
        return old

    previous = real_signal(signal.SIGTERM, mine)
    try:
        monkeypatch.setattr(signal, "signal", put_back)
        with pytest.raises(KeyboardInterrupt), uninterrupted():
            pass
        monkeypatch.undo()
        os.kill(os.getpid(), signal.SIGTERM)  # the section's handler, if left, hands it to the app's
        assert seen == [signal.SIGTERM]
    finally:
        real_signal(signal.SIGTERM, previous)


def test_a_handler_the_block_sets_is_kept():
    """An app's SIG_IGN set inside a section was overwritten with the handler saved at its start (a
    review)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with uninterrupted():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the app's choice, inside the section
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
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
