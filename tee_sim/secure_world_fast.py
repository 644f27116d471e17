"""The secure world's fast path: prepared step commands answered in C (``secure_world_fast.c``).

A trusted app may offer, per session, a ``StepProgram`` (``TrustedApp.step_program``): the command that
runs one step of a fixed sequence, the step it expects next (a cell both sides share) and, per step, the
C calls the step is made of, or none when the step needs the app's Python. ``SecureWorld`` then waits
for requests in ``FastPath.serve``, which answers those steps itself - same checks (the session's command,
one input Value, the step expected next), same response - and hands everything else back to Python. Step 0
starts an inference: the fast path runs it only when the app has prepared that inference ahead (cursor
``AHEAD``; the ShadowNet TA takes its pool entry between inferences, ``tee_sim.ta_shadownet_steps``).
After every request Python handles, ``refresh`` takes the programs of the sessions still open and alive.
Its polling yields the core between looks for the whole window (the secure world's ``hard_spin_us`` applies
to Python's polling only). Only the process transport has it; the in-process one calls the app directly.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_PROGRAMS = 32  # as in the C file
FINISHED = -1  # a cursor's value after the fast path ran a program's last step, for the app to settle
AHEAD = -2  # the app has prepared the next inference: the fast path may run its step 0
STOPPED = -3  # the fast path stopped a step part-way, for the app's Python (cursor[1:4]: step, call, status)


@dataclass
class StepProgram:
    """One session's step command, for the fast path. ``cursor``: int32 ``[4]``: the step the app expects
    next (the app reads and writes it too; ``AHEAD`` for a step 0 the fast path may run; ``STOPPED`` for a
    step the fast path stopped part-way and handed back to Python), then that step, the place of the call
    that stopped it and what that call returned (the C file says why); ``calls[s]``:
    step ``s``'s C calls as ``(function address, argument address)`` pairs, or None where it needs the app's
    Python. ``finish``: the cursor after the last step - ``FINISHED``, which the app settles (statistics,
    the spent pool entry) at its next entry, or ``AHEAD`` when it has nothing to settle nor to prepare.
    ``keep``: whatever the addresses point into."""

    cmd: int
    cursor: np.ndarray
    calls: Sequence[Sequence[tuple[int, int]] | None]
    keep: Any = None
    finish: int = FINISHED
    arrays: dict[str, np.ndarray] = field(init=False, repr=False)  # calls, flattened for C

    def __post_init__(self) -> None:
        if self.cursor.dtype != np.int32 or self.cursor.shape != (4,) or not self.cursor.flags.c_contiguous:
            raise ValueError(f"a step program's cursor is int32 [4], not {self.cursor.dtype} "
                             f"{self.cursor.shape}")
        flat = [c for step in self.calls if step is not None for c in step]
        starts, ends, at = [], [], 0
        for step in self.calls:
            starts.append(at if step is not None else -1)
            at += len(step) if step is not None else 0
            ends.append(at if step is not None else -1)
        self.arrays = {
            "starts": np.array(starts, np.int64), "ends": np.array(ends, np.int64),
            "fns": np.array([f for f, _ in flat] or [0], np.uintp),
            "args": np.array([a for _, a in flat] or [0], np.uintp),
        }


class _Program(ctypes.Structure):
    _fields_ = [("session", ctypes.c_uint32), ("cmd", ctypes.c_uint32), ("steps", ctypes.c_int64),
                ("finish", ctypes.c_int64), ("cursor", ctypes.c_void_p), ("starts", ctypes.c_void_p),
                ("ends", ctypes.c_void_p), ("fns", ctypes.c_void_p), ("args", ctypes.c_void_p)]


class _World(ctypes.Structure):
    _fields_ = [("block", ctypes.c_void_p), ("spin_ns", ctypes.c_int64), ("resp_efd", ctypes.c_int32),
                ("count", ctypes.c_int32), ("memory", ctypes.c_uint64 * 3), ("served", ctypes.c_int64),
                ("programs", _Program * MAX_PROGRAMS)]


def _load() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("tee_sim._secure_world_fast")  # the built file, not imported
    if spec is None or spec.origin is None:
        return None  # not built: the secure world serves every request in Python
    library = ctypes.CDLL(spec.origin)
    library.sw_serve.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    library.sw_serve.restype = ctypes.c_int
    return library


LIBRARY = _load()


class FastPath:
    """The C loop over one control block (``block``: its writable buffer, e.g. an mmap)."""

    def __init__(self, block: Any, spin_ns: int, resp_efd: int) -> None:
        self._anchor = ctypes.c_char.from_buffer(block)  # keeps the buffer exported (and its address)
        self._world = _World(block=ctypes.addressof(self._anchor), spin_ns=spin_ns, resp_efd=resp_efd)
        self._last = ctypes.c_uint64(0)
        self._programs: dict[int, StepProgram] = {}

    @property
    def active(self) -> bool:
        return LIBRARY is not None and self._world.count > 0

    @property
    def served(self) -> int:
        return self._world.served

    def serve(self, last: int) -> tuple[int, bool]:
        """Answer fast steps after request ``last``: ``(the last request answered, whether one waits for
        Python)``; ``False`` when the spin window passed with no request."""
        self._last.value = last
        pending = LIBRARY.sw_serve(ctypes.addressof(self._world), ctypes.addressof(self._last))
        return self._last.value, bool(pending)

    def refresh(self, programs: Mapping[int, StepProgram], memory: tuple[int, int, int]) -> None:
        """The sessions' programs now (by session id; at most ``MAX_PROGRAMS``, the rest served in
        Python) and the secure memory figures every fast answer reports."""
        self._world.memory[:] = memory
        chosen = dict(list(programs.items())[:MAX_PROGRAMS])
        if chosen.keys() == self._programs.keys() and all(chosen[s] is self._programs[s] for s in chosen):
            return
        self._world.count = 0  # no stale entry is ever visible
        for i, (sid, program) in enumerate(chosen.items()):
            a = program.arrays
            self._world.programs[i] = _Program(
                sid, program.cmd, len(program.calls), program.finish, program.cursor.ctypes.data,
                a["starts"].ctypes.data, a["ends"].ctypes.data, a["fns"].ctypes.data, a["args"].ctypes.data)
        self._world.count = len(chosen)
        self._programs = chosen

    def close(self) -> None:
        self._world.count = 0
        self._programs = {}
        del self._anchor
