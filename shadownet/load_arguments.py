"""The checks of ``shadownet.load``'s (and ``ProtectedModel``'s) arguments, before any work: a wrong type is a
``TypeError`` where Python's own would be (a flag that is not a boolean: ``"no"`` would be true), a value out
of range a ``ValueError``."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from shadownet import MAX_THREADS
from tee_sim.ta_shadownet_commands import MAX_POOL_CAPACITY


def whole(value: Any) -> bool:
    """Whether ``value`` is an integer: Python's or numpy's, not a boolean."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def check_load_arguments(num_threads: Any, verify: Any, mask_pool: Any, on_exhausted: Any,
                     background_refill: Any) -> None:
    """``load``'s (and ``ProtectedModel``'s) arguments: ``TypeError`` for a flag that is not a boolean
    (``"no"`` would be true) or a count that is not an integer, ``ValueError`` for a count or a policy out
    of range."""
    check_flags(verify=verify, background_refill=background_refill)
    check_count("num_threads", num_threads, 1, MAX_THREADS)
    check_count("mask_pool", mask_pool, 1, MAX_POOL_CAPACITY)
    if on_exhausted not in ("refill", "fail"):
        raise ValueError(f"on_exhausted must be 'refill' or 'fail', not {on_exhausted!r}")


def check_flags(**flags: Any) -> None:
    """``TypeError`` for a flag that is not a boolean (``"no"`` would be true)."""
    for name, flag in flags.items():
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{name} must be True or False, not {flag!r}")


def check_count(name: str, value: Any, low: int, high: int, optional: bool = True) -> None:
    """``value`` is an integer from ``low`` to ``high`` (or None, when ``optional``): ``TypeError`` for
    another type (``"2"``, ``2.0``, a boolean), ``ValueError`` for one out of range."""
    if value is None and optional:
        return
    if not whole(value) or not low <= value <= high:
        raise (ValueError if whole(value) else TypeError)(
            f"{name} must be an int from {low} to {high}, not {value!r}")
