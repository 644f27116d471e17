"""The ShadowNet trusted app's linear maps of a pixel's channels, prepared at load: each restore's
and each input mixing's form, as the C kernel ``sn_run`` (``tee_sim/ta_shadownet_kernels.c``, its
``sn_linear``) runs it.

A restore's form is chosen by ``prepare_linears``: a scale for a depthwise layer's, block matmuls when it
is block diagonal over contiguous channel ranges (group-mixing schemes; ``block_matmuls``), a dense matrix
while it is small (``MATMUL_MAX_ENTRIES``), else a k-term gather (the paper's scheme: two terms); an
input mixing likewise as block matmuls, after one gather when a block's channels are scattered. The
restore and push instructions that use them: ``tee_sim.ta_shadownet_restore_push``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tee_sim.ta_shadownet_kernels import LANES

# A dense restore does M x N vector-lane multiply-adds per pixel, the gather k scattered loads per output
# channel; up to this many entries (e.g. the paper's 19 -> 16 layers) the dense one, a vectorized loop,
# is the cheaper (the threshold was measured for the numpy kernels; both forms are exact). Scales and
# block-diagonal restores come first: a 32 -> 32 depthwise scale as a dense matrix did 32 multiply-adds
# per output instead of one (MobileNet's first two restores: 1.26 ms each).
MATMUL_MAX_ENTRIES = 2048
# A restore (or input mixing) that is block diagonal over contiguous channel ranges runs as block
# matmuls when the blocks are at least this wide on average and cost at most this many multiply-adds per
# output element (a fully dense restore costs M); otherwise as a gather.
BLOCK_MIN_MEAN_WIDTH = 4
BLOCK_MAX_MACS_PER_OUTPUT = 64
BlockMatmuls = list[tuple[slice, slice, np.ndarray]]

# A linear map's kind, as the kernel names it (``SN_NONE`` ... in ta_shadownet_kernels.c).
SN_NONE, SN_GATHER, SN_BLOCKS, SN_SCALE = 0, 1, 2, 3


class LinearStruct(ctypes.Structure):
    """``sn_linear``, as the kernel reads it."""

    _fields_ = [("kind", ctypes.c_int32), ("n_in", ctypes.c_int32), ("n_out", ctypes.c_int32),
                ("k", ctypes.c_int32), ("index", ctypes.c_void_p), ("coef", ctypes.c_void_p),
                ("order", ctypes.c_void_p), ("n_order", ctypes.c_int32), ("nblocks", ctypes.c_int32),
                ("blocks", ctypes.c_void_p), ("mats", ctypes.c_void_p), ("perm", ctypes.c_void_p)]


@dataclass
class Linear:
    """A linear map of each pixel's channels in the form the kernel runs (``sn_linear``): ``kind`` gather
    (``index``/``coef`` ``[k, n_out]``, coef None for ones), scale (``coef`` ``[n_out]``, None: a copy) or
    blocks (``blocks`` ``[nblocks, 5]``: source start, width in, output start, width out, offset of the
    block's matrix in ``mats``, after an optional ``order`` gather or followed by an optional ``perm``; a
    gather folds its permutation in). The arrays live in secure memory."""

    kind: int
    n_in: int
    n_out: int
    index: np.ndarray | None = None
    coef: np.ndarray | None = None
    order: np.ndarray | None = None
    blocks: np.ndarray | None = None
    mats: np.ndarray | None = None
    perm: np.ndarray | None = None

    def struct(self) -> LinearStruct:
        return LinearStruct(self.kind, self.n_in, self.n_out,
                            0 if self.index is None else self.index.shape[0],
                            _address(self.index), _address(self.coef), _address(self.order),
                            0 if self.order is None else self.order.size,
                            0 if self.blocks is None else self.blocks.shape[0], _address(self.blocks),
                            _address(self.mats), _address(self.perm))


NO_LINEAR = LinearStruct(SN_NONE, 0, 0, 0, None, None, None, 0, 0, None, None, None)


def _address(array: np.ndarray | None) -> int | None:
    return None if array is None else array.ctypes.data


Alloc = Callable[[Any, Any], np.ndarray]


def _kept(alloc: Alloc, array: np.ndarray, dtype: Any) -> np.ndarray:
    kept = alloc(array.shape, dtype)
    kept[...] = array
    return kept


def gather_linear(index: np.ndarray, coef: np.ndarray, n_in: int, alloc: Alloc,
                  perm: np.ndarray | None = None) -> Linear:
    """``out[n] = sum_j coef[j, n] * in[index[j, n]]``, output channels permuted by ``perm`` (folded in)."""
    if index.ndim != 2 or index.shape != coef.shape or index.shape[0] < 1 \
            or index.min(initial=0) < 0 or index.max(initial=0) >= n_in:
        raise ValueError(f"inconsistent gather of {n_in} channels: index {index.shape}, coef {coef.shape}")
    if perm is not None:
        index, coef = index[:, perm], coef[:, perm]
    n_out = index.shape[1]
    ones = bool(np.all(coef == 1))
    if is_scale(index, n_in):
        return Linear(SN_SCALE, n_in, n_out, coef=None if ones else _kept(alloc, coef[0], np.float32))
    return Linear(SN_GATHER, n_in, n_out, index=_kept(alloc, index, np.int32),
                  coef=None if ones else _kept(alloc, coef, np.float32))


def is_scale(index: np.ndarray, n_in: int, perm: np.ndarray | None = None) -> bool:
    """Whether a gather (output channels permuted by ``perm``) is a per-channel scale: one term, each
    output channel reading its own input channel."""
    return index.ndim == 2 and index.shape[0] == 1 and index.shape[1] == n_in and np.array_equal(
        index[0] if perm is None else index[0, perm], np.arange(n_in))


def block_linear(order: np.ndarray | None, blocks: BlockMatmuls, n_in: int, n_out: int, alloc: Alloc,
                 perm: np.ndarray | None = None) -> Linear:
    """``block_matmuls``' plan as the kernel's blocks: matrices padded to ``LANES`` columns, in order of
    their output ranges (which must tile ``[0, n_out)``). A gathered input (``order``: an input mixing) or
    a permuted output (``perm``: a restore), not both."""
    if order is not None and perm is not None:
        raise ValueError("block matmuls with both a gathered input and a permuted output")
    blocks = sorted(blocks, key=lambda b: b[1].start)
    at, table, total = 0, [], 0
    for rows, cols, matrix in blocks:
        if cols.start != at or matrix.shape != (rows.stop - rows.start, cols.stop - cols.start):
            raise ValueError("block matmuls that do not tile the output")
        at = cols.stop
        table.append((rows.start, matrix.shape[0], cols.start, matrix.shape[1], total))
        total += matrix.shape[0] * -(-matrix.shape[1] // LANES) * LANES
    if at != n_out:
        raise ValueError("block matmuls that do not tile the output")
    mats = alloc((max(total, 1),), np.float32)
    for (_, _, matrix), (_, width_in, _, width_out, offset) in zip(blocks, table, strict=True):
        padded = -(-width_out // LANES) * LANES
        mats[offset:offset + width_in * padded].reshape(width_in, padded)[:, :width_out] = matrix
    return Linear(SN_BLOCKS, n_in, n_out, order=None if order is None else _kept(alloc, order, np.int32),
                  blocks=_kept(alloc, np.asarray(table, np.int32).reshape(-1, 5), np.int32), mats=mats,
                  perm=None if perm is None else _kept(alloc, perm, np.int32))


class LoadedModel(Protocol):
    """What the restore and push compilers read of a loaded model (``tee_sim.ta_shadownet``)."""

    arrays: dict[str, np.ndarray]
    scratch: np.ndarray | None
    stride: int  # floats per pixel in the kernel's four tiles in ``scratch``
    tile: int  # pixels per tile
    restores: dict[str, Linear]  # restore (by offset array) -> its linear map
    mixings: dict[str, Linear]  # input mixing (by index array) -> its linear map


def prepare_linears(model: LoadedModel, steps: list[list[dict[str, Any]]], shared_buffers: dict[str, Any],
                    alloc: Alloc) -> None:
    """At load, the form of each input mixing (block matmuls, else a gather) and each restore (a dense
    matrix while it is small, else block matmuls, else a gather): ``model.mixings`` and
    ``model.restores``, in secure memory from ``alloc(shape, dtype)``."""
    for i in (i for step in steps for i in step if i.get("input_index")):
        index, coef = model.arrays[i["input_index"]], model.arrays[i["input_coef"]]
        n = index.shape[1] if index.ndim == 2 else 0
        plan = block_matmuls(index, coef, n, gather=True)
        model.mixings[i["input_index"]] = gather_linear(index, coef, n, alloc) if plan is None \
            else block_linear(plan[0], plan[1], n, n, alloc)
    for i in (i for step in steps for i in step if i["op"] == "restore"):
        m = shared_buffers[i["src"].removeprefix("shm:")]["shape"][-1]
        if i.get("pop"):  # an exact split's [y_hi | y_lo]: restored once combined (tee_sim.exact_split)
            m //= 2
        index, coef = model.arrays[i["index"]], model.arrays[i["coef"]]
        n = index.shape[1] if index.ndim == 2 else 0
        perm = permutation(model.arrays, i.get("permutation"), n)
        # A scale (a depthwise layer's) stays one; then block matmuls, a dense matrix, a gather.
        simple = index.ndim == 2 and index.shape == coef.shape and not is_scale(index, m, perm)
        blocks = restore_blocks(index, coef, m) if simple else None
        if blocks is not None:
            model.restores[i["offset"]] = block_linear(None, blocks, m, n, alloc, perm)
        elif simple and m * n <= MATMUL_MAX_ENTRIES:
            whole = [(slice(0, m), slice(0, n), restore_matrix(index, coef, m, perm))]
            model.restores[i["offset"]] = block_linear(None, whole, m, n, alloc)
        else:
            model.restores[i["offset"]] = gather_linear(index, coef, m, alloc, perm)


def restore_matrix(index: np.ndarray, coef: np.ndarray, m: int, perm: np.ndarray | None) -> np.ndarray:
    """The restore as a dense ``[M, N]`` matrix, its columns in the output's channel order."""
    if index.min(initial=0) < 0 or index.max(initial=0) >= m:
        raise ValueError("restore index out of range")
    if perm is not None:
        index, coef = index[:, perm], coef[:, perm]
    matrix = np.zeros((m, index.shape[1]), np.float32)
    columns = np.arange(index.shape[1])
    for j in range(index.shape[0]):
        matrix[index[j], columns] += coef[j]
    return matrix


def restore_blocks(index: np.ndarray, coef: np.ndarray, m: int) -> BlockMatmuls | None:
    """The restore ``y[:, n] = sum_j coef[j, n] * y'[:, index[j, n]]`` as block matmuls
    ``y[:, cols] = y'[:, rows] @ matrix``, one per connected set of output and source channels, when
    each set is a contiguous range on both sides and the blocks pay (see ``BLOCK_*``); else None."""
    plan = block_matmuls(index, coef, m, gather=False)
    return None if plan is None else plan[1]


def block_matmuls(index: np.ndarray, coef: np.ndarray, m: int, gather: bool
                  ) -> tuple[np.ndarray | None, BlockMatmuls] | None:
    """``out[:, n] = sum_j coef[j, n] * src[:, index[j, n]]`` as ``(order, blocks)``: one matmul
    ``out[:, cols] = src'[:, rows] @ matrix`` per connected set of output and source channels, where
    ``src'`` is ``src`` itself (``order`` None: each set's source channels span a range, gaps as zero
    rows) or, with ``gather``, ``src[:, order]`` (one gather puts each set's source channels side by
    side). None when a set's output channels are not contiguous or the blocks do not pay (``BLOCK_*``)."""
    if index.ndim != 2 or index.shape != coef.shape:
        return None
    k, n = index.shape
    if n == 0 or index.min() < 0 or index.max() >= m:
        return None
    parent = np.arange(m)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for column in index.T.tolist():
        root = find(column[0])
        for row in column[1:]:
            other = find(row)
            if other != root:
                parent[other] = root
    label = np.array([find(int(r)) for r in index[0]])
    starts = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    if len(starts) != len(np.unique(label)) or n < BLOCK_MIN_MEAN_WIDTH * len(starts):
        return None  # a set of output channels is not contiguous, or the blocks are too narrow
    spans = list(zip(starts.tolist(), [*starts[1:].tolist(), n], strict=True))
    sources = [np.unique(index[:, a:b]) for a, b in spans]
    contiguous = all(len(r) == r[-1] - r[0] + 1 for r in sources)
    if not (contiguous or gather):
        sources = [np.arange(r[0], r[-1] + 1) for r in sources]
    order = np.concatenate(sources).astype(np.int32) if gather and not contiguous else None
    blocks, macs, at = [], 0, 0
    for (a, b), rows in zip(spans, sources, strict=True):
        macs += len(rows) * (b - a)
        matrix = np.zeros((len(rows), b - a), np.float32)
        for j in range(k):
            np.add.at(matrix, (np.searchsorted(rows, index[j, a:b]), np.arange(b - a)), coef[j, a:b])
        start = at if order is not None else int(rows[0])
        blocks.append((slice(start, start + len(rows)), slice(a, b), matrix))
        at += len(rows)
    if macs > BLOCK_MAX_MACS_PER_OUTPUT * n:
        return None
    return order, blocks


def permutation(arrays: dict[str, np.ndarray], name: str | None, channels: int) -> np.ndarray | None:
    if name is None:
        return None
    perm = arrays[name]
    if perm.shape != (channels,) or np.any(np.sort(perm) != np.arange(channels)):
        raise ValueError(f"{name}: not a permutation of {channels} channels")
    return perm.astype(np.intp)
