"""The container of the TEE program (the secret part of a protected model), written by the converter and
parsed by the ShadowNet trusted app - never with pickle.

Layout::

    magic "SNTP" | format version u16 | reserved u16 | header length u64 | header (UTF-8 JSON) | zero padding
    to a 64-byte boundary | data: raw little-endian numpy buffers, each 64-byte aligned

The header is ``{"program": {...}, "arrays": {name: {"dtype", "shape", "offset", "nbytes"}}}``; an array's
``offset`` counts from the start of the data section. ``read_program`` checks everything it relies on
(magic, version, sizes, JSON shape, allowed dtypes, shapes, alignment, bounds, no overlap) and returns
read-only zero-copy views; callers parse only bytes that already passed authentication (the sealed
blob's AES-GCM tag). That tag says the blob was made for this device and not changed since, not who made
it: the device's identity is public, so anyone can provision a program to it (one that holds only its
maker's data). Every check here, and the trusted app's of every geometry the program names, is needed.
The trusted app's input format, published like its command header (``tee_sim.ta_shadownet_commands``):
the converter imports it to write programs. It imports only numpy and the standard library.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

MAGIC = b"SNTP"
# Written; 2: a restore may add an ``addend`` tensor; 3: a one-time mask may be shaped (``bands``,
# ``common``: ``mask_bands``), and a checked layer carry its inputs' ``anisotropy`` (``tee_sim.freivalds``).
# 4: a one-time mask may follow the spread of its input's channels scaled (``scale``: a user's raw input whose
# channels differ in scale, ``converters.schemes.groupmix.input_scales``).
# An older reader would skip them and compute, mask or check something else.
FORMAT_VERSION = 4
READABLE_VERSIONS = frozenset({1, 2, 3, 4})
PROGRAM_FORMAT = "shadownet-tee-program"  # the program dict's "format" (inside the container)

# The largest input magnitude a protected model takes: round 1's mask is 10-40x its input's RMS (white;
# shaped, 35-170x), the
# accelerator sums it through mixed weights, and a verified model's checks sum squares of a window of it,
# all in float32 (max 3.4e38). A probe's MiniVGG input at 6e37 came back wrong without a word (LiteRT's own
# answer was right to 4e37, NaN from 1e38), and near 1e19 a verified model's tolerances overflowed. 2**40
# (1.1e12) keeps the squares of a 10^4-value window of 170x-masked inputs under 4e32, with 5 orders of
# magnitude for the model's own gain, and is far beyond any input a float32 model is given.
MAX_INPUT = float(2 ** 40)  # the runtime refuses larger inputs, the converter larger calibration

# A one-time mask of at most this many times the spread of the input it was sized for is "small": its
# rounding within a few times the input's own, which the converter need not warn of and the TA's checks
# tolerate unweakened (tee_sim.one_time_masks.MaskStream.small; groupmix's deep_mask_scale, 1x by default).
SMALL_MASK = 2.0
MODULAR_RMS = math.sqrt(12.0)  # a uniform's RMS over one period is period / MODULAR_RMS

ALIGN = 64  # arrays in the container, and every buffer of the program's arena and shared-memory layout
_HEAD = struct.Struct("<4sHHQ")
DTYPES = frozenset({"float32", "int32", "uint8"})
MAX_HEADER = 64 << 20
MAX_NAME = 256
MAX_RANK = 8


class ProgramFormatError(ValueError):
    """The bytes are not a well-formed TEE program of a known version."""


def align(n: int) -> int:
    """``n`` rounded up to a multiple of ``ALIGN``."""
    return -(-n // ALIGN) * ALIGN


def round_of(buffer: str, side: str = "out") -> int | None:
    """The round whose output (``side`` "out") or input ("in") ``buffer`` is (``round_N/out/...``,
    ``round_N/in/...``: the names of the program's shared buffers and of the manifest's), or None."""
    head, _, rest = buffer.partition("/")
    number = head.removeprefix("round_")
    return int(number) if head != number and number.isdigit() and rest.startswith(side + "/") else None


def window_fits(kernel: int, dilation: int, size: int) -> bool:
    """Whether the TA checks and masks a linear layer whose window has ``kernel`` taps ``dilation`` apart
    along an input ``size`` long: any kernel (its weights bound it) whose taps lie at most twice the input
    apart. Further apart, every window reads the input through one tap at most, and the checks' and pop
    masks' padded input would grow with a number nothing else bounds: the converter keeps such a layer in
    the TEE (``converters.graph.is_offloadable``), and the TA refuses one in a program."""
    return kernel == 1 or dilation <= 2 * size


def wire_dtype(dtype: Any) -> np.dtype:
    """The type in which a model input or output of ``dtype`` sits in shared memory, for the normal world
    to write or read: its own, or float32 for a type narrower than 4 bytes (bool, 8- and 16-bit integers,
    float16). The program's buffers, slots and shared buffers alike, hold float32 only; a non-float tensor
    crosses them encoded by LiteRT ops of the TEE-side model (``converters.non_float``): the same bytes for
    4- and 8-byte types, a CAST to float32 for the narrower ones, which the runtime casts back exactly."""
    dtype = np.dtype(dtype)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def modular_std(spread: float) -> float:
    """The ``std`` of a modular one-time mask (``tee_sim.modular_masks``) of about ``spread`` (its RMS): that
    of the power-of-two period nearest ``sqrt(12) * spread`` in log scale (the RMS within ``2**(+-1/2)`` of
    ``spread``). The program carries the ``std``; ``modular_period`` reads the period back."""
    return 2.0 ** round(math.log2(MODULAR_RMS * spread)) / MODULAR_RMS


def modular_period(std: float) -> float:
    """The period of a modular mask of ``std`` (``modular_std``'s): the power of two ``sqrt(12) * std``."""
    return 2.0 ** round(math.log2(MODULAR_RMS * std))


def mask_bands(positions: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """The frequency bands of a shaped one-time mask over a tensor's position axes (``[N, *positions, C]``:
    ``H, W`` of an image): for each bin of ``numpy.fft.rfftn`` over them, its band - 0 for the mean (the
    zero frequency), ``b >= 1`` for the octave ``2^-(b+1) < |f| <= 2^-b`` cycles per position (band 1 also
    holds everything above 1/4) - and the number of bands present. A shaped mask puts equal power in every
    band (``tee_sim.one_time_masks``), so an input whose power lies in any one band - smooth at any scale,
    blocky, or constant - meets the mask's whole per-band power there."""
    if not positions:
        return np.zeros((), np.int64), 1
    axes = [np.fft.fftfreq(n) for n in positions[:-1]] + [np.fft.rfftfreq(positions[-1])]
    grid = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(sum(f * f for f in grid))
    with np.errstate(divide="ignore"):
        octave = np.floor(-np.log2(np.where(radius > 0, radius, 1.0))).astype(np.int64)
    bands = np.where(radius > 0, np.maximum(octave, 1), 0)
    present = np.unique(bands)
    return np.searchsorted(present, bands), len(present)  # numbered 0 .. count - 1, the mean first


def write_program(program: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """Serialise ``program`` (JSON-able) and named ``arrays`` (float32 / int32 / uint8) into one blob."""
    entries: dict[str, dict[str, Any]] = {}
    offset = 0
    prepared = []
    for name, array in arrays.items():
        a = np.asarray(array, order="C")  # (np.ascontiguousarray would make a scalar a 1-element vector)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"array {name!r}: dtype {a.dtype} is not one of {sorted(DTYPES)}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        entries[name] = {"dtype": a.dtype.name, "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes}
        prepared.append((offset, a))
        offset = align(offset + a.nbytes)
    header = json.dumps({"program": program, "arrays": entries}, sort_keys=True,
                        separators=(",", ":")).encode()
    start = align(_HEAD.size + len(header))
    out = bytearray(start + offset)
    _HEAD.pack_into(out, 0, MAGIC, FORMAT_VERSION, 0, len(header))
    out[_HEAD.size:_HEAD.size + len(header)] = header
    view = memoryview(out)
    for off, a in prepared:
        view[start + off:start + off + a.nbytes] = a.reshape(-1).view(np.uint8)
    return bytes(out)


def read_program(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Parse a blob of ``write_program``: ``(program, arrays)``, the arrays read-only views of ``data``.
    ``ProgramFormatError`` names the first thing that is wrong."""
    if not isinstance(data, bytes):
        raise ProgramFormatError("a TEE program must be given as bytes")
    if len(data) < _HEAD.size:
        raise ProgramFormatError(f"TEE program of {len(data)} bytes is truncated")
    magic, version, _, header_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise ProgramFormatError("not a TEE program (bad magic)")
    if version not in READABLE_VERSIONS:
        raise ProgramFormatError(f"TEE program format version {version} is not supported "
                                 f"({', '.join(map(str, sorted(READABLE_VERSIONS)))} are)")
    if header_len > MAX_HEADER or _HEAD.size + header_len > len(data):
        raise ProgramFormatError("TEE program header overruns the data")
    try:
        header = json.loads(data[_HEAD.size:_HEAD.size + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProgramFormatError(f"TEE program header is not JSON: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"program", "arrays"} \
            or not isinstance(header["program"], dict) or not isinstance(header["arrays"], dict):
        raise ProgramFormatError("TEE program header must hold exactly 'program' and 'arrays' objects")
    start = align(_HEAD.size + header_len)
    if start > len(data):
        raise ProgramFormatError("TEE program data section is missing")
    size = len(data) - start
    arrays: dict[str, np.ndarray] = {}
    spans = []
    for name, entry in header["arrays"].items():
        if not 0 < len(name) <= MAX_NAME:
            raise ProgramFormatError(f"array name of length {len(name)}")
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "offset", "nbytes"}:
            raise ProgramFormatError(f"array {name!r}: entry must hold dtype, shape, offset, nbytes")
        dtype, shape, offset, nbytes = entry["dtype"], entry["shape"], entry["offset"], entry["nbytes"]
        if dtype not in DTYPES:
            raise ProgramFormatError(f"array {name!r}: dtype {dtype!r} not allowed")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_count(d) for d in shape):
            raise ProgramFormatError(f"array {name!r}: bad shape {shape!r}")
        if not (_is_count(offset) and _is_count(nbytes)) or offset % ALIGN:
            raise ProgramFormatError(f"array {name!r}: bad offset or size")
        itemsize = np.dtype(dtype).itemsize
        count = 1
        for d in shape:
            count *= d
        if nbytes != count * itemsize:
            raise ProgramFormatError(f"array {name!r}: {nbytes} bytes for shape {shape} {dtype}")
        if offset + nbytes > size:
            raise ProgramFormatError(f"array {name!r} lies past the end of the data")
        spans.append((offset, offset + nbytes, name))
        little = np.dtype(dtype).newbyteorder("<")
        arrays[name] = np.frombuffer(data, little, count, start + offset).reshape(shape)
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise ProgramFormatError(f"arrays {a!r} and {b!r} overlap")
    return header["program"], arrays


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
