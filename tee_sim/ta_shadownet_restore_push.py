"""The ShadowNet trusted app's restore and push kernels: where values cross between the TEE and the
accelerator.

- ``restore``: accelerator output y' -> ``y = sum_j coef_j * y'[..., index_j] + offset`` (offset = bias
  minus the pop mask, precombined offline; the bias alone, per channel, where no static mask is popped),
  then the fused activation, in place;
- ``push``: ``dst = x[..., permutation] + mask`` (or the input channels mixed,
  ``x'[..., c] = sum_j input_coef[j, c] * x[..., input_index[j, c]]``, as block matmuls; no mask on a
  round the scheme leaves unmasked) into the next round's shared input buffer - the result is computed
  in secure memory (or written element by element by one ufunc), so no value before its permutation,
  mixing and mask ever lands in shared memory, not even transiently.

Both run a chunk of rows at a time through three small scratch buffers of secure memory, and compile to
closures over preallocated arrays (``tee_sim.ta_shadownet`` allocates them at load and binds them).

Why these kernels (measured on MobileNet-sized tensors, one core): numpy's ``take`` gather + in-place
multiply-add beats LiteRT's GATHER/MUL/ADD for the restore; a matmul against the dense ``[M, N]`` restore
matrix does the same in one pass and wins while the matrix is small (few channels), the gather wins at
large channel counts; both are exact (the matrix holds the same coefficients and zeros). A restore that
is block diagonal over contiguous channel ranges (group-mixing schemes) runs as one small matmul per block.
Gathers use ``mode="wrap"``: every index is checked once at bind time, and numpy's wrap loop is ~1.4x
faster than its clip loop (0.83 vs 1.20 ns an element, 3136 x 128 of 153 channels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from tee_sim.ta_shadownet_numpy_ops import activation_in_place, interior

# A matmul restore reads the [M, N] matrix once per output pixel; below this many matrix entries it beats
# the 2-3 gather passes (measured: benchmarks in the converter tests' notes; both are exact).
MATMUL_MAX_ENTRIES = 2048
# A restore whose matrix is block diagonal (contiguous source channels -> contiguous output channels,
# e.g. a scheme that mixes groups of channels) runs as one small matmul per block, writing its output
# slice in place: 3-5x faster than k gather passes at k = 4-16 terms (MobileNet-sized layers, one core).
# Used when the blocks are at least this wide on average and cost at most this many multiply-adds per
# output element (a fully dense restore costs M).
BLOCK_MIN_MEAN_WIDTH = 4
BLOCK_MAX_MACS_PER_OUTPUT = 64
# Restores and pushes run a chunk of rows at a time (about this many float32 elements): whatever is still
# unmasked or half-restored sits in three small scratch buffers of secure memory, not full-size copies.
CHUNK = 1 << 16

BlockMatmuls = list[tuple[slice, slice, np.ndarray]]


class LoadedModel(Protocol):
    """What the restore and push compilers read of a loaded model (``tee_sim.ta_shadownet``)."""

    arrays: dict[str, np.ndarray]
    scratch: np.ndarray | None
    chunk: int  # elements of each of the scratch's three chunk buffers
    matrices: dict[str, np.ndarray]  # restore (by offset array) -> [M, N]
    blocks: dict[str, BlockMatmuls]  # restore (by offset array) -> block matmuls
    mixings: dict[str, tuple[np.ndarray | None, BlockMatmuls]]  # input mixing -> (gather order, blocks)


def compile_push(model: LoadedModel, instr: dict[str, Any], src: np.ndarray,
                 dst: np.ndarray) -> Callable[[], Any]:
    """``push``: ``src`` permuted or mixed, masked and padded into ``dst`` (shared memory)."""
    mask = _push_mask(model.arrays, instr, dst)
    out, inner_mask, border = _masked_destination(dst, mask, instr["pad"])
    if src.shape != out.shape:
        raise ValueError(f"push {instr['src']} -> {instr['dst']}: {src.shape} into {out.shape}")
    perm = permutation(model.arrays, instr["permutation"], src.shape[-1])
    if instr.get("input_index"):
        return _compile_mixing_push(model, instr, src, out, inner_mask, border)
    if perm is None:
        def push_plain() -> None:
            for d, s in border:
                np.copyto(d, s)
            np.add(src, inner_mask, out=out)
        return push_plain
    # The permuted, still unmasked values only ever sit in secure scratch, a chunk at a time.
    work = model.scratch[:model.chunk]
    chunks = [(src[sl], _chunk_of(work, out[sl].shape), inner_mask[sl], out[sl])
              for sl in _row_chunks(out.shape)]

    def push() -> None:
        for d, s in border:
            np.copyto(d, s)
        for s, w, m, o in chunks:
            np.take(s, perm, axis=-1, out=w, mode="wrap")
            np.add(w, m, out=o)
    return push


def _mixer(model: LoadedModel, instr: dict[str, Any],
           channels: int) -> Callable[[np.ndarray, np.ndarray, np.ndarray], None]:
    """``mix(x, out, tmp)``: ``out[:, c] = sum_j input_coef[j, c] * x[:, input_index[j, c]]`` for
    ``[rows, channels]`` chunks; one gather into ``tmp`` when a block's channels are scattered, then
    one small matmul per block (or, without block structure, the gather passes of a restore)."""
    index, coef = model.arrays[instr["input_index"]], model.arrays[instr["input_coef"]]
    if (index.ndim != 2 or index.shape != coef.shape or index.shape[1] != channels
            or coef.dtype != np.float32 or index.min(initial=0) < 0 or index.max(initial=0) >= channels
            or instr.get("permutation") is not None):
        raise ValueError(f"{instr['op']} {instr['src']}: inconsistent input mixing")
    plan = model.mixings.get(instr["input_index"])
    if plan is not None:
        order, blocks = plan
        order = None if order is None else order.astype(np.intp)

        def mix_blocks(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
            if order is not None:
                np.take(x, order, axis=1, out=tmp, mode="clip")
                x = tmp
            for rows, cols, matrix in blocks:
                np.matmul(x[:, rows], matrix, out=out[:, cols])
        return mix_blocks
    (first, first_coef), *rest = [(i.astype(np.intp), c) for i, c in zip(index, coef, strict=True)]

    def mix_gather(x: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> None:
        np.take(x, first, axis=1, out=out, mode="clip")
        np.multiply(out, first_coef, out=out)
        for i, c in rest:
            np.take(x, i, axis=1, out=tmp, mode="clip")
            np.multiply(tmp, c, out=tmp)
            np.add(out, tmp, out=out)
    return mix_gather


def _compile_mixing_push(model: LoadedModel, instr: dict[str, Any], src: np.ndarray, out: np.ndarray,
                         mask: np.ndarray, border: list[tuple[np.ndarray, np.ndarray]]
                         ) -> Callable[[], Any]:
    """A push whose input channels are mixed: chunk by chunk through secure scratch, then masked."""
    c = src.shape[-1]
    if not src.flags.c_contiguous:
        raise ValueError(f"push {instr['src']}: the source is not contiguous")
    mix = _mixer(model, instr, c)
    work, term = model.scratch[:model.chunk], model.scratch[model.chunk:2 * model.chunk]
    # Unmasked, block mixing writes each block's final values once: straight into shared memory (as in
    # compile_restore).
    direct = instr["mask"] is None and instr["input_index"] in model.mixings
    chunks = []
    for sl in _row_chunks(out.shape):
        s, o = src[sl].reshape(-1, c), out[sl]
        if direct and o.flags.c_contiguous:
            chunks.append((s, o.reshape(-1, c), _chunk_of(term, s.shape), None, None))
        else:
            chunks.append((s, _chunk_of(work, s.shape), _chunk_of(term, s.shape), mask[sl], o))

    def push() -> None:
        for d, m in border:
            np.copyto(d, m)
        for s, w, t, m, o in chunks:
            mix(s, w, t)
            if o is not None:
                np.add(w.reshape(o.shape), m, out=o)
    return push


def compile_restore(model: LoadedModel, instr: dict[str, Any], src: np.ndarray,
                    dst: np.ndarray) -> Callable[[], Any]:
    """``restore``, fused with the next round's push when it carries that push's ``mask`` field (a
    name, or None for an unmasked round): then ``dst`` is that round's shared input buffer and the
    restored values are permuted (``permutation``) or mixed, masked and padded (``pad``) on their way
    there, a chunk at a time through secure scratch. ``offset`` is in the output's channel order (a
    full tensor, or per channel when no static mask is popped), ``index`` / ``coef`` in the restored
    one."""
    index, coef, offset = (model.arrays[instr[k]] for k in ("index", "coef", "offset"))
    m, n = src.shape[-1], index.shape[1]
    fused = "mask" in instr
    out, mask, border = dst, None, []
    if fused:
        mask = _push_mask(model.arrays, instr, dst)
        out, mask, border = _masked_destination(dst, mask, instr.get("pad"))
    elif instr.get("pad") is not None:
        raise ValueError(f"restore {instr['src']}: padding without a push")
    per_channel = offset.shape == (n,) and out.shape != (n,)
    if (index.ndim != 2 or index.shape != coef.shape or out.shape[-1] != n
            or (offset.shape != out.shape and not per_channel)
            or src.shape[:-1] != out.shape[:-1]
            or index.min(initial=0) < 0 or index.max(initial=0) >= m or src.dtype != np.float32):
        raise ValueError(f"restore {instr['src']} -> {instr['dst']}: inconsistent shapes")
    perm = permutation(model.arrays, instr.get("permutation"), n)
    # Fused with a push that mixes the input channels: restored, activated, mixed, masked.
    mix = _mixer(model, instr, n) if fused and instr.get("input_index") else None
    cap = model.chunk
    work, term, spare = (model.scratch[i * cap:(i + 1) * cap] for i in range(3))
    matrix = model.matrices.get(instr["offset"])  # permuted at load
    blocks = model.blocks.get(instr["offset"])
    terms = [(idx.astype(np.intp) if perm is None else idx[perm].astype(np.intp),
              (None if np.all(c == 1) else c) if perm is None else
              (None if np.all(c == 1) else np.ascontiguousarray(c[perm])))
             for idx, c in zip(index, coef, strict=True)]
    kind, alpha = instr["activation"], instr["alpha"]
    # Never in place into a push's shared buffer: the values before mixing and masking stay secure.
    in_place = not fused and out.flags.c_contiguous
    # Except an unmasked push's block mixing, which writes each block's final values once: straight into
    # shared memory, one pass less. (The gather fallback sums partial terms there: not that one.)
    unmasked = fused and instr["mask"] is None
    mix_into_place = unmasked and mix is not None and instr["input_index"] in model.mixings
    chunks = []
    for sl in _row_chunks(out.shape):
        o = out[sl]
        direct = in_place or (mix_into_place and o.flags.c_contiguous)
        w = o.reshape(-1, n) if in_place else _chunk_of(work, (o.size // n, n))
        t = _chunk_of(term, w.shape)
        v = o.reshape(-1, n) if direct and mix is not None else _chunk_of(spare, w.shape)
        pushed = w if mix is None else v
        chunks.append((src[sl].reshape(-1, m), w, offset if per_channel else offset[sl].reshape(w.shape),
                       t, v,
                       activation_in_place(kind, alpha, t),
                       # A strided destination (a slice of a concatenation), or an unmasked push's,
                       # gets the chunk copied.
                       None if direct else (pushed.reshape(o.shape), None if mask is None or unmasked
                                            else mask[sl], o)))

    if matrix is not None:
        def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
            np.matmul(s, matrix, out=w)
    elif blocks is not None:
        def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
            target = w if perm is None else v
            for rows, cols, part in blocks:
                np.matmul(s[:, rows], part, out=target[:, cols])
            if perm is not None:
                np.take(v, perm, axis=1, out=w, mode="wrap")
    else:
        (first, first_coef), rest = terms[0], terms[1:]
        # A first term that reads each channel in place (a depthwise layer's scales) needs no gather.
        identity = m == n and np.array_equal(first, np.arange(n))

        def linear(s: np.ndarray, w: np.ndarray, t: np.ndarray, v: np.ndarray) -> None:
            if identity and first_coef is None:
                np.copyto(w, s)
            elif identity:
                np.multiply(s, first_coef, out=w)
            else:
                np.take(s, first, axis=1, out=w, mode="wrap")
                if first_coef is not None:
                    np.multiply(w, first_coef, out=w)
            for idx, c in rest:
                np.take(s, idx, axis=1, out=t, mode="wrap")
                if c is not None:
                    np.multiply(t, c, out=t)
                np.add(w, t, out=w)

    def restore() -> None:
        for d, s in border:
            np.copyto(d, s)
        for s, w, off, t, v, activation, masked in chunks:
            linear(s, w, t, v)
            np.add(w, off, out=w)
            if activation is not None:
                activation(w)
            if mix is not None:
                mix(w, v, t)
            if masked is not None:
                if masked[1] is None:
                    np.copyto(masked[2], masked[0])
                else:
                    np.add(masked[0], masked[1], out=masked[2])
    return restore


def permutation(arrays: dict[str, np.ndarray], name: str | None, channels: int) -> np.ndarray | None:
    if name is None:
        return None
    perm = arrays[name]
    if perm.shape != (channels,) or np.any(np.sort(perm) != np.arange(channels)):
        raise ValueError(f"{name}: not a permutation of {channels} channels")
    return perm.astype(np.intp)


def prepare_matmuls(model: LoadedModel, steps: list[list[dict[str, Any]]], shared_buffers: dict[str, Any],
                    alloc: Callable[[Any, Any], np.ndarray]) -> None:
    """At load, choose the kernel of each input mixing (block matmuls, else gathers) and each restore (a
    dense matrix while it is small, else block matmuls, else gathers): ``model.mixings``,
    ``model.matrices`` and ``model.blocks`` get the matrices, in secure memory from ``alloc(shape,
    dtype)``."""
    def keep(array: np.ndarray) -> np.ndarray:
        kept = alloc(array.shape, array.dtype)
        kept[...] = array
        return kept

    for i in (i for step in steps for i in step if i.get("input_index")):
        index, coef = model.arrays[i["input_index"]], model.arrays[i["input_coef"]]
        plan = block_matmuls(index, coef, index.shape[1], gather=True)
        if plan is not None:
            model.mixings[i["input_index"]] = (plan[0], [(rows, cols, keep(matrix))
                                                         for rows, cols, matrix in plan[1]])
    for i in (i for step in steps for i in step if i["op"] == "restore"):
        m = shared_buffers[i["src"].removeprefix("shm:")]["shape"][-1]
        n = model.arrays[i["index"]].shape[1]
        if m * n <= MATMUL_MAX_ENTRIES:
            perm = permutation(model.arrays, i.get("permutation"), n)
            model.matrices[i["offset"]] = restore_matrix(model.arrays, i, m, perm, alloc)
            continue
        blocks = restore_blocks(model.arrays[i["index"]], model.arrays[i["coef"]], m)
        if blocks is not None:
            model.blocks[i["offset"]] = [(rows, cols, keep(matrix)) for rows, cols, matrix in blocks]


def restore_matrix(arrays: dict[str, np.ndarray], instr: dict[str, Any], m: int, perm: np.ndarray | None,
                   alloc: Callable[[Any, Any], np.ndarray]) -> np.ndarray:
    """The restore as a dense ``[M, N]`` matrix, its columns in the output's channel order, in secure
    memory from ``alloc(shape, dtype)``."""
    index, coef = arrays[instr["index"]], arrays[instr["coef"]]
    if index.min(initial=0) < 0 or index.max(initial=0) >= m:
        raise ValueError(f"restore {instr['src']}: index out of range")
    if perm is not None:
        index, coef = index[:, perm], coef[:, perm]
    matrix = alloc((m, index.shape[1]), np.float32)
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




def _row_chunks(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """Index tuples cutting a ``[1, H, W, C]`` tensor into runs of whole rows of about ``CHUNK``
    elements; any other shape is one chunk."""
    if len(shape) == 4 and shape[0] == 1:
        rows = max(1, CHUNK // max(shape[2] * shape[3], 1))
        return [(slice(None), slice(h, min(h + rows, shape[1]))) for h in range(0, shape[1], rows)]
    return [()]


def chunk_elements(shape: tuple[int, ...]) -> int:
    """Elements of the largest chunk of ``shape`` (see ``_row_chunks``)."""
    if len(shape) == 4 and shape[0] == 1:
        row = shape[2] * shape[3]
        return min(shape[1], max(1, CHUNK // max(row, 1))) * row
    return elements(list(shape))


def _chunk_of(scratch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    size = elements(list(shape))
    if size > scratch.size:
        raise ValueError(f"a chunk of {shape} does not fit the scratch ({scratch.size} elements)")
    return scratch[:size].reshape(shape)


def _push_mask(arrays: dict[str, np.ndarray], instr: dict[str, Any], dst: np.ndarray) -> np.ndarray:
    """A push's mask: the program's array, or for an unmasked round (``mask`` None) zeros as a broadcast
    view, which costs no memory."""
    if instr["mask"] is None:
        return np.broadcast_to(np.float32(0), dst.shape)
    mask = arrays[instr["mask"]]
    if mask.shape != dst.shape or mask.dtype != np.float32:
        raise ValueError(f"push into {instr['dst']}: mask {mask.shape} for {dst.shape}")
    return mask


def _masked_destination(dst: np.ndarray, mask: np.ndarray, pad: Any) -> tuple[
        np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """For a push into ``dst`` (shared memory) of a tensor zero-padded by ``pad`` (or None): the interior
    that receives ``x + mask``, the mask's interior, and the border's (destination, mask) slices, where
    the value is ``0 + mask``."""
    if pad is None:
        return dst, mask, []
    if len(pad) != dst.ndim or any(len(p) != 2 or min(p) < 0 for p in pad):
        raise ValueError(f"bad padding {pad}")
    inner = interior(pad, dst.shape)
    border = []
    for axis, (before, after) in enumerate(pad):
        # Slabs along each padded axis, within the interior of the axes before it: disjoint, and with
        # the interior they cover the whole buffer.
        head = inner[:axis]
        for part in (slice(0, before), slice(dst.shape[axis] - after, dst.shape[axis])):
            if part.stop > part.start:
                index = (*head, part)
                border.append((dst[index], mask[index]))
    return dst[inner], mask[inner], border


def elements(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def scratch_size(steps: list[list[dict[str, Any]]],
                 shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, int]:
    """``(chunk, scratch)`` in float32 elements: the largest chunk a restore or a permuting / mixing push
    works on, and the secure scratch they share (three chunks) with padded max pools (a padded copy of
    their input). ``shape_of(ref)``: the shape of a buffer the program names."""
    def restore_shape(instr: dict[str, Any]) -> tuple[int, ...]:  # its destination less a push's border
        shape, pad = shape_of(instr["dst"]), instr.get("pad")
        return shape if pad is None else tuple(n - a - b for n, (a, b) in zip(shape, pad, strict=True))

    instrs = [i for step in steps for i in step]
    chunk = max([1] + [chunk_elements(restore_shape(i)) for i in instrs if i["op"] == "restore"]
                + [chunk_elements(shape_of(i["src"])) for i in instrs
                   if i["op"] == "push" and (i["permutation"] is not None or i.get("input_index"))])
    scratch = 3 * chunk
    for i in instrs:
        if i["op"] == "max_pool" and any(map(any, i["pad"])):
            n, h, w, c = shape_of(i["srcs"][0])
            (top, bottom), (left, right) = i["pad"]
            scratch = max(scratch, n * (h + top + bottom) * (w + left + right) * c)
    return chunk, scratch
