"""The transport behind a ``Context``: the secure OS in a process of its own (``ProcessTransport``; the
other, in this process, is ``tee_sim.transport_inprocess``'s).

Each takes parameters in wire form and returns the secure OS's ``Outcome``; failures of the channel
itself (the secure world died, hung, or would not start) raise ``TEEError(..., TEEC_ORIGIN_COMMS)``.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from tee_sim import channel as ch
from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_COMMUNICATION,
    TEE_ERROR_TARGET_DEAD,
    TEEC_ORIGIN_API,
    TEEC_ORIGIN_COMMS,
    TEEError,
)
from tee_sim.identity import resolve_home
from tee_sim.secure_os import NO_PARAMS, Outcome, WireParam
from tee_sim.secure_world_launch import launch, log_path

# A prepared invoke's answer: code, TA time in ns, secure memory (used, peak, cap), the Outcome of a failure.
Answer = tuple[int, int, tuple[int, int, int], Outcome | None]
Prepared = Callable[[float], Answer]  # called with the timeout

# A world that answers nothing for ``timeout`` seconds is hung unless it computed meanwhile: CPU time of at
# least PROGRESS of the window (a stopped or deadlocked world has none), or it is running or waiting for a
# CPU as the window ends (``_cpu_state``). A fixed wall-clock limit failed
# legitimate loads on a busy machine (a helper's probe: ResNet-404's LOAD_MODEL took 0.5 s idle, 5.5 s beside
# 12 busy processes, and was killed at 5). One that computes is waited for up to BUSY_LIMIT timeouts.
PROGRESS, BUSY_LIMIT = 0.01, 60


def resolve_secure_core(secure_core: int | str | None) -> int | None:
    """The CPU the secure world is pinned to (process transport), or None to leave it to the scheduler.

    TrustZone runs the secure world on the core that entered it, the caller's thread stopped meanwhile;
    a simulated secure world in its own process otherwise takes whichever core the scheduler gives it,
    next to the accelerator's threads. ``"auto"`` (the default): the lowest CPU this process may use,
    when it may use more than one; an int: that CPU; ``None`` or ``"none"``: no pinning. Callers that
    alternate with the secure world (``shadownet``'s inference loop) move onto ``Context.secure_core``
    while they do, so that the accelerator's other threads keep the other cores.
    """
    if secure_core is None or secure_core == "none":
        return None
    allowed = os.sched_getaffinity(0)
    if secure_core == "auto":
        return min(allowed) if len(allowed) > 1 else None
    try:
        core = int(secure_core)
    except (TypeError, ValueError):
        raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API,
                       f"secure_core must be 'auto', 'none' or a CPU number, not {secure_core!r}") from None
    if core not in allowed:
        raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API,
                       f"secure_core {core} is not among the CPUs this process may use: {sorted(allowed)}")
    return core


class ProcessTransport:
    """The secure OS in a child interpreter (``python -m tee_sim.secure_world``), reached via shared memory.

    A request is written into the control block and announced by bumping its sequence counter; the
    caller spins on the response counter for ``caller_spin_us``, then sleeps on an eventfd until the answer,
    a hang-up of the control socket (the secure world died) or ``timeout`` seconds in which the world did
    not compute (it hung: it is killed; ``PROGRESS``, ``BUSY_LIMIT``).
    Either failure raises a ``TEEC_ORIGIN_COMMS`` error; the next OpenSession starts a new secure world.
    """

    def __init__(
        self,
        home: str | None,
        memory_cap: int,
        timeout: float,
        spin_us: float,
        caller_spin_us: float,
        hard_spin_us: float,
        secure_core: int | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.home = resolve_home(home)
        self.memory_cap, self.timeout, self.spin_us = memory_cap, timeout, spin_us
        self.startup_timeout = startup_timeout
        self.caller_spin_us, self.hard_spin_us = caller_spin_us, hard_spin_us
        self.secure_core = secure_core
        self._cpus = os.sched_getaffinity(0)
        self._pinned = False
        self.generation = 0
        self.proc: subprocess.Popen | None = None
        self._seq = 0
        self._unanswered = 0  # the request on the wire until its answer is seen (interrupted: _settle)
        self._unanswered_op = 0
        # Sessions that an interrupted OpenSession opened, its answer read only by _settle: the client closes
        # them (``Context._tidy``), else they and their secure memory stayed until the context closed.
        self.orphaned_sessions: list[int] = []
        self._start()
        _transports.add(self)

    # Life cycle.
    @property
    def log_path(self) -> Path:
        return log_path(self.home)

    def _start(self) -> None:
        world = launch(self.home, self.memory_cap, self.spin_us, self.hard_spin_us, self.startup_timeout)
        self.proc, self.sock, self.block = world.proc, world.sock, world.block
        self.words = memoryview(self.block).cast("Q")
        self.req_efd, self.resp_efd = world.req_efd, world.resp_efd
        self.poller = select.poll()
        self.poller.register(self.resp_efd, select.POLLIN)
        self.poller.register(self.sock.fileno(), 0)
        self._seq = 0
        self._unanswered = 0  # that world's requests died with it, and its sessions
        self.orphaned_sessions.clear()
        self._pinned = False
        self.generation += 1
        self.pin(True)  # every thread it has started; those to come inherit it

    @property
    def alive(self) -> bool:
        return self.proc is not None

    def pin(self, pinned: bool) -> None:
        """Every thread of the secure world on ``secure_core`` (True) or on the CPUs of this process
        (False); nothing without a secure core. A secure world that is gone is left to the next request."""
        if self.secure_core is None or self.proc is None or pinned == self._pinned:
            return
        cpus = {self.secure_core} if pinned else self._cpus
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                os.sched_setaffinity(int(tid), cpus)
        except OSError:
            return
        self._pinned = pinned

    def ensure_running(self) -> None:
        """Start a secure world if there is none, or if the last one died since we last spoke."""
        if self.proc is not None and self.proc.poll() is not None:
            self._dead()
        if self.proc is None:
            self._start()

    def _dead(self) -> None:
        """Tear down after a crash, a hang or a shutdown: kill, reap, close our ends."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None
        self._unanswered = 0  # its requests died with it
        self._close_channel()

    def _close_channel(self, quietly: bool = False) -> None:
        """Close this process's ends of the channel: the control block's mapping, the control socket, the two
        eventfds - all of them ``quietly`` (whatever fails), else up to the first that fails, which raises."""
        for close in (self.words.release, self.block.close, self.sock.close,
                      lambda: os.close(self.req_efd), lambda: os.close(self.resp_efd)):
            try:
                close()
            except (OSError, BufferError, ValueError):
                if not quietly:
                    raise

    def _forget_after_fork(self) -> None:
        """In a forked child: the secure world and its channel belong to the parent; never talk on them. This
        process's copies of the channel's descriptors and mapping are closed (the parent's stay open): kept,
        they leaked one set per fork, and the child held the parent's control socket open (a helper's
        reading). None to close when the parent's world was already gone (``_dead`` closed them)."""
        if self.proc is not None:
            self._close_channel(quietly=True)
        self.proc = None
        self._unanswered = 0
        self.orphaned_sessions = []

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            self._roundtrip(ch.OP_SHUTDOWN, 0, 0, NO_PARAMS, timeout=min(self.timeout, 5.0))
            self.proc.wait(timeout=2)
        except (TEEError, subprocess.TimeoutExpired):
            pass
        self._dead()

    # Requests.
    def _roundtrip(
        self, op: int, session: int, cmd: int, wire: tuple[WireParam, ...], timeout: float
    ) -> Outcome:
        if self.proc is None:
            raise TEEError(TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS, "the secure world is not running")
        if self._unanswered:
            self._settle(timeout)
        request = _request(op, session, cmd, wire)
        self.block[ch.REQUEST_OFFSET : ch.REQUEST_OFFSET + len(request)] = request
        self._exchange(timeout, op)
        fields = ch.RESPONSE.unpack_from(self.block, ch.RESPONSE_OFFSET)
        outcome = self._outcome(fields[:8])
        outcome.outputs = [fields[8:11], fields[11:14], fields[14:17], fields[17:20]]
        return outcome

    def _exchange(self, timeout: float, op: int) -> None:
        """Announce the request written in the block and wait until its answer is there. Until then it is
        ``_unanswered``, set before it is announced: a KeyboardInterrupt anywhere in between (the kick, the
        spin, the sleep) leaves it to ``_settle``; a secure world that dies takes it with it (``_dead``)."""
        words = self.words
        seq = self._seq + 1
        self._unanswered, self._unanswered_op = seq, op
        self._seq = seq
        words[ch.REQ_SEQ] = seq
        if words[ch.SW_SLEEPING]:
            os.eventfd_write(self.req_efd, 1)
        if words[ch.RESP_SEQ] != seq:
            # Responses come in order, so until ours arrives the counter still shows the previous one.
            window = int(self.caller_spin_us * 1000)
            ch.spin_while(words, ch.RESP_SEQ, seq - 1, min(int(self.hard_spin_us * 1000), window), window)
            if words[ch.RESP_SEQ] != seq:
                self._sleep_until(seq, timeout)
        self._unanswered = 0

    def settle(self, timeout: float | None = None) -> None:
        """Before anything is written where the secure world reads (the block, a bounce buffer's
        parameters, an open's payload): the answer to a request whose wait was interrupted (``_settle``)."""
        if self._unanswered and self.proc is not None:
            self._settle(self.timeout if timeout is None else timeout)

    def _settle(self, timeout: float) -> None:
        """Wait for the answer to a request whose wait was interrupted, before the next request is written
        over it: the secure world may not have read it yet (asleep, or descheduled), and would then have
        read the next one in its place and answered it under the old number - one request lost, or run
        twice. A request interrupted before it was announced is dropped, its number used again (only the
        normal world writes ``REQ_SEQ``). The answer is dropped too, but for the session an OpenSession
        opened (``orphaned_sessions``)."""
        seq = self._unanswered
        if self.words[ch.REQ_SEQ] != seq:
            self._seq, self._unanswered = seq - 1, 0
            return
        if self.words[ch.RESP_SEQ] != seq:  # no one waits for this answer: a world that computes on is not
            # waited for (an interrupted call's clean-up, Ctrl-C's or SIGTERM's, waited 60 timeouts: a review)
            self._sleep_until(seq, timeout, patient=False)  # interrupted again: unanswered; dead: forgotten
        if self._unanswered_op == ch.OP_OPEN:  # recorded before the request is let go (closed twice: no-op)
            code, _, session = ch.RESPONSE_HEADER.unpack_from(self.block, ch.RESPONSE_OFFSET)[:3]
            if code == 0 and session not in self.orphaned_sessions:
                self.orphaned_sessions.append(session)
        self._unanswered = 0

    def _outcome(self, header: tuple[int, ...]) -> Outcome:
        """The ``Outcome`` of a response header (``ch.RESPONSE_HEADER``), with its message."""
        code, origin, sid, msg_len, ta_ns, used, peak, cap = header
        message = ""
        if msg_len:
            message = bytes(
                self.block[ch.MESSAGE_OFFSET : ch.MESSAGE_OFFSET + min(msg_len, ch.MESSAGE_MAX)]
            ).decode("utf-8", "replace")
        outcome = Outcome(code, origin, message, session=sid, ta_time_ns=ta_ns)
        outcome.memory = (used, peak, cap)
        return outcome

    def prepare_invoke(self, session: int, cmd_id: int, wire: tuple[WireParam, ...]) -> Prepared:
        """``invoke(session, cmd_id, wire, timeout)`` for a request sent again and again (a prepared
        command: input values only, so its answer has no outputs): packed once here, then copied into the
        block per call, and only the response's header read back. The call returns ``(code,
        ta_time_ns, (used, peak, cap), outcome)``, ``outcome`` the full ``Outcome`` for a failure only.
        Against packing and unpacking every field each time: 0.7-1.4 us less per TEE entry (of 7-9 for
        a ResNet step's whole crossing; alternated on one loaded model)."""
        request = _request(ch.OP_INVOKE, session, cmd_id, wire)
        start, end = ch.REQUEST_OFFSET, ch.REQUEST_OFFSET + len(request)
        header, at = ch.RESPONSE_HEADER.unpack_from, ch.RESPONSE_OFFSET

        def invoke(timeout: float) -> Answer:
            if self.proc is None:
                raise TEEError(TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS, "the secure world is not running")
            if self._unanswered:
                self._settle(timeout)
            self.block[start:end] = request
            self._exchange(timeout, ch.OP_INVOKE)
            fields = header(self.block, at)
            if fields[0]:
                return fields[0], fields[4], fields[5:8], self._outcome(fields)
            return 0, fields[4], fields[5:8], None
        return invoke

    def _sleep_until(self, seq: int, timeout: float, patient: bool = True) -> None:
        """Until the answer numbered ``seq``: a world that neither answers nor computes for ``timeout``
        seconds - or, ``patient``, computes for BUSY_LIMIT of them; not, only answers late - is stopped."""
        words = self.words
        start = time.monotonic()
        deadline, computed = start + timeout, self._cpu_state()[0]
        words[ch.NW_SLEEPING] = 1
        try:
            wait_ms = 1  # see SecureWorld.wait_request: the first short wait covers a lost kick
            while words[ch.RESP_SEQ] != seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    now, runnable = self._cpu_state()
                    busy = runnable or (now is not None and computed is not None
                                        and now - computed >= PROGRESS * timeout)
                    if busy and patient and time.monotonic() - start < BUSY_LIMIT * timeout:
                        deadline, computed = time.monotonic() + timeout, now  # slow, not hung: wait on
                        continue
                    if words[ch.RESP_SEQ] == seq:  # answered as the deadline passed
                        break
                    self._dead()
                    raise TEEError(
                        TEE_ERROR_COMMUNICATION,
                        TEEC_ORIGIN_COMMS,
                        f"the secure world computed for {BUSY_LIMIT * timeout:g} s without answering and was "
                        "stopped" if busy and patient else
                        f"the secure world did not answer an interrupted request within {timeout:g} s and "
                        "was stopped" if busy else
                        f"the secure world did not answer within {timeout:g} s, nor compute, and was stopped",
                    )
                for fd, _ in self.poller.poll(min(wait_ms, remaining * 1000)):
                    if fd == self.resp_efd:
                        try:
                            os.eventfd_read(self.resp_efd)
                        except BlockingIOError:
                            pass
                    elif words[ch.RESP_SEQ] != seq:  # control socket hung up: the secure world is gone
                        how = self._exit_status()
                        self._dead()
                        raise TEEError(
                            TEE_ERROR_TARGET_DEAD,
                            TEEC_ORIGIN_COMMS,
                            f"the secure world died ({how}); see {self.log_path}",
                        )
                wait_ms = 1000
        finally:
            if self.proc is not None:
                words[ch.NW_SLEEPING] = 0

    def _cpu_state(self) -> tuple[float | None, bool]:
        """The secure world's CPU time so far (Linux's /proc; None where it cannot be read), and whether its
        main thread is running or waiting for a CPU (state R): a world a busy machine starves of CPU for a
        whole window is not hung (the CPU time counts in clock ticks, 10 ms, and a 0.1 s window beside three
        busy processes saw none: a timing test's failure). A stopped world is T, one that waits for
        something that never comes S."""
        try:
            with open(f"/proc/{self.proc.pid}/stat", "rb") as f:  # type: ignore[union-attr]
                fields = f.read().rsplit(b")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), fields[0] == b"R"
        except (OSError, AttributeError, IndexError, ValueError):
            return None, False

    def _exit_status(self) -> str:
        """How the secure world's process ended, reaped (its socket hangs up a moment before it exits)."""
        try:
            status = self.proc.wait(timeout=1.0) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            status = None
        if status is None:
            return "still exiting"
        return f"killed by signal {-status}" if status < 0 else f"exit status {status}"

    def open_session(self, ta_uuid: uuid.UUID, wire: tuple[WireParam, ...]) -> Outcome:
        self.settle()
        self.block[ch.PAYLOAD_OFFSET : ch.PAYLOAD_OFFSET + 16] = ta_uuid.bytes
        return self._roundtrip(ch.OP_OPEN, 0, 0, wire, self.timeout)

    def invoke(self, session: int, cmd_id: int, wire: tuple[WireParam, ...], timeout: float) -> Outcome:
        return self._roundtrip(ch.OP_INVOKE, session, cmd_id, wire, timeout)

    def close_session(self, session: int) -> Outcome:
        return self._roundtrip(ch.OP_CLOSE, session, 0, NO_PARAMS, self.timeout)

    def stats(self) -> Outcome:
        return self._roundtrip(ch.OP_STATS, 0, 0, NO_PARAMS, self.timeout)

    @staticmethod
    def new_buffer(size: int) -> tuple[mmap.mmap, int | None]:
        fd = os.memfd_create("tee_sim-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            return mmap.mmap(fd, size), fd
        except BaseException:
            os.close(fd)
            raise

    def register_shm(self, shm_id: int, buffer: mmap.mmap, fd: int | None) -> None:
        assert fd is not None
        if self.proc is None:
            raise TEEError(TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS, "the secure world is not running")
        try:
            socket.send_fds(self.sock, [ch.REGISTER_MESSAGE.pack(shm_id, len(buffer))], [fd])
        except OSError as exc:
            self._dead()
            raise TEEError(
                TEE_ERROR_TARGET_DEAD, TEEC_ORIGIN_COMMS, f"the secure world is gone ({exc})"
            ) from None
        wire = ((0, shm_id, len(buffer), 0, 0, 0),) + NO_PARAMS[1:]
        outcome = self._roundtrip(ch.OP_REGISTER, 0, 0, wire, self.timeout)
        if outcome.code:
            raise TEEError(outcome.code, outcome.origin, outcome.message)

    def release_shm(self, shm_id: int) -> None:
        if self.proc is not None:
            self._roundtrip(ch.OP_RELEASE, 0, 0, ((0, shm_id, 0, 0, 0, 0),) + NO_PARAMS[1:], self.timeout)


# A child forked from a process with a secure world must not talk on (or shut down) its parent's channel:
# its sessions are lost and its next OpenSession starts a secure world of its own.
_transports: weakref.WeakSet[ProcessTransport] = weakref.WeakSet()


def _request(op: int, session: int, cmd: int, wire: tuple[WireParam, ...]) -> bytes:
    """A request as the control block holds it (``tee_sim.channel``): the header, then the parameters but
    when there are none."""
    if wire is NO_PARAMS:
        return ch.REQUEST_HEADER.pack(op, session, cmd, 0)
    types = wire[0][0] | wire[1][0] << 4 | wire[2][0] << 8 | wire[3][0] << 12
    return ch.REQUEST.pack(
        op, session, cmd, types, *wire[0][1:], *wire[1][1:], *wire[2][1:], *wire[3][1:]
    )


def _after_fork_in_child() -> None:
    for transport in list(_transports):
        transport._forget_after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
