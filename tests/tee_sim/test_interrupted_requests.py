"""Requests interrupted (Ctrl-C, SIGTERM) at every point of their way to the secure world and back: the
answer is waited for before the next request is written over it, a world that computes on is not, and what
the interrupted call left in the secure world (sessions, registrations) is closed or released by the next
one. (The transport's other failures: ``test_faults.py``.)"""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tee_sim import (
    Context,
    MemRef,
    TempMemRef,
    Value,
)
from tee_sim.registry import TEST_TA_UUID
from tee_sim.secure_os import NO_PARAMS
from tee_sim.testing_ta import Cmd

# Generous bounds: these check "an error, not a hang", not speed.
SLACK = 15.0


@contextlib.contextmanager
def _ctrl_c_after(seconds: float) -> Iterator[None]:
    """A Ctrl-C (SIGINT to this process) ``seconds`` into the body, which must raise KeyboardInterrupt:
    under Python's own handler for the while, however the tests were started (a shell starts a background
    job with SIGINT ignored, and Python then keeps it so: these tests timed out instead)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _ctrl_c_while_stopped(pid: int) -> Iterator[None]:
    """The body, with the secure world (``pid``) stopped - asleep or descheduled in life - and a Ctrl-C
    0.2 s into it, which the body must raise; the world resumes 0.3 s later, while the next request
    waits."""
    os.kill(pid, signal.SIGSTOP)
    try:
        with _ctrl_c_after(0.2):
            yield
    finally:
        threading.Timer(0.3, os.kill, (pid, signal.SIGCONT)).start()


def _interrupt_once(monkeypatch, owner, name: str, after_the_call: bool = False) -> None:
    """``owner.name`` raises KeyboardInterrupt at its next call (after making it, with ``after_the_call``),
    and is itself again from then on."""
    original = getattr(owner, name)

    def interrupted(*args):
        monkeypatch.setattr(owner, name, original)
        if after_the_call:
            original(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


def test_an_interrupted_request_is_not_waited_for_while_the_world_computes_on(tmp_path):
    """No one reads an interrupted call's answer: its clean-up (close, the next call) waits one timeout, not
    the patience a caller gets for its own answer - Ctrl-C and SIGTERM waited 60 timeouts for a world that
    computed on (a review: close() took 30 s at a timeout of 0.5)."""
    with Context("process", home=tmp_path, timeout=0.5) as ctx:
        session = ctx.open_session(TEST_TA_UUID)

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                session.invoke_command(Cmd.SPIN, [Value(600_000)])  # computes for ten minutes
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        start = time.monotonic()
        ctx.close()
        assert time.monotonic() - start < 0.5 + SLACK / 3


def test_a_request_interrupted_before_it_was_read_is_answered_before_the_next(tmp_path):
    """A Ctrl-C while the secure world has not read a request yet (here: stopped; asleep or descheduled
    in life): the next request waits for that one's answer instead of being written over it - which had
    the secure world read the next one in its place, under the old number (the first lost, the second
    run twice)."""
    with Context("process", home=tmp_path / "device") as ctx, ctx.open_session(TEST_TA_UUID) as s:
        before = ctx.memory_stats()["used"]
        with _ctrl_c_while_stopped(ctx.secure_world_pid):
            s.invoke_command(Cmd.ALLOC, [Value(1 << 16, 1), Value(direction="out")])
        out = s.invoke_command(Cmd.ADD, [Value(40, 2), Value(direction="out")])
        assert out[1].a == 42
        assert 1 << 16 <= ctx.memory_stats()["used"] - before < 2 << 16  # ALLOC ran, once


def test_a_request_interrupted_while_it_kicks_the_sleeping_secure_world_is_answered(tmp_path, monkeypatch):
    """The interrupt lands after the request is announced but before the sleeping secure world is kicked:
    still the next request waits for its answer (the world wakes on its own within a second) instead of
    being written over it (ALLOC lost, as a review reproduced)."""
    from tee_sim import channel

    with Context("process", home=tmp_path / "device") as ctx, ctx.open_session(TEST_TA_UUID) as s:
        before = ctx.memory_stats()["used"]
        transport = ctx._transport
        deadline = time.monotonic() + SLACK
        while not transport.words[channel.SW_SLEEPING]:  # past its spin, asleep on its eventfd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        _interrupt_once(monkeypatch, os, "eventfd_write")
        with pytest.raises(KeyboardInterrupt):
            s.invoke_command(Cmd.ALLOC, [Value(1 << 16, 1), Value(direction="out")])
        out = s.invoke_command(Cmd.ADD, [Value(40, 2), Value(direction="out")])
        assert out[1].a == 42
        assert 1 << 16 <= ctx.memory_stats()["used"] - before < 2 << 16  # ALLOC ran, once


def test_an_interrupted_request_is_answered_before_the_next_ones_parameters_are_written(tmp_path):
    """The next request's temporary buffers share memory with the interrupted one's: written before that
    one ran, they were overwritten by its outputs (an ECHO returned the previous FILL's bytes)."""
    with Context("process", home=tmp_path / "device") as ctx, ctx.open_session(TEST_TA_UUID) as s:
        s.invoke_command(Cmd.ECHO, [TempMemRef(b"x" * 64), TempMemRef(size=64, direction="out")])
        with _ctrl_c_while_stopped(ctx.secure_world_pid):
            s.invoke_command(Cmd.FILL, [Value(0xAA, 0), TempMemRef(size=64, direction="out")])
        out = TempMemRef(size=64, direction="out")
        s.invoke_command(Cmd.ECHO, [TempMemRef(b"\x01" * 64), out])
        assert bytes(out.data) == b"\x01" * 64


@pytest.mark.parametrize("reaped", [True, False])
def test_an_interrupted_request_of_a_world_that_died_is_not_waited_for(tmp_path, reaped, monkeypatch):
    """Interrupted, then the secure world died: the next call starts a new world and is answered (it
    waited for the dead world's answer in the new one until the timeout, failed, and stopped it; and with
    the death not yet seen, the OpenSession failed instead of starting a new world)."""
    with Context("process", home=tmp_path / "device", timeout=5.0) as ctx:
        s = ctx.open_session(TEST_TA_UUID)
        pid = ctx.secure_world_pid
        os.kill(pid, signal.SIGSTOP)
        with _ctrl_c_after(0.2):
            s.invoke_command(Cmd.ADD, [Value(1, 2), Value(direction="out")])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + SLACK
        proc = ctx._transport.proc
        while reaped and proc.poll() is None:  # the next call sees the death first
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if not reaped:  # the next call sees it only when settling the interrupted request
            monkeypatch.setattr(proc, "poll", lambda: None)
        with ctx.open_session(TEST_TA_UUID) as fresh:  # a new world, not waited on for the old answer
            out = fresh.invoke_command(Cmd.ADD, [Value(40, 2), Value(direction="out")])
        assert out[1].a == 42 and ctx.secure_world_pid != pid


def test_a_release_interrupted_before_its_request_went_out_is_sent_again(tmp_path, monkeypatch):
    """The secure world's side of shared memory whose release never reached it (a KeyboardInterrupt
    before the request went out) goes with the next registration, not at the context's close."""
    with Context("inprocess", home=tmp_path / "device") as ctx:
        registered = ctx._transport._os._shm
        shm = ctx.register_shared_memory(1 << 16)
        _interrupt_once(monkeypatch, ctx._transport, "release_shm")
        with pytest.raises(KeyboardInterrupt):
            shm.release()
        assert shm.released and shm._id in registered
        other = ctx.register_shared_memory(1 << 16)
        assert shm._id not in registered and other._id in registered


def test_a_session_opened_by_an_interrupted_open_is_closed_by_the_next_one(tmp_path):
    """A Ctrl-C while the secure world has an OpenSession in hand: it opens the session all the same (with
    the ShadowNet TA, megabytes of secure memory). Its id was in the answer nobody read; the next OpenSession
    closes it first, instead of it staying open until the context closes."""
    with Context("process", home=tmp_path / "device") as ctx:
        with _ctrl_c_while_stopped(ctx.secure_world_pid):
            ctx.open_session(TEST_TA_UUID)
        with ctx.open_session(TEST_TA_UUID) as fresh:
            orphan = fresh._id - 1  # the secure OS numbers sessions in order, from 1
            assert orphan == 1  # the interrupted OpenSession opened one
            assert ctx._transport.invoke(orphan, Cmd.NOTHING, NO_PARAMS, SLACK).code != 0  # closed
            assert ctx._transport.invoke(fresh._id, Cmd.NOTHING, NO_PARAMS, SLACK).code == 0
            assert fresh.invoke_command(Cmd.ADD, [Value(40, 2), Value(direction="out")])[1].a == 42


def test_a_registration_interrupted_after_the_secure_world_had_it_is_released(tmp_path, monkeypatch):
    """Interrupted once the secure world had mapped the memory (its answer lost): the mapping goes with the
    next registration, not at the context's close."""
    with Context("inprocess", home=tmp_path / "device") as ctx:
        registered = ctx._transport._os._shm
        _interrupt_once(monkeypatch, ctx._transport, "register_shm", after_the_call=True)
        before = set(registered)
        with pytest.raises(KeyboardInterrupt):
            ctx.register_shared_memory(1 << 16)
        (lost,) = set(registered) - before
        other = ctx.register_shared_memory(1 << 16)
        assert lost not in registered and other._id in registered


def test_a_registration_interrupted_between_its_two_messages_leaves_the_next_ones_working(tmp_path,
                                                                                       monkeypatch):
    """Interrupted after its memory's descriptor went over the socket, before its request: the secure world
    skips that message at the next registration, which it read instead of its own before (every later
    registration refused until the secure world restarted)."""
    with Context("process", home=tmp_path / "device") as ctx, ctx.open_session(TEST_TA_UUID) as s:
        _interrupt_once(monkeypatch, ctx._transport, "_roundtrip")  # after the descriptor went
        with pytest.raises(KeyboardInterrupt):
            ctx.register_shared_memory(1 << 12)
        for _ in range(2):
            with ctx.register_shared_memory(1 << 12) as shm:
                shm.buffer[:3] = b"abc"
                out = TempMemRef(size=3, direction="out")
                s.invoke_command(Cmd.ECHO, [MemRef(shm, 0, 3, "in"), out])
                assert bytes(out.data) == b"abc"


def test_a_session_opened_but_interrupted_before_it_was_returned_is_closed_by_the_next_open(tmp_path,
                                                                                         monkeypatch):
    """Interrupted after the secure world answered the OpenSession (here in tidying the bounce buffer): the
    session is neither returned nor kept open till the context closes; the next OpenSession closes it."""
    with Context("inprocess", home=tmp_path / "device") as ctx:
        opened = ctx._transport._os._sessions
        _interrupt_once(monkeypatch, ctx._marshalling, "trim_bounce")
        with pytest.raises(KeyboardInterrupt):
            ctx.open_session(TEST_TA_UUID)
        (lost,) = opened
        with ctx.open_session(TEST_TA_UUID) as fresh:
            assert set(opened) == {fresh._id} and lost != fresh._id


def test_a_re_registration_after_a_restart_skips_a_newer_stale_message(tmp_path, monkeypatch):
    """After a restart, memory registered before it is registered again under its old, lower id: a newer
    id's message left by an interrupted registration is skipped too (it was read in its place: refused)."""
    with Context("process", home=tmp_path / "device") as ctx:
        with ctx.open_session(TEST_TA_UUID) as s:  # the bounce buffer, registered in the first world
            s.invoke_command(Cmd.ECHO, [TempMemRef(b"abc"), TempMemRef(size=3, direction="out")])
        proc = ctx._transport.proc
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SLACK)
        ctx._transport.ensure_running()  # the second world
        _interrupt_once(monkeypatch, ctx._transport, "_roundtrip")  # after the descriptor went
        with pytest.raises(KeyboardInterrupt):
            ctx.register_shared_memory(1 << 12)
        with ctx.open_session(TEST_TA_UUID) as s:
            out = TempMemRef(size=3, direction="out")
            s.invoke_command(Cmd.ECHO, [TempMemRef(b"xyz"), out])  # the bounce buffer registered again
            assert bytes(out.data) == b"xyz"
