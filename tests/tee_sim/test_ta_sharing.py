"""Sessions that load the same secrets share the decrypted program (two frames in flight cost one copy of
the masks and offsets), and each keeps working when the other closes."""

import warnings

import numpy as np

import tee_sim
from converters import convert
from tests.converters.driver import Driver
from tests.shadownet.small_models import images, small_cnn
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


def test_sessions_share_the_packed_depthwise_weights(tmp_path):
    """The TA's depthwise kernel reads a 3x3 layer's weights packed (``pack_weights``): made once per
    program, counted with it, and freed with it."""
    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # a 3x3 depthwise layer of multiplier 1, 16 channels: the default scheme keeps it in the TEE
            convert(small_cnn(seed=5, multiplier=1), tmp_path / "out", seed=0, device=device)
        first = Driver(device, tmp_path / "out")
        alone = first.memory()[0]
        second = Driver(device, tmp_path / "out")
        models = [s.context["model"] for s in device._transport._os._sessions.values()]
        assert len(models) == 2
        (packed,) = models[0].depthwise.values()  # one 3x3 layer, as the kernel reads it
        assert packed.shape == (1, 9, 16) and models[1].depthwise == models[0].depthwise
        assert all(a is b for a, b in zip(models[0].depthwise.values(), models[1].depthwise.values(),
                                           strict=True))
        (x,) = images(1)
        want = first(x)  # one-time masks: equal within rounding, not bit for bit
        assert all(np.allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
                   for a, b in zip(second(x), want, strict=True))
        first.close()
        assert second.memory()[0] == alone  # the program and its packed weights stay for the second one
        second.close()
        assert device.memory_stats()["used"] == 0
