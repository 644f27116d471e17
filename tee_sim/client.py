"""The normal world's client API (GlobalPlatform TEE Client API): Context and Session (``SharedMemory`` is
in ``tee_sim.shared_memory``, the parameters' marshalling in ``tee_sim.marshalling``).

The normal world never holds a trusted app, a key or a reference into secure memory: it names a TA
by UUID and exchanges parameters; large tensors travel through shared memory it registered.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from tee_sim.channel import DEFAULT_CALLER_SPIN_US, DEFAULT_HARD_SPIN_US, DEFAULT_SPIN_US
from tee_sim.errors import (
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_TARGET_DEAD,
    TEE_SUCCESS,
    TEEC_ORIGIN_COMMS,
    TEEError,
)
from tee_sim.identity import resolve_home
from tee_sim.marshalling import NO_TEMPS, Marshalling
from tee_sim.params import MAX_PARAMS, ClientParam, MemRef, TempMemRef, Value
from tee_sim.secure_os import NO_PARAMS, Outcome, WireParam
from tee_sim.shared_memory import SharedMemory, api_error
from tee_sim.transport import ProcessTransport, resolve_secure_core
from tee_sim.transport_inprocess import InProcessTransport

TRANSPORTS = ("process", "inprocess")
EXIT_WAIT_S = 5.0  # see _close_transport


def _check_command(cmd_id: Any) -> None:
    if not isinstance(cmd_id, int) or not 0 <= cmd_id < 1 << 32:
        raise api_error(f"command id must be a 32-bit unsigned int, not {cmd_id!r}")


class Session:
    """An open session with one trusted app (TEEC_Session); a context manager that closes it."""

    def __init__(self, context: Context, session_id: int, ta_uuid: uuid.UUID, generation: int) -> None:
        self.ta_uuid = ta_uuid
        self._context = context
        self._id = session_id
        self._generation = generation
        self.closed = False
        self._invocations = self._bytes_in = self._bytes_out = self._ta_time_ns = 0
        self._time_inside = 0.0
        self._memory = (0, 0, 0)

    @property
    def lost(self) -> bool:
        """Whether the secure world this session was opened in is known gone (it stopped, or was started
        again since): every command of it fails with ``TEE_ERROR_TARGET_DEAD``."""
        transport = self._context._transport
        return self._generation != transport.generation or not transport.alive

    def invoke_command(
        self, cmd_id: int, params: Sequence[ClientParam] = (), timeout: float | None = None
    ) -> list:
        """Run command ``cmd_id`` of the TA (TEEC_InvokeCommand).

        Returns ``params`` (as a list) with output values, output ``TempMemRef.data`` and reported
        sizes filled in. Raises ``TEEError``; on ``TEE_ERROR_SHORT_BUFFER`` the memref's ``size`` says
        what the TA needs. ``timeout`` overrides the context's for this call.
        """
        return self._context._invoke(self, cmd_id, params, timeout)

    def prepare_command(self, cmd_id: int, params: Sequence[Value] = ()) -> Callable[..., None]:
        """``invoke_command(cmd_id, params)`` made ready for a hot loop (a tee_sim extension: a
        TEEC_Operation kept and reused): input ``Value`` s only, fixed now. Calling the result, with an
        optional ``timeout``, runs the command - same checks, errors and counters - without marshalling
        the parameters again."""
        return self._context._prepare(self, cmd_id, params)

    def stats(self) -> dict[str, Any]:
        """Counters of this session: ``invocations`` (world switches), ``bytes_in``, ``bytes_out``,
        ``time_inside_s`` (wall time in invoke_command), ``ta_time_s`` (inside the TA's code), and the
        device's ``secure_memory_used``/``_peak``/``_cap`` as of the last call."""
        used, peak, cap = self._memory
        return {
            "invocations": self._invocations,
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "time_inside_s": self._time_inside,
            "ta_time_s": self._ta_time_ns * 1e-9,
            "secure_memory_used": used,
            "secure_memory_peak": peak,
            "secure_memory_cap": cap,
        }

    def close(self) -> None:
        """Close the session (TEEC_CloseSession): the TA's close_session entry point runs."""
        if not self.closed:
            self.closed = True
            self._context._close_session(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Session({self.ta_uuid}{', closed' if self.closed else ''})"


def _environ_us(name: str, default: float) -> float:
    """A spin time in microseconds from the environment variable ``name``, else ``default``."""
    value = os.environ.get(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise api_error(f"${name} must be a number of microseconds, not {value!r}") from None


class Context:
    """A connection to the secure world (TEEC_InitializeContext).

    ``transport="process"`` runs the secure world in its own interpreter (one per context; use
    ``default_context()`` to share one per process); ``"inprocess"`` runs it as an object here, for
    fast tests. ``home``: the device's state (default ``$SHADOWNET_HOME`` or ``~/.shadownet``).
    ``memory_cap``: the secure-memory budget in bytes. ``timeout``: seconds an invocation may go
    unanswered with the secure world not computing (process transport: a world that computes is waited
    for up to ``transport.BUSY_LIMIT`` times as long; the answer to an interrupted invocation, which the
    next request waits for, only ``timeout``) before it is declared hung, stopped, and a
    ``TEEC_ORIGIN_COMMS`` error raised.
    ``spin_us``: how long the secure world polls for the next request before sleeping;
    ``caller_spin_us``: how long a caller polls for the answer; ``hard_spin_us``: the first part of
    each window, polled without offering the core to other threads (process transport; defaults
    ``$TEE_SIM_SPIN_US``, ``$TEE_SIM_CALLER_SPIN_US``, ``$TEE_SIM_HARD_SPIN_US``, else the measured ones
    in ``tee_sim.channel``). ``secure_core``: the CPU the secure world runs on (process transport; default
    ``$TEE_SIM_SECURE_CORE``, else ``"auto"``; see ``resolve_secure_core``), as ``secure_core``.
    """

    def __init__(
        self,
        transport: str = "process",
        *,
        home: str | os.PathLike[str] | None = None,
        memory_cap: int = 64 << 20,
        timeout: float = 5.0,
        spin_us: float | None = None,
        caller_spin_us: float | None = None,
        hard_spin_us: float | None = None,
        secure_core: int | str | None = "default",
    ) -> None:
        if transport not in TRANSPORTS:
            raise api_error(f"transport must be one of {TRANSPORTS}")
        if spin_us is None:
            spin_us = _environ_us("TEE_SIM_SPIN_US", DEFAULT_SPIN_US)
        if caller_spin_us is None:
            caller_spin_us = _environ_us("TEE_SIM_CALLER_SPIN_US", DEFAULT_CALLER_SPIN_US)
        if hard_spin_us is None:
            hard_spin_us = _environ_us("TEE_SIM_HARD_SPIN_US", DEFAULT_HARD_SPIN_US)
        # The in-process secure world runs in its caller's thread, wherever that is.
        if secure_core != "default":
            self.secure_core = resolve_secure_core(secure_core) if transport == "process" else None
        else:
            try:
                self.secure_core = resolve_secure_core(os.environ.get("TEE_SIM_SECURE_CORE", "auto")) \
                    if transport == "process" else None
            except TEEError as exc:
                raise api_error(f"$TEE_SIM_SECURE_CORE: {exc.message}") from None
        self.transport_name = transport
        self.timeout = timeout
        self._lock = threading.RLock()
        self._sessions: set[Session] = set()  # open sessions, of any generation of the secure world
        self._shms: dict[int, SharedMemory] = {}
        self._next_shm = 1
        # Shared memory whose registration or release was interrupted -> the secure world's generation
        # then: released (again) before the next session, registration or release (``_tidy``).
        self._unreleased: dict[int, int] = {}
        self._marshalling = Marshalling(self)
        _contexts.add(self)  # once what the fork hook resets exists (a fork in between: AttributeError there)
        self.closed = False
        home = os.fspath(home) if home is not None else None
        self.home = resolve_home(home)  # the device's state: its keys, sealed storage and logs
        if transport == "process":
            self._transport: Any = ProcessTransport(
                home, memory_cap, timeout, spin_us, caller_spin_us, hard_spin_us, self.secure_core
            )
        else:
            self._transport = InProcessTransport(home, memory_cap)
        # Closes the transport when the context is collected or at interpreter exit, whichever is
        # first: the secure world then closes every session left open (their TA's close_session runs).
        self._finalizer = weakref.finalize(self, _close_transport, self._transport, self._lock)
        _hook_exit()

    # Public API.
    def open_session(self, ta_uuid: uuid.UUID | str, params: Sequence[ClientParam] = ()) -> Session:
        """Open a session with the TA ``ta_uuid`` (TEEC_OpenSession); restarts a dead secure world."""
        ta_uuid = uuid.UUID(str(ta_uuid))
        with self._lock:
            self._check_open()
            self._transport.ensure_running()
            try:
                self._transport.settle()
                self._tidy()
            except TEEError:  # the secure world died with a request on the wire, unseen till now
                if self._transport.alive:
                    raise
                self._transport.ensure_running()
            wire, temps, _ = self._marshalling.marshal(params)
            outcome = self._transport.open_session(ta_uuid, wire)
            opened = outcome.code == 0
            try:
                self._marshalling.unmarshal(params, wire, temps, outcome)
                self._marshalling.trim_bounce()
                self._raise(outcome)
                session = Session(self, outcome.session, ta_uuid, self._transport.generation)
                session._memory = outcome.memory
                self._sessions.add(session)
                opened = False
            finally:
                if opened:  # interrupted after the secure world opened it: closed by the next _tidy
                    self._transport.orphaned_sessions.append(outcome.session)
            return session

    def register_shared_memory(self, size: int) -> SharedMemory:
        """Allocate ``size`` bytes both worlds map (TEEC_RegisterSharedMemory / AllocateSharedMemory)."""
        if not isinstance(size, int) or size <= 0:
            raise api_error(f"shared memory size must be a positive int, not {size!r}")
        with self._lock:
            self._check_open()
            self._transport.ensure_running()
            self._tidy()
            shm = SharedMemory(self, self._next_shm, size)
            self._next_shm += 1
            generation = self._transport.generation
            try:
                self._register(shm)
            except BaseException:  # interrupted, or refused: the secure world may hold the mapping still
                self._unreleased[shm._id] = generation
                shm.forget_after_fork()  # this process's descriptor and mapping (left open: a probe)
                raise
            self._shms[shm._id] = shm
            return shm

    def memory_stats(self) -> dict[str, int]:
        """The secure world's memory ``used``, ``peak`` and ``cap`` in bytes."""
        with self._lock:
            self._check_open()
            self._transport.ensure_running()
            used, peak, cap = self._transport.stats().memory
            return {"used": used, "peak": peak, "cap": cap}

    def close(self) -> None:
        """Close every session, release shared memory, stop the secure world (TEEC_FinalizeContext)."""
        with self._lock:
            if self.closed:
                return
            for session in list(self._sessions):
                try:
                    session.close()
                except TEEError:
                    pass
            for shm in list(self._shms.values()):
                try:
                    shm.release()
                except TEEError:
                    pass
            self.closed = True
            self._finalizer()

    def pin_secure_world(self, pinned: bool) -> None:
        """Run the secure world on ``secure_core`` only (True, as it starts) or let it float over this
        process's CPUs (False: while several callers take turns with it; shadownet.secure_core)."""
        self._transport.pin(pinned)

    @property
    def secure_world_pid(self) -> int | None:
        """The secure world's process id (process transport), e.g. for fault-injection tests."""
        proc = getattr(self._transport, "proc", None)
        return proc.pid if proc is not None else None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Internals.
    def _check_open(self) -> None:
        if self.closed:
            raise api_error("the context is closed", TEE_ERROR_BAD_STATE)

    def _register(self, shm: SharedMemory) -> None:
        self._transport.register_shm(shm._id, shm._mmap, shm._fd)
        shm._generation = self._transport.generation

    def _release_shm(self, shm: SharedMemory) -> None:
        with self._lock:
            self._shms.pop(shm._id, None)
            if not self.closed and shm._generation == self._transport.generation:
                self._unreleased[shm._id] = shm._generation
                self._tidy()

    def _tidy(self) -> None:
        """Undo in the secure world what interrupted requests left there (a KeyboardInterrupt in the middle
        of one: the secure world kept it until the context closed). Close the sessions an interrupted
        OpenSession opened (the transport read their ids in the answer nobody awaited). Unregister the shared
        memory whose registration or release was interrupted, sent again when the request may have gone out
        too: the secure OS releases an id it does not know as a no-op, and ids are never reused."""
        orphans = self._transport.orphaned_sessions
        while orphans:
            self._transport.close_session(orphans[-1])
            orphans.pop()
        while self._unreleased:
            shm_id, generation = next(iter(self._unreleased.items()))
            if generation == self._transport.generation:  # else that secure world is gone, and its maps
                self._transport.release_shm(shm_id)
            del self._unreleased[shm_id]

    def _close_session(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)
            if self.closed or session._generation != self._transport.generation or not self._transport.alive:
                return
            self._raise(self._transport.close_session(session._id))

    def _invoke(
        self, session: Session, cmd_id: int, params: Sequence[ClientParam], timeout: float | None
    ) -> list:
        _check_command(cmd_id)
        with self._lock:
            self._check_live(session)
            if params:
                self._transport.settle(timeout)  # before the parameters go where the secure world reads
                wire, temps, bytes_in = self._marshalling.marshal(params)
            else:
                wire, temps, bytes_in = NO_PARAMS, NO_TEMPS, 0
            outcome = self._round_trip(session, int(cmd_id), wire, bytes_in, timeout)
            bytes_out = self._marshalling.unmarshal(params, wire, temps, outcome) if params else 0
            if temps:
                self._marshalling.trim_bounce()
            session._bytes_out += bytes_out
            if outcome.code:
                self._raise(outcome)
            return list(params) if params else []

    def _prepare(self, session: Session, cmd_id: int, params: Sequence[ClientParam]) -> Callable[..., None]:
        _check_command(cmd_id)
        if isinstance(params, Value | TempMemRef | MemRef) or len(params) > MAX_PARAMS or any(
                type(p) is not Value or p.direction != "in" for p in params):
            raise api_error(f"a prepared command takes at most {MAX_PARAMS} input Values")
        wire, _, bytes_in = self._marshalling.marshal(params) if params else (NO_PARAMS, NO_TEMPS, 0)
        check_live, raise_, lock, clock = self._check_live, self._raise, self._lock, time.perf_counter
        sent = self._transport.prepare_invoke(session._id, int(cmd_id), wire)

        def invoke(timeout: float | None = None) -> None:
            # _round_trip's counters, on the transport's prepared request (its answer is a tuple)
            with lock:
                check_live(session)
                start = clock()
                code, ta_ns, session._memory, failure = sent(self.timeout if timeout is None else timeout)
                session._time_inside += clock() - start
                session._invocations += 1
                session._bytes_in += bytes_in
                session._ta_time_ns += ta_ns
            if code:
                raise_(failure)
        return invoke

    def _check_live(self, session: Session) -> None:
        if session.closed:
            raise api_error("the session is closed", TEE_ERROR_BAD_STATE)
        if self.closed:
            self._check_open()
        if session._generation != self._transport.generation or not self._transport.alive:
            raise TEEError(
                TEE_ERROR_TARGET_DEAD,
                TEEC_ORIGIN_COMMS,
                "session lost: the secure world stopped; open a new session",
            )

    def _round_trip(self, session: Session, cmd_id: int, wire: tuple[WireParam, ...], bytes_in: int,
                    timeout: float | None) -> Outcome:
        """One invocation on the wire and its counters; the lock is held, ``_check_live`` passed."""
        transport = self._transport
        start = time.perf_counter()
        outcome = transport.invoke(session._id, cmd_id, wire, self.timeout if timeout is None else timeout)
        session._time_inside += time.perf_counter() - start
        session._invocations += 1
        session._bytes_in += bytes_in
        session._ta_time_ns += outcome.ta_time_ns
        session._memory = outcome.memory
        return outcome

    @staticmethod
    def _raise(outcome: Outcome) -> None:
        if outcome.code != TEE_SUCCESS:
            raise TEEError(outcome.code, outcome.origin, outcome.message) from outcome.cause


def _close_transport(transport: Any, lock: threading.RLock) -> None:
    """A context's finalizer: close its transport under its lock, so that no other thread's request is on
    the wire meanwhile - at interpreter exit daemon threads still run (a model's background refill may be
    waiting for the secure world). If a request holds the lock longer than ``EXIT_WAIT_S`` it has hung:
    the secure world is left to its parent-death signal as the process ends; so it is when Ctrl-C comes
    during the close at exit (a helper's probe: right after a command's last line, a traceback of the
    KeyboardInterrupt "ignored in atexit callback" on 11 of 12 tries)."""
    try:
        if lock.acquire(timeout=EXIT_WAIT_S):
            try:
                transport.close()
            finally:
                lock.release()
    except KeyboardInterrupt:
        if not _exiting:
            raise


_exiting = False
_exit_hooked = False


def _at_exit() -> None:
    global _exiting
    _exiting = True


def _hook_exit() -> None:
    """Register ``_at_exit`` once, after a finalizer was made: weakref registers its exit hook at the first
    ``finalize``, and exit hooks run last registered first, so ``_exiting`` is set before the finalizers
    run."""
    global _exit_hooked
    if not _exit_hooked:
        atexit.register(_at_exit)
        _exit_hooked = True


# A child forked while another thread held a context's lock (a request on the wire, a model's refill) would
# wait for it forever: in the child that thread does not exist, and the lock is made anew, in place (as the
# standard library does its own); the transport forgets the parent's secure world (tee_sim.transport).
_contexts: weakref.WeakSet[Context] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    _default_lock._at_fork_reinit()  # first: default_context() waits on it (a failure below would skip it)
    for context in list(_contexts):
        context._lock._at_fork_reinit()
        try:
            context._marshalling.forget_after_fork()  # the parent's bounce buffer: its secure world reads it
        except Exception:  # noqa: BLE001 - one context's failure must not leave the others' locks held
            pass


_default: Context | None = None
_default_pid = 0
_default_lock = threading.Lock()


def default_context() -> Context:
    """The process-wide context: one secure world per normal-world process, shared by every session.

    Its transport is ``$SHADOWNET_TEE_TRANSPORT`` (default ``process``); it is closed at exit.
    """
    global _default, _default_pid
    with _default_lock:
        if _default is None or _default.closed or _default_pid != os.getpid():
            _default = Context(os.environ.get("SHADOWNET_TEE_TRANSPORT", "process"))
            _default_pid = os.getpid()
        return _default


os.register_at_fork(after_in_child=_after_fork_in_child)
