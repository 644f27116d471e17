"""What an attacker holding public weights learns of private ones made from them (``audit --public``)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from converters.schemes import LinearLayer as SchemeLayer
from converters.schemes import get_scheme
from shadownet import audit, audit_report, private_change, span_attack
from shadownet.audit_layers import LinearLayer
from shadownet.exceptions import ArtifactError, ShadowNetError


def _public_and_private(rng: np.random.Generator, n: int, taps: int, c: int, change: float):
    public = rng.standard_normal((n, taps * c)) * math.sqrt(2 / (taps * c))
    return public, public + change * public.std() * rng.standard_normal(public.shape)


def _obfuscated(scheme_name: str, private: np.ndarray, taps: int, c: int, rng: np.random.Generator, **params):
    k = int(math.isqrt(taps))
    weights = private.reshape(len(private), k, k, c).astype(np.float32)
    scheme = get_scheme(scheme_name, **params)
    obf = scheme.obfuscate(SchemeLayer("CONV_2D", weights, name="conv", input_channels=c), rng)
    return scheme, np.asarray(obf.weights, np.float64).reshape(len(obf.weights), -1)


def test_the_span_attack_learns_most_of_a_private_change_under_groupmix() -> None:
    """Each group's obfuscated filters are a basis of its real filters' span in the coordinates of the input
    mixing: the public weights projected onto it, the mixing fitted along, leave about sqrt(16 / D) of the
    change (here D = 288: 0.24, and a bit more, the change being part of the private filters themselves),
    where the weight attacks of the suite, aligned to the public filters, land farther than the public
    weights themselves (the obfuscated filters point nowhere near them)."""
    rng = np.random.default_rng(0)
    public, private = _public_and_private(rng, 64, 9, 32, change=0.1)
    scheme, obf = _obfuscated("groupmix", private, 9, 32, rng)
    row = private_change.layer_change(obf, private, public, 32, scheme)
    assert row["best"] == "span"
    assert row["span"]["ratio"] < 0.4, row["span"]
    assert row["span"]["recovered"] >= 0.9 * 64
    assert row["weight_attacks"]["ratio"] > 1.0 and row["weight_attacks"]["recovered"] == 0
    # What it learnt is this private model's change, read from its obfuscated weights: scored against
    # another change of the same public weights it is farther off than the public weights themselves.
    other = public + 0.1 * public.std() * np.random.default_rng(1).standard_normal(public.shape)
    estimate = span_attack.span_estimate(obf, public, 32, scheme.input_blocks(32), 16)
    assert private_change.change_figures(estimate, other, public)["ratio"] > 1.2


def test_the_partner_planes_learn_a_private_change_under_the_papers_scheme() -> None:
    """``W' = (W - F) / s`` and its fake partner ``F`` span a plane that holds ``W``: the public filter
    projected onto it errs by the change's part in the plane only."""
    rng = np.random.default_rng(2)
    public, private = _public_and_private(rng, 64, 9, 32, change=0.1)
    scheme, obf = _obfuscated("shadownet", private, 9, 32, rng)
    row = private_change.layer_change(obf, private, public, 32, scheme)
    assert row["best"] == "planes" and "span" not in row
    assert row["planes"]["ratio"] < 0.25, row["planes"]
    assert row["planes"]["recovered"] >= 0.9 * 64


def test_the_partner_planes_try_several_partners_as_fakes_are_shared() -> None:
    """On a narrow layer (27 inputs per filter) a filter's most collinear other is often another real filter
    that shares its fake (about 5 share each), whose plane does not hold it: with only that partner, the
    estimate was 1.94 of the change on MiniVGG's first layer and up to 26x on a fine-tuned one (a review);
    with each filter's 6 most collinear others, every public filter finds the plane of its own."""
    rng = np.random.default_rng(6)
    public, private = _public_and_private(rng, 32, 9, 3, change=0.1)
    scheme, obf = _obfuscated("shadownet", private, 9, 3, rng)
    one = private_change.partner_planes(obf, public, partners=1)
    six = private_change.partner_planes(obf, public)
    errors = [np.linalg.norm(e - private, axis=1) / np.linalg.norm(private - public, axis=1)
              for e in (one, six)]
    assert errors[0].max() > 2 and errors[1].max() < 1.0, [e.max() for e in errors]
    assert private_change.change_figures(six, private, public)["ratio"] < 0.5


def test_a_public_model_of_another_architecture_is_refused() -> None:
    def layer(name: str, shape: tuple[int, int]) -> LinearLayer:
        return LinearLayer(name, "conv", (3, 3, shape[1] // 9), np.zeros(shape), "op 0")

    private = [layer("a", (16, 27)), layer("b", (32, 144))]
    with pytest.raises(ArtifactError, match="has 1 linear layer where the protected model has 2"):
        private_change.check_public(private[:1], private, "pub.tflite")
    with pytest.raises(ArtifactError, match=r"filters \[24, 144\] \(kernel \[3, 3, 16\]\) where the "):
        private_change.check_public([private[0], layer("b", (24, 144))], private, "pub.tflite")
    # The same number of weights per filter in another kernel (1x1 on 144 channels): not the same layer.
    pointwise = LinearLayer("b", "conv", (1, 1, 144), np.zeros((32, 144)), "op 0")
    with pytest.raises(ArtifactError, match=r"\(kernel \[1, 1, 144\]\) where the protected model's conv"):
        private_change.check_public([private[0], pointwise], private, "pub.tflite")


# ---------------------------------------------------------------------------------------------
# End to end: a Keras CNN fine-tuned (here: changed by 10%), converted, audited with --public
# ---------------------------------------------------------------------------------------------


def _changed(model: bytes, change: float, seed: int, skip: int = 0) -> bytes:
    """``model`` with every linear layer's weights but the first ``skip`` moved by ``change`` of their
    spread (a stand-in for fine-tuning)."""
    from converters.graph import write_model
    from converters.tflite_reader import read_model

    g = read_model(model)
    rng = np.random.default_rng(seed)
    linear = [op.inputs[1] for op in g.ops if op.kind in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D")]
    for t in linear[skip:]:
        w = np.asarray(g.tensors[t].data, np.float64)
        moved = w + change * w.std() * rng.standard_normal(w.shape)
        g.tensors[t] = dataclasses.replace(g.tensors[t], data=moved.astype(g.tensors[t].dtype))
    return write_model(g)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(public, private, private under groupmix, private under the paper's scheme): the private model is the
    public one with all but its first linear layer changed."""
    import shadownet
    from tests.shadownet.test_audit import write_paper_cnn

    base = tmp_path_factory.mktemp("fine_tuned")
    public = write_paper_cnn(base / "public.tflite")
    private = base / "private.tflite"
    private.write_bytes(_changed(public.read_bytes(), 0.1, seed=4, skip=1))
    shadownet.convert(str(private), str(base / "groupmix"), seed=5)
    shadownet.convert(str(private), str(base / "paper"), scheme="shadownet", seed=5)
    return public, private, base / "groupmix", base / "paper"


def test_audit_reports_the_private_change_each_scheme_gives_away(fine_tuned, tmp_path: Path) -> None:
    public, private, groupmix, paper = fine_tuned
    report = audit.audit(groupmix, private, inferences=0, public=public)
    change = report["private_change"]
    rows = {r["name"]: r for r in change["layers"]}
    assert len(rows) == len(report["layers"])  # depthwise layers run in the TEE: in neither
    first = change["layers"][0]
    assert first.get("unchanged") and change["summary"]["unchanged_layers"] == 1
    changed = [r for r in change["layers"] if not r.get("unchanged")]
    # Layers of many inputs per filter give most of their change away. The 1x1 convolution of 48 filters on
    # 32 inputs and the 10-output head hold too few weights to determine their input mixing: no estimate.
    wide = [r for r in changed if r["dim"] >= 144]
    assert len(wide) == 3 and all(r["best"] == "span" and r["span"]["ratio"] < 0.5 for r in wide), wide
    narrow = [r for r in changed if r["dim"] < 144]
    assert [r["dim"] for r in narrow] == [32, 64]
    assert all(r["best"] == "public" and r["span"] is None and r["public"]["ratio"] == 1.0 for r in narrow)
    totals = change["summary"]["conv_dense"]
    assert totals["span"]["ratio"] < 0.5 and totals["best"]["ratio"] < 0.7
    text = audit_report.format_report(report)
    assert "private change against the public weights" in text and "span attack" in text
    paper_change = audit.audit(paper, private, inferences=0, public=public)["private_change"]
    # Its depthwise layer's kernels cross permuted and scaled: the weight attacks' directions are the best.
    assert all(r["best"] == ("weight_attacks" if r["kind"] == "depthwise" else "planes")
               for r in paper_change["layers"] if not r.get("unchanged"))
    assert paper_change["summary"]["conv_dense"]["best"]["ratio"] < 0.5


def test_audit_without_public_weights_has_no_private_change_and_refuses_another_architecture(
        fine_tuned, tmp_path: Path, monkeypatch) -> None:
    public, private, groupmix, _ = fine_tuned
    assert "private_change" not in audit.audit(groupmix, private, inferences=0)
    from shadownet.cli import main

    assert main(["audit", str(groupmix), "--reference", str(private), "--public",
                 str(tmp_path / "none.tflite"), "--inferences", "0"]) == 1
    tf = pytest.importorskip("tensorflow")
    import keras

    keras.utils.set_random_seed(0)
    x = keras.Input((16, 16, 3), batch_size=1, name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    y = keras.layers.Dense(10)(keras.layers.Flatten()(h))
    other = tmp_path / "other.tflite"
    other.write_bytes(bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, y)).convert()))
    with pytest.raises(ArtifactError, match="public weights of the same architecture"):
        audit.audit(groupmix, private, inferences=0, public=other)
    # Refused before any inference is observed (a review waited 4 min 42 s on MobileNet for it), and in
    # its own words: not "the reference".
    import shadownet.audit as audit_module

    def observed(*args, **kwargs):
        raise AssertionError("observed inferences before checking the public model")

    monkeypatch.setattr(audit_module, "observe_boundary", observed)
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ShadowNetError, match=r"^public model .*garbage.tflite"):
        audit.audit(groupmix, private, inferences=4, public=garbage)
    with pytest.raises(ArtifactError, match="public weights of the same architecture"):
        audit.audit(groupmix, private, inferences=4, public=other)
