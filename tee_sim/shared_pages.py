"""Client memory shared in place: the whole pages of an array the client already has (an accelerator's
tensor) become the same memory as a ``SharedMemory``'s bytes, so the secure world reads and writes it
directly and nobody copies the tensor.

OP-TEE registers client memory with ``TEEC_RegisterSharedMemory``, and on a device the accelerator's
driver hands its own buffers (dma-buf) to the TEE. Here the worlds are two processes: the pages of the
array are replaced, at the same addresses, by a ``MAP_SHARED`` mapping of the ``SharedMemory``'s memfd
(``mmap(MAP_FIXED)``), after copying their contents into it. The array keeps its address, so the library
that owns it (LiteRT, whose tensors stay where ``AllocateTensors`` put them) notices nothing.

Only pages that lie wholly inside the array are shared: the bytes before the first whole page (``head``)
and after the last (``tail``), which share a page with other memory of the client (a malloc header, a
neighbouring tensor), stay the client's, and whoever drives the accelerator copies those few bytes
itself. So the memory the two worlds share never holds anything but the array's own bytes.

``SharedPages.release()`` puts private memory back under the array with the same contents; call it
before the library that owns the array frees it. Like the ``SharedMemory`` it shares, the mapping is
inherited by a forked child (the child must load its own model, as with any shared memory).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import numpy as np

PAGE = mmap.PAGESIZE
MIN_SHARED_BYTES = 4 * PAGE  # smaller arrays are copied: a page or two saves nothing worth a mapping

_PROT_RW = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FIXED = 0x10  # Linux, every architecture
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_lock = threading.RLock()  # a collected accelerator's finalizer may release pages inside a section
os.register_at_fork(after_in_child=_lock._at_fork_reinit)  # a child's release must not wait on the parent's


def _map_fixed(address: int, length: int, flags: int, fd: int, offset: int) -> None:
    got = _libc.mmap(address, length, _PROT_RW, flags | _MAP_FIXED, fd, offset)
    if got != address:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap(MAP_FIXED) at {address:#x} failed" if got == _MAP_FAILED
                      else f"mmap placed {length} bytes at {got} instead of {address:#x}")


def page_span(address: int, nbytes: int) -> tuple[int, int]:
    """The whole pages inside ``[address, address + nbytes)``: (first page's address, length; 0: none)."""
    start = -(-address // PAGE) * PAGE
    return start, max(0, (address + nbytes) // PAGE * PAGE - start)


class SharedPages:
    """The whole pages of one array shared with a ``SharedMemory``: its elements ``[head, stop)`` (flat
    indices) are the shared memory's; the rest are the client's. ``release()`` makes them private again."""

    def __init__(self, target: np.ndarray, fd: int, offset: int) -> None:
        address = target.ctypes.data
        start, length = page_span(address, target.nbytes)
        if not target.flags.c_contiguous or length == 0 or (start - address) % target.itemsize:
            raise ValueError("the array is not contiguous or holds no whole page at an element boundary")
        if (offset - address) % PAGE:
            raise ValueError(f"offset {offset} and the array's address {address:#x} lie at different places "
                             "in a page")
        self.address, self.length = start, length
        self.head = (start - address) // target.itemsize
        self.stop = self.head + length // target.itemsize
        self._target = target  # keeps the client's view alive (not its memory: the owner frees that)
        with _lock:
            # The shared memory takes the pages' current contents, then replaces them in place.
            window = np.frombuffer((ctypes.c_char * length).from_address(start), np.uint8)
            shared = mmap.mmap(fd, length, offset=offset + (start - address))
            try:
                shared[:] = window.tobytes()
            finally:
                shared.close()
            _map_fixed(start, length, mmap.MAP_SHARED, fd, offset + (start - address))
        self.released = False

    def release(self) -> None:
        """Private, anonymous memory back under the array, with the contents it has now. Idempotent."""
        if self.released:
            return
        with _lock:
            window = np.frombuffer((ctypes.c_char * self.length).from_address(self.address), np.uint8)
            saved = window.copy()
            _map_fixed(self.address, self.length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            window[:] = saved
        # Released once done (set first, an interrupt before the remapping left the pages the shared
        # memory's, marked released: a helper's probe); a caller that may be interrupted holds the signals
        # back meanwhile (tee_sim.uninterrupted), as the contents are between the remapping and the copy
        self.released = True
        self._target = None

    def __repr__(self) -> str:
        return f"SharedPages({self.length} bytes at {self.address:#x}{', released' if self.released else ''})"
