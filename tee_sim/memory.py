"""The secure-memory budget: what trusted apps allocate is counted against one device-wide cap."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from tee_sim.errors import TEE_ERROR_BAD_PARAMETERS, TEE_ERROR_OUT_OF_MEMORY, TEEC_ORIGIN_TEE, TEEError


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB ({n} bytes)"


class SecureMemory:
    """Counts bytes held by trusted apps; ``charge`` fails with ``TEE_ERROR_OUT_OF_MEMORY`` over the cap."""

    def __init__(self, cap: int) -> None:
        if cap <= 0:
            raise ValueError("memory cap must be positive")
        self.cap = int(cap)
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def charge(self, nbytes: int, what: str | None = None) -> None:
        """Count ``nbytes`` more (``what`` they are for, named in the error when they do not fit)."""
        with self._lock:
            if self.used + nbytes > self.cap:
                raise TEEError(
                    TEE_ERROR_OUT_OF_MEMORY,
                    TEEC_ORIGIN_TEE,
                    f"secure memory exhausted: requested {_mib(nbytes)}{f' for {what}' if what else ''}, "
                    f"used {_mib(self.used)}, cap {_mib(self.cap)}",
                )
            self.used += nbytes
            self.peak = max(self.peak, self.used)

    def uncharge(self, nbytes: int) -> None:
        with self._lock:
            self.used -= nbytes

    def stats(self) -> dict[str, int]:
        return {"used": self.used, "peak": self.peak, "cap": self.cap}


# Where allocations start: a cache line, an AVX-512 vector. numpy's own large arrays start 16 bytes into
# one, and the TA kernels' vector loads and stores then straddle two: its Freivalds prepare measured
# 20-40% slower on MobileNet's depthwise layers.
ALIGN = 64


class Heap:
    """One trusted app's allocations in the shared budget; everything is returned when the TA is destroyed.

    ``alloc`` gives a zeroed numpy array; ``free`` (or the array being garbage-collected) returns its
    bytes. ``reserve`` charges memory the TA holds in other forms (e.g. an interpreter's arena).
    """

    def __init__(self, memory: SecureMemory) -> None:
        self._memory = memory
        # id(buffer) -> (nbytes, finalizer of the buffer, the array alloc returned: a view of the buffer)
        self._live: dict[int, tuple[int, weakref.finalize, weakref.ref]] = {}
        self._reserved = 0

    def alloc(self, shape: Any, dtype: Any = np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise TEEError(TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, f"negative dimension in {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._memory.charge(nbytes)
        try:
            buffer = np.zeros(nbytes + ALIGN, np.uint8)
        except MemoryError:
            self._memory.uncharge(nbytes)
            raise TEEError(TEE_ERROR_OUT_OF_MEMORY, TEEC_ORIGIN_TEE, "host allocation failed") from None
        start = -buffer.ctypes.data % ALIGN
        array = buffer[start:start + nbytes].view(dtype).reshape(shape)
        # Every view of the array holds the buffer: its bytes are returned when the last one goes.
        key = id(buffer)
        finalizer = weakref.finalize(buffer, self._release, key)
        self._live[key] = (nbytes, finalizer, weakref.ref(array))
        return array

    def alloc_copy(self, source: Any, dtype: Any = None) -> np.ndarray:
        source = np.asarray(source, dtype=dtype)
        array = self.alloc(source.shape, source.dtype)
        array[...] = source
        return array

    def free(self, array: np.ndarray) -> None:
        entry = self._live.get(id(array.base)) if isinstance(array, np.ndarray) else None
        if entry is None or entry[1].peek() is None or entry[2]() is not array:
            raise TEEError(
                TEE_ERROR_BAD_PARAMETERS, TEEC_ORIGIN_TEE, "free() of an array alloc() did not return"
            )
        entry[1]()  # runs _release once and detaches the finalizer

    def reserve(self, nbytes: int, what: str | None = None) -> None:
        self._memory.charge(int(nbytes), what)
        self._reserved += int(nbytes)

    def unreserve(self, nbytes: int) -> None:
        nbytes = min(int(nbytes), self._reserved)
        self._reserved -= nbytes
        self._memory.uncharge(nbytes)

    @property
    def used(self) -> int:
        return sum(entry[0] for entry in self._live.values()) + self._reserved

    def release_all(self) -> None:
        for _, finalizer, _ in list(self._live.values()):
            finalizer()
        self.unreserve(self._reserved)

    def _release(self, key: int) -> None:
        nbytes, _, _ = self._live.pop(key)
        self._memory.uncharge(nbytes)


class SharedScratch:
    """Secure memory the sessions of one trusted app share for what lives within one of its calls (a step's
    staging, a refill's drawing buffers): a TA runs one call at a time - the secure world serves one
    request at a time, the in-process transport holds its context's lock - so a buffer that a call fills and
    uses before it returns serves every session. By purpose: a session takes the largest buffer of its
    purpose when it is large enough, else one of its own size; each is charged once (``alloc``) and freed
    (``free``) when its last user is (``release``). Two frames in flight of yolov4-tiny, two sessions of
    one model, share 4 MiB of such buffers. A buffer keeps its size while it has users (the steps compile
    its address): a small model loaded beside a larger one holds the larger one's buffers until it closes,
    and the larger one loaded after a small one takes buffers of its own (a review: 0.3 MB more for a
    small CNN beside a 96x96 one than alone)."""

    def __init__(self, alloc: Any, free: Any) -> None:
        self._alloc, self._free = alloc, free
        self._buffers: dict[str, list[list[Any]]] = {}  # purpose -> [[uint8 array, users]]

    def take(self, purpose: str, shape: Any, dtype: Any = np.float32) -> tuple[np.ndarray, list[Any]]:
        """An array of ``shape`` and ``dtype`` for ``purpose``, and the handle that ``release`` gives back."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(d) for d in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        held = self._buffers.setdefault(purpose, [])
        fits = [entry for entry in held if entry[0].size >= nbytes]
        if fits:
            entry = max(fits, key=lambda e: e[0].size)
        else:
            entry = [self._alloc(max(nbytes, 1), np.uint8), 0]
            held.append(entry)
        entry[1] += 1
        return entry[0][:nbytes].view(dtype).reshape(shape), entry

    def release(self, handle: list[Any]) -> None:
        """One user of ``handle``'s buffer gone: freed with its last."""
        handle[1] -= 1
        if handle[1] == 0:
            for held in self._buffers.values():
                held[:] = [entry for entry in held if entry is not handle]
            self._free(handle[0])
