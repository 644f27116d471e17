"""The process transport when the machine says no: a secure world whose start fails or is interrupted
(``tee_sim/secure_world_launch.py``), file descriptors or memory that run out, a bounce buffer that cannot
grow. Each says so, stops what it started and leaks nothing."""

import os
import subprocess

import pytest

from tee_sim import TEE_ERROR_COMMUNICATION, Context, TEEError, TempMemRef
from tee_sim.registry import TEST_TA_UUID
from tee_sim.testing_ta import Cmd


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fails", ["eventfd", "Popen"])
def test_out_of_file_descriptors_at_start_says_so_and_leaks_none(tmp_path, monkeypatch, fails):
    """A process at its descriptor limit: the start fails with what failed (the log closed twice made it
    "Bad file descriptor", a probe at ``ulimit -n 12``) and closes every descriptor it made."""
    import errno

    import tee_sim.transport as transport

    real = {"eventfd": os.eventfd, "Popen": subprocess.Popen}[fails]
    calls = []

    def out_of_fds(*args, **kwargs):
        calls.append(1)
        if fails == "Popen" or len(calls) == 2:  # the second eventfd: some made, some not
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*args, **kwargs)

    monkeypatch.setattr(transport.os if fails == "eventfd" else transport.subprocess, fails, out_of_fds)
    before = _open_fds()
    with pytest.raises(TEEError) as caught:
        Context("process", home=tmp_path, timeout=30.0)
    assert caught.value.code == TEE_ERROR_COMMUNICATION
    assert "cannot start the secure world: [Errno 24] Too many open files" in str(caught.value)
    assert _open_fds() <= before


def test_shared_memory_that_cannot_be_made_is_the_clients_out_of_memory(tmp_path, monkeypatch):
    import errno

    import tee_sim
    import tee_sim.transport as transport

    def out_of_fds(*args):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    with Context("process", home=tmp_path, timeout=30.0) as ctx:
        monkeypatch.setattr(transport.os, "memfd_create", out_of_fds)
        with pytest.raises(TEEError) as caught:
            ctx.register_shared_memory(4096)
    assert caught.value.code == tee_sim.TEE_ERROR_OUT_OF_MEMORY
    assert caught.value.origin == tee_sim.TEEC_ORIGIN_API
    assert "cannot allocate 4096 bytes of shared memory: Too many open files" in str(caught.value)


def test_a_failed_start_after_the_world_was_started_stops_it_and_leaks_nothing(tmp_path, monkeypatch):
    """Out of memory mapping the control block, after the secure world was started: it is stopped, every
    descriptor closed, and the error is the start's (it was a bare OSError, three descriptors and a running
    world left behind: a review's)."""
    import errno

    import tee_sim.transport as transport

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(transport.subprocess, "Popen", popen)
    monkeypatch.setattr(transport.mmap, "mmap", no_memory)
    before = _open_fds()
    with pytest.raises(TEEError) as caught:
        Context("process", home=tmp_path, timeout=30.0)
    assert "cannot start the secure world: [Errno 12] Cannot allocate memory" in str(caught.value)
    assert started and started[0].poll() is not None
    assert _open_fds() <= before


def test_an_interrupted_start_stops_the_started_world_and_leaks_nothing(tmp_path, monkeypatch):
    """Ctrl-C while the started secure world is waited for (up to a minute): the world is stopped and every
    descriptor closed (moved into secure_world_launch, the start lost them and left the world running: a
    review's)."""
    import tee_sim.secure_world_launch as launch

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(sock):
        raise KeyboardInterrupt

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch, "_hello", interrupted)
    before = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        Context("process", home=tmp_path, timeout=30.0)
    assert started and started[0].poll() is not None
    assert _open_fds() <= before


def test_an_interrupt_between_the_start_and_the_wait_stops_the_world(tmp_path, monkeypatch):
    """Ctrl-C in the statements between the world's start and the wait for it (here: closing the world's
    end of the control socket) left the control block's and the eventfds' descriptors open, and the world
    running until the socket was collected: one clean-up now covers those statements too."""
    import socket

    import tee_sim.secure_world_launch as launch

    started = []
    real_popen, real_socketpair = subprocess.Popen, socket.socketpair

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    class InterruptedClose(socket.socket):
        def close(self):
            super().close()
            raise KeyboardInterrupt

    def socketpair(*args):
        mine, worlds = real_socketpair(*args)
        return mine, InterruptedClose(worlds.family, worlds.type, fileno=worlds.detach())

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch.socket, "socketpair", socketpair)
    before = _open_fds()
    with pytest.raises(KeyboardInterrupt):
        Context("process", home=tmp_path, timeout=30.0)
    assert started and started[0].wait(timeout=10) is not None
    assert _open_fds() <= before


def test_a_bounce_buffer_that_cannot_grow_leaves_the_context_usable(tmp_path, monkeypatch):
    """Growing the bounce buffer for a large temporary memref fails (out of descriptors): the call fails,
    and the next ones, which fit, work (the released buffer was kept and failed them all: a review's)."""
    import errno

    import tee_sim.transport as transport

    with Context("process", home=tmp_path, timeout=30.0) as ctx, ctx.open_session(TEST_TA_UUID) as s:
        small = TempMemRef(size=5, direction="out")
        s.invoke_command(Cmd.ECHO, [TempMemRef(b"small"), small])
        real = transport.os.memfd_create

        def out_of_fds(*args):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        monkeypatch.setattr(transport.os, "memfd_create", out_of_fds)
        with pytest.raises(TEEError, match="Too many open files"):
            big = 1 << 20
            s.invoke_command(Cmd.ECHO, [TempMemRef(b"x" * big), TempMemRef(size=big, direction="out")])
        monkeypatch.setattr(transport.os, "memfd_create", real)
        out = TempMemRef(size=5, direction="out")
        s.invoke_command(Cmd.ECHO, [TempMemRef(b"again"), out])
        assert out.data == b"again"


def test_log_rotated_by_two_worlds_at_once_keeps_the_old_log_and_both_logs(tmp_path, monkeypatch):
    """Two secure worlds start on one home whose log is over LOG_MAX: the second rotates it between the
    first's size check and its rename (a helper's probe: 4 processes at once, 14/200 runs had a world log to
    /dev/null, 2/200 lost the old log, renamed over by a fresh one). The old log stays in ``.1`` and both
    worlds write to the current log."""
    import sys
    import textwrap

    from tee_sim import secure_world_launch as launch

    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    (logs / launch.LOG_FILE).write_bytes(b"OLD LOG\n" + b"x" * (launch.LOG_MAX + 1))
    other = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from tee_sim.secure_world_launch import _open_log
        fd = _open_log(Path({str(tmp_path)!r}))
        os.write(fd, b"world B\\n")
        print(os.readlink(f"/proc/self/fd/{{fd}}"))
    """)
    real_replace, started = os.replace, []

    def second_world_meanwhile(src, dst, *args, **kwargs):
        if not started:  # the first rotation: let another world start now, and rotate first if it can
            started.append(subprocess.Popen([sys.executable, "-c", other], stdout=subprocess.PIPE, text=True))
            try:
                started[0].wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # it waits for this rotation: fine
                pass
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", second_world_meanwhile)
    fd = launch._open_log(tmp_path)
    try:
        os.write(fd, b"world A\n")
        assert os.readlink(f"/proc/self/fd/{fd}") == str(logs / launch.LOG_FILE)
    finally:
        os.close(fd)
    out, _ = started[0].communicate(timeout=30)
    assert started[0].returncode == 0
    assert out.strip() == str(logs / launch.LOG_FILE)  # not /dev/null, not the rotated file
    assert (logs / (launch.LOG_FILE + ".1")).read_bytes().startswith(b"OLD LOG\n")
    current = (logs / launch.LOG_FILE).read_bytes()
    assert b"world A" in current and b"world B" in current


def test_log_is_rotated_on_a_file_system_without_locks(tmp_path, monkeypatch):
    """flock failing (ENOSYS on Lustre without -o flock, ENOLCK on NFS without lockd) sent every secure
    world's log to /dev/null once it passed LOG_MAX (a review): it is rotated all the same."""
    import errno

    from tee_sim import secure_world_launch as launch

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(launch.fcntl, "flock", no_locks)
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    (logs / launch.LOG_FILE).write_bytes(b"OLD LOG\n" + b"x" * (launch.LOG_MAX + 1))
    fd = launch._open_log(tmp_path)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == str(logs / launch.LOG_FILE)
    finally:
        os.close(fd)
    assert (logs / (launch.LOG_FILE + ".1")).read_bytes().startswith(b"OLD LOG\n")


@pytest.mark.parametrize("reader", [False, True])
def test_a_log_that_is_not_a_file_is_not_written_and_does_not_block(tmp_path, reader):
    """A FIFO in the log's place blocked every command that starts a secure world, for ever, in the open
    for writing (a helper's probe); with a reader it took the world's output. The world logs nowhere then."""
    from tee_sim import secure_world_launch as launch

    logs = tmp_path / "logs"
    logs.mkdir(mode=0o700)
    os.mkfifo(logs / launch.LOG_FILE)
    held = os.open(logs / launch.LOG_FILE, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        fd = launch._open_log(tmp_path)
        try:
            assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
        finally:
            os.close(fd)
    finally:
        if held is not None:
            os.close(held)


def test_no_home_directory_at_all_says_to_set_shadownet_home(monkeypatch):
    """$HOME unset and a user without a passwd entry (a container's arbitrary uid): Path.home() raised
    RuntimeError, and every command was an internal error, exit 3 (a helper's probe)."""
    from pathlib import Path

    from tee_sim.identity import resolve_home

    def no_home(cls=None):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("SHADOWNET_HOME", raising=False)
    monkeypatch.setattr(Path, "home", classmethod(no_home))
    with pytest.raises(ValueError, match=r"no home directory .*: set SHADOWNET_HOME"):
        resolve_home()
    monkeypatch.setenv("SHADOWNET_HOME", "/somewhere")
    assert resolve_home() == Path("/somewhere")
