"""What a forked child does with the protected models and interpreters its parent had open.

``fork()`` copies the memory of a process but only the thread that called it. A model's TEE session and
shared memory belong to the parent's secure world, its accelerator's threads and its background refill do
not exist in the child, and a lock that one of the parent's other threads held at that moment (an
inference under way, a refill) stays held forever. So in the child every model and interpreter the parent
had open is closed, without touching any of that (its ``_forget_after_fork``: fresh locks, nothing
released), and says so at once: ``ClosedError`` naming the fork, not a hang. The child loads its own
(``multiprocessing``'s ``fork`` start method included); ``tee_sim`` likewise gives the child a secure world
of its own.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol


class ForkAware(Protocol):
    def _forget_after_fork(self, parent: int) -> None: ...


_live: weakref.WeakSet[Any] = weakref.WeakSet()
_pid = os.getpid()


def track(obj: ForkAware) -> None:
    """Close ``obj`` in a child this process forks (``obj._forget_after_fork(parent_pid)``)."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    global _pid
    parent, _pid = _pid, os.getpid()
    for obj in list(_live):
        obj._forget_after_fork(parent)
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
