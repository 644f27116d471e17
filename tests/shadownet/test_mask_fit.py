"""The mask-fit attack (``shadownet.mask_fit``): a first layer fitted through the one-time mask of the round
that carries its output - what a Gaussian one-time mask does not stop, and the default's modular mask does
(``tee_sim.modular_masks``)."""

from __future__ import annotations

import numpy as np

from shadownet import audit, mask_fit
from tests.shadownet.test_chosen_inputs import convert, two_convs


def test_a_first_layer_is_fitted_through_a_gaussian_one_time_mask_and_not_through_a_modular_one(tmp_path,
                                                                                                monkeypatch):
    """Round 2 - ``relu(conv0 x)`` mixed - crosses under a fresh mask ~10-20x its values every inference: the
    chosen-input attack gets nothing from either kind. A Gaussian mask (``modular_masks=false``, the default
    before stop 61) adds noise of a fixed mean, and a least-squares fit over 1,600 inferences of random
    inputs averages it out and gets many of conv0's 16 filters (measured 5-13 at |cos| >= 0.9, median best
    |cos| 0.92-0.96 where 10-13; 5 and 0.77 from 800); unmasked (``mask_scale=0``) 100 inferences give
    14-16. The default's modular mask sends the input modulo its period, uniform whatever the input: the same
    fit gets none."""
    monkeypatch.setattr(mask_fit, "STEPS", 3000)
    original = tmp_path / "unmasked"
    convert(original, scheme="groupmix:mask_scale=0")
    report = audit.audit(original / "out", original / "model.tflite", inferences=4, mask_fit=100)
    assert report["mask_fit"]["buffer"] == "round_2/in/x0" and report["mask_fit"]["inferences"] == 100
    assert report["layers"][0]["recovered"]["mask_fit"] >= 12
    fitted = {}
    for name, scheme in (("gaussian", "groupmix:modular_masks=false"), ("default", None)):
        converted = tmp_path / name
        manifest = convert(converted, **({"scheme": scheme} if scheme else {}))
        assert 2 in manifest["masks"]["one_time_rounds"]
        report = audit.audit(converted / "out", converted / "model.tflite", inferences=4, mask_fit=1600)
        first = fitted[name] = report["layers"][0]
        assert report["mask_fit"]["masked"]
        assert report["mask_fit"]["recovered"] == first["recovered"]["mask_fit"]
        assert first["recovered"]["chosen_input"] == 0
        assert first["recovered"]["any"] >= first["recovered"]["mask_fit"]
        assert report["layers"][1]["recovered"]["mask_fit"] == 0  # conv1: not the attack's
        assert "mask fit (fit): " in audit.format_report(report)
    gaussian, default = fitted["gaussian"], fitted["default"]
    # Through the Gaussian mask the count moves with the masks the TEE draws (5, 10, 11, 13 in four runs of
    # this test); its median best |cos| stays well above the modular one's (0.4-0.46)
    assert gaussian["recovered"]["mask_fit"] >= 3, gaussian
    assert default["recovered"]["mask_fit"] == 0 and default["median_best_cos"]["mask_fit"] < 0.6, default
    assert gaussian["median_best_cos"]["mask_fit"] >= default["median_best_cos"]["mask_fit"] + 0.2


def test_a_first_layer_through_a_leaky_relu_is_fitted_with_its_slope(tmp_path, monkeypatch):
    """A first conv through a LEAKY_RELU, its output padded before it crosses (YOLOv4-tiny's first layer's
    kind), is the mask fit's, not the chosen-input attack's (no unit is ever off): fitted with the
    activation's slope to the padded crossing's interior (round 2's input is 18x18), unmasked (100
    inferences), it gives most of the 16 filters (measured 16, median best |cos| 1.0); the default's modular
    mask again leaves none (0, median 0.41; from fewer inferences than the test above's: through a modular
    mask the count does not grow with them)."""
    monkeypatch.setattr(mask_fit, "STEPS", 2000)
    model = two_convs(leaky=0.1, padded=True)
    counts = {}
    for name, scheme, budget in (("unmasked", "groupmix:mask_scale=0", 100), ("default", None, 200)):
        converted = tmp_path / name
        convert(converted, model, **({"scheme": scheme} if scheme else {}))
        report = audit.audit(converted / "out", converted / "model.tflite", inferences=4, mask_fit=budget)
        assert report["mask_fit"]["slope"] == np.float32(0.1)
        assert report["mask_fit"]["buffer"] == "round_2/in/x0"
        crossing = report["input_leakage"]["rounds"][1]
        assert crossing["tensor"] == "conv0/padded" and crossing["shape"] == [1, 18, 18, 16]
        assert report["chosen_inputs"]["layers"] == []  # not the chosen-input attack's
        counts[name] = report["layers"][0]["recovered"]["mask_fit"]
    assert counts["unmasked"] >= 12 and counts["default"] == 0, counts


def test_deeper_rounds_modular_masks_keep_the_outputs(tmp_path):
    """``groupmix:modular_depth=all``: every deeper round's small mask modular (by default those up to two
    layers from the input: a two-layer fit went through round 3's Gaussian mask - SECURITY.md); at about
    its input's spread a modular mask wraps many of its elements, each unwrapped through its layer in the
    TEE: the outputs stay LiteRT's to 1e-4."""
    import shadownet
    from tests.converters.litert import run

    model = two_convs(dense_block=True)
    manifest = convert(tmp_path, model, scheme="groupmix:modular_depth=all", mask_rounds="all")
    assert manifest["masks"]["one_time_rounds"] == [1, 2, 3, 4]
    rng = np.random.default_rng(5)
    with shadownet.load(tmp_path / "out") as protected:
        for _ in range(4):
            x = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
            want = run(model, [x])[0]
            got = protected(x)
            assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
