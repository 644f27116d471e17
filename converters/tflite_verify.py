"""A flatbuffer verifier for ``.tflite`` bytes, in Python, run before anything reads them.

flatbuffers' Python reader trusts its input: an offset, a vector length or a vtable that points elsewhere
is read as whatever lies there (or raises whatever exception the bad position leads to), and a file the
Python reader accepts may still be one LiteRT's C++ ``Verifier`` rejects - or, worse, one that crashes
native code later. ``verify`` applies the C++ verifier's rules to every field the schema's reader touches:
each table, vtable, offset, vector, string and scalar lies inside the buffer and is aligned to its size,
offsets point forward (strictly positive), strings end in a NUL (and are UTF-8, as the schema says:
LiteRT's Python API decodes tensor names), a vtable has an even size of at least 4 bytes, and the number
of tables read is bounded (a file of N bytes holds at most N / 4 distinct tables, so more visits mean
offsets shared to blow up the work).

It reads the whole model once through a private copy of the schema's generated module whose
``flatbuffers.table.Table`` is the checking subclass below (so the real module and other threads are not
affected), and discards the result.
"""

from __future__ import annotations

import importlib.util
import threading
import types
from typing import Any

import flatbuffers
from flatbuffers import encode, table
from flatbuffers import number_types as N

from shadownet.exceptions import ModelFormatError

_UOFFSET = N.UOffsetTFlags.packer_type
_SOFFSET = N.SOffsetTFlags.packer_type
_VOFFSET = N.VOffsetTFlags.packer_type
MAX_TABLES = 1_000_000  # flatbuffers' C++ Verifier default


class VerifyError(Exception):
    """The bytes break a flatbuffer rule (internal: ``verify`` turns it into ModelFormatError)."""


class _Budget:
    def __init__(self, size: int) -> None:
        self.size = size
        self.tables = 0
        self.max_tables = min(MAX_TABLES, size // 4 + 64)


_state = threading.local()


def _in_bounds(buf: Any, at: int, size: int, what: str) -> None:
    if at < 0 or size < 0 or at + size > len(buf):
        raise VerifyError(f"{what} at {at}+{size} outside the {len(buf)} bytes")


def _aligned(at: int, align: int, what: str) -> None:
    if at % align:
        raise VerifyError(f"{what} at {at} is not {align}-byte aligned")


def _scalar(buf: Any, packer: Any, at: int, what: str) -> int:
    if at < 0 or at + packer.size > len(buf) or at % packer.size:
        raise VerifyError(f"{what} at {at} ({packer.size} bytes) is unaligned or outside {len(buf)} bytes")
    return packer.unpack_from(buf, at)[0]


def _follow(buf: Any, at: int, what: str) -> int:
    """The target of the uoffset stored at ``at`` (checked: aligned, in bounds, strictly forward)."""
    value = _scalar(buf, _UOFFSET, at, what)
    target = at + value
    if not 0 < value <= 0x7FFFFFFF or target >= len(buf):
        raise VerifyError(f"{what}: offset {value} at {at} does not point forward into the buffer")
    return target


def _verify_table(buf: Any, pos: int) -> None:
    budget: _Budget = _state.budget
    budget.tables += 1
    if budget.tables > budget.max_tables:
        raise VerifyError(f"more than {budget.max_tables} tables read")
    vtable = pos - _scalar(buf, _SOFFSET, pos, "table")
    size = _scalar(buf, _VOFFSET, vtable, "vtable")
    if size < 4 or size % 2:
        raise VerifyError(f"vtable at {vtable} has size {size}")
    _in_bounds(buf, vtable, size, "vtable")


class VerifyingTable(table.Table):
    """``flatbuffers.table.Table`` that checks every access the generated reader makes."""

    __slots__ = ()

    def __init__(self, buf: Any, pos: int) -> None:
        if len(buf):  # the generated union code makes an empty placeholder first
            _verify_table(buf, pos)
        super().__init__(buf, pos)

    def Offset(self, vtableOffset: int) -> int:  # noqa: N802, N803 - flatbuffers' names
        # The vtable was checked when the table was; the field is checked where it is read.
        buf, pos = self.Bytes, self.Pos
        vtable = pos - _SOFFSET.unpack_from(buf, pos)[0]
        if vtableOffset < _VOFFSET.unpack_from(buf, vtable)[0]:
            return _VOFFSET.unpack_from(buf, vtable + vtableOffset)[0]
        return 0

    def Get(self, flags: Any, off: int) -> Any:  # noqa: N802
        width = flags.bytewidth
        if off < 0 or off + width > len(self.Bytes) or off % width:
            raise VerifyError(f"scalar at {off} ({width} bytes) is outside the buffer or unaligned")
        return flags.py_type(encode.Get(flags.packer_type, self.Bytes, off))

    def Indirect(self, off: int) -> int:  # noqa: N802
        return _follow(self.Bytes, off, "table offset")

    def String(self, off: int) -> bytes:  # noqa: N802
        start = _follow(self.Bytes, off, "string")
        length = _scalar(self.Bytes, _UOFFSET, start, "string length")
        _in_bounds(self.Bytes, start + 4, length + 1, "string")
        if self.Bytes[start + 4 + length]:
            raise VerifyError(f"string at {start} is not NUL-terminated")
        text = super().String(off)
        try:
            text.decode("utf-8")  # the schema's strings are UTF-8; LiteRT's Python API decodes tensor names
        except UnicodeDecodeError:
            raise VerifyError(f"string at {start} is not UTF-8") from None
        return text

    def _vector(self, off: int) -> tuple[int, int]:
        start = _follow(self.Bytes, off + self.Pos, "vector")
        length = _scalar(self.Bytes, _UOFFSET, start, "vector length")
        _in_bounds(self.Bytes, start + 4, length, "vector")  # at least one byte per element
        return start + 4, length

    def VectorLen(self, off: int) -> int:  # noqa: N802
        return self._vector(off)[1]

    def Vector(self, off: int) -> int:  # noqa: N802
        return self._vector(off)[0]

    def GetVectorAsNumpy(self, flags: Any, off: int) -> Any:  # noqa: N802
        start, length = self._vector(off)
        _in_bounds(self.Bytes, start, length * flags.bytewidth, "vector")
        _aligned(start, flags.bytewidth, "vector")
        return super().GetVectorAsNumpy(flags, off)

    def Union(self, t2: Any, off: int) -> None:  # noqa: N802
        target = _follow(self.Bytes, off + self.Pos, "union")
        _verify_table(self.Bytes, target)
        super().Union(t2, off)


class _Flatbuffers(types.ModuleType):
    """What the private schema copy sees as ``flatbuffers``: the real package, but a checking Table."""

    def __getattr__(self, name: str) -> Any:
        return getattr(flatbuffers, name)


_schema: Any = None
_schema_lock = threading.Lock()


def _verifying_schema() -> Any:
    global _schema
    with _schema_lock:
        if _schema is None:
            spec = importlib.util.find_spec("ai_edge_litert.schema_py_generated")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            shim = _Flatbuffers("flatbuffers")
            shim.table = types.SimpleNamespace(Table=VerifyingTable)
            module.flatbuffers = shim
            _schema = module
        return _schema


def verify(data: bytes | bytearray | memoryview) -> None:
    """Raise ``ModelFormatError`` unless ``data`` is a well-formed TFLite flatbuffer (``TFL3``)."""
    buf = bytes(data)
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ModelFormatError("not a TFLite model (no TFL3 flatbuffer identifier)")
    if len(buf) >= 1 << 31:
        raise ModelFormatError(f"TFLite model of {len(buf)} bytes exceeds the flatbuffer limit of 2 GiB")
    schema = _verifying_schema()
    _state.budget = _Budget(len(buf))
    try:
        root = _follow(buf, 0, "root table")
        _verify_table(buf, root)
        model = schema.Model()
        model.Init(buf, root)
        schema.ModelT.InitFromObj(model)
    except VerifyError as exc:
        raise ModelFormatError(f"corrupt TFLite model: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever else the reader meets is a malformed file too
        raise ModelFormatError(f"corrupt TFLite model: {type(exc).__name__}: {exc}") from None
    finally:
        del _state.budget
