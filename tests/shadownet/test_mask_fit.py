"""The mask-fit attack (``shadownet.mask_fit``): a first layer fitted through the one-time mask of the round
that carries its output - what the default's masks do not stop."""

from __future__ import annotations

from shadownet import audit, mask_fit
from tests.shadownet.test_chosen_inputs import convert


def test_a_first_layer_is_fitted_through_the_one_time_mask_that_stops_the_chosen_input_attack(tmp_path,
                                                                                               monkeypatch):
    """Under the default round 2 - ``relu(conv0 x)`` mixed - crosses under a fresh mask ~20x its values every
    inference: the chosen-input attack gets nothing from it, but a least-squares fit over 1,600 inferences of
    random inputs averages the mask out and gets most of conv0's 16 filters (measured 10 at |cos| >= 0.9,
    median best |cos| 0.92; 5 and 0.77 from 800); unmasked (``mask_scale=0``) 100 inferences give 14-16."""
    monkeypatch.setattr(mask_fit, "STEPS", 3000)
    original = tmp_path / "unmasked"
    convert(original, scheme="groupmix:mask_scale=0")
    report = audit.audit(original / "out", original / "model.tflite", inferences=4, mask_fit=100)
    assert report["mask_fit"]["buffer"] == "round_2/in/x0" and report["mask_fit"]["inferences"] == 100
    assert report["layers"][0]["recovered"]["mask_fit"] >= 12
    masked = tmp_path / "default"
    manifest = convert(masked)
    assert 2 in manifest["masks"]["one_time_rounds"]
    report = audit.audit(masked / "out", masked / "model.tflite", inferences=4, mask_fit=1600)
    first = report["layers"][0]
    assert report["mask_fit"]["masked"] and report["mask_fit"]["recovered"] == first["recovered"]["mask_fit"]
    assert first["recovered"]["chosen_input"] == 0
    assert first["recovered"]["mask_fit"] >= 6 and first["median_best_cos"]["mask_fit"] >= 0.8, first
    assert first["recovered"]["any"] >= first["recovered"]["mask_fit"]
    assert report["layers"][1]["recovered"]["mask_fit"] == 0  # conv1: not the attack's
    assert "mask fit (fit): " in audit.format_report(report)
