"""Client memory shared in place (``SharedMemory.share_pages``): both worlds see the same bytes, the
array keeps its address and its contents, and release gives it private memory back."""

import mmap

import numpy as np
import pytest

from tee_sim import MemRef, TEEError, Value, shared_memory_of
from tee_sim.registry import TEST_TA_UUID
from tee_sim.shared_pages import PAGE
from tee_sim.testing_ta import Cmd


def client_array(pages: int, skew: int = 64) -> tuple[mmap.mmap, np.ndarray]:
    """A float32 array in memory of the client's own (like a LiteRT tensor), starting ``skew`` bytes
    into a page, so that its first and last pages are shared with other data."""
    memory = mmap.mmap(-1, (pages + 2) * PAGE)
    neighbours = np.frombuffer(memory, np.float32)
    neighbours[:] = -1.0
    array = np.frombuffer(memory, np.float32, pages * PAGE // 4, skew)
    array[:] = np.arange(array.size, dtype=np.float32)
    return memory, array


def test_pages_are_shared_both_ways_with_the_secure_world(context):
    memory, array = client_array(8)
    address, before = array.ctypes.data, array.copy()
    shm = context.register_shared_memory(16 * PAGE)
    offset = 3 * PAGE + 64  # the same place in a page as the array
    view = shm.ndarray(np.float32, array.shape, offset)
    pages = shm.share_pages(offset, array)
    assert array.ctypes.data == address
    # Every whole page inside the array is shared; the partial first and last ones are not.
    assert pages.head == (PAGE - 64) // 4 and pages.stop == pages.head + 7 * PAGE // 4
    np.testing.assert_array_equal(array[pages.head:pages.stop], before[pages.head:pages.stop])
    np.testing.assert_array_equal(view[pages.head:pages.stop], before[pages.head:pages.stop])
    assert shared_memory_of(view) == (shm, offset)
    assert shared_memory_of(array) is None
    with context.open_session(TEST_TA_UUID) as session:
        # The TA scales what it sees through the shared memory: the client's own array changes.
        session.invoke_command(Cmd.SCALE, [Value(3), MemRef(shm, offset, array.nbytes, "inout")])
    np.testing.assert_array_equal(array[pages.head:pages.stop], 3 * before[pages.head:pages.stop])
    np.testing.assert_array_equal(array[:pages.head], before[:pages.head])  # not shared: unchanged
    array[pages.head] = 42.0
    assert view[pages.head] == 42.0
    # Released: private again, contents kept, the shared memory no longer reaches it.
    pages.release()
    pages.release()
    assert array[pages.head] == 42.0 and array[pages.stop - 1] == 3 * before[pages.stop - 1]
    view[pages.head] = 7.0
    assert array[pages.head] == 42.0
    # The neighbours around the array were never touched.
    outside = np.frombuffer(memory, np.float32)
    assert outside[0] == -1.0 and outside[-1] == -1.0
    shm.release()
    del array, view, outside


def test_pages_that_cannot_be_shared_are_refused_clearly(context):
    memory, array = client_array(8)
    shm = context.register_shared_memory(16 * PAGE)
    with pytest.raises(TEEError, match="different places in a page"):
        shm.share_pages(3 * PAGE, array)
    with pytest.raises(TEEError, match="do not fit"):
        shm.share_pages(12 * PAGE + 64, array)
    small = np.frombuffer(memory, np.float32, 100, 64)
    with pytest.raises(TEEError, match="no whole page"):
        shm.share_pages(64, small)
    shm.release()
    with pytest.raises(TEEError, match="released"):
        shm.share_pages(3 * PAGE + 64, array)
    del array, small
