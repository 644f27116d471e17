"""Parameters of one invocation: the client's view (TEEC_Operation) and the trusted app's view (TEE_Param).

Client side: at most four of ``Value``, ``TempMemRef`` (bytes copied across, for small or setup data)
and ``MemRef`` (a window of registered shared memory, zero-copy). Trusted-app side: a list of four
``TEEParam`` whose ``.types`` the handler checks first with ``check_param_types``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from tee_sim.errors import TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, TEEC_ORIGIN_TRUSTED_APP, TEEError

if TYPE_CHECKING:
    from tee_sim.shared_memory import SharedMemory

MAX_PARAMS = 4
DIRECTIONS = ("in", "out", "inout")

# Client parameter types (TEEC_*), as they travel to the secure world.
TEEC_NONE = 0x0
TEEC_VALUE_INPUT = 0x1
TEEC_VALUE_OUTPUT = 0x2
TEEC_VALUE_INOUT = 0x3
TEEC_MEMREF_TEMP_INPUT = 0x5
TEEC_MEMREF_TEMP_OUTPUT = 0x6
TEEC_MEMREF_TEMP_INOUT = 0x7
TEEC_MEMREF_PARTIAL_INPUT = 0xD
TEEC_MEMREF_PARTIAL_OUTPUT = 0xE
TEEC_MEMREF_PARTIAL_INOUT = 0xF

# Trusted-app parameter types (TEE_PARAM_TYPE_*): a TA does not see whether a memref was temporary.
TEE_PARAM_TYPE_NONE = 0
TEE_PARAM_TYPE_VALUE_INPUT = 1
TEE_PARAM_TYPE_VALUE_OUTPUT = 2
TEE_PARAM_TYPE_VALUE_INOUT = 3
TEE_PARAM_TYPE_MEMREF_INPUT = 5
TEE_PARAM_TYPE_MEMREF_OUTPUT = 6
TEE_PARAM_TYPE_MEMREF_INOUT = 7

_DIRECTION_BITS = {"in": 1, "out": 2, "inout": 3}
VALUE_TYPES = frozenset({TEEC_VALUE_INPUT, TEEC_VALUE_OUTPUT, TEEC_VALUE_INOUT})
MEMREF_TYPES = frozenset(
    {
        TEEC_MEMREF_TEMP_INPUT,
        TEEC_MEMREF_TEMP_OUTPUT,
        TEEC_MEMREF_TEMP_INOUT,
        TEEC_MEMREF_PARTIAL_INPUT,
        TEEC_MEMREF_PARTIAL_OUTPUT,
        TEEC_MEMREF_PARTIAL_INOUT,
    }
)
U64_MAX = (1 << 64) - 1


def TEE_PARAM_TYPES(t0: int = 0, t1: int = 0, t2: int = 0, t3: int = 0) -> int:  # noqa: N802 - GP's name
    """Pack four parameter types into one word, as GlobalPlatform's macro does."""
    return t0 | (t1 << 4) | (t2 << 8) | (t3 << 12)


def ta_param_type(wire_type: int) -> int:
    """The TA-side type of a client (wire) type: temporary and registered memrefs look the same."""
    return wire_type if wire_type in VALUE_TYPES or wire_type == TEEC_NONE else 4 | (wire_type & 3)


def _check_direction(direction: str) -> int:
    if direction not in _DIRECTION_BITS:
        raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, f"direction must be one of {DIRECTIONS}")
    return _DIRECTION_BITS[direction]


class Value:
    """Two unsigned 64-bit integers passed by value (TEEC_Value; GP's are 32-bit, ours hold sizes too)."""

    __slots__ = ("a", "b", "direction")

    def __init__(self, a: int = 0, b: int = 0, direction: str = "in") -> None:
        _check_direction(direction)
        for v in (a, b):
            if not isinstance(v, int | np.integer) or not 0 <= int(v) <= U64_MAX:
                raise TEEError(
                    TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, "a Value holds unsigned 64-bit ints"
                )
        self.a, self.b, self.direction = int(a), int(b), direction

    @property
    def wire_type(self) -> int:
        return _DIRECTION_BITS[self.direction]

    def __repr__(self) -> str:
        return f"Value(a={self.a}, b={self.b}, direction={self.direction!r})"


class TempMemRef:
    """A temporary memory reference: bytes copied into the secure world and/or back (TEEC_TempMemoryRef).

    ``in``: give ``data``. ``out``: give ``size``, the capacity; after the call ``data`` holds what the TA
    wrote and ``size`` its length (or, after ``TEE_ERROR_SHORT_BUFFER``, the size the TA needs).
    """

    __slots__ = ("data", "size", "direction")

    def __init__(
        self,
        data: bytes | bytearray | memoryview | None = None,
        size: int | None = None,
        direction: str = "in",
    ) -> None:
        bits = _check_direction(direction)
        if data is None and size is None:
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, "TempMemRef needs data or a size")
        if bits & 1 and data is None:
            raise TEEError(
                TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, f"a {direction!r} TempMemRef needs data"
            )
        nbytes = memoryview(data).nbytes if data is not None else 0
        if size is None:
            size = nbytes
        if not isinstance(size, int) or size < 0 or (data is not None and size < nbytes and bits & 1):
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_API, f"bad TempMemRef size {size!r}")
        self.data = bytes(data) if data is not None else None
        self.size, self.direction = size, direction

    @property
    def wire_type(self) -> int:
        return 4 | _DIRECTION_BITS[self.direction]

    def __repr__(self) -> str:
        return f"TempMemRef(size={self.size}, direction={self.direction!r})"


class MemRef:
    """A window ``[offset, offset + size)`` of registered shared memory (TEEC_RegisteredMemoryReference).

    Nothing is copied: the TA reads and writes the shared pages in place. After the call ``size`` is
    the size the TA reported (it may shrink it to say how much output it wrote).
    """

    __slots__ = ("shm", "offset", "size", "direction")

    def __init__(
        self, shm: SharedMemory, offset: int = 0, size: int | None = None, direction: str = "inout"
    ) -> None:
        _check_direction(direction)
        if size is None:
            size = shm.size - offset
        if (
            not (isinstance(offset, int) and isinstance(size, int))
            or offset < 0
            or size < 0
            or offset + size > shm.size
        ):
            raise TEEError(
                TEE_ERROR_BAD_PARAMETERS,
                TEEC_ORIGIN_API,
                f"MemRef [{offset}, {offset}+{size}) outside shared memory of {shm.size} bytes",
            )
        self.shm, self.offset, self.size, self.direction = shm, offset, size, direction

    @property
    def wire_type(self) -> int:
        return 0xC | _DIRECTION_BITS[self.direction]

    def __repr__(self) -> str:
        return f"MemRef(offset={self.offset}, size={self.size}, direction={self.direction!r})"


ClientParam = Value | TempMemRef | MemRef


class TEEParam:
    """One parameter as a trusted app receives it (GP's ``TEE_Param`` union plus its type).

    Values: ``a``, ``b`` (write them for output). Memrefs: ``buffer`` is a zero-copy ``memoryview``
    of the bytes (read-only for input, writable for output/inout) and ``size`` its length; a TA may set
    ``size`` to the number of bytes it produced, or to the size it needs before raising
    ``TEE_ERROR_SHORT_BUFFER``. A view of a ``TempMemRef`` is valid only during the call (its bytes
    live in a bounce buffer reused by the next call); a view of a ``MemRef`` stays valid until the
    normal world releases that shared memory, so a TA may keep views of registered memory across
    calls. The normal world can change shared memory at any time: copy what you validate before
    relying on it.
    """

    __slots__ = ("type", "a", "b", "buffer", "size")

    def __init__(
        self,
        type: int = TEE_PARAM_TYPE_NONE,
        a: int = 0,
        b: int = 0,  # noqa: A002 - GP's name
        buffer: memoryview | None = None,
    ) -> None:
        self.type, self.a, self.b, self.buffer = type, a, b, buffer
        self.size = buffer.nbytes if buffer is not None else 0

    def ndarray(self, dtype: Any, shape: tuple[int, ...] | None = None, offset: int = 0) -> np.ndarray:
        """A zero-copy numpy view of the memref's bytes (writable unless the parameter is input only)."""
        if self.buffer is None:
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP, "parameter is not a memref")
        dtype = np.dtype(dtype)
        count = -1 if shape is None else int(np.prod(shape, dtype=np.int64))
        if count >= 0 and offset + count * dtype.itemsize > self.buffer.nbytes:
            raise TEEError(
                TEE_ERROR_BAD_PARAMETERS,
                TEEC_ORIGIN_TRUSTED_APP,
                f"memref of {self.buffer.nbytes} bytes is too small for {shape} {dtype}",
            )
        array = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=offset)
        return array if shape is None else array.reshape(shape)

    def __repr__(self) -> str:
        return f"TEEParam(type={self.type}, a={self.a}, b={self.b}, size={self.size})"


class _AbsentParam:
    """An unused parameter (``TEE_PARAM_TYPE_NONE``): one shared object whose fields cannot be written."""

    __slots__ = ()
    type = TEE_PARAM_TYPE_NONE
    a = b = size = 0
    buffer = None

    def ndarray(self, dtype: Any, shape: tuple[int, ...] | None = None, offset: int = 0) -> np.ndarray:
        raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TRUSTED_APP, "parameter is not a memref")

    def __repr__(self) -> str:
        return "TEEParam(type=0)"


NO_PARAM = _AbsentParam()


class TAParams(list):
    """The four parameters of one call; ``types`` packs their TA-side types (``TEE_PARAM_TYPES``)."""

    __slots__ = ("types",)

    def __init__(self, items: Any = (), types: int | None = None) -> None:
        super().__init__(items)
        self.types = TEE_PARAM_TYPES(*(p.type for p in self)) if types is None else types


def check_param_types(params: TAParams, *expected: int) -> None:
    """Raise ``TEE_ERROR_BAD_PARAMETERS`` unless the parameter types are exactly ``expected`` (rest NONE)."""
    if params.types != TEE_PARAM_TYPES(*expected):
        got = ", ".join(str(p.type) for p in params)
        raise TEEError(
            TEE_ERROR_BAD_PARAMETERS,
            TEEC_ORIGIN_TRUSTED_APP,
            f"parameter types ({got}) differ from the expected {tuple(expected)}",
        )
