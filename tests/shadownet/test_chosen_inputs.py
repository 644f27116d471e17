"""The chosen-input attack (``shadownet.chosen_inputs``) against what crosses, and the one-time masks that
stop it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

from converters.graph import Graph, write_model
from shadownet import audit, chosen_inputs
from tests.converters.litert import run
from tests.shadownet.small_models import conv_options, pooled_dense_head


def two_convs(seed: int = 0, dense_block: bool = False, leaky: float | None = None,
              padded: bool = False) -> bytes:
    """A 16x16x3 image, a 3x3 ReLU conv of 16 filters (round 1), another (round 2, on what the first made),
    their mean over positions and a dense layer of 5 (round 3): a plain CNN's first layers. ``dense_block``:
    a third conv reads the two convs' outputs concatenated (a DenseNet block; round 3), before the head.
    ``leaky``: the first conv's activation a LEAKY_RELU op of this slope instead; ``padded``: its output
    zero-padded by a PAD op and read by a VALID conv (both as YOLOv4-tiny's first layer)."""
    rng = np.random.default_rng(seed)
    g = Graph()

    def conv(x: int, c_in: int, name: str, slope: float | None = None, valid: bool = False) -> int:
        w = g.add_tensor(f"{name}/w", (16, 3, 3, c_in), np.float32,
                         rng.standard_normal((16, 3, 3, c_in)) * np.sqrt(2 / (9 * c_in)))
        b = g.add_tensor(f"{name}/b", (16,), np.float32, rng.standard_normal(16) * 0.1)
        y = g.add_tensor(name, (1, 16, 16, 16), np.float32)
        fused = fb.ActivationFunctionType.RELU if slope is None else fb.ActivationFunctionType.NONE
        padding = fb.Padding.VALID if valid else fb.Padding.SAME
        g.add_op("CONV_2D", [x, w, b], [y], conv_options("CONV_2D", padding, 1, fused))
        if slope is None:
            return y
        options = fb.LeakyReluOptionsT()
        options.alpha = slope
        activated = g.add_tensor(f"{name}/leaky", (1, 16, 16, 16), np.float32)
        g.add_op("LEAKY_RELU", [y], [activated], options)
        return activated

    image = g.add_tensor("image", (1, 16, 16, 3), np.float32)
    first = conv(image, 3, "conv0", leaky)
    if padded:
        pads = g.add_tensor("pads", (4, 2), np.int32, np.array([[0, 0], [1, 1], [1, 1], [0, 0]], np.int32))
        bordered = g.add_tensor("conv0/padded", (1, 18, 18, 16), np.float32)
        g.add_op("PAD", [first, pads], [bordered])
    x = conv(bordered if padded else first, 16, "conv1", valid=padded)
    if dense_block:
        joined = g.add_tensor("joined", (1, 16, 16, 32), np.float32)
        options = fb.ConcatenationOptionsT()
        options.axis = 3
        g.add_op("CONCATENATION", [first, x], [joined], options)
        x = conv(joined, 32, "conv2")
    g.inputs, g.outputs = [image], [pooled_dense_head(g, x, rng)]
    return write_model(g)


def convert(tmp_path: Path, model: bytes | None = None, **options) -> dict:
    """``model`` (the two convs by default) as ``tmp_path / "model.tflite"``, converted into ``tmp_path /
    "out"`` with ``options``; its manifest."""
    import shadownet

    tmp_path.mkdir(parents=True, exist_ok=True)
    original = tmp_path / "model.tflite"
    original.write_bytes(model or two_convs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded (insecure), mask_scale=0 (unmasked)
        return shadownet.convert(str(original), str(tmp_path / "out"), seed=3, **options)


def _audit(tmp_path: Path, model: bytes | None = None, **options) -> tuple[dict, dict]:
    manifest = convert(tmp_path, model, **options)
    return manifest, audit.audit(tmp_path / "out", tmp_path / "model.tflite", inferences=4)


def test_a_first_layer_whose_activated_output_crosses_unmasked_is_solved_from_chosen_inputs(tmp_path):
    """``groupmix:mask_scale=0``: the one-time masks add nothing, so round 2 crosses as ``B relu(W x + b)``;
    21 inferences of the attacker's own inputs give every filter of the first layer (in the input's real
    coordinates: |cos| >= 0.9 with the reference's), none of the second's."""
    manifest, report = _audit(tmp_path, scheme="groupmix:mask_scale=0")
    assert report["chosen_inputs"]["inferences"] == chosen_inputs.INFERENCES
    assert [row["buffer"] for row in report["chosen_inputs"]["layers"]] == ["round_2/in/x0"]
    first, second = report["layers"][:2]
    assert first["recovered"]["chosen_input"] == first["filters"] == 16
    assert second["recovered"]["chosen_input"] == 0
    assert "chsn" in audit.format_report(report)


def test_the_round_after_the_first_layer_gets_one_time_masks_which_stop_the_attack(tmp_path):
    """By default, and whatever ``--mask-rounds`` names, round 2 - what the first layer made, one layer
    from the user's input - gets one-time masks as round 1 does (``converters.partition.after_input_rounds``;
    unsplit here: its split would cost 3x its layer's multiply-adds, most of this model's); the attack then
    recovers nothing."""
    manifest, report = _audit(tmp_path, mask_rounds="1")
    assert manifest["masks"]["one_time_rounds"] == [1, 2] and manifest["masks"]["input_rounds"] == [1]
    assert [i.get("split") for i in manifest["rounds"][1]["inputs"]] == [None]
    assert report["summary"]["conv_dense"]["recovered"]["chosen_input"] == 0
    assert report["summary"]["conv_dense"]["recovered"]["any"] == 0


def test_a_first_layer_carried_through_a_concatenation_is_solved_and_masked(tmp_path):
    """A DenseNet block: round 3 reads ``concat(relu(conv0 x), relu(conv1(...)))``. Unmasked
    (``mask_scale=0``), its first 16 channels are ``B relu(W x + b)`` and the attack solves conv0 from them
    as from round 2; under every policy round 3 gets one-time masks as round 2 does (a review found it
    crossing unmasked, conv0 given away: ``converters.partition.CARRY_THROUGH``), and nothing is recovered
    (``first``: the floor alone; ``auto`` masks every round of a model this small)."""
    model = two_convs(dense_block=True)
    _, report = _audit(tmp_path / "unmasked", model, scheme="groupmix:mask_scale=0")
    assert [row["buffer"] for row in report["chosen_inputs"]["layers"]] == ["round_2/in/x0", "round_3/in/x0"]
    assert report["layers"][0]["recovered"]["chosen_input"] == 16
    manifest, report = _audit(tmp_path / "floor", model, mask_rounds="first")
    assert manifest["masks"]["one_time_rounds"] == [1, 2, 3]
    assert report["summary"]["conv_dense"]["recovered"]["any"] == 0


@pytest.mark.parametrize(("padding", "stride", "dilation"),
                         [(fb.Padding.SAME, 2, 1), (fb.Padding.VALID, 1, 2), (fb.Padding.SAME, 1, 2)])
def test_the_attack_reads_each_position_s_window_as_litert_does(padding, stride, dilation):
    """``windows_of`` times the filters is LiteRT's conv, padding, strides and dilation included."""
    rng = np.random.default_rng(1)
    g = Graph()
    x = g.add_tensor("x", (1, 11, 10, 3), np.float32)
    weights = rng.standard_normal((4, 3, 3, 3))
    w = g.add_tensor("w", weights.shape, np.float32, weights)
    options = conv_options("CONV_2D", padding, stride, fb.ActivationFunctionType.NONE)
    options.dilationHFactor = options.dilationWFactor = dilation
    span = 2 * dilation + 1
    out = (-(-11 // stride), -(-10 // stride)) if padding == fb.Padding.SAME else (
        (11 - span) // stride + 1, (10 - span) // stride + 1)
    y = g.add_tensor("y", (1, *out, 4), np.float32)
    g.add_op("CONV_2D", [x, w, -1], [y], options)
    g.inputs, g.outputs = [x], [y]
    value = rng.standard_normal((1, 11, 10, 3)).astype(np.float32)
    want = run(write_model(g), [value])[0]
    patches = chosen_inputs.windows_of(value.astype(np.float64), weights.shape, options)
    got = patches @ weights.reshape(4, -1).T.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
