"""The process transport's isolation and failure modes: crash, hang, parent death, exit, noise. (A start that
fails and resources that run out: ``test_launch_faults.py``; requests interrupted on their way:
``test_interrupted_requests.py``.)"""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from tee_sim import (
    TEE_ERROR_COMMUNICATION,
    TEE_ERROR_TARGET_DEAD,
    TEEC_ORIGIN_COMMS,
    Context,
    MemRef,
    TEEError,
    TempMemRef,
    Value,
    transport,
)
from tee_sim.registry import TEST_TA_UUID
from tee_sim.secure_os import NO_PARAMS
from tee_sim.testing_ta import Cmd

# Generous bounds: these check "an error, not a hang", not speed.
SLACK = 15.0


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is dead for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] == "Z"


def _wait_gone(pid: int, limit: float = SLACK) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return False


def test_secure_world_is_a_separate_interpreter(process_context):
    pid = process_context.secure_world_pid
    assert pid and pid != os.getpid()
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[1:4] == [b"-P", b"-m", b"tee_sim.secure_world"]  # -P: its code never from the caller's cwd
    assert os.getpgid(pid) == pid != os.getpgid(0)  # a terminal's Ctrl-C does not reach it


def test_crash_gives_comms_error_and_context_recovers(tmp_path):
    with Context("process", home=tmp_path, timeout=30.0) as ctx:
        session = ctx.open_session(TEST_TA_UUID)
        shm = ctx.register_shared_memory(4096)
        old_pid = ctx.secure_world_pid
        os.kill(old_pid, signal.SIGKILL)
        assert _wait_gone(old_pid)
        start = time.monotonic()
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.SLEEP, [Value(0)])
        assert time.monotonic() - start < SLACK
        assert (err.value.code, err.value.origin) == (TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS)
        # The old session stays dead; a new one gets a new secure world, and old shared memory works.
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.NOTHING)
        assert err.value.code == TEE_ERROR_TARGET_DEAD
        with ctx.open_session(TEST_TA_UUID) as fresh:
            assert ctx.secure_world_pid != old_pid
            shm.ndarray(np.float32)[:] = 2
            fresh.invoke_command(Cmd.SCALE, [Value(5), MemRef(shm, 0, 4096, "inout")])
            assert shm.ndarray(np.float32)[0] == 10
        session.close()


def test_crash_while_waiting_inside_a_call(tmp_path):
    with Context("process", home=tmp_path, timeout=60.0) as ctx:
        session = ctx.open_session(TEST_TA_UUID)
        pid = ctx.secure_world_pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.SLEEP, [Value(0)])  # sleeps forever; the kill ends it
        assert time.monotonic() - start < SLACK  # the hang-up is noticed, not the 60 s timeout
        assert (err.value.code, err.value.origin) == (TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS)
        with ctx.open_session(TEST_TA_UUID) as fresh:
            assert fresh.invoke_command(Cmd.ADD, [Value(2, 2), Value(direction="out")])[1].a == 4


def test_hang_gives_comms_error_within_timeout(tmp_path):
    with Context("process", home=tmp_path, timeout=1.0) as ctx:
        session = ctx.open_session(TEST_TA_UUID)
        pid = ctx.secure_world_pid
        start = time.monotonic()
        with pytest.raises(TEEError) as err:
            session.invoke_command(Cmd.SLEEP, [Value(0)])
        assert time.monotonic() - start < 1.0 + SLACK
        assert (err.value.code, err.value.origin) == (TEE_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS)
        assert _wait_gone(pid)  # the hung secure world was stopped, not left behind
        with ctx.open_session(TEST_TA_UUID) as fresh:
            out = fresh.invoke_command(Cmd.ECHO, [TempMemRef(b"alive"), TempMemRef(size=8, direction="out")])
            assert out[1].data == b"alive"
        # A per-call timeout longer than the context's lets a slow command finish.
        with ctx.open_session(TEST_TA_UUID) as slow:
            slow.invoke_command(Cmd.SLEEP, [Value(1500)], timeout=30.0)


def test_a_world_that_computes_past_the_timeout_is_waited_for_and_one_that_only_waits_is_not(tmp_path):
    """The timeout is for a world that makes no progress: a fixed wall-clock limit killed legitimate loads
    of a large model on a busy machine (a helper's probe: ResNet-404's took 5.5 s beside 12 busy processes
    and was stopped at 5). A stopped world is still declared hung within the timeout."""
    with Context("process", home=tmp_path, timeout=0.5) as ctx:
        with ctx.open_session(TEST_TA_UUID) as session:
            start = time.monotonic()
            session.invoke_command(Cmd.SPIN, [Value(1500)])  # 1.5 s of CPU: three timeouts
            assert time.monotonic() - start >= 1.5
            pid = ctx.secure_world_pid
            threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP)).start()  # stopped while computing
            start = time.monotonic()
            with pytest.raises(TEEError, match="did not answer within 0.5 s, nor compute") as err:
                session.invoke_command(Cmd.SPIN, [Value(60_000)])
            assert time.monotonic() - start < 0.3 + 2 * 0.5 + SLACK
            assert (err.value.code, err.value.origin) == (TEE_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS)
            assert _wait_gone(pid)
    with Context("process", home=tmp_path, timeout=0.1) as ctx:  # computing for ever: stopped all the same
        with ctx.open_session(TEST_TA_UUID) as session:
            start = time.monotonic()
            with pytest.raises(TEEError, match=r"computed for 6 s without answering"):
                session.invoke_command(Cmd.SPIN, [Value(600_000)])
            assert 6.0 <= time.monotonic() - start < 6.0 + SLACK


def test_a_world_starved_of_cpu_is_waited_for(tmp_path, monkeypatch):
    """A world that got no clock tick of CPU time in a window (a busy machine: a 0.1 s window beside three
    busy processes) but is running or waiting for a CPU is not hung. Its CPU time is held still here, as
    such a window reads: the spin is waited for; stopped, it is declared hung all the same."""
    real = transport.ProcessTransport._cpu_state
    monkeypatch.setattr(transport.ProcessTransport, "_cpu_state", lambda self: (0.0, real(self)[1]))
    with Context("process", home=tmp_path, timeout=0.1) as ctx:
        with ctx.open_session(TEST_TA_UUID) as session:
            session.invoke_command(Cmd.SPIN, [Value(1000)])  # 10 windows with no CPU time seen
            pid = ctx.secure_world_pid
            threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP)).start()
            with pytest.raises(TEEError, match="did not answer within 0.1 s, nor compute"):
                session.invoke_command(Cmd.SPIN, [Value(60_000)])
            assert _wait_gone(pid)


def _run_script(body: str, home, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, SHADOWNET_HOME=str(home))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_secure_world_exits_when_its_parent_dies(tmp_path):
    # No `if __name__ == "__main__"` guard: the secure world is a fresh interpreter, not a re-import.
    result = _run_script(
        """
        import os, signal
        from tee_sim import default_context
        from tee_sim.registry import TEST_TA_UUID
        ctx = default_context()
        ctx.open_session(TEST_TA_UUID)
        print(ctx.secure_world_pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
        tmp_path,
    )
    pid = int(result.stdout.split()[0])
    assert _wait_gone(pid)


def test_sessions_closed_at_exit_and_noise_stays_off_the_terminal(tmp_path):
    result = _run_script(
        """
        from tee_sim import default_context, TEEError
        from tee_sim.registry import OTHER_TEST_TA_UUID, TEST_TA_UUID
        from tee_sim.testing_ta import Cmd
        session = default_context().open_session(TEST_TA_UUID)
        session.invoke_command(Cmd.MARK_ON_CLOSE)
        try:  # another TA: a panic kills every session of the TA that panicked
            default_context().open_session(OTHER_TEST_TA_UUID).invoke_command(Cmd.PANIC)
        except TEEError as e:
            print(e.code)
        print(default_context().secure_world_pid)
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the TA's traceback went to the secure world's log
    pid = int(result.stdout.split()[-1])
    assert _wait_gone(pid)
    log = (tmp_path / "logs" / "secure_world.log").read_text()
    assert "RuntimeError: test panic" in log
    with Context("inprocess", home=tmp_path) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        out = s.invoke_command(
            Cmd.OBJECT_READ, [TempMemRef(b"closed-marker"), TempMemRef(size=16, direction="out")]
        )
        assert out[1].data == b"closed"


def test_forked_child_never_uses_the_parents_channel(tmp_path):
    result = _run_script(
        """
        import os, sys
        from tee_sim import Context, TEEError, TEE_ERROR_TARGET_DEAD, Value
        from tee_sim.registry import TEST_TA_UUID
        from tee_sim.testing_ta import Cmd
        ctx = Context("process")
        session = ctx.open_session(TEST_TA_UUID)
        parent_world = ctx.secure_world_pid
        t = ctx._transport
        channel = [t.sock.fileno(), t.req_efd, t.resp_efd]
        pid = os.fork()
        if pid == 0:
            for fd in channel:  # the child's copies closed (they leaked, holding the parent's socket open)
                try:
                    os.fstat(fd)
                    os._exit(4)
                except OSError:
                    pass
            try:
                session.invoke_command(Cmd.NOTHING)
                os._exit(1)
            except TEEError as e:
                if e.code != TEE_ERROR_TARGET_DEAD:
                    os._exit(2)
            with ctx.open_session(TEST_TA_UUID) as own:
                ok = own.invoke_command(Cmd.ADD, [Value(1, 2), Value(direction="out")])[1].a == 3
                ok = ok and ctx.secure_world_pid != parent_world
            ctx.close()  # shuts down the child's own secure world only
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
        print(session.invoke_command(Cmd.ADD, [Value(20, 22), Value(direction="out")])[1].a)
        print(ctx.secure_world_pid == parent_world)
    """,
        tmp_path,
    )
    assert result.stdout.split() == ["0", "42", "True"], result.stderr


def test_forked_child_has_a_bounce_buffer_of_its_own(tmp_path):
    """A child that goes on with its parent's context gets a bounce buffer of its own: the parent's is a memfd
    both processes map shared, from which the parent's secure world reads the parent's temporary memrefs.
    Kept in the child, each process's echoes came back with the other's bytes (thousands in a second)."""
    result = _run_script(
        """
        import os, time
        from tee_sim import Context, TempMemRef
        from tee_sim.registry import TEST_TA_UUID
        from tee_sim.testing_ta import Cmd

        def wrong_echoes(session, data):
            wrong, end = 0, time.monotonic() + 1.0
            while time.monotonic() < end:
                out = session.invoke_command(Cmd.ECHO, [TempMemRef(data), TempMemRef(size=len(data),
                                                                                     direction="out")])
                wrong += out[1].data != data
            return wrong

        ctx = Context("process")
        session = ctx.open_session(TEST_TA_UUID)
        session.invoke_command(Cmd.ECHO, [TempMemRef(b"A"), TempMemRef(size=1, direction="out")])
        parents = ctx._marshalling.bounce
        pid = os.fork()
        if pid == 0:
            with ctx.open_session(TEST_TA_UUID) as own:
                wrong = wrong_echoes(own, b"B" * 4000)
                mine = ctx._marshalling.bounce is not parents
            ctx.close()
            os._exit(0 if wrong == 0 and mine else 3)
        wrong = wrong_echoes(session, b"A" * 4000)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), wrong)
        ctx.close()
    """,
        tmp_path,
    )
    assert result.stdout.split() == ["0", "0"], result.stdout + result.stderr


def test_forked_child_cannot_hand_the_parents_shared_memory_to_its_secure_world(tmp_path):
    """Memory the parent registered is the parent's in a forked child too (the same memfd, mapped shared): a
    MemRef of it is refused there, rather than registered with the child's secure world, whose TA then wrote
    into the parent's live buffer."""
    result = _run_script(
        """
        import os
        import numpy as np
        from tee_sim import Context, MemRef, TEEError, Value
        from tee_sim.registry import TEST_TA_UUID
        from tee_sim.testing_ta import Cmd
        ctx = Context("process")
        session = ctx.open_session(TEST_TA_UUID)
        shm = ctx.register_shared_memory(4096)
        view = shm.ndarray(np.uint8, 4096)
        view[:] = 0xAA
        pid = os.fork()
        if pid == 0:
            code = 0
            with ctx.open_session(TEST_TA_UUID) as own:
                try:
                    own.invoke_command(Cmd.FILL, [Value(0xBB), MemRef(shm, 0, 4096, "out")])
                    code = 3
                except TEEError as e:
                    code = 0 if "parent" in e.message else 4
                with ctx.register_shared_memory(4096) as mine:  # its own memory works
                    own.invoke_command(Cmd.FILL, [Value(0xCC), MemRef(mine, 0, 4096, "out")])
                    code = code or (0 if mine.ndarray(np.uint8, 1)[0] == 0xCC else 5)
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        session.invoke_command(Cmd.FILL, [Value(0xDD), MemRef(shm, 0, 8, "out")])  # the parent's still works
        print(os.waitstatus_to_exitcode(status), hex(view[0]), hex(view[8]))
        ctx.close()
    """,
        tmp_path,
    )
    assert result.stdout.split() == ["0", "0xdd", "0xaa"], result.stdout + result.stderr


def test_secure_world_refuses_a_regular_file_as_shared_memory(tmp_path):
    """A hostile normal world passing another file (here: one it owns) gets it refused: only memfds."""
    import socket

    from tee_sim import TEE_ERROR_BAD_PARAMETERS
    from tee_sim import channel as ch

    path = tmp_path / "not-shared-memory"
    path.write_bytes(b"\0" * 4096)
    with Context("process", home=tmp_path / "home") as ctx:
        transport = ctx._transport
        with open(path, "r+b") as f:
            socket.send_fds(transport.sock, [ch.REGISTER_MESSAGE.pack(99, 4096)], [f.fileno()])
        wire = ((0, 99, 4096, 0, 0, 0),) + NO_PARAMS[1:]
        outcome = transport._roundtrip(ch.OP_REGISTER, 0, 0, wire, 10.0)
        assert outcome.code == TEE_ERROR_BAD_PARAMETERS
        with ctx.open_session(TEST_TA_UUID) as s:  # still serving
            assert s.invoke_command(Cmd.ADD, [Value(1, 1), Value(direction="out")])[1].a == 2


def test_exit_while_a_daemon_thread_waits_for_the_secure_world(tmp_path):
    # At interpreter exit the context's finalizer shuts the secure world down while daemon threads still
    # run (a model's background refill): it must not put its request on the wire beside theirs.
    result = _run_script(
        """
        import threading, time
        from tee_sim import default_context, TEEError, TEE_ERROR_TARGET_DEAD, Value
        from tee_sim.registry import TEST_TA_UUID
        from tee_sim.testing_ta import Cmd
        session = default_context().open_session(TEST_TA_UUID)
        started = threading.Event()

        def worker():
            started.set()
            try:
                while True:
                    session.invoke_command(Cmd.SLEEP, [Value(300)])
            except TEEError as e:  # the finalizer's shutdown came first
                assert e.code == TEE_ERROR_TARGET_DEAD, e

        threading.Thread(target=worker, daemon=True).start()
        started.wait()
        time.sleep(0.05)  # the worker is in the secure world now
        print(default_context().secure_world_pid)
    """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert _wait_gone(int(result.stdout.split()[-1]))


def test_forked_while_another_thread_waits_for_the_secure_world(tmp_path):
    # The other thread holds the context's lock while its request is on the wire: in the child, where that
    # thread does not exist, the context still opens sessions (on a secure world of its own).
    result = _run_script(
        """
        import os, threading, time
        from tee_sim import default_context, Value
        from tee_sim.registry import TEST_TA_UUID
        from tee_sim.testing_ta import Cmd
        ctx = default_context()
        session = ctx.open_session(TEST_TA_UUID)
        busy = threading.Thread(target=session.invoke_command, args=(Cmd.SLEEP, [Value(1000)]))
        busy.start()
        time.sleep(0.1)  # the request is in the secure world, the lock held
        pid = os.fork()
        if pid == 0:
            with ctx.open_session(TEST_TA_UUID) as own:
                ok = own.invoke_command(Cmd.ADD, [Value(1, 2), Value(direction="out")])[1].a == 3
            with default_context().open_session(TEST_TA_UUID) as other:
                ok = ok and other.invoke_command(Cmd.ADD, [Value(2, 2), Value(direction="out")])[1].a == 4
            ctx.close()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        busy.join()
        print(os.waitstatus_to_exitcode(status))
    """,
        tmp_path,
        timeout=30.0,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0"]


def test_a_context_dropped_without_close_stops_its_secure_world_at_once(tmp_path):
    """No cycle through the marshalling keeps a dropped context alive till a garbage collection (its
    finalizer stops the secure world; a review found the refactor's strong reference delaying it)."""
    import gc

    gc.disable()
    try:
        ctx = Context("process", home=tmp_path, timeout=30.0)
        with ctx.open_session(TEST_TA_UUID):
            pid = ctx.secure_world_pid
        del ctx
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        else:
            pytest.fail("the secure world of a dropped context still runs")
    finally:
        gc.enable()


def test_ctrl_c_while_the_secure_world_is_closed_at_exit_prints_no_traceback(tmp_path):
    """Ctrl-C right after a command's last line lands in the close of its secure world at interpreter exit:
    Python printed "Exception ignored in atexit callback" and a KeyboardInterrupt's traceback (a helper's
    probe, 11 of 12 tries on convert). At exit it is swallowed, the world left to its parent-death signal;
    a close the program asks for is still interrupted."""
    script = textwrap.dedent(f"""
        import tee_sim
        from tee_sim import client
        from tee_sim.transport import ProcessTransport

        ctx = tee_sim.Context("process", home={str(tmp_path)!r}, timeout=30.0)
        real = ProcessTransport.close

        def interrupted(self):  # as Ctrl-C in the close's wait for the world to stop
            real(self)
            raise KeyboardInterrupt

        ProcessTransport.close = interrupted
        other = tee_sim.Context("process", home={str(tmp_path)!r}, timeout=30.0)
        try:
            client._close_transport(other._transport, other._lock)
        except KeyboardInterrupt:
            print("interrupted")
        print("done")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["interrupted", "done"]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
