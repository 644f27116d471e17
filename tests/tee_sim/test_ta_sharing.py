"""Sessions that load the same secrets share the decrypted program (two frames in flight cost one copy of
the masks and offsets), and each keeps working when the other closes."""

import warnings

import numpy as np

import tee_sim
from converters import convert
from tests.converters.driver import Driver
from tests.tee_sim.test_ta_shadownet import _model, _x


def test_sessions_share_one_program(tmp_path):
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The paper's scheme: static masks and offsets, shared; deterministic results to compare.
            convert(_model(0), tmp_path / "out", scheme="shadownet", seed=0, device=device)
        first = Driver(device, tmp_path / "out")
        alone = first.memory()[0]
        second = Driver(device, tmp_path / "out")
        both = second.memory()[0]
        program = (tmp_path / "out" / "secrets.sealed").stat().st_size
        # alone = program + one session's buffers, both = program + two sessions' buffers
        assert 2 * alone - both >= 0.9 * program
        want = first(_x())
        assert all(np.array_equal(a, b) for a, b in zip(second(_x()), want, strict=True))
        first.close()
        assert second.memory()[0] == alone  # the program stays for the second session
        assert all(np.array_equal(a, b) for a, b in zip(second(_x()), want, strict=True))
        second.close()
        assert device.memory_stats()["used"] == 0
