"""The critical-point attack (``shadownet.critical_points``) against a deeper round input that crosses
without one-time masks, and the masks that stop it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from converters.graph import Graph, write_model
from shadownet import audit, critical_points
from shadownet.audit_layers import LinearLayer
from tests.shadownet.small_models import conv_options, pooled_dense_head

FIRST = 10  # the first layer's filters
SIDE = 48  # the strided model's image


def _mini_vgg(seed: int = 0) -> bytes:
    """MiniVGG's first block on a 32x32x3 image: two 3x3 ReLU convs (``FIRST`` then 8 filters), a 2x2 max
    pool, a third conv of 16 (round 3 reads the pool: ``B maxpool(relu(conv(relu(conv x))))``, 6x6 fields
    of the image), then the mean over positions and a dense layer."""
    rng = np.random.default_rng(seed)
    g = Graph()

    def conv(x: int, c_in: int, c_out: int, side: int, name: str) -> int:
        w = g.add_tensor(f"{name}/w", (c_out, 3, 3, c_in), np.float32,
                         rng.standard_normal((c_out, 3, 3, c_in)) * np.sqrt(2 / (9 * c_in)))
        b = g.add_tensor(f"{name}/b", (c_out,), np.float32, rng.standard_normal(c_out) * 0.1)
        y = g.add_tensor(name, (1, side, side, c_out), np.float32)
        g.add_op("CONV_2D", [x, w, b], [y], conv_options("CONV_2D", fb.Padding.SAME, 1,
                                                         fb.ActivationFunctionType.RELU))
        return y

    image = g.add_tensor("image", (1, 32, 32, 3), np.float32)
    x = conv(conv(image, 3, FIRST, 32, "conv0"), FIRST, 8, 32, "conv1")
    pooled = g.add_tensor("pool", (1, 16, 16, 8), np.float32)
    options = fb.Pool2DOptionsT()
    options.padding, options.strideH, options.strideW = fb.Padding.VALID, 2, 2
    options.filterHeight = options.filterWidth = 2
    g.add_op("MAX_POOL_2D", [x], [pooled], options)
    g.inputs, g.outputs = [image], [pooled_dense_head(g, conv(pooled, 8, 16, 16, "conv2"), rng)]
    return write_model(g)


def _strided(seed: int = 0) -> bytes:
    """MobileNet's stem on a ``SIDE`` x ``SIDE`` x 3 image: a 3x3 stride-2 SAME RELU6 conv of ``FIRST``
    filters (padded at the bottom and right only), a 3x3 RELU6 depthwise layer (the default scheme keeps it
    in the TEE) and a 1x1 conv of 16 (round 2 reads ``B relu6(depthwise(relu6(conv0 x)))``: 7x7 fields of the
    image at a stride of 2), then the mean over positions and a dense layer. conv0's weights are large enough
    that its units reach RELU6's top as well as its bottom; the depthwise layer's bias keeps most of its
    units between its kinks, where they pass conv0's switches on. (At 32x32, 6-9 of the 10 filters came back
    within the default budget, varying between runs: too few positions for the seldom switching units.)"""
    rng = np.random.default_rng(seed)
    g = Graph()
    act = fb.ActivationFunctionType
    image = g.add_tensor("image", (1, SIDE, SIDE, 3), np.float32)
    w = g.add_tensor("conv0/w", (FIRST, 3, 3, 3), np.float32, rng.standard_normal((FIRST, 3, 3, 3)) * 1.5)
    b = g.add_tensor("conv0/b", (FIRST,), np.float32, rng.standard_normal(FIRST))
    a = g.add_tensor("conv0", (1, SIDE // 2, SIDE // 2, FIRST), np.float32)
    g.add_op("CONV_2D", [image, w, b], [a], conv_options("CONV_2D", fb.Padding.SAME, 2, act.RELU6))
    w = g.add_tensor("dw/w", (1, 3, 3, FIRST), np.float32, rng.standard_normal((1, 3, 3, FIRST)) * 0.25)
    b = g.add_tensor("dw/b", (FIRST,), np.float32, 1 + rng.standard_normal(FIRST) * 0.1)
    d = g.add_tensor("dw", (1, SIDE // 2, SIDE // 2, FIRST), np.float32)
    g.add_op("DEPTHWISE_CONV_2D", [a, w, b], [d],
             conv_options("DEPTHWISE_CONV_2D", fb.Padding.SAME, 1, act.RELU6))
    w = g.add_tensor("pw/w", (16, 1, 1, FIRST), np.float32, rng.standard_normal((16, 1, 1, FIRST)) * 0.4)
    b = g.add_tensor("pw/b", (16,), np.float32, rng.standard_normal(16) * 0.1)
    p = g.add_tensor("pw", (1, SIDE // 2, SIDE // 2, 16), np.float32)
    g.add_op("CONV_2D", [d, w, b], [p], conv_options("CONV_2D", fb.Padding.SAME, 1, act.RELU))
    g.inputs, g.outputs = [image], [pooled_dense_head(g, p, rng)]
    return write_model(g)


def _attack(tmp_path: Path, model: bytes | None = None, **convert) -> tuple[dict, dict]:
    import shadownet

    original = tmp_path / "model.tflite"
    original.write_bytes(_mini_vgg() if model is None else model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded (insecure)
        manifest = shadownet.convert(str(original), str(tmp_path / "out"), seed=3, **convert)
    report = audit.audit(tmp_path / "out", original, inferences=0, critical_points=True)
    return manifest, report


def _first_row(report: dict) -> dict:
    return next(r for r in report["layers"] if r["name"] == report["critical_points"]["layer"])


def test_a_deeper_unmasked_crossing_gives_the_first_layer_s_filters(tmp_path):
    """``mask_rounds="first"``: rounds 1-2 are masked, round 3 crosses as ``B maxpool(relu(conv1(relu(conv0
    x))))``; within the default budget the attack recovers most of conv0's filters from it."""
    manifest, report = _attack(tmp_path, mask_rounds="first")
    assert 3 not in manifest["masks"]["one_time_rounds"]
    found = report["critical_points"]
    assert found["buffer"] == "round_3/in/x0" and not found["masked"]
    assert found["field"] == [6, 6] and found["filters"] == FIRST
    assert found["inferences"] <= critical_points.BUDGET
    assert found["recovered"] >= 0.9 * FIRST, found
    assert found["sigma"] < 1e-3
    # counted with the other attacks' in the first layer's row, and in its ``any``
    recovered = _first_row(report)["recovered"]
    assert recovered["critical_point"] == found["recovered"] <= recovered["any"]
    assert "critical points (crit)" in audit.format_report(report)


def test_one_time_masks_leave_the_attack_nothing(tmp_path):
    """The default policy masks every round of a model this small: the attack reads the first crossing
    after the first layer anyway, measures the masks as noise and stops with nothing."""
    manifest, report = _attack(tmp_path)
    found = report["critical_points"]
    assert found["masked"] and found["recovered"] == 0
    assert found["sigma"] > 1e-2 and found["stopped"].startswith("masked")
    assert _first_row(report)["recovered"]["critical_point"] == 0


def test_a_strided_first_layer_under_a_depthwise_in_the_tee_gives_its_filters(tmp_path):
    """MobileNet's stem under ``mask_rounds="first"``: round 1 masked, round 2 crosses as ``B relu6(dw(relu6(
    conv0 x)))`` (the depthwise layer in the TEE); conv0's units sit every 2 pixels, 3 windows to a 7x7
    field each way, and switch at RELU6's both kinks. The attack recovers most of conv0's filters, and the
    audit counts them in the layer's ``critical_point`` and ``any``."""
    manifest, report = _attack(tmp_path, _strided(), mask_rounds="first")
    assert manifest["masks"]["one_time_rounds"] == [1]
    found = report["critical_points"]
    assert found["buffer"] == "round_2/in/x0" and not found["masked"]
    assert found["field"] == [7, 7] and found["filters"] == FIRST
    assert found["recovered"] >= 0.9 * FIRST and found["false_estimates"] == 0, found
    row = _first_row(report)
    assert row["recovered"]["critical_point"] == found["recovered"]
    assert row["recovered"]["any"] >= found["recovered"]
    assert report["summary"]["conv_dense"]["recovered"]["any"] >= found["recovered"]
    table = audit.format_report(report)
    assert " crit " in table and "counted in 'any'" in table


def test_one_time_masks_leave_the_strided_attack_nothing(tmp_path):
    """The default masks every round of the strided model: round 2's masks drown the probes; nothing is
    recovered or counted."""
    manifest, report = _attack(tmp_path, _strided())
    assert manifest["masks"]["one_time_rounds"] == list(range(1, len(manifest["rounds"]) + 1))
    found = report["critical_points"]
    assert found["masked"] and found["recovered"] == 0 and found["stopped"].startswith("masked")
    assert _first_row(report)["recovered"]["critical_point"] == 0


def test_any_counts_a_filter_once_whichever_attacks_found_it():
    """The first layer's ``any`` is the union of the filters each attack found: one the chosen-input and
    the critical-point attacks both found counts once; the table shows ``-`` for an attack that did not
    run."""
    rng = np.random.default_rng(0)
    real = rng.standard_normal((8, 27))
    first = LinearLayer("conv0", "conv", (3, 3, 3), real, "op 0")
    obfuscated = LinearLayer("conv0'", "conv", (3, 3, 3), rng.standard_normal((10, 27)), "round_1")
    scale = rng.uniform(-2, 2, (8, 1))
    report = audit.weight_attacks([first], [obfuscated], chosen={"conv0": real[:3]},
                                  critical={"conv0": scale[2:6] * real[2:6]})
    recovered = report["layers"][0]["recovered"]
    assert (recovered["chosen_input"], recovered["critical_point"], recovered["any"]) == (3, 4, 6)
    assert report["summary"]["conv_dense"]["recovered"]["any"] == 6
    report |= {"threshold": 0.9, "observation": {"inferences": 21, "under_observed": []},
               "critical_points": {"skipped": "the first op on the image is ..."}}
    row = audit.format_report(report).splitlines()[3]
    assert row.split()[-6:-2] == ["3", "-", "-", "6"]  # chsn, crit and fit (not run: '-'), any


def test_a_model_whose_first_layer_is_not_a_conv_is_skipped_with_its_reason():
    g = Graph()
    image = g.add_tensor("image", (1, 8, 8, 3), np.float32)
    w = g.add_tensor("w", (1, 3, 3, 3), np.float32, np.ones((1, 3, 3, 3)))
    y = g.add_tensor("y", (1, 8, 8, 3), np.float32)
    g.add_op("DEPTHWISE_CONV_2D", [image, w, -1], [y],
             conv_options("DEPTHWISE_CONV_2D", fb.Padding.SAME, 1, fb.ActivationFunctionType.RELU))
    g.inputs, g.outputs = [image], [y]
    why = critical_points.target(g, {}, [])
    assert why.startswith("the first op on the image is DEPTHWISE_CONV_2D, not a conv")
