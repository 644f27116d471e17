"""Starting the secure world's process for ``tee_sim.transport.ProcessTransport``: its control channel (a
socket pair, the shared control block, two eventfds), its log file, and the wait for its "ready".

``launch`` either returns a ``Launched`` world that said it is ready or raises, having closed every
descriptor it made and stopped a world it had started.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, NamedTuple

from tee_sim import channel as ch
from tee_sim.errors import TEE_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS, TEEError
from tee_sim.identity import private_dir

LOG_FILE = "secure_world.log"
LOG_MAX = 4 << 20
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)


class Launched(NamedTuple):
    """A started secure world: its process, the normal world's end of the control socket, the control
    block and the request and response eventfds."""

    proc: subprocess.Popen
    sock: socket.socket
    block: mmap.mmap
    req_efd: int
    resp_efd: int


def log_path(home: Path) -> Path:
    """Where a secure world under ``home`` writes its stderr (TA panics, tracebacks)."""
    return home / "logs" / LOG_FILE


def _open_log(home: Path) -> int:
    """The log, opened for appending; one over ``LOG_MAX`` is first renamed to ``LOG_FILE.1``. Secure worlds
    of several processes start at once on one home: the rename is done under an exclusive ``flock`` of the
    big file and only while the log's name still is that file, so a second world neither renames the first
    one's fresh log over the rotated one (the old log was lost) nor fails its rename (it logged to
    /dev/null)."""
    # Non-blocking: a FIFO in its place (with no reader, opening it for writing blocked every command that
    # starts a secure world, for ever: a helper's probe) fails to open, or is refused below
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        logs = private_dir(home / "logs")
        path = logs / LOG_FILE
        fd = os.open(path, flags, 0o600)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            if os.fstat(fd).st_size > LOG_MAX:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
                except OSError:  # a file system without locks (a review): the name check alone, as before
                    pass
                held = os.fstat(fd)
                try:
                    named = os.stat(path)
                except FileNotFoundError:
                    named = None
                if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                    os.replace(path, logs / (LOG_FILE + ".1"))
                big, fd = fd, -1
                os.close(big)
                fd = os.open(path, flags, 0o600)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        return fd
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def launch(home: Path, memory_cap: int, spin_us: float, hard_spin_us: float,
           startup_timeout: float) -> Launched:
    """A secure world (``python -m tee_sim.secure_world``) under ``home``, once it said it is ready (a
    fresh interpreter importing numpy and cryptography takes a while: up to ``startup_timeout`` s)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # A TEE runs on one core. Idle OpenBLAS/OpenMP worker threads spin and, on a 2-core device,
    # steal the core the accelerator needs (measured: ResNet-44 protected 21.6 ms -> 55 ms).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    # One clean-up for every way the start can fail: out of file descriptors part-way (a process at its
    # limit: the error says what failed; a double close of the log had it say "Bad file descriptor"), out
    # of memory, a world that does not say it is ready, or a Ctrl-C - in the wait for the world's hello or
    # between two statements (a window of a few statements once left the world running and three
    # descriptors open). The world is stopped and every descriptor made is closed; what is left is the
    # instant between a call's return and its result's assignment (a descriptor, or the world, which then
    # dies when its socket closes or its parent does) and a second Ctrl-C during the clean-up.
    made: list[Any] = []  # this world's ends of the channel
    spare: list[Any] = []  # the secure world's ends and its log: closed once it has them
    proc: subprocess.Popen | None = None
    try:
        sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        made.append(sock)
        spare.append(child_sock)
        block_fd = os.memfd_create("tee_sim-control", os.MFD_CLOEXEC)
        spare.append(block_fd)  # the mapping below holds its own
        os.ftruncate(block_fd, ch.BLOCK_SIZE)
        req_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        made.append(req_efd)
        resp_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        made.append(resp_efd)
        log = _open_log(home)
        spare.append(log)
        config = {
            "ctrl": child_sock.fileno(),
            "block": block_fd,
            "req": req_efd,
            "resp": resp_efd,
            "home": str(home),
            "memory_cap": memory_cap,
            "spin_us": spin_us,
            "hard_spin_us": hard_spin_us,
            "parent": os.getpid(),
            "pdeathsig": threading.current_thread() is threading.main_thread(),
        }
        try:
            # -P: the caller's working directory is not put first on the secure world's sys.path. A source
            # checkout there (the README's main command runs in one) would shadow the installed package,
            # which has the built kernels; and no directory of the normal world's choosing should supply
            # the secure world's code.
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "tee_sim.secure_world", json.dumps(config)],
                pass_fds=(child_sock.fileno(), block_fd, req_efd, resp_efd),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                close_fds=True,
                # Its own process group: Ctrl-C in a terminal reaches the foreground group only, so it
                # cannot kill the secure world in its imports, before it ignores SIGINT (the normal world
                # decides when it stops).
                process_group=0,
            )
            block = mmap.mmap(block_fd, ch.BLOCK_SIZE)
            made.append(block)
        finally:
            _close_each(spare)
        waiter = select.poll()
        waiter.register(sock.fileno(), select.POLLIN)
        if not (waiter.poll(startup_timeout * 1000) and _hello(sock)):
            raise TEEError(TEE_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS,
                           f"the secure world did not start; see {log_path(home)}")
    except BaseException as exc:
        _close_each(spare)  # what an interrupt in the closes above left open
        if proc is not None:
            _stop(proc)
        raise _start_failed(exc, made) from None
    return Launched(proc, sock, block, req_efd, resp_efd)


def _hello(sock: socket.socket) -> bool:
    try:
        return bool(json.loads(sock.recv(4096)).get("ready"))
    except (OSError, ValueError, AttributeError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Kill and reap a world that will not be used."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _close(made: list[Any]) -> None:
    for item in made:
        if isinstance(item, int):
            os.close(item)
        else:
            item.close()


def _close_each(items: list[Any]) -> None:
    """Close ``items``, each taken out of the list before it is closed: an interrupt leaves the ones not
    reached in it (and may leak the one it hit; never closes one twice: its number may be another's)."""
    while items:
        _close([items.pop()])


def _start_failed(exc: BaseException, made: list[Any]) -> BaseException:
    """What a failed start raises, once the sockets and descriptors it ``made`` are closed: an OSError (out
    of descriptors or memory) as the start's TEE_ERROR_COMMUNICATION, anything else (an interrupt) as it
    is."""
    _close(made)
    if not isinstance(exc, OSError):
        return exc
    return TEEError(TEE_ERROR_COMMUNICATION, TEEC_ORIGIN_COMMS, f"cannot start the secure world: {exc}")
