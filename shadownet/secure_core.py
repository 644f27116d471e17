"""The inference loop's thread on the secure world's core while it takes turns with it.

TrustZone runs the secure world on the core that entered it, the caller stopped meanwhile. The simulated
secure world is a process of its own, pinned to one CPU (``tee_sim.resolve_secure_core``); left to the
scheduler, the caller, the secure world and the accelerator's second thread - three busy threads on a
2-CPU device - share two cores at random, and when the accelerator's second thread is the one that shares,
every round takes twice as long. With the caller on the secure world's core, the two take turns there (each
waits for the other by yielding the core) and the accelerator's other threads keep the other cores.

Measured (2-CPU VM, 2 accelerator threads, medians of 60 calls, each variant alternated with the other):
ResNet-404 31.9-32.4 -> 26.6-27.1 ms (p90 33-42 -> 27.1-27.5), ResNet-44 4.2 -> 3.6-3.7 ms, MobileNet
13.8-13.9 ms either way; yolov4-tiny and MiniVGG within 2%. The all-in-tee baseline (the whole model in the
pinned secure world) did not move (ResNet-404 21.0 / 21.3 ms).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_in_flight = 0  # inferences under way in this process (past their session's first)
_lock = threading.Lock()


@contextmanager
def on_secure_core(core: int) -> Iterator[None]:
    """Run the body with this thread on ``core``, then give it its CPUs back. Only the process's one
    inference under way moves (concurrent callers of several models stay where the scheduler puts them:
    all on one core, their accelerators' own shares would queue there), and only a thread that may run on
    ``core`` and on some other CPU as well."""
    global _in_flight
    with _lock:
        alone = _in_flight == 0
        _in_flight += 1
    try:
        allowed = os.sched_getaffinity(0) if alone else None
        if allowed is None or core not in allowed or len(allowed) == 1:
            yield
            return
        os.sched_setaffinity(0, (core,))
        try:
            yield
        finally:
            os.sched_setaffinity(0, allowed)
    finally:
        with _lock:
            _in_flight -= 1
