"""The pool's read-back of the obfuscated weights (``tee_sim.obfuscated_weights.Weights``): what the TA reads
from the normal world's copy of ``untrusted.tflite`` is checked in secure memory before it is used."""

import os

import numpy as np
import pytest

from tee_sim.errors import TEE_ERROR_BAD_STATE, TEE_ERROR_SECURITY, TEEError
from tee_sim.obfuscated_weights import Weights


def _file():
    """A stand-in for untrusted.tflite: 16 bytes of header, then two float32 tensors."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    untrusted = bytes(16) + a.tobytes() + b.tobytes()
    data = np.frombuffer(untrusted, np.uint8)
    found = {"a": data[16:16 + a.nbytes].view(np.float32).reshape(a.shape),
             "b": data[16 + a.nbytes:].view(np.float32)}
    return untrusted, found, a, b


def _outside(untrusted, found):
    return Weights(untrusted, found, lambda shape, dtype: np.zeros(shape, dtype), True, os.urandom)


def test_weights_read_back_are_those_loaded():
    untrusted, found, a, b = _file()
    weights = _outside(untrusted, found)
    with pytest.raises(TEEError) as err:
        weights.get("a")  # nothing bound yet
    assert err.value.code == TEE_ERROR_BAD_STATE
    weights.bind(np.frombuffer(untrusted, np.uint8).copy())
    np.testing.assert_array_equal(weights.get("a"), a)
    np.testing.assert_array_equal(weights.get("b"), b)


@pytest.mark.parametrize("change", ["one bit", "one weight swapped", "zeroed"])
def test_a_changed_copy_is_refused_layer_by_layer(change):
    untrusted, found, a, b = _file()
    weights = _outside(untrusted, found)
    shared = np.frombuffer(untrusted, np.uint8).copy()
    weights.bind(shared)
    tensor = shared[16:16 + a.nbytes].view(np.float32)
    if change == "one bit":
        shared[16 + 9] ^= 1
    elif change == "one weight swapped":
        tensor[[0, 5]] = tensor[[5, 0]]
    else:
        tensor[:] = 0
    with pytest.raises(TEEError, match="'a' changed since it was loaded") as err:
        weights.get("a")
    assert err.value.code == TEE_ERROR_SECURITY
    np.testing.assert_array_equal(weights.get("b"), b)  # the unchanged layer still reads


def test_each_load_keys_its_check_afresh():
    """The key comes from the TEE's CSPRNG per load: two loads of one file hold different tags, so a
    tag learnt from one (it never leaves the TEE anyway) says nothing about the other."""
    untrusted, found, _, _ = _file()
    first, second = _outside(untrusted, found), _outside(untrusted, found)
    assert first._where["a"][2] != second._where["a"][2]
