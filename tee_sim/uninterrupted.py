"""Sections that a Ctrl-C may not cut in half: state that two worlds, or a tensor's pages and its interpreter,
must agree on, changed in several steps.

Python runs a signal's handler - ``KeyboardInterrupt`` for SIGINT, the CLI's or an app's for SIGTERM -
between any two bytecodes of the main thread. Cut between two steps, such state was left half changed:
a tensor's pages made private again while the accelerator's plan still took them for shared memory (every
later inference wrong, without an error), or a flag set before the change it stood for (helpers' probes).
Blocking the signal (``pthread_sigmask``) does not help: the kernel hands a process's signal to another
thread - LiteRT's, the refill's - and Python still runs the handler in the main thread at once. So the
section swaps the Python handlers for one that only notes the signal, and calls the real ones after it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM's Python handlers for the block; each signal that came meanwhile is
    handled as it ends, every one of them (``KeyboardInterrupt`` then, for a Ctrl-C: the last exception a
    handler raised, once all ran, the earlier as its context). A no-op outside the main thread, where
    Python runs no handler, and for a signal without a Python handler (ignored, the default, or set in C).
    A handler the block sets itself is kept. Not for the hot path: a few microseconds to swap handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    ended = False

    def hold(signum: int, frame: Any) -> None:
        if ended:  # after the block, its handler not yet put back (a signal cut the restore: a review)
            saved[signum](signum, frame)
        else:
            held.append(signum)

    saved: dict[int, Any] = {}
    try:
        for sig in SIGNALS:
            handler = signal.getsignal(sig)
            if callable(handler):
                saved[sig] = handler  # before the swap: restored whatever interrupts the next line
                signal.signal(sig, hold)
        yield
    finally:
        ended = True
        try:
            for sig, handler in saved.items():
                if signal.getsignal(sig) is hold:  # not one the block set itself
                    signal.signal(sig, handler)
        finally:
            _handle(held, saved)


def _handle(held: list[int], saved: dict[int, Any]) -> None:
    """Run the handler of each signal in ``held`` once, all of them, then raise the last exception one raised,
    the earlier ones as its context - as Python would have, running the next handler while the first's
    exception unwound (the CLI's raise KeyboardInterrupt: a SIGTERM after a SIGINT was lost, 'terminated'
    said 'interrupted', a review; an app's SIGTERM SystemExit after a Ctrl-C was dropped, its review)."""
    last: BaseException | None = None
    for sig in dict.fromkeys(held):
        try:
            saved[sig](sig, None)
        except BaseException as exc:  # noqa: BLE001 - raised below, once every handler ran
            if last is not None and exc.__context__ is None:
                exc.__context__ = last
            last = exc
    if last is not None:
        raise last
