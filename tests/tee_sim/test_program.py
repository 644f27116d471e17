"""The TEE program container: round trip, and strict refusal of anything malformed."""

import json
import struct

import numpy as np
import pytest

from tee_sim.program import ProgramFormatError, read_program, write_program

ARRAYS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "idx": np.array([[2, 0, 1]], np.int32),
          "bytes": np.frombuffer(b"TFL3 model", np.uint8), "empty": np.zeros((0, 4), np.float32)}


def blob():
    return write_program({"steps": [[{"op": "litert", "signature": "step_0"}]]}, ARRAYS)


def test_round_trip_zero_copy_read_only():
    program, arrays = read_program(blob())
    assert program == {"steps": [[{"op": "litert", "signature": "step_0"}]]}
    assert set(arrays) == set(ARRAYS)
    for name, a in ARRAYS.items():
        assert arrays[name].dtype == a.dtype and np.array_equal(arrays[name], a)
        assert not arrays[name].flags.writeable
    assert b"pickle" not in blob() and blob()[:4] == b"SNTP"


def test_refuses_other_dtypes_when_writing():
    with pytest.raises(ValueError, match="dtype"):
        write_program({}, {"x": np.zeros(2, np.float64)})


def _rewrite(data: bytes, edit) -> bytes:
    magic, version, reserved, n = struct.unpack_from("<4sHHQ", data)
    header = json.loads(data[16:16 + n])
    edit(header)
    text = json.dumps(header).encode()
    start = -(-(16 + n) // 64) * 64
    new_start = -(-(16 + len(text)) // 64) * 64
    out = struct.pack("<4sHHQ", magic, version, reserved, len(text)) + text
    return out + b"\0" * (new_start - len(out)) + data[start:]


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:10], "truncated"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + struct.pack("<H", 5) + d[6:], "version"),
    (lambda d: d[:4] + struct.pack("<H", 0) + d[6:], "version"),
    (lambda d: d[:8] + struct.pack("<Q", len(d)) + d[16:], "overruns"),
    (lambda d: d[:-8], "past the end"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["a"].update(dtype="object")), "not allowed"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["a"].update(shape=[2, -3])), "bad shape"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["a"].update(shape=[4, 3])), "bytes for shape"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["a"].update(offset=8)), "offset"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["idx"].update(offset=0)), "overlap"),
    (lambda d: _rewrite(d, lambda h: h.update(extra=1)), "exactly"),
    (lambda d: _rewrite(d, lambda h: h["arrays"]["a"].pop("nbytes")), "entry"),
])
def test_malformed_programs_are_refused(mutate, message):
    with pytest.raises(ProgramFormatError, match=message):
        read_program(mutate(blob()))


def test_only_bytes_are_parsed():
    with pytest.raises(ProgramFormatError):
        read_program(bytearray(blob()))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_programs_are_still_read(version):
    """Versions 2, 3 and 4 only added fields (a restore's addend, a shaped mask's bands, a mask's channel
    scales): programs of the older versions mean the same."""
    data = blob()
    assert struct.unpack_from("<H", data, 4)[0] == 4
    program, arrays = read_program(data[:4] + struct.pack("<H", version) + data[6:])
    assert program == read_program(data)[0] and arrays.keys() == ARRAYS.keys()
