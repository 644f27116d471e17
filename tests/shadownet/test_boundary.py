"""What the crossings tell about the secrets, end to end through the attack suite: the restore regression
and the input unmixing (``shadownet.boundary``; the fits themselves: test_crossing_fits.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

import shadownet
from converters.graph import Graph, write_model
from shadownet import audit, boundary
from tests.shadownet.small_models import DEPTHWISE_OFFLOADED, conv_options


def _linear(g: Graph, rng: np.random.Generator, x: int, kind: str, shape: tuple[int, ...],
            out_shape: tuple[int, ...], padding: int, stride: int, activation: int,
            bias: tuple[float, float] = (0.2, 0.6)) -> int:
    """A CONV_2D / DEPTHWISE_CONV_2D of LiteRT's weight ``shape`` on ``x``: He-normal weights, biases uniform
    in ``bias`` (positive, as batch norm often leaves them: most units active on most positions)."""
    k = len(g.ops)
    fan_in = int(np.prod(shape[1:])) if kind == "CONV_2D" else int(np.prod(shape[1:3]))
    w = g.add_tensor(f"w{k}", shape, np.float32, rng.standard_normal(shape) * np.sqrt(2 / fan_in))
    b = g.add_tensor(f"b{k}", (out_shape[-1],), np.float32, rng.uniform(*bias, out_shape[-1]))
    y = g.add_tensor(f"y{k}", out_shape, np.float32)
    g.add_op(kind, [x, w, b], [y], conv_options(kind, padding, stride, activation))
    return y


def _same_size_chain(layers: list[tuple], side: int, bias: tuple[float, float], seed: int) -> bytes:
    """An image of ``side`` x ``side`` x 3 through ``layers`` (kind, in, out, kernel, activation; SAME,
    stride 1, ``_linear``'s weights, biases uniform in ``bias``), then a mean: each linear op a round of its
    own."""
    rng = np.random.default_rng(seed)
    g = Graph()
    x = image = g.add_tensor("image", (1, side, side, 3), np.float32)
    for kind, c_in, c_out, k, activation in layers:
        shape = (c_out, k, k, c_in) if kind == "CONV_2D" else (1, k, k, c_out)
        x = _linear(g, rng, x, kind, shape, (1, side, side, c_out), fb.Padding.SAME, 1, activation, bias)
    axes = g.add_tensor("axes", (2,), np.int32, np.array([1, 2]))
    out = g.add_tensor("pooled", (1, layers[-1][2]), np.float32)
    g.add_op("MEAN", [x, axes], [out], fb.ReducerOptionsT())
    g.inputs, g.outputs = [image], [out]
    return write_model(g)


def _narrow_then_wide(seed: int = 0) -> bytes:
    """conv 3->4 | depthwise 4 | 1x1 conv 4->32, ReLU6 (its input too narrow to be mixed) | depthwise 32 |
    1x1 conv 32->16, ReLU (its input mixed) | depthwise 16 | mean. Each pointwise layer's results are
    followed by a depthwise layer's input, which is not channel-mixed. The depthwise layers have no
    activation, so that the pointwise layers' inputs take both signs."""
    act = fb.ActivationFunctionType
    return _same_size_chain([("CONV_2D", 3, 4, 3, act.RELU), ("DEPTHWISE_CONV_2D", 4, 4, 3, act.NONE),
                             ("CONV_2D", 4, 32, 1, act.RELU6), ("DEPTHWISE_CONV_2D", 32, 32, 3, act.NONE),
                             ("CONV_2D", 32, 16, 1, act.RELU), ("DEPTHWISE_CONV_2D", 16, 16, 3, act.NONE)],
                            16, (0.2, 0.6), seed)


@pytest.fixture(scope="module")
def narrow_then_wide(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("narrow")
    (directory / "original.tflite").write_bytes(_narrow_then_wide())
    return directory


# Depthwise layers offloaded, and the rounds past round 1 unmasked as before stop 56 (``mask_floor=input``:
# since, rounds one layer from the input or too narrow to mix are masked whatever the policy; and the policy
# "first", since stop 58: "auto" masks every round of a model this small): the crossings these attacks read.
UNMASKED = f"{DEPTHWISE_OFFLOADED},mask_floor=input"


def _audit(directory: Path, name: str, **kw) -> dict:
    """The audit of ``directory``'s model converted with ``kw`` (``UNMASKED`` and ``--mask-rounds first``
    unless a scheme is given)."""
    if "scheme" not in kw:
        kw.update(scheme=UNMASKED, mask_rounds=kw.get("mask_rounds", "first"))
    out = directory / name
    if out.exists():
        return _report(out, directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded, no calibration
        shadownet.convert(str(directory / "original.tflite"), str(out), seed=11, **kw)
    return _report(out, directory)


def _report(out: Path, directory: Path) -> dict:
    return rows_of(audit.audit(out, directory / "original.tflite", inferences=4))


def rows_of(report: dict) -> dict:
    return {row["obfuscated"]: row for row in report["layers"]} | {"report": report}


def test_unmasked_crossings_give_the_restore_away(narrow_then_wide):
    """Depthwise layers offloaded, the mask policy ``first`` (round 1 masked only): each pointwise layer's
    restore is learnt from the next
    round's input; the layer whose input is too narrow to mix is then recovered outright, the other one
    stands in its input's mixed coordinates, which the regression does not undo."""
    rows = _audit(narrow_then_wide, "offloaded")
    narrow, wide = rows["round_3/y0"], rows["round_5/y0"]
    assert "error" not in rows["report"]["input_leakage"]
    assert narrow["restore"]["rank"] >= 0.9 * 32 and narrow["restore"]["follower"] == "round_4/in/x0"
    assert narrow["recovered"]["restore_regression"] >= 0.9 * 32
    assert narrow["recovered"]["any"] >= narrow["recovered"]["restore_regression"]
    assert wide["restore"]["rank"] >= 0.75 * 16  # a unit its ReLU keeps at 0 almost everywhere fits nothing
    assert wide["recovered"]["restore_regression"] == 0
    summary = rows["report"]["summary"]["conv_dense"]
    assert summary["recovered"]["restore_regression"] == narrow["recovered"]["restore_regression"]
    assert "rreg" in audit.format_report(rows["report"])


def test_narrow_rounds_and_those_one_layer_from_the_input_are_masked_whatever_the_policy(narrow_then_wide):
    """Since stop 56 (``converters.partition.always_masked``): round 2 (the depthwise layer on what the first
    conv made) and round 3 (the pointwise layer whose 4-channel input is too narrow to mix) get one-time
    masks, so the narrow layer's restore, learnt above from its unmasked follower, is not learnt. (Its
    4-value filters still match by chance: the table's chance column.)"""
    rows = _audit(narrow_then_wide, "floor", scheme=DEPTHWISE_OFFLOADED)
    manifest = json.loads((narrow_then_wide / "floor" / "manifest.json").read_text())
    assert manifest["masks"]["one_time_rounds"][:3] == [1, 2, 3] and manifest["masks"]["input_rounds"] == [1]
    narrow = rows["round_3/y0"]
    assert narrow.get("restore", {}).get("rank", 0) == 0 and narrow["recovered"]["restore_regression"] == 0


def test_the_default_observes_as_many_inferences_as_the_fits_want(narrow_then_wide):
    """The default count covers every conv layer (4 at least); a shorter watch lists the layers it leaves
    under-observed, in the JSON and in the table."""
    _audit(narrow_then_wide, "offloaded")
    out, reference = narrow_then_wide / "offloaded", narrow_then_wide / "original.tflite"
    obf = audit.untrusted_layers((out / "untrusted.tflite").read_bytes())
    # 16 x 16 positions an inference: the 32-wide layers' 33 unknowns want 8 x 33 = 264, 2 inferences
    assert [(layer.where, layer.positions, boundary.inferences_needed(layer)) for layer in obf][2:4] == \
        [("round_3", 256, 2), ("round_4", 256, 2)]
    assert audit.default_inferences(obf) == audit.AUTO_INFERENCES[0]
    report = audit.audit(out, reference, inferences=1)
    short = report["observation"]["under_observed"]
    assert report["observation"]["inferences"] == 1
    assert [(r["where"], r["positions"], r["wanted"], r["inferences_needed"]) for r in short] == \
        [("round_3", 256, 264, 2), ("round_4", 256, 264, 2)]
    assert "too few for the restore fits on 2 layers, where" in audit.format_report(report)
    assert rows_of(report)["round_3/y0"]["restore"]["rank"] > 0  # found some, fewer than an attacker could
    default = audit.audit(out, reference)  # the count chosen: 4, enough for every layer here
    assert default["observation"] == {"inferences": 4, "under_observed": []}
    assert default["input_leakage"]["inferences"] == 4


def test_the_default_count_is_capped_and_leaves_dense_layers_to_the_report():
    def layer(kind: str, channels: int, positions: int) -> audit.LinearLayer:
        return audit.LinearLayer("t", kind, (1, 1, 4), np.zeros((channels, 4)), "round_1", None, positions)

    low, high = audit.AUTO_INFERENCES
    assert audit.default_inferences([layer("conv", 512, 196)]) == 21  # MobileNet's pw6-pw11
    assert audit.default_inferences([layer("conv", 16, 1024), layer("dense", 10, 1)]) == low
    assert audit.default_inferences([layer("conv", 1024, 49)]) == high  # wants 168
    listed = audit.under_observed([layer("conv", 1024, 49), layer("dense", 10, 1)], high)
    assert [r["inferences_needed"] for r in listed] == [168, 88]


def test_one_time_masks_on_every_round_stop_the_restore_regression(narrow_then_wide):
    rows = _audit(narrow_then_wide, "all", mask_rounds="all")
    assert "error" not in rows["report"]["input_leakage"]
    tried = [row["restore"] for key, row in rows.items() if key != "report" and "restore" in row]
    assert len(tried) >= 4 and all(r["tried"] > 0 and r["rank"] == 0 for r in tried)
    assert rows["report"]["summary"]["conv_dense"]["recovered"]["restore_regression"] == 0


def test_an_artifact_that_does_not_load_is_still_attacked_on_its_weights(narrow_then_wide, tmp_path):
    import shutil

    out = tmp_path / "damaged"
    _audit(narrow_then_wide, "offloaded")  # converted by the test above, or here
    shutil.copytree(narrow_then_wide / "offloaded", out)
    sealed = out / "secrets.sealed"
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sealed.write_bytes(bytes(data))
    report = audit.audit(out, narrow_then_wide / "original.tflite", inferences=2)
    assert report["input_leakage"]["error"].startswith("no crossing observed, so no restore regression")
    assert len(report["layers"]) == 6 and not any("restore" in row for row in report["layers"])
    # The table says at its top that the attacks on the crossings did not run, and shows none of their
    # columns as a count (a 0 there read as "nothing recovered" to a helper skimming it).
    lines = audit.format_report(report).splitlines()
    assert lines[1].startswith("NOT MEASURED: no crossing observed") and "'any' counts only" in lines[1]
    rows = lines[lines.index(next(line for line in lines if line.startswith("-"))) + 1:][:6]
    # rreg, unmx, chsn, crit, fit (then any, subsp, chance)
    assert all(row.split()[-8:-3] == ["-"] * 5 for row in rows), rows
    assert "restore_regression -, input_unmixing -" in audit.format_report(report)
    # The command's last line: why the model did not run, first (it ended a long line: a helper's probe).
    from types import SimpleNamespace

    from shadownet.exceptions import ShadowNetError

    args = SimpleNamespace(artifacts=str(out), reference=str(narrow_then_wide / "original.tflite"),
                           inferences=2, json=None)
    with pytest.raises(ShadowNetError, match=r"^the protected model did not run here \(.*secrets.sealed does "
                                             r"not match the SHA-256.*\): the attacks on the crossings"):
        audit.audit_cli(args)


def test_depthwise_layers_kept_in_the_tee_leave_the_regression_nothing(narrow_then_wide):
    """``groupmix:depthwise=tee``: no layer's output crosses again unmixed and unmasked, so no row of any
    restore is learnt; the outputs still LiteRT's."""
    from tests.shadownet.small_models import reference

    # Round 1 unsplit, as the auto policy left it before its masks were shaped: a split layer's results
    # cross in two halves, which no regression reads, and this test wants every layer's results tried.
    rows = _audit(narrow_then_wide, "depthwise_in_tee", scheme="groupmix:depthwise=tee,exact_split=none")
    assert "error" not in rows["report"]["input_leakage"]
    layers = [row for key, row in rows.items() if key != "report"]
    assert [row["kind"] for row in layers] == ["conv", "conv", "conv"]  # the depthwise ones not offloaded
    tried = [row["restore"] for row in layers if "restore" in row]
    assert len(tried) == 2 and all(r["tried"] > 0 and r["rank"] == 0 for r in tried)
    report = rows["report"]
    assert len(report["kept_in_tee"]) == 3 and not report["unmatched_reference"]
    assert ("kept in the TEE, not offloaded (by the scheme, or for sums too long to split): 3 layers "
            "(depthwise)") in audit.format_report(report)
    original = (narrow_then_wide / "original.tflite").read_bytes()
    x = np.random.default_rng(3).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    with shadownet.load(narrow_then_wide / "depthwise_in_tee") as model:
        got, want = model(x), reference(original, x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_a_follower_the_tee_padded_is_cropped(tmp_path):
    """Keras's MobileNet pads before its stride-2 depthwise layers (a PAD, then VALID): the next round's
    input is the activation with a border, which the regression crops at each placement its shape allows."""
    rng = np.random.default_rng(4)
    g = Graph()
    act = fb.ActivationFunctionType
    image = g.add_tensor("image", (1, 16, 16, 3), np.float32)

    def layer(*args):
        return _linear(g, rng, *args)

    a = layer(image, "CONV_2D", (4, 3, 3, 3), (1, 16, 16, 4), fb.Padding.SAME, 1, act.NONE)
    p = layer(a, "CONV_2D", (32, 1, 1, 4), (1, 16, 16, 32), fb.Padding.SAME, 1, act.RELU6)
    paddings = g.add_tensor("paddings", (4, 2), np.int32, np.array([[0, 0], [0, 1], [0, 1], [0, 0]]))
    padded = g.add_tensor("padded", (1, 17, 17, 32), np.float32)
    g.add_op("PAD", [p, paddings], [padded], fb.PadOptionsT())
    d = layer(padded, "DEPTHWISE_CONV_2D", (1, 3, 3, 32), (1, 8, 8, 32), fb.Padding.VALID, 2, act.NONE)
    axes = g.add_tensor("axes", (2,), np.int32, np.array([1, 2]))
    out = g.add_tensor("pooled", (1, 32), np.float32)
    g.add_op("MEAN", [d, axes], [out], fb.ReducerOptionsT())
    g.inputs, g.outputs = [image], [out]
    (tmp_path / "original.tflite").write_bytes(write_model(g))
    rows = _audit(tmp_path, "out")
    assert "error" not in rows["report"]["input_leakage"]
    pointwise = rows["round_2/y0"]
    assert pointwise["restore"]["follower"] == "round_3/in/x0"
    assert pointwise["restore"]["rank"] >= 0.9 * 32
    assert pointwise["recovered"]["restore_regression"] >= 0.9 * 32  # its 4-channel input is not mixed


def _depthwise_separable(seed: int = 5) -> bytes:
    """A small MobileNet: conv 3->16 | depthwise 16 | 1x1 conv 16->32 | depthwise 32 | 1x1 conv 32->32 |
    depthwise 32 | mean, every layer with ReLU6. The pointwise layers' inputs are mixed (16 channels and
    more), each made by the TEE from a depthwise round's results."""
    relu6 = fb.ActivationFunctionType.RELU6
    return _same_size_chain([("CONV_2D", 3, 16, 3, relu6), ("DEPTHWISE_CONV_2D", 16, 16, 3, relu6),
                             ("CONV_2D", 16, 32, 1, relu6), ("DEPTHWISE_CONV_2D", 32, 32, 3, relu6),
                             ("CONV_2D", 32, 32, 1, relu6), ("DEPTHWISE_CONV_2D", 32, 32, 3, relu6)],
                            24, (0.0, 0.4), seed)


@pytest.fixture(scope="module")
def depthwise_separable(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("separable")
    (directory / "original.tflite").write_bytes(_depthwise_separable())
    return directory


def test_the_input_mixing_of_a_pointwise_layer_is_undone_from_the_depthwise_results(depthwise_separable):
    """Depthwise layers offloaded, the mask policy ``first``: each pointwise layer's restore rows come from
    the next depthwise round's input, then its input mixing from the previous depthwise round's results,
    both crossing unmixed and unmasked: the real filters, with no reference weight used (SECURITY.md)."""
    rows = _audit(depthwise_separable, "offloaded")
    report = rows["report"]
    assert "error" not in report["input_leakage"]
    for name, earlier in (("round_3/y0", "round_2/out/y0"), ("round_5/y0", "round_4/out/y0")):
        pointwise = rows[name]
        assert pointwise["recovered"]["restore_regression"] == 0  # in the mixed coordinates only
        assert pointwise["input_mixing"]["earlier"] == earlier
        assert pointwise["input_mixing"]["blocks"] == pointwise["input_mixing"]["of"] >= 1
        # Every filter whose restore row was learnt (a unit its ReLU6 keeps at 0 or 6 gives none)
        assert pointwise["restore"]["rank"] >= 0.7 * 32
        assert pointwise["recovered"]["input_unmixing"] >= 0.9 * pointwise["restore"]["rank"]
    assert report["summary"]["conv_dense"]["recovered"]["input_unmixing"] >= 0.7 * 64
    assert "input unmixing (unmx)" in audit.format_report(report)


@pytest.mark.parametrize("policy", [{"mask_rounds": "1,2,4,6"}, {"mask_rounds": "all"},
                                    {"scheme": "groupmix:depthwise=tee"}, {"scheme": None}],
                         ids=["depthwise rounds masked", "every round masked", "depthwise in the TEE",
                              "the default"])
def test_masked_or_kept_depthwise_rounds_stop_the_input_unmixing(depthwise_separable, policy):
    name = "_".join(str(v).replace(",", "_").replace(":", "_").replace("=", "_") for v in policy.values())
    rows = _audit(depthwise_separable, name, **policy)
    report = rows["report"]
    assert "error" not in report["input_leakage"]
    layers = [row for key, row in rows.items() if key != "report"]
    assert not any(row.get("input_mixing") for row in layers)
    recovered = report["summary"]["conv_dense"]["recovered"]
    assert recovered["input_unmixing"] == 0
    # The chosen-input attack's estimates of the first layer: median best |cos| 1.0 with round 2 unmasked
    # (all 16 filters), at most 0.65 behind its mask (mean 0.59 over 50 audits, stop 60; direction matching
    # on the obfuscated weights 0.55). One of the 16 crossed |cos| 0.9 in 3 of 130 audits (and in one full
    # test run): at the threshold by chance, not the attack working.
    first = rows["round_1/y0"]
    assert first["median_best_cos"]["chosen_input"] < 0.75, first["median_best_cos"]
    assert recovered["any"] <= 1, (recovered, [(row["obfuscated"], row["recovered"]) for row in layers
                                               if any(row.get("recovered", {}).values())])


def test_the_layers_a_scheme_keeps_in_the_tee_come_from_its_manifest():
    """groupmix keeps depthwise layers in the TEE by default; a manifest written before its ``depthwise``
    parameter existed offloaded them, and is audited so."""
    params = {"group_size": 16, "input_group": 16}
    kept = {name: audit._kept_in_tee(audit._manifest_scheme({"scheme": {"name": "groupmix", "params": p}}))
            for name, p in (("old", params), ("tee", params | {"depthwise": "tee"}),
                            ("offload", params | {"depthwise": "offload"}))}
    assert kept == {"old": frozenset(), "tee": {"depthwise"}, "offload": frozenset()}
    assert audit._kept_in_tee(audit._manifest_scheme({"scheme": {"name": "nonesuch"}})) == frozenset()
    assert audit._manifest_scheme({"scheme": {"name": "groupmix", "params": params}}).input_blocks(40) == \
        [(0, 13), (13, 27), (27, 40)]
