"""The refill of a ``ProtectedModel``'s pool of one-time masks and check projections: a call into the
trusted app (``refill_pool``), its statistics and the secure world's (``pool_stats``,
``secure_world_stats``: the TEE calls outside inference), and the background refill (see
``shadownet.load``'s ``background_refill``): a thread that works while the model is idle."""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import tee_sim
from shadownet.exceptions import ShadowNetError
from shadownet.tee_errors import translated

if TYPE_CHECKING:
    from shadownet.runtime import ProtectedModel


def refill_pool(session: Any, budget_us: int, entries: int = 0) -> tuple[int, int]:
    """One REFILL_POOL call on ``session``: work for up to ``budget_us`` (0: no limit) until the pool is
    full or ``entries`` more are ready (0: full). Returns (ready entries, capacity)."""
    from tee_sim.ta_shadownet_commands import Command

    out = tee_sim.Value(direction="out")
    with translated("refilling the one-time mask pool"):
        session.invoke_command(Command.REFILL_POOL, [tee_sim.Value(budget_us, entries), out])
    return out.a, out.b


def secure_world_stats(session: Any) -> dict[str, Any]:
    """The secure world's memory (``secure_memory_used`` / ``_peak`` / ``_cap``) and what the ShadowNet
    trusted app holds (``model_secure_memory``: one TEE entry, outside any inference)."""
    from tee_sim.ta_shadownet_commands import Command

    out = tee_sim.Value(direction="out")
    with translated("reading the trusted app's statistics"):
        session.invoke_command(Command.GET_STATS, [out])
    # The session's counters as this call's answer left them: read before it, they were the device's as of
    # this session's previous TEE entry (another session's load or close unseen; a helper's probe).
    memory = session.stats()
    result = {key: memory[key] for key in ("secure_memory_used", "secure_memory_peak", "secure_memory_cap")}
    result["model_secure_memory"] = out.a
    return result


def pool_stats(session: Any) -> dict[str, Any]:
    """The trusted app's statistics of the pool (``pool``: with ``offline_s_per_inference``) and of the
    checks (``verify``), and ``per_inference_secure_memory``: what both hold in secure memory."""
    from tee_sim.ta_shadownet_commands import Command

    out = tee_sim.TempMemRef(size=1 << 14, direction="out")
    with translated("reading the mask pool's statistics"):
        session.invoke_command(Command.GET_POOL_STATS, [out])
    stats = json.loads(out.data or b"{}")
    pool = stats.get("pool", {})
    if pool:
        made = pool["made"]
        pool["offline_s_per_inference"] = pool["offline_s"] / made if made else None
    return {"pool": pool, "verify": stats.get("verify", {}),
            "per_inference_secure_memory": stats.get("secure_bytes", 0)}


class BackgroundRefill(threading.Thread):
    """Refills a model's pool between inferences: a daemon thread at the lowest scheduling priority that
    wakes after each inference and asks the TEE for ``CHUNK_US`` of work at a time, stepping aside as soon
    as a caller waits for the model (so an inference waits at most one chunk) or the pool is full. It holds
    the model weakly, and strongly only for a chunk: a model dropped without ``close()`` is collected, and
    its ``__del__`` closes it (its TEE session and secure memory with it), as LiteRT's interpreters are."""

    CHUNK_US = 4000
    STOP_WAIT_S = 5.0  # for the chunk under way to end

    def __init__(self, model: ProtectedModel) -> None:
        super().__init__(name=f"shadownet-refill-{model.artifacts.directory.name}", daemon=True)
        self._model = weakref.ref(model)
        self._wake = threading.Event()
        self._stopped = False
        self._wake.set()  # fill the pool right after load
        _refills.add(self)

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.signal_stop()
        if self is not threading.current_thread() and self.is_alive():
            self.join(timeout=self.STOP_WAIT_S)

    def signal_stop(self) -> None:
        """Ask the thread to stop after its chunk, without waiting for it."""
        self._stopped = True
        self._wake.set()

    def run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            while not self._stopped and self._chunk():
                pass

    def _chunk(self) -> bool:
        """One chunk of work; whether to go on (the model alive, open and idle, its pool not full). The
        model is held only meanwhile: dropped by its app, it is collected after the chunk at the latest
        (its ``__del__`` then runs on this thread, and its ``close()`` stops it)."""
        model = self._model()
        if model is None:
            self._stopped = True
            return False
        if model._waiting:
            return False
        with model._lock:  # not _locked: the model's own thread never holds it
            if model._closed or model._session is None:
                return False
            try:
                ready, capacity = model._refill(self.CHUNK_US)
            except ShadowNetError:
                return False  # the next inference reports what is wrong (or makes its masks itself)
        return ready < capacity


# Stopped at exit, before the interpreter finalizes: a daemon thread still running then is frozen where it
# next takes the GIL, and one frozen in a TEE call keeps its context's lock for ever - the close of a model
# the app left open (its ``__del__``, during finalization) then waited for that lock, and a process that
# left two default-scheme models open never exited (a helper's probe: 12 of 12 runs). Atexit handlers run
# while daemon threads still run: all are asked to stop at once, and each finishes its chunk (a fraction of
# a second) within one shared wait; the models stay usable. A forked child has none of its parent's
# threads, and their events' locks may be held for ever there: it forgets them.
_refills: weakref.WeakSet[BackgroundRefill] = weakref.WeakSet()


def _stop_refills_at_exit() -> None:
    running = [refill for refill in list(_refills) if refill.is_alive()]
    for refill in running:
        refill.signal_stop()
    deadline = time.monotonic() + BackgroundRefill.STOP_WAIT_S
    for refill in running:
        refill.join(timeout=max(0.0, deadline - time.monotonic()))


atexit.register(_stop_refills_at_exit)
os.register_at_fork(after_in_child=_refills.clear)
