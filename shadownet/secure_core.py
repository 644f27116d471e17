"""The inference loop's thread on the secure world's core while it takes turns with it.

TrustZone runs the secure world on the core that entered it, the caller stopped meanwhile. The simulated
secure world is a process of its own, pinned to one CPU (``tee_sim.resolve_secure_core``); left to the
scheduler, the caller, the secure world and the accelerator's second thread - three busy threads on a
2-CPU device - share two cores at random, and when the accelerator's second thread is the one that shares,
every round takes twice as long. With the caller on the secure world's core, the two take turns there (each
waits for the other by yielding the core) and the accelerator's other threads keep the other cores. With
several inferences under way at once (two frames in flight), neither the callers nor the secure world stay
pinned: as in TrustZone, where the secure world runs on whichever core calls it.

Measured (2-CPU VM, 2 accelerator threads, medians of 60 calls, each variant alternated with the other):
ResNet-404 31.9-32.4 -> 26.6-27.1 ms (p90 33-42 -> 27.1-27.5), ResNet-44 4.2 -> 3.6-3.7 ms, MobileNet
13.8-13.9 ms either way; yolov4-tiny and MiniVGG within 2%. The all-in-tee baseline (the whole model in the
pinned secure world) did not move (ResNet-404 21.0 / 21.3 ms). Two frames in flight: MobileNet 61-67
frames/s either way; yolov4-tiny 18.8-19.2 against 19.2-19.8 unpinned (18.4-19.0 with the secure world kept
pinned through them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_in_flight = 0  # inferences under way in this process (past their session's first)
_moved: tuple[int, set[int]] | None = None  # the thread on the secure core: (native id, its CPUs)
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # The parent's other threads - their inferences under way, the lock they may have held - are not here.
    global _in_flight, _moved
    _in_flight, _moved = 0, None
    _lock._at_fork_reinit()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _set_cpus(tid: int, cpus: Any) -> bool:
    """Move thread ``tid`` (0: this one) to ``cpus``; False where the system refuses (e.g. a CPU set
    changed under us): the inference then runs where it is."""
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:
        return False
    return True


@contextmanager
def on_secure_core(core: int, context: Any) -> Iterator[None]:
    """Run the body with this thread on ``core``, then give it its CPUs back. Only an inference that starts
    alone in this process moves, and it moves back as soon as another starts; the secure world (``context``'s,
    pinned to ``core``) then floats over the process's CPUs until an inference runs alone again (module
    docstring: concurrent callers and the secure world would otherwise queue on one core). Only a thread
    that may run on ``core`` and on some other CPU as well moves."""
    global _in_flight, _moved
    moved = None
    with _lock:
        _in_flight += 1
        if _in_flight == 1:
            allowed = os.sched_getaffinity(0)
            if core in allowed and len(allowed) > 1:
                context.pin_secure_world(True)
                if _set_cpus(0, (core,)):
                    moved = _moved = (threading.get_native_id(), allowed)
        else:
            if _moved is not None:  # give the inference on the core its CPUs back
                _set_cpus(_moved[0], _moved[1])
                _moved = None
            context.pin_secure_world(False)
    try:
        yield
    finally:
        with _lock:
            _in_flight -= 1
            if moved is not None and _moved is moved:
                _set_cpus(0, moved[1])
                _moved = None
