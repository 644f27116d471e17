"""Faults: the secure world killed or hung in the middle of an inference (a TEECommunicationError within the
bounded time, then the model reopens its session and the next inference is right), interrupted closes
and loads. (Forks: ``test_fork.py``; a conversion killed while it writes:
``tests/converters/test_output_directory.py``.)"""

import contextlib
import gc
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shadownet
import tee_sim
from converters.fidelity import relative_error
from shadownet.accelerator import AcceleratorWrapper
from shadownet.exceptions import TEECommunicationError
from shadownet.soak import open_fds
from tests.shadownet.hardening import protect_small

TOLERANCE = 1e-3
pytestmark = pytest.mark.filterwarnings("ignore:converting with seed")
HANG_TIMEOUT = 2.0  # the context's per-call timeout during the hang tests
SLACK = 20.0  # generous: "an error, not a hang", on a busy machine


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return protect_small(tmp_path_factory.mktemp("small"), which=1)


@pytest.fixture
def context():
    context = tee_sim.default_context()
    if context.secure_world_pid is None:
        pytest.skip("the secure world runs in this process (inprocess transport)")
    return context


class Saboteur(AcceleratorWrapper):
    """Runs ``action`` once, just before the accelerator's round ``at`` (the TEE is between two steps)."""

    def __init__(self, inner):
        super().__init__(inner)
        self.action = None
        self.at = 1

    def run_round(self, r: int) -> None:
        if self.action is not None and r == self.at:
            action, self.action = self.action, None
            action()
        super().run_round(r)


def _load_with_saboteur(out):
    saboteurs = []

    def wrap(inner):
        saboteurs.append(Saboteur(inner))
        return saboteurs[-1]

    return shadownet.load(out, accelerator=wrap), saboteurs


def _wait_gone(pid: int) -> None:
    end = time.monotonic() + SLACK
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still runs")


def test_secure_world_killed_between_steps(small, context):
    x = small.input()
    want = small.reference(x)
    with shadownet.load(small.out):
        pass  # warm-up: the context's reusable buffers exist before the descriptor count
    before = open_fds()
    model, (saboteur,) = _load_with_saboteur(small.out)
    with model:
        assert relative_error(model(x), want) <= TOLERANCE
        for r in range(1, model.num_rounds + 1):
            pid = context.secure_world_pid

            def kill(pid=pid):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)

            saboteur.action, saboteur.at = kill, r
            start = time.monotonic()
            with pytest.raises(TEECommunicationError):
                model(x)
            assert time.monotonic() - start < SLACK
            # The next call opens a session in a new secure world, loads the model again, and is right.
            assert relative_error(model(x), want) <= TOLERANCE
            assert context.secure_world_pid != pid
    assert open_fds()["memfds"] == before["memfds"]


def test_refill_and_stats_recover_from_a_lost_secure_world_as_inference_does(small, context):
    """A secure world killed between inferences: the next call outside inference - refill_masks() or
    stats() - fails once; then refill_masks() works on a new secure world, and stats() answers without the
    secure world's figures until an inference opens a new session (a probe's health check that only called
    them failed for ever: they kept the dead session)."""
    x = small.input()
    with shadownet.load(small.out, background_refill=False) as model:
        assert relative_error(model(x), small.reference(x)) <= TOLERANCE
        pid = context.secure_world_pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        with pytest.raises(TEECommunicationError, match=r"died \(killed by signal 9\)"):  # not "status None"
            model.refill_masks()
        assert model.refill_masks() > 0 and context.secure_world_pid != pid
        pid = context.secure_world_pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        with pytest.raises(TEECommunicationError):
            model.stats()
        assert "model_secure_memory" not in model.stats()
        assert relative_error(model(x), small.reference(x)) <= TOLERANCE
        assert model.stats()["model_secure_memory"] > 0 and context.secure_world_pid != pid


def test_a_model_collected_during_a_tee_call_is_closed_after_it(small, context, monkeypatch):
    """The cyclic GC can run a dropped model's finalizer while this thread waits for the secure world's
    answer to another model's call: its close used to send a request on that very channel, the call never
    saw its answer and the secure world was stopped after the 5 s timeout (a probe's). The GC is made to
    run there; the call is answered, and the dropped model is closed right after it."""
    from tee_sim import transport

    x = small.input()
    want = small.reference(x)
    with shadownet.load(small.out) as model:
        model(x)
        before = model.stats()["secure_memory_used"]
        dropped = shadownet.load(small.out, background_refill=False)
        dropped.cycle = dropped  # garbage only the cyclic collector frees
        del dropped
        real, fired = transport.ch.spin_while, []

        def spin_after_collecting(*args):
            if not fired:
                fired.append(gc.collect())
            return real(*args)

        monkeypatch.setattr(transport.ch, "spin_while", spin_after_collecting)
        start = time.monotonic()
        assert relative_error(model(x), want) <= TOLERANCE  # a hang: the call fails after HANG_TIMEOUT
        assert fired and time.monotonic() - start < SLACK  # (2.7 s of collecting on a busy machine: not one)
        monkeypatch.setattr(transport.ch, "spin_while", real)
        end = time.monotonic() + SLACK
        while model.stats()["secure_memory_used"] > before and time.monotonic() < end:
            time.sleep(0.01)
        assert model.stats()["secure_memory_used"] <= before  # the dropped model's memory is back
        assert relative_error(model(x), want) <= TOLERANCE


def test_secure_world_killed_at_random_moments(small, context):
    """Kills that land anywhere: inside a TEE step, in the transport, while the accelerator runs."""
    x = small.input(1)
    want = small.reference(x)
    rng = random.Random(0)
    with shadownet.load(small.out) as model:
        model(x)
        for _ in range(4):
            pid = context.secure_world_pid
            timer = threading.Timer(rng.uniform(0.0, 0.05), os.kill, (pid, signal.SIGKILL))
            timer.start()
            failed = False
            for _ in range(100_000):
                try:
                    got = model(x)
                except TEECommunicationError:
                    failed = True
                    break
                assert relative_error(got, want) <= TOLERANCE  # every answer before the kill is right
                if not timer.is_alive() and context.secure_world_pid != pid:
                    break  # the kill hit between calls and a call already restarted the world
            timer.join()
            assert failed or context.secure_world_pid != pid
            assert relative_error(model(x), want) <= TOLERANCE


@pytest.fixture
def short_timeout(context):
    saved = context.timeout
    context.timeout = HANG_TIMEOUT
    yield context
    context.timeout = saved


def test_secure_world_hung_mid_inference(small, short_timeout):
    context = short_timeout
    x = small.input(2)
    want = small.reference(x)
    model, (saboteur,) = _load_with_saboteur(small.out)
    with model:
        model(x)
        pid = context.secure_world_pid
        saboteur.action = lambda: os.kill(pid, signal.SIGSTOP)  # frozen: it never answers the next step
        start = time.monotonic()
        with pytest.raises(TEECommunicationError, match="did not answer"):
            model(x)
        assert HANG_TIMEOUT <= time.monotonic() - start < HANG_TIMEOUT + SLACK
        _wait_gone(pid)  # the transport killed the hung world
        assert relative_error(model(x), want) <= TOLERANCE


@pytest.mark.parametrize("background_refill", [False, True])
def test_secure_world_hung_inside_a_step(small, short_timeout, background_refill):
    """A world stopped while it runs a step (a timer, not between steps): the same bounded error. With the
    background refill on, the stop may land in one of its calls instead: it times out there, the hung
    world is replaced, and the caller's inferences go on, right, after a bounded stall."""
    context = short_timeout
    x = small.input(3)
    want = small.reference(x)
    with shadownet.load(small.out, background_refill=background_refill) as model:
        model(x)
        pid = context.secure_world_pid
        timer = threading.Timer(0.01, os.kill, (pid, signal.SIGSTOP))
        timer.start()
        start, raised = time.monotonic(), False
        while time.monotonic() - start < HANG_TIMEOUT + SLACK:
            try:
                got = model(x)
            except TEECommunicationError:
                raised = True
                break
            assert relative_error(got, want) <= TOLERANCE
            if not timer.is_alive() and context.secure_world_pid != pid:
                break  # a background refill's call met the hang and the world was replaced
        assert time.monotonic() - start < HANG_TIMEOUT + SLACK
        assert raised if not background_refill else raised or context.secure_world_pid != pid
        timer.join()
        _wait_gone(pid)
        assert relative_error(model(x), want) <= TOLERANCE


@contextlib.contextmanager
def _idle_models_after_a_kill(small, context, count: int):
    """``count`` models of ``small`` that each ran once, idle while their secure world was killed: (models,
    pid of the killed secure world); closed after."""
    x = small.input()
    models = [shadownet.load(small.out, background_refill=False) for _ in range(count)]
    try:
        for model in models:
            model(x)
        pid = context.secure_world_pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        yield models, pid
    finally:
        for model in models:
            model.close()


def test_models_idle_when_the_secure_world_died_open_sessions_of_their_own(small, context):
    """The secure world killed while three models sat idle: each model's next call failed once, the first
    finding it dead, the others with "session lost ... open a new session" (an instruction no app could act
    on: a helper's probe). Nothing of an inference has run when its step 0 finds the secure world gone:
    each call now opens a session of its own and runs (a kill during an inference still fails it, above)."""
    x = small.input()
    want = small.reference(x)
    with _idle_models_after_a_kill(small, context, 3) as (models, pid):
        for model in models:
            assert relative_error(model(x), want) <= TOLERANCE
        assert context.secure_world_pid != pid


def test_an_interrupted_close_or_load_leaves_nothing_behind(small, monkeypatch):
    """A Ctrl-C in close() while a hung secure world was waited for left the accelerator open and the shared
    memory registered, and a second close() did nothing; collected, the accelerator freed tensors whose
    pages were still the shared memory's (two reads of one file then hashed differently: a helper's probe).
    A Ctrl-C in load() while untrusted.tflite was copied into shared memory left that registered for the
    process's life. Each step now runs whatever interrupts the one before."""
    from shadownet import runtime

    x = small.input()
    model = shadownet.load(small.out, background_refill=False)
    model(x)
    context, accelerator = model._buffers.context, model.accelerator
    registered = set(context._shms)
    real_drop = runtime.ProtectedModel._drop_session

    def interrupted(self):
        real_drop(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime.ProtectedModel, "_drop_session", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.close()
    monkeypatch.setattr(runtime.ProtectedModel, "_drop_session", real_drop)
    assert model.closed and accelerator.interpreter is None and model._buffers._shm is None
    assert not set(context._shms) & registered  # the model's memory unregistered

    before = set(context._shms)
    real_ndarray = tee_sim.SharedMemory.ndarray
    size = (small.out / "untrusted.tflite").stat().st_size

    def copy_interrupted(self, dtype, shape=None, offset=0):
        if np.dtype(dtype) == np.uint8 and shape == (size,):
            raise KeyboardInterrupt  # as the copy of untrusted.tflite starts
        return real_ndarray(self, dtype, shape, offset)

    monkeypatch.setattr(tee_sim.SharedMemory, "ndarray", copy_interrupted)
    with pytest.raises(KeyboardInterrupt):
        shadownet.load(small.out, background_refill=False)
    monkeypatch.setattr(tee_sim.SharedMemory, "ndarray", real_ndarray)
    assert set(context._shms) == before

    # A Ctrl-C while the new session's steps are prepared: the session, not yet the model's, is closed (a
    # review: it stayed open, with its secure memory, for the context's life).
    sessions = set(context._sessions)
    real_prepare, prepared = tee_sim.Session.prepare_command, []

    def prepare_interrupted(self, *args, **kw):
        prepared.append(1)
        if len(prepared) == 2:
            raise KeyboardInterrupt
        return real_prepare(self, *args, **kw)

    monkeypatch.setattr(tee_sim.Session, "prepare_command", prepare_interrupted)
    with pytest.raises(KeyboardInterrupt):
        shadownet.load(small.out, background_refill=False)
    monkeypatch.setattr(tee_sim.Session, "prepare_command", real_prepare)
    assert set(context._sessions) == sessions and set(context._shms) == before

    # A load that fails after its accelerator was made closes it (a review: the accelerator, made inside
    # the session's opening, was left to the garbage collector, and a user's wrapper never closed).
    from shadownet.accelerator import AcceleratorWrapper
    from shadownet.exceptions import SecureMemoryError
    from shadownet.shared_buffers import SharedBuffers

    closed = []

    class Closing(AcceleratorWrapper):
        def close(self):
            closed.append(True)
            super().close()

    def no_memory(self, session):
        raise SecureMemoryError("no secure memory left")

    monkeypatch.setattr(SharedBuffers, "bind", no_memory)
    with pytest.raises(SecureMemoryError):
        shadownet.load(small.out, background_refill=False, accelerator=Closing)
    assert closed == [True] and set(context._sessions) == sessions and set(context._shms) == before
    # So is the default accelerator when the user's accelerator= fails on it.
    from shadownet.accelerator import LiteRTAccelerator

    real_close = LiteRTAccelerator.close
    monkeypatch.setattr(LiteRTAccelerator, "close", lambda self: (closed.append("base"), real_close(self)))

    def failing(inner):
        raise RuntimeError("no such device")

    with pytest.raises(RuntimeError, match="no such device"):
        shadownet.load(small.out, background_refill=False, accelerator=failing)
    assert closed[-1] == "base" and set(context._sessions) == sessions


def test_a_secure_world_that_cannot_start_is_a_shadownet_error(small):
    """A secure core the process may not use: load() raised tee_sim's raw TEEError, which an app's
    ``except ShadowNetError`` missed (a helper's probe)."""
    script = textwrap.dedent(f"""
        import shadownet
        from shadownet.exceptions import ShadowNetError
        try:
            shadownet.load({str(small.out)!r})
        except ShadowNetError as exc:
            print("ShadowNetError", str(exc).startswith("loading "))
        except Exception as exc:
            print(type(exc).__name__)
    """)
    env = {**os.environ, "TEE_SIM_SECURE_CORE": "99", "SHADOWNET_TEE_TRANSPORT": "process"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.stdout.split() == ["ShadowNetError", "True"], result.stderr


def test_a_secure_world_lost_while_the_moved_rounds_are_bound_loses_one_call(small, monkeypatch):
    """The thread-choice trial moves rounds between interpreters, and the buffers are then placed and bound
    again: a secure world lost right there left the accelerator without a plan, and every later call an
    IndexError (a probe). Now the next call opens a session that registers and binds them."""
    from shadownet.shared_buffers import SharedBuffers

    x = small.input()
    want = small.reference(x)
    with shadownet.load(small.out, num_threads=2, background_refill=False) as model:
        model(x)
        accelerator = model.accelerator
        if not accelerator.tunable:
            pytest.skip("the accelerator runs every round on one interpreter here")

        class Moving:  # a trial whose phase ends now: the rounds move to one thread
            done = True

            def record(self, seconds):
                accelerator.use([1] * len(accelerator.rounds))
                return True

        real = SharedBuffers.register

        def lost(self, context, acc):
            monkeypatch.setattr(SharedBuffers, "register", real)
            raise tee_sim.TEEError(tee_sim.TEE_ERROR_COMMUNICATION, tee_sim.TEEC_ORIGIN_COMMS,
                                   "the secure world died")

        model._trial = Moving()
        monkeypatch.setattr(SharedBuffers, "register", lost)
        assert relative_error(model(x), want) <= TOLERANCE  # this inference was done before the move
        assert model._trial is None
        for _ in range(3):
            assert relative_error(model(x), want) <= TOLERANCE


def test_models_used_at_once_after_the_secure_world_died_lose_no_call(small, context):
    """Idle models, the secure world killed, then all used from threads at once: every model's first call
    failed (all but one with 'session lost ... open a new session', though nothing had been sent: a probe).
    A call whose step 0 finds the secure world gone runs again on a new session."""
    x = small.input()
    want = small.reference(x)
    with _idle_models_after_a_kill(small, context, 4) as (models, pid):
        outcomes: list = []
        start = threading.Barrier(len(models))

        def call(model):
            start.wait()
            try:
                outcomes.append(relative_error(model(x), want))
            except TEECommunicationError as exc:
                outcomes.append(exc)

        threads = [threading.Thread(target=call, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [o for o in outcomes if isinstance(o, Exception)]
        assert not failed and context.secure_world_pid != pid, failed
        assert all(o <= TOLERANCE for o in outcomes if not isinstance(o, Exception))
        assert all(relative_error(m(x), want) <= TOLERANCE for m in models)


def test_a_model_whose_empty_pool_must_fail_reports_the_lost_secure_world(small, context):
    """on_exhausted="fail": a run again on a new session would meet its empty pool, and the crash would read
    as MaskPoolExhaustedError (a review); such a model's call that finds the secure world gone fails as
    the lost secure world it is, and the model refills and runs after."""
    x = small.input()
    want = small.reference(x)
    with shadownet.load(small.out, on_exhausted="fail", background_refill=False) as model:
        model.refill_masks()
        model(x)
        pid = context.secure_world_pid
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
        with pytest.raises(TEECommunicationError, match="died"):
            model(x)
        model.refill_masks()
        assert relative_error(model(x), want) <= TOLERANCE
