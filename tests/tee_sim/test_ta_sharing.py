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
            # ("first": with every round masked, as "auto" would, the first session also holds a smaller
            # mask-drawing buffer of its own that the second does not need - below - and its figure alone
            # is not the second's)
            convert(small_cnn(seed=5, multiplier=1), tmp_path / "out", seed=0, device=device,
                    mask_rounds="first")
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


def test_sessions_share_what_lives_within_one_call(tmp_path, monkeypatch):
    """What a call fills and uses before it returns - a user input's secure copy, a mask's drawing buffers,
    the kernels' tiles - is one buffer for every session of the trusted app (``tee_sim.memory.
    SharedScratch``; a TA runs one call at a time): a second session of the model costs that much less
    (two frames of yolov4-tiny in flight fit the 64 MiB cap so), sessions running at once on two threads
    (their calls interleaved) get LiteRT's outputs, and the last to close frees it."""
    import threading

    import shadownet
    from tests.shadownet.small_models import reference

    with tee_sim.Context("inprocess", home=tmp_path / "device") as device:
        monkeypatch.setattr(tee_sim, "default_context", lambda: device)
        original = small_cnn(seed=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # ("first": with every round masked, as "auto" would, the first session takes a purpose's
            # buffers as its masks of several sizes ask, the second the largest alone - figures not equal)
            convert(original, tmp_path / "out", seed=0, device=device, mask_rounds="first")
        secure_os = device._transport._os
        first = shadownet.load(tmp_path / "out", background_refill=False)
        alone = device.memory_stats()["used"]
        (model,) = [s.context["model"] for s in secure_os._sessions.values()]
        scratch = sum(handle[0].nbytes for handle in {id(h): h for h in model.scratches}.values())
        assert scratch > 0
        second = shadownet.load(tmp_path / "out", background_refill=False)
        both = device.memory_stats()["used"]
        (app,) = [instance.app for instance in secure_os._instances.values()]
        program = app._programs[model.shared].nbytes  # shared since stop 34
        assert both - alone == alone - program - scratch  # the second session's buffers, its scratch shared
        models = [s.context["model"] for s in secure_os._sessions.values()]
        assert {id(h) for h in models[0].scratches} == {id(h) for h in models[1].scratches}
        xs = images(12, seed=3)
        got: dict[int, list[np.ndarray]] = {0: [], 1: []}

        def run(k: int, session) -> None:
            for x in xs[k::2]:
                got[k].append(session(x))

        threads = [threading.Thread(target=run, args=(k, s)) for k, s in enumerate((first, second))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in (0, 1):
            for x, y in zip(xs[k::2], got[k], strict=True):
                want = reference(original, x)
                assert np.abs(y - want).max() <= 1e-4 * np.abs(want).max()
        first.close()
        assert device.memory_stats()["used"] == alone  # the second keeps the shared ones
        second.close()
        assert device.memory_stats()["used"] == 0
