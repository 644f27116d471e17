"""The TEE program's memory, planned at conversion: the secure arena's slots for the tensors that live across
instructions (``plan_arena``), and the peak a LiteRT unit's arena reaches (``litert_peak``), which the
conversion adds up to warn of a model near the secure-memory cap (``converters.pipeline``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from converters.graph import Graph
from tee_sim.program import ALIGN, align


def litert_peak(g: Graph, ops: list[int], pinned: set[int]) -> int:
    """Peak bytes of a signature's non-constant tensors when each is freed after its last use (what
    LiteRT's arena planner achieves, roughly); signature inputs and outputs live throughout."""
    def size(t: int) -> int:
        return int(np.prod(g.tensors[t].shape, dtype=np.int64)) * g.tensors[t].dtype.itemsize

    last: dict[int, int] = {}
    for k, i in enumerate(ops):
        for t in g.ops[i].inputs:
            if t >= 0 and g.tensors[t].data is None:
                last[t] = k
    live = sum(size(t) for t in pinned)
    peak = live
    for k, i in enumerate(ops):
        new = [t for t in g.ops[i].outputs if t not in pinned]
        live += sum(size(t) for t in new)
        peak = max(peak, live)
        live -= sum(size(t) for t in {*g.ops[i].inputs, *new} - pinned if t >= 0 and last.get(t, k) <= k)
    return peak


def plan_arena(items: dict[str, tuple[tuple[int, ...], int, int]]) -> tuple[dict[str, dict[str, Any]], int]:
    """Offsets in one secure arena for float32 tensors live over [first, last] instruction numbers; tensors
    whose lifetimes do not overlap share bytes (greedy, biggest first, lowest free offset)."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    slots: dict[str, dict[str, Any]] = {}
    order = sorted(items.items(), key=lambda kv: (-int(np.prod(kv[1][0], dtype=np.int64)), kv[1][1]))
    for name, (shape, first, last) in order:
        nbytes = int(np.prod(shape, dtype=np.int64)) * 4
        busy = sorted((o, e) for o, e, f, lst in placed if not (lst < first or last < f))
        offset = 0
        for o, e in busy:
            if offset + nbytes <= o:
                break
            offset = max(offset, align(e))
        placed.append((offset, offset + nbytes, first, last))
        slots[name] = {"offset": offset, "shape": list(shape), "dtype": "float32"}
    size = max((align(e) for _, e, _, _ in placed), default=0)
    return slots, max(size, ALIGN)
