"""The pool's read-back of the obfuscated weights (``tee_sim.obfuscated_weights.Weights``): what the TA reads
from the normal world's copy of ``untrusted.tflite`` is checked in secure memory before it is used."""

import hashlib
import os

import numpy as np
import pytest

from tee_sim import obfuscated_weights
from tee_sim.errors import TEE_ERROR_BAD_STATE, TEE_ERROR_SECURITY, TEEError
from tee_sim.obfuscated_weights import Weights, weight_regions


@pytest.fixture(autouse=True)
def _read_back(monkeypatch):
    """Weights asked for outside are read back even where keeping them resident would cost little (these
    tests are of the read-back; the slack's own test sets it)."""
    monkeypatch.setattr(obfuscated_weights, "RESIDENT_SLACK", -1)


def _file():
    """A stand-in for untrusted.tflite: 16 bytes of header, then two float32 tensors, then 8 bytes more."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    untrusted = bytes(16) + a.tobytes() + b.tobytes() + bytes(8)
    regions = {"a": (16, a.shape), "b": (16 + a.nbytes, b.shape)}
    return untrusted, regions, a, b


def _weights(untrusted, regions, outside=True, sealed=None):
    sealed = sealed or hashlib.sha256(untrusted).hexdigest()
    zeros = lambda shape, dtype: np.zeros(shape, dtype)  # noqa: E731
    return Weights(untrusted, regions, sealed, zeros, outside, os.urandom)


def _outside(untrusted, regions):
    return _weights(untrusted, regions)


def test_weights_read_back_are_those_loaded():
    untrusted, regions, a, b = _file()
    weights = _outside(untrusted, regions)
    with pytest.raises(TEEError) as err:
        weights.get("a")  # nothing bound yet
    assert err.value.code == TEE_ERROR_BAD_STATE
    weights.bind(np.frombuffer(untrusted, np.uint8).copy())
    np.testing.assert_array_equal(weights.get("a"), a)
    np.testing.assert_array_equal(weights.get("b"), b)


@pytest.mark.parametrize("change", ["one bit", "one weight swapped", "zeroed"])
def test_a_changed_copy_is_refused_layer_by_layer(change):
    untrusted, regions, a, b = _file()
    weights = _outside(untrusted, regions)
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


def test_weights_that_cost_little_more_than_the_largest_layer_stay_resident(monkeypatch):
    """Where all the weights take at most ``RESIDENT_SLACK`` more than the largest layer (the staging buffer's
    size), they stay in secure memory from the read that authenticated the file: a refill reads nothing
    back (MiniVGG, every round masked: ~3 of its 9 ms a refill), and the normal world's copy, bound or
    changed, is not read."""
    untrusted, regions, a, b = _file()
    monkeypatch.setattr(obfuscated_weights, "RESIDENT_SLACK", b.nbytes)  # a is the largest
    weights = _outside(untrusted, regions)
    assert weights.outside and not weights.read_back
    shared = np.frombuffer(untrusted, np.uint8).copy()
    weights.bind(shared)  # accepted, as for weights read back (the runtime binds what it asked for)
    shared[16:] = 0
    np.testing.assert_array_equal(weights.get("a"), a)
    np.testing.assert_array_equal(weights.get("b"), b)
    monkeypatch.setattr(obfuscated_weights, "RESIDENT_SLACK", b.nbytes - 4)
    assert _outside(untrusted, regions).read_back  # one float more: read back


def test_each_load_keys_its_check_afresh():
    """The key comes from the TEE's CSPRNG per load: two loads of one file hold different tags, so a
    tag learnt from one (it never leaves the TEE anyway) says nothing about the other."""
    untrusted, regions, _, _ = _file()
    first, second = _outside(untrusted, regions), _outside(untrusted, regions)
    assert first._where["a"][2] != second._where["a"][2]


@pytest.mark.parametrize("outside", [True, False])
def test_the_weights_come_from_the_read_that_authenticates_the_file(outside, monkeypatch):
    """The normal world may rewrite its buffer while the TA reads it (it is shared memory): the weights'
    tags or copies must come from the bytes whose SHA-256 was checked. Here it rewrites a weight while the
    TA hashes the header: the hash of what was read then fails; rewritten once everything was read, the
    weights are the authentic ones. (A hash of the buffer, then a second read for the weights, took the
    rewritten ones: a review's race against a verified model.)"""
    untrusted, regions, a, b = _file()
    real = hashlib.sha256

    def racing(when):
        buffer = bytearray(untrusted)

        class Hasher:
            def __init__(self):
                self.inner, self.calls = real(), 0

            def update(self, data):
                self.inner.update(data)
                self.calls += 1
                if self.calls == when:
                    buffer[16 + 5] ^= 0x40  # a weight of "a", as the normal world rewrites it

            def hexdigest(self):
                return self.inner.hexdigest()

        monkeypatch.setattr(obfuscated_weights.hashlib, "sha256", Hasher)
        return buffer

    buffer = racing(when=1)  # after the header's bytes, before "a"'s
    with pytest.raises(TEEError, match="not the one these secrets were made for") as err:
        _weights(buffer, regions, outside, real(untrusted).hexdigest())
    assert err.value.code == TEE_ERROR_SECURITY
    buffer = racing(when=4)  # header, "a", "b", the tail: all read
    weights = _weights(buffer, regions, outside, real(untrusted).hexdigest())
    monkeypatch.setattr(obfuscated_weights.hashlib, "sha256", real)
    if outside:
        with pytest.raises(TEEError, match="'a' changed since it was loaded"):
            weights.bind(np.frombuffer(bytes(buffer), np.uint8))
            weights.get("a")  # the rewritten copy fails the tag taken from the authentic bytes
        weights.bind(np.frombuffer(untrusted, np.uint8))
    np.testing.assert_array_equal(weights.get("a"), a)
    np.testing.assert_array_equal(weights.get("b"), b)


def test_another_file_is_refused_as_it_is_read():
    untrusted, regions, _, _ = _file()
    other = untrusted[:-1] + b"\1"
    for outside in (True, False):
        with pytest.raises(TEEError, match="not the one") as err:
            _weights(other, regions, outside, hashlib.sha256(untrusted).hexdigest())
        assert err.value.code == TEE_ERROR_SECURITY
    with pytest.raises(TEEError, match="not the one"):  # shorter than where the weights lie
        _weights(untrusted[:20], regions, True, hashlib.sha256(untrusted).hexdigest())


def test_the_program_says_where_the_weights_lie():
    layers = {"conv": {"weights": "w", "weights_at": [64, [2, 3]]}, "old": {"weights": "v"}}
    assert weight_regions(layers, {"w"}) == {"w": (64, (2, 3))}
    with pytest.raises(ValueError, match="convert again"):
        weight_regions(layers, {"v"})  # a program without weights_at: the TA does not parse the flatbuffer
    layers["other"] = {"weights": "u", "weights_at": [80, [4]]}  # 64 + 24 bytes run past 80
    with pytest.raises(ValueError, match="overlap"):
        weight_regions(layers, {"w", "u"})
    untrusted = bytes(100)
    with pytest.raises(ValueError, match="past the untrusted model's end"):  # authentic, but a bad program
        _weights(untrusted, {"w": (96, (2,))})



def test_weights_too_large_for_secure_memory_are_said_to_be_what_failed():
    """A dense first layer of 64 MiB, split, failed its load with the bytes requested alone (a helper's
    probe): the error says what they were for."""
    from tee_sim.errors import TEE_ERROR_OUT_OF_MEMORY
    from tee_sim.memory import Heap, SecureMemory

    untrusted, regions, _, _ = _file()
    memory = SecureMemory(1 << 10)  # less than the 64 KiB staging chunk
    with pytest.raises(TEEError) as err:
        Weights(untrusted, regions, hashlib.sha256(untrusted).hexdigest(), Heap(memory).alloc, True,
                os.urandom)
    assert err.value.code == TEE_ERROR_OUT_OF_MEMORY
    assert err.value.message == (
        "secure memory exhausted: requested 0.1 MiB (65536 bytes), used 0.0 MiB (0 bytes), cap 0.0 MiB (1024 "
        "bytes), for the copy through which the trusted app reads the obfuscated weights, the largest "
        "layer's whole (at each refill of its one-time masks or, verified, of its checks) (README, 'Secure "
        "memory')")
    assert memory.used == 0
    with pytest.raises(TEEError) as err:  # kept in secure memory: the first that does not fit is named
        Weights(untrusted, regions, hashlib.sha256(untrusted).hexdigest(), Heap(SecureMemory(100)).alloc,
                False, os.urandom)
    assert err.value.message.endswith("for the obfuscated weights of b, kept in secure memory (README, "
                                      "'Secure memory')"), err.value.message
