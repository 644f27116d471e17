"""The ShadowNet trusted app's restore and push kernels: where values cross between the TEE and the
accelerator.

- ``restore``: accelerator output y' -> ``y = sum_j coef_j * y'[..., index_j] + offset`` (offset = bias
  minus the pop mask, precombined offline; the bias alone, per channel, where no static mask is popped),
  plus the ``addend`` if it has one (a residual block's shortcut), then the fused activation;
- ``push``: ``dst = x[..., permutation] + mask`` (or the input channels mixed,
  ``x'[..., c] = sum_j input_coef[j, c] * x[..., input_index[j, c]]``; no mask on a round the scheme
  leaves unmasked) into the next round's shared input buffer.

A restore that feeds the next round's push only carries that push's fields and does both. Each
instruction runs as one call of the C kernel ``sn_run`` (``tee_sim/ta_shadownet_kernels.c``, which says
why C): one pass over the tensor, a tile of pixels at a time, every intermediate value in the secure
scratch, so no value before its permutation, mixing and mask ever lands in shared memory, not even
transiently. Its parameters - pointers into preallocated arrays and the restore's prepared form (block
matrices padded to the kernel's ``LANES``) - are packed into a ``ctypes`` structure once, when the
program is bound; running an instruction is one foreign call. The restore's and the input mixing's
form is chosen at load: ``tee_sim.ta_shadownet_linears``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.exact_split import split_mask
from tee_sim.ta_shadownet_kernels import LANES, LIBRARY
from tee_sim.ta_shadownet_linears import NO_LINEAR, SN_GATHER, Linear, LinearStruct, LoadedModel, permutation
from tee_sim.ta_shadownet_numpy_ops import interior
from tee_sim.ta_shadownet_small_ops import compile_rows

SN_RUN = ctypes.cast(LIBRARY.sn_run, ctypes.c_void_p).value  # the kernel's address, for C callers

# The kernel works on tiles of up to this many floats (a tile of pixels of one row, each pixel's channels
# plus a vector's spill), four of them: they stay in the core's L1/L2 cache between the stages.
TILE_FLOATS = 8192
MAX_TILE_PIXELS = 256

ACTIVATIONS = {None: 0, "RELU": 1, "RELU6": 2, "RELU_N1_TO_1": 3, "LEAKY_RELU": 4}


# ---------------------------------------------------------------------------------------------------
# The C kernel
# ---------------------------------------------------------------------------------------------------

class _Tensor(ctypes.Structure):
    _fields_ = [("p", ctypes.c_void_p), ("row", ctypes.c_int64), ("pix", ctypes.c_int64)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("src", _Tensor), ("a", LinearStruct),
                ("offset", _Tensor), ("activation", ctypes.c_int32), ("alpha", ctypes.c_float),
                ("b", LinearStruct), ("mask", _Tensor), ("dst", ctypes.c_void_p), ("dst_row", ctypes.c_int64),
                ("dst_pix", ctypes.c_int64), ("channels", ctypes.c_int32), ("scratch", ctypes.c_void_p),
                ("stride", ctypes.c_int64), ("tile", ctypes.c_int64), ("check", ctypes.c_void_p),
                ("copy", ctypes.c_void_p), ("copy_row", ctypes.c_int64), ("copy_pix", ctypes.c_int64),
                ("addend", _Tensor), ("pop", _Tensor), ("grid", ctypes.c_float), ("spread", ctypes.c_void_p),
                ("popped", ctypes.c_void_p), ("plain", ctypes.c_void_p), ("plain_row", ctypes.c_int64),
                ("plain_pix", ctypes.c_int64), ("wraps", ctypes.c_void_p), ("period", ctypes.c_void_p)]

# sn_run's answers: done; a check failed (the verified model's ``on_fail`` says which); the restored
# tensor's spread left its followed mask's band (``spread``: the mask must move, and the step run again).
DONE, CHECK_FAILED, SPREAD_OUTSIDE = 0, 1, 2


# ---------------------------------------------------------------------------------------------------
# The instructions
# ---------------------------------------------------------------------------------------------------

def compile_push(model: LoadedModel, instr: dict[str, Any], src: np.ndarray, dst: np.ndarray,
                 **verified: Any) -> Callable[[], Any]:
    """``push``: ``src`` permuted or mixed, masked and padded into ``dst`` (shared memory). ``verified``:
    see ``_compile``. With ``split`` (an exact split's, ``tee_sim.exact_split``): ``dst`` has twice the
    channels and receives ``[x_hi | x_lo]``."""
    split = instr.get("split")
    halves = dst.shape[-1] // 2 if split else 0
    mask = _push_mask(model.arrays, instr, dst[..., :halves] if split else dst)
    out, inner_mask, border = _masked_destination(dst, mask, instr["pad"])
    grid = 0.0
    if split:
        grid = float(split["grid"])
        if not (0 < grid < np.inf) or mask is None or dst.shape[-1] != 2 * halves:
            raise ValueError(f"push {instr['src']}: a split on grid {grid!r} into {dst.shape}")
        out = out[..., :halves]  # the pixels the kernel writes; each gets its two halves
    if src.shape != out.shape:
        raise ValueError(f"push {instr['src']} -> {instr['dst']}: {src.shape} into {out.shape}")
    c = src.shape[-1]
    perm = permutation(model.arrays, instr["permutation"], c)
    if instr.get("input_index"):
        if perm is not None:
            raise ValueError(f"push {instr['src']}: both a permutation and a mixing")
        transform = _mixing(model, instr, c)
    elif perm is not None:
        transform = Linear(SN_GATHER, c, c, index=perm.astype(np.int32)[None])
    else:
        transform = None
    return _compile(model, src, None, None, 0, 0.0, transform, inner_mask, out, border,
                    pad=instr["pad"], split_grid=grid, **verified)


def compile_restore(model: LoadedModel, instr: dict[str, Any], src: np.ndarray, dst: np.ndarray,
                    addend: np.ndarray | None = None, **verified: Any) -> Callable[[], Any]:
    """``restore``, fused with the next round's push when it carries that push's ``mask`` field (a
    name, or None for an unmasked round): then ``dst`` is that round's shared input buffer and the
    restored values are permuted (``permutation``) or mixed, masked and padded (``pad``) on their way
    there. ``offset`` is in the output's channel order (a full tensor, or per channel when no static
    mask is popped), ``index`` / ``coef`` in the restored one. ``addend`` (the instruction's
    ``addend`` tensor: a residual block's shortcut) is added before the activation, shaped as the
    restored tensor. ``pop`` (an exact split's, ``tee_sim.exact_split``): ``src`` holds ``[y_hi | y_lo]``
    and ``(y_hi - pop_hi) + (y_lo - pop_lo)`` is restored. ``verified``: see ``_compile``."""
    index, offset = model.arrays[instr["index"]], model.arrays[instr["offset"]]
    pop = model.arrays[instr["pop"]] if instr.get("pop") else None
    m, n = src.shape[-1] // (1 if pop is None else 2), index.shape[1] if index.ndim == 2 else -1
    if pop is not None and (pop.shape != src.shape or pop.dtype != np.float32 or src.shape[-1] != 2 * m):
        raise ValueError(f"restore {instr['src']}: a pop mask {pop.shape} for {src.shape}")
    fused = "mask" in instr
    out, mask, border = dst, None, []
    if fused:
        out, mask, border = _masked_destination(dst, _push_mask(model.arrays, instr, dst), instr.get("pad"))
    elif instr.get("pad") is not None:
        raise ValueError(f"restore {instr['src']}: padding without a push")
    per_channel = offset.shape == (n,) and out.shape != (n,)
    restore = model.restores.get(instr["offset"])
    if (restore is None or restore.n_in != m or restore.n_out != n or out.shape[-1] != n
            or (offset.shape != out.shape and not per_channel) or src.shape[:-1] != out.shape[:-1]
            or src.dtype != np.float32 or offset.dtype != np.float32):
        raise ValueError(f"restore {instr['src']} -> {instr['dst']}: inconsistent shapes")
    kind, alpha = instr["activation"], instr["alpha"]
    if kind not in ACTIVATIONS or kind == "LEAKY_RELU" and not (isinstance(alpha, float) and 0 <= alpha <= 1):
        raise ValueError(f"activation {kind!r} (alpha {alpha!r}) cannot be fused into a restore")
    if addend is not None and (addend.dtype != np.float32 or addend.shape != out.shape
                               or (fused and instr.get("permutation"))):  # the channels would not match
        raise ValueError(f"restore {instr['src']}: a {addend.dtype} {addend.shape} addend for {out.shape}")
    # Fused with a push that mixes the input channels: restored, activated, mixed, masked.
    transform = _mixing(model, instr, n) if fused and instr.get("input_index") else None
    return _compile(model, src, restore, offset, ACTIVATIONS[kind], alpha or 0.0, transform, mask, out,
                    border, pad=instr.get("pad"), addend=addend, pop=pop, **verified)


def _mixing(model: LoadedModel, instr: dict[str, Any], channels: int) -> Linear:
    mixing = model.mixings.get(instr["input_index"])
    if mixing is None or mixing.n_in != channels or mixing.n_out != channels:
        raise ValueError(f"{instr['op']} {instr['src']}: inconsistent input mixing")
    return mixing


def _compile(model: LoadedModel, src: np.ndarray, restore: Linear | None, offset: np.ndarray | None,
             activation: int, alpha: float, transform: Linear | None, mask: np.ndarray | None,
             out: np.ndarray, border: list[tuple[np.ndarray, np.ndarray | None]], pad: Any = None,
             check: Any = None, on_fail: Callable[[], Any] | None = None,
             secure_dst: np.ndarray | None = None, addend: np.ndarray | None = None,
             pop: np.ndarray | None = None, split_grid: float = 0.0,
             spread: np.ndarray | None = None, popped: Any = None,
             plain: np.ndarray | None = None, wraps: np.ndarray | None = None,
             period: np.ndarray | None = None) -> Callable[[], Any]:
    """One ``sn_run`` call over ``out``'s pixels (and the padded border's mask, written by numpy).

    On a verified model (``tee_sim.per_inference_kernels``' ``wrap``): ``check``, the ``fv_check_t`` of
    ``src`` (an accelerator's result, contiguous), is made tile by tile on a secure copy that the restore
    then reads, and ``on_fail()`` is called (it raises) when a tile fails, before anything of it is used;
    ``secure_dst``, a secure array shaped as the destination (padding included), receives what is sent.
    ``split_grid``: an exact split's push (``out``: the first half of each pixel, whose stride covers both;
    the border slices hold both halves, each gets ``[r_hi | r_lo]`` of its mask). ``spread``: a restore's
    followed mask's ``[lo, hi, peak_weight, measured]`` (float64, ``tee_sim.mask_spread``), which the kernel
    measures the restored tensor against. ``popped`` (with ``check`` and ``pop``): the ``fv_check_t`` of
    the popped result ``(y_hi - pop_hi) + (y_lo - pop_lo)`` (``tee_sim.freivalds``), made on it tile by tile
    after ``check``; ``plain`` (with ``split_grid``): a secure array shaped as the destination with half its
    channels, whose interior receives the input itself (the popped check's prepare reads it; its border
    stays 0). ``wraps`` and ``period`` (a modular mask's, ``tee_sim.modular_masks``): int8 shaped as the
    mask (padding included), where the push stores the periods it takes off each element, and the float32
    ``[1]`` holding the period now (with ``split_grid``: the high half is taken modulo it). The compiled
    function returns the kernel's answer (``DONE``,
    ``SPREAD_OUTSIDE``; ``CHECK_FAILED`` after ``on_fail``, if that returns); its ``step`` is the kernel's
    structure: a mask scaled by a power of two moves its grid there (``grid``)."""
    rows, cols, src_row, src_pix = _grid(src)
    grid = (rows, cols)
    if check is not None and (check.p != rows * cols or check.m != src.shape[-1] or not src.flags.c_contiguous
                              or on_fail is None):
        raise ValueError(f"a check of {check.p} x {check.m} results for {src.shape}")
    if popped is not None and (check is None or pop is None or popped.p != rows * cols
                               or 2 * popped.m != src.shape[-1]):
        raise ValueError(f"a popped check of {popped.p} x {popped.m} results for {src.shape}")
    copy, copy_border = None, []
    if secure_dst is not None:
        if secure_dst.dtype != np.float32 or not secure_dst.flags.c_contiguous:
            raise ValueError("the secure copy must be contiguous float32")
        copy, _, copy_border = _masked_destination(secure_dst, None, pad)
        if split_grid:
            copy = copy[..., :out.shape[-1]]
        if copy.shape != out.shape:
            raise ValueError(f"a secure copy {secure_dst.shape} for {out.shape}")
    if plain is not None:
        if not split_grid or plain.dtype != np.float32 or not plain.flags.c_contiguous:
            raise ValueError("the input's secure copy must be contiguous float32, for a split push")
        plain, _, _ = _masked_destination(plain, None, pad)
        if plain.shape != out.shape:
            raise ValueError(f"a secure copy of the input {plain.shape} for {out.shape}")
    out_rows, out_cols, dst_row, dst_pix = _grid(out)
    if (out_rows, out_cols) != grid:
        raise ValueError(f"{src.shape} -> {out.shape}: not the same pixels")
    channels = out.shape[-1]
    last = transform or restore
    if (last.n_out if last is not None else src.shape[-1]) != channels:
        raise ValueError(f"{src.shape} -> {out.shape}: the channels do not match")
    maps = [m for m in (restore, transform) if m is not None]
    widest = max(src.shape[-1], channels, *(m.n_in for m in maps),
                 *(m.order.size for m in maps if m.order is not None))
    if widest + LANES > model.stride or model.scratch is None \
            or model.scratch.size < 4 * model.tile * model.stride:
        raise ValueError(f"{src.shape} -> {out.shape}: wider than the kernel's scratch")
    step = _Step()
    step.rows, step.cols = grid
    step.src = _Tensor(src.ctypes.data, src_row, src_pix)
    step.a = restore.struct() if restore is not None else NO_LINEAR
    step.offset = _tensor(offset, grid)
    step.activation, step.alpha = activation, alpha
    step.b = transform.struct() if transform is not None else NO_LINEAR
    step.mask = _tensor(mask, grid)
    if addend is not None:
        step.addend = _tensor(addend, grid)
    if pop is not None:
        step.pop = _tensor(pop, grid)
    step.grid = split_grid
    if wraps is not None:
        inner = wraps[interior(pad, wraps.shape)] if pad is not None else wraps
        if (mask is None or period is None or period.shape != (1,) or period.dtype != np.float32
                or wraps.dtype != np.int8 or inner.shape != mask.shape
                or any(n > 1 and a != b // 4 for n, a, b in zip(mask.shape, inner.strides, mask.strides,
                                                                       strict=True))):
            raise ValueError(f"a modular push's wraps {wraps.dtype} {wraps.shape} for its mask")
        step.wraps, step.period = inner.ctypes.data, period.ctypes.data
    if spread is not None:
        if restore is None or spread.dtype != np.float64 or spread.shape != (4,):
            raise ValueError(f"a spread measure {spread.dtype} {spread.shape} for {src.shape}")
        step.spread = spread.ctypes.data
    step.dst, step.dst_row, step.dst_pix, step.channels = out.ctypes.data, dst_row, dst_pix, channels
    # The tiles as wide as this step needs, as long as the model's scratch allows: with the model's
    # widest stride everywhere (MobileNet's 1024 channels: 7 pixels a tile) a 112x112x64 restore ran most
    # of its pixels through the kernel's one-pixel remainders.
    stride, tile = _tiles(widest, model.tile * model.stride)
    step.scratch, step.stride, step.tile = model.scratch.ctypes.data, stride, tile
    if check is not None:
        step.check = ctypes.addressof(check)
    if copy is not None:
        _, _, step.copy_row, step.copy_pix = _grid(copy)
        step.copy = copy.ctypes.data
    if popped is not None:
        step.popped = ctypes.addressof(popped)
    if plain is not None:
        _, _, step.plain_row, step.plain_pix = _grid(plain)
        step.plain = plain.ctypes.data
    # The arrays the structure points into, kept alive with it.
    keep = (step, src, out, offset, mask, restore, transform, check, copy, addend, pop, spread, popped, plain,
            wraps, period)
    run, address = LIBRARY.sn_run, ctypes.addressof(step)
    # The border's mask (or zeros), into the secure copy too.
    borders = border if copy is None else \
        border + [(d, m) for (d, _), (_, m) in zip(copy_border, border, strict=True)]
    if not borders:
        if check is None:
            kernel = lambda keep=keep: run(address)  # noqa: E731 - a function with an attribute
        else:
            def kernel(keep: tuple = keep) -> int:
                status = run(address)
                if status == CHECK_FAILED:
                    on_fail()
                return status
        # For the secure world's fast path (ShadowNetTA.step_program), which hands a failed check's step
        # back to Python: it reports what failed from this run's figures (ta_shadownet_steps.settle).
        kernel.c_call = (SN_RUN, address)
        kernel.step = step  # type: ignore[attr-defined]
        return kernel

    # The border as C calls where it is a copy of the mask (or zeros) row by row: the step can then run on
    # the fast path (yolov4-tiny's steps 0 and 1, a padded push each, went through Python: 40-210 us).
    rows = [compile_rows(m, d) for d, m in borders] if not split_grid else []
    if rows and all(k is not None for k in rows):
        def bordered(keep: tuple = keep) -> int:
            for k in rows:
                k()
            status = run(address)
            if status == CHECK_FAILED and on_fail is not None:
                on_fail()
            return status
        bordered.c_calls = [*(k.c_call for k in rows), (SN_RUN, address)]  # type: ignore[attr-defined]
        bordered.step = step  # type: ignore[attr-defined]
        return bordered

    def guarded(keep: tuple = keep) -> int:
        for d, m in borders:
            if not split_grid or m is None:
                np.copyto(d, 0 if m is None else m)
                continue
            c = m.shape[-1]  # v = 0 on the border: x_hi = r_hi, x_lo = r_lo
            d[..., :c], d[..., c:] = split_mask(m, step.grid)  # the grid a rescaled mask moved (step.grid)
        status = run(address)
        if status == CHECK_FAILED and on_fail is not None:
            on_fail()
        return status
    guarded.step = step  # type: ignore[attr-defined]
    return guarded


def _grid(array: np.ndarray) -> tuple[int, int, int, int]:
    """``(rows, cols, row stride, pixel stride)``, strides in floats, of a float32 tensor whose channels
    (last axis) are contiguous and whose other axes collapse into a grid of rows and columns."""
    if array.dtype != np.float32 or array.ndim == 0 or (array.shape[-1] > 1 and array.strides[-1] != 4):
        raise ValueError(f"a {array.dtype} {array.shape} tensor with strides {array.strides}")
    lead, strides = array.shape[:-1], [s // 4 for s in array.strides[:-1]]
    if any(s % 4 for s in array.strides):
        raise ValueError(f"misaligned strides {array.strides}")
    if not lead:
        return 1, 1, 0, 0
    cols, pix = lead[-1], strides[-1]
    rows, row = 1, 0
    for axis in range(len(lead) - 1):
        if lead[axis] != 1:
            rows, row = _collapse(rows, row, lead[axis], strides[axis])
    return int(rows), int(cols), int(row), int(pix)


def _collapse(rows: int, row: int, n: int, stride: int) -> tuple[int, int]:
    """Rows ``rows`` of stride ``row`` followed by an axis of ``n`` of stride ``stride``, as one."""
    if rows == 1:
        return n, stride
    if row != n * stride:
        raise ValueError("a tensor whose leading axes do not collapse into rows")
    return rows * n, stride


def _tensor(array: np.ndarray | None, grid: tuple[int, int]) -> _Tensor:
    """An offset or mask: absent, one vector for every pixel, or a tensor on ``grid``."""
    if array is None:
        return _Tensor(None, 0, 0)
    if array.ndim == 1:
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"a per-channel {array.dtype} {array.shape}")
        return _Tensor(array.ctypes.data, 0, 0)
    rows, cols, row, pix = _grid(array)
    if (rows, cols) != grid:
        raise ValueError(f"{array.shape}: not the output's pixels")
    return _Tensor(array.ctypes.data, row, pix)


def _push_mask(arrays: dict[str, np.ndarray], instr: dict[str, Any], dst: np.ndarray) -> np.ndarray | None:
    """A push's mask: the program's array, or None for an unmasked round."""
    if instr["mask"] is None:
        return None
    mask = arrays[instr["mask"]]
    if mask.shape != dst.shape or mask.dtype != np.float32:
        raise ValueError(f"push into {instr['dst']}: mask {mask.shape} for {dst.shape}")
    return mask


def _masked_destination(dst: np.ndarray, mask: np.ndarray | None, pad: Any) -> tuple[
        np.ndarray, np.ndarray | None, list[tuple[np.ndarray, np.ndarray | None]]]:
    """For a push into ``dst`` (shared memory) of a tensor zero-padded by ``pad`` (or None): the interior
    that receives ``x + mask``, the mask's interior, and the border's (destination, mask) slices, where
    the value is ``0 + mask`` (0 where there is no mask); none when ``dst`` is the mask itself, whose
    border holds it already (a fused push that makes what it sends in its mask's buffer:
    ``tee_sim.per_inference_kernels``)."""
    if pad is None:
        return dst, mask, []
    if len(pad) != dst.ndim or any(len(p) != 2 or min(p) < 0 for p in pad):
        raise ValueError(f"bad padding {pad}")
    inner = interior(pad, dst.shape)
    if mask is not None and mask.ctypes.data == dst.ctypes.data and mask.strides == dst.strides:
        return dst[inner], mask[inner], []
    border = []
    for axis, (before, after) in enumerate(pad):
        # Slabs along each padded axis, within the interior of the axes before it: disjoint, and with
        # the interior they cover the whole buffer.
        head = inner[:axis]
        for part in (slice(0, before), slice(dst.shape[axis] - after, dst.shape[axis])):
            if part.stop > part.start:
                index = (*head, part)
                border.append((dst[index], None if mask is None else mask[index]))
    return dst[inner], None if mask is None else mask[inner], border


def elements(shape: list[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _tiles(widest: int, floats: int) -> tuple[int, int]:
    """``(stride, tile)`` for channels up to ``widest``: the floats per pixel in the kernel's tiles (plus a
    vector's spill, rounded to ``LANES``) and the pixels per tile in ``floats`` floats."""
    stride = -(-(widest + LANES) // LANES) * LANES
    return stride, max(1, min(MAX_TILE_PIXELS, floats // stride))


def scratch_size(steps: list[list[dict[str, Any]]], arrays: dict[str, np.ndarray],
                 shape_of: Callable[[str], tuple[int, ...]]) -> tuple[int, int, int]:
    """``(stride, tile, scratch)``: the floats per pixel in the kernel's tiles (the widest channel count of
    a restore or push, plus a vector's spill), the pixels per tile, and the float32 elements of the secure
    scratch that holds its four tiles. ``shape_of(ref)``: the shape of a buffer the program names."""
    widest = 1
    for i in (i for step in steps for i in step if i["op"] in ("restore", "push")):
        widest = max(widest, shape_of(i["src"])[-1], shape_of(i["dst"])[-1])
        for name in ("index", "input_index"):
            if i.get(name):
                widest = max(widest, *arrays[i[name]].shape)
    stride, tile = _tiles(widest, TILE_FLOATS)
    return stride, tile, 4 * tile * stride  # three tiles for the stages, one for a checked result's copy
