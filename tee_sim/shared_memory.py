"""Shared memory (TEEC_SharedMemory): memory both worlds map, registered with a ``tee_sim.client.Context``,
and ``shared_memory_of``, which finds the registered memory an array is a view of."""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from tee_sim.errors import (
    TEE_ERROR_BAD_PARAMETERS,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_OUT_OF_MEMORY,
    TEEC_ORIGIN_API,
    TEEError,
)
from tee_sim.shared_pages import SharedPages

if TYPE_CHECKING:
    from tee_sim.client import Context


def api_error(message: str, code: int = TEE_ERROR_BAD_PARAMETERS) -> TEEError:
    """An error of the client API's own checks (origin ``TEEC_ORIGIN_API``)."""
    return TEEError(code, TEEC_ORIGIN_API, message)


class SharedMemory:
    """Memory both worlds map (a memfd for the process transport); register it with ``Context``.

    ``ndarray(dtype, shape, offset)`` is a zero-copy numpy view; pass windows of it to a TA as
    ``MemRef(shm, offset, size, direction)``. ``release()`` (or the context manager) unregisters it.
    """

    def __init__(self, context: Context, shm_id: int, size: int) -> None:
        self.size = size
        self._context = context
        self._id = shm_id
        try:
            self._mmap, self._fd = context._transport.new_buffer(size)
        except OSError as exc:  # out of memory, of file descriptors (TEEC_AllocateSharedMemory's failure)
            raise api_error(f"cannot allocate {size} bytes of shared memory: {exc.strerror or exc}",
                            TEE_ERROR_OUT_OF_MEMORY) from None
        base = np.frombuffer(self._mmap, np.uint8)
        self.address = base.ctypes.data  # where this process maps it (for shared_memory_of)
        del base
        self._generation = 0
        self._pid = os.getpid()  # a forked child inherits the mapping, not the registration (marshalling)
        self.released = False
        _live_memories.add(self)

    @property
    def buffer(self) -> memoryview:
        """The whole memory as a writable memoryview."""
        self._check()
        return memoryview(self._mmap)

    def ndarray(self, dtype: Any, shape: Any = None, offset: int = 0) -> np.ndarray:
        """A zero-copy numpy view of ``shape`` elements of ``dtype`` starting at byte ``offset``."""
        self._check()
        dtype = np.dtype(dtype)
        if shape is None:
            shape = ((self.size - offset) // dtype.itemsize,)
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dtype.itemsize > self.size:
            raise api_error(f"{shape} {dtype} at offset {offset} does not fit in {self.size} bytes")
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=offset).reshape(shape)

    def share_pages(self, offset: int, target: np.ndarray) -> SharedPages:
        """Make the whole pages of ``target`` - the client's own memory, such as an accelerator's tensor -
        the same memory as this one's bytes from ``offset`` on (``tee_sim.shared_pages``): what either
        world writes there, the other reads, with no copy. ``offset`` must sit at the same place in a page
        as ``target``'s first byte, and ``target`` must fit. Release the result before ``target``'s owner
        frees it."""
        self._check()
        if self._fd is None:
            raise api_error("this transport's shared memory has no file to share pages of")
        if offset < 0 or offset + target.nbytes > self.size:
            raise api_error(f"{target.nbytes} bytes at offset {offset} do not fit in {self.size} bytes")
        try:
            return SharedPages(target, self._fd, offset)
        except (ValueError, OSError) as exc:
            raise api_error(f"cannot share the array's pages: {exc}") from None

    def _check(self) -> None:
        if self.released:
            raise api_error("shared memory was released", TEE_ERROR_BAD_STATE)

    def release(self) -> None:
        """Unregister from the secure world and unmap (views handed out stay valid until collected)."""
        if self.released:
            return
        self.released = True
        try:
            self._context._release_shm(self)
        finally:  # even if the unregistration fails (a KeyboardInterrupt in its round trip): released
            # here at least, or the descriptor and mapping stayed for the life of the process
            self._unmap()

    def forget_after_fork(self) -> None:
        """In a forked child, memory the parent registered and the child must not hand to a secure world
        (or memory whose registration failed, which the secure world may hold still, unregistered later by
        its id): released here only (this process's descriptor and mapping), never unregistered, as the
        parent's secure world holds it for the parent."""
        if not self.released:
            self.released = True
            self._unmap()

    def _unmap(self) -> None:
        """This process's descriptor and mapping closed."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            self._mmap.close()
        except BufferError:  # numpy views still exist: the mapping goes when they do
            pass

    def __enter__(self) -> SharedMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"SharedMemory(size={self.size}{', released' if self.released else ''})"


_live_memories: weakref.WeakSet[SharedMemory] = weakref.WeakSet()


def shared_memory_of(array: np.ndarray) -> tuple[SharedMemory, int] | None:
    """The registered ``SharedMemory`` that ``array`` is a view of, and the byte offset of its first
    element there; ``None`` for any other memory."""
    address = array.ctypes.data
    for shm in list(_live_memories):
        if not shm.released and shm.address <= address and address + array.nbytes <= shm.address + shm.size:
            return shm, address - shm.address
    return None
