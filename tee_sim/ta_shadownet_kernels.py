"""The ShadowNet trusted app's C kernels (``ta_shadownet_kernels.c``, restore / push, with its linear maps
in ``ta_shadownet_linear_map.h``;
``ta_shadownet_freivalds.c`` and ``ta_shadownet_freivalds_check.c``, the check, sharing
``ta_shadownet_lanes.h``; ``ta_shadownet_max_pool.c``; ``ta_shadownet_depthwise.c``;
``ta_shadownet_small_ops.c``; ``ta_shadownet_pool.c``, the pool refill's; sharing ``ta_shadownet_kernels.h``;
one library, built by ``setup.py``), loaded.

Plain C without the Python API, called through ``ctypes`` with one structure per call, prepared once:
``sn_run`` (restore / push, ``tee_sim.ta_shadownet_restore_push``), ``sn_max_pool``
(``tee_sim.ta_shadownet_max_pool``), ``sn_depthwise`` (``tee_sim.ta_shadownet_depthwise``), ``sn_small_op``
(``tee_sim.ta_shadownet_small_ops``), ``fv_prepare``,
``fv_check`` and ``fv_draw`` (Freivalds' check and the projections its pool draws, ``tee_sim.freivalds``),
``sn_pop`` (a one-time-masked conv's pop mask, ``tee_sim.one_time_masks.conv_pop``), ``sn_unwrap`` (a modular
mask's correction, ``tee_sim.modular_masks``). The C files say why C
and how each kernel works.

On x86-64 the library is built for three targets (``setup.py``); ``VARIANT`` names the one loaded: the best
that the CPU runs, as the baseline build's ``sn_cpu_level`` reports it, among those that were built.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np

# Measured with the TA's code (the libraries are built from them).
SOURCES = tuple(Path(__file__).with_name(f"ta_shadownet_{name}") for name in
                ("kernels.h", "lanes.h", "linear_map.h", "kernels.c", "freivalds.c", "freivalds_check.c",
                 "max_pool.c", "depthwise.c", "small_ops.c", "pool.c"))
LANES = 16  # the width of the layouts the kernels share with Python (block matrices, packed lanes)
VARIANTS = ("", "_avx2", "_avx512")  # by sn_cpu_level


def nhwc_strides(array: np.ndarray, what: str) -> tuple[int, int, int]:
    """An NHWC float32 array's image, row and pixel strides in floats, for a window kernel's structure; its
    channels must be contiguous (ValueError naming ``what`` otherwise)."""
    if array.dtype != np.float32 or array.ndim != 4 or (array.shape[-1] > 1 and array.strides[-1] != 4) \
            or any(s % 4 for s in array.strides):
        raise ValueError(f"{what}: {array.dtype} {array.shape} strides {array.strides}")
    return tuple(s // 4 for s in array.strides[:3])


def window_geometry(instr: dict, window_key: str | None = None) -> tuple[list[int], ...]:
    """A window kernel's ``stride`` (``[sh, sw]``, each 1 .. 2^31-1), ``pad`` (``[[top, bottom], [left,
    right]]``, each 0 .. 2^31-1) and, if ``window_key``, that ``[fh, fw]`` (1 .. 2^31-1), as the C structures'
    int32 fields hold them: ValueError for anything else (ctypes would wrap an out-of-range int silently)."""
    def ints(value: object, low: int, what: str) -> list[int]:
        if not (isinstance(value, list) and len(value) == 2
                and all(type(v) is int and low <= v < 2 ** 31 for v in value)):
            raise ValueError(f"{what} must be two integers in [{low}, 2^31), not {value!r}")
        return value
    pad = instr.get("pad")
    if not (isinstance(pad, list) and len(pad) == 2):
        raise ValueError(f"pad must be [[top, bottom], [left, right]], not {pad!r}")
    found = (ints(instr.get("stride"), 1, "stride"), [ints(p, 0, "pad") for p in pad])
    return (*found, ints(instr.get(window_key), 1, window_key)) if window_key else found


def windows_fit(src: np.ndarray, dst: np.ndarray, window: tuple[int, int], stride: list[int],
                pad: list[list[int]]) -> bool:
    """Whether ``dst`` is an NHWC output of ``src``'s images and channels whose every window (with
    ``window_geometry``'s stride and pad) lies inside the padded input: what a window kernel reads and writes
    stays in bounds."""
    n, h, w, c = src.shape
    oh, ow = dst.shape[1:3] if dst.ndim == 4 else (0, 0)
    (sh, sw), ((top, bottom), (left, right)) = stride, pad
    return (dst.shape == (n, oh, ow, c) and (oh - 1) * sh + window[0] <= h + top + bottom
            and (ow - 1) * sw + window[1] <= w + left + right)


def _find(suffix: str) -> str | None:
    spec = importlib.util.find_spec(f"tee_sim._ta_shadownet_kernels{suffix}")  # the built file, not imported
    return None if spec is None or spec.origin is None else spec.origin


def _open(path: str) -> ctypes.CDLL:
    library = ctypes.CDLL(path)
    for name in ("sn_run", "sn_max_pool", "sn_depthwise", "sn_small_op", "fv_prepare", "fv_check", "fv_draw",
                 "sn_pop", "sn_unwrap"):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p]
        function.restype = ctypes.c_int
    return library


def runnable() -> dict[str, ctypes.CDLL]:
    """Every build of the kernels this CPU runs, by name (``baseline``, ``avx2``, ``avx512``), best last."""
    baseline = _find("")
    if baseline is None:
        raise ImportError(f"the trusted app's C kernels are not built in {Path(__file__).parent}: install "
                          "shadownet (pip install .) on a machine with a C compiler, or, if it is installed, "
                          "run from outside its source tree, whose tee_sim/ then shadows the installed one")
    found = {"baseline": _open(baseline)}
    level = found["baseline"].sn_cpu_level()
    for suffix in VARIANTS[1:level + 1]:
        path = _find(suffix)
        if path is not None:
            found[suffix[1:]] = _open(path)
    return found


VARIANT, LIBRARY = list(runnable().items())[-1]
