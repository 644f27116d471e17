"""``shadownet audit``: the attack suite against exactly what the normal world sees.

The attacker reads ``untrusted.tflite`` and ``manifest.json``, watches every tensor that crosses the
boundary during a few inferences, and holds the original model as its "public pretrained weights" (the
worst case for the defender). It matches the untrusted model's obfuscated linear layers to the
reference's by order and compatible shape (kernel size and input channels equal; the obfuscated layer
may have more output channels, the fakes), runs every attack of :mod:`shadownet.attacks` on each pair,
and reports what came back: per layer and overall, as a table and as JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadownet import attacks
from shadownet.audit_report import format_report, write_json
from shadownet.boundary import (
    inferences_needed,
    learn_restores,
    observe_boundary,
    round_number,
    sample_inputs,
    unmix_inputs,
)
from shadownet.crossing_fits import restore_positions
from shadownet.exceptions import ArtifactError, ModelFormatError, ShadowNetError, UnsupportedOpError
from shadownet.files import check_destination
from shadownet.input_leakage import difference_leakage, known_input_leakage, single_leakage

UNTRUSTED = "untrusted.tflite"
MANIFEST = "manifest.json"
# The fewest and the most inferences observed by default (``default_inferences``): every crossing of each
# is kept in memory (MobileNet 23.6 MB an inference, yolov4-tiny 53.6 MB).
AUTO_INFERENCES = (4, 32)


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer as the attacker sees it: filters as rows (see :mod:`shadownet.attacks`)."""

    name: str  # output tensor name
    kind: str  # "conv", "dense" or "depthwise"
    kernel: tuple[int, ...]  # (kh, kw, cin) for conv/dense (dense = (1, 1, in)), (kh, kw) for depthwise
    filters: np.ndarray  # (channels, kh*kw*cin) or (channels, kh*kw)
    where: str  # "round_3" or "op 12", for the report
    input: str | None = None  # reference: the op's input tensor; untrusted: the signature input feeding it
    positions: int = 0  # untrusted: output positions per inference (1 for dense), as the results cross

    @property
    def family(self) -> tuple:
        # Dense and 1x1 conv are the same linear map: a converter may turn one into the other.
        return ("depthwise" if self.kind == "depthwise" else "conv", self.kernel)


def _layer(kind: str, weights: np.ndarray, name: str, where: str, source: str | None,
           positions: int = 0) -> LinearLayer:
    w = np.asarray(weights, dtype=np.float64)
    if kind == "CONV_2D":
        # TFLite conv weights are (out, kh, kw, in).
        return LinearLayer(name, "conv", tuple(w.shape[1:]), w.reshape(w.shape[0], -1), where, source,
                           positions)
    if kind == "FULLY_CONNECTED":
        w = w.reshape(w.shape[0], -1)  # (out, in)
        return LinearLayer(name, "dense", (1, 1, w.shape[1]), w, where, source, positions)
    if kind == "DEPTHWISE_CONV_2D":
        # (1, kh, kw, channels * multiplier): one kh*kw filter per output channel.
        _, kh, kw, c = w.shape
        return LinearLayer(name, "depthwise", (kh, kw), w.reshape(kh * kw, c).T.copy(), where, source,
                           positions)
    raise ValueError(f"not a linear op: {kind}")


def reference_layers(model: str | os.PathLike | bytes, manifest: dict | None = None) -> list[LinearLayer]:
    """The linear layers of the reference model, in execution order. With the protected model's
    ``manifest`` (that lists its inputs): ``ArtifactError`` unless the reference takes the same inputs
    (shapes and dtypes) - another model's figures would be meaningless, and its inference would fail
    halfway through."""
    from converters.normalize import normalize
    from converters.tflite_reader import read_model

    try:
        graph = normalize(read_model(model))
    except ModelFormatError as exc:
        if isinstance(model, bytes):
            raise
        raise ModelFormatError(f"reference {model}: {exc}") from None
    if manifest is not None and "inputs" in manifest:
        given = [(list(graph.tensors[i].shape), str(np.dtype(graph.tensors[i].dtype))) for i in graph.inputs]
        want = [(list(t.get("shape", [])), str(t.get("dtype"))) for t in manifest.get("inputs", [])]
        if given != want:
            raise ArtifactError(f"the reference model takes {_specs(given)} but the protected model "
                                f"{_specs(want)}: give the .tflite that was converted")
    return _linear_layers(graph)


# A linear op's kind as ``LinearLayer.kind`` names it (``_layer``).
LAYER_KINDS = {"CONV_2D": "conv", "FULLY_CONNECTED": "dense", "DEPTHWISE_CONV_2D": "depthwise"}


def _manifest_scheme(manifest: dict) -> Any | None:
    """The scheme object the manifest names, with its public parameters (None for one unknown here). A
    ``groupmix`` manifest written before its ``depthwise`` parameter existed offloaded depthwise layers."""
    from converters.schemes import get_scheme

    scheme = manifest.get("scheme") or {}
    if not scheme.get("name"):
        return None
    params = dict(scheme.get("params") or {})
    if scheme["name"] == "groupmix":
        params.setdefault("depthwise", "offload")
    try:
        return get_scheme(scheme["name"], **params)
    except (ValueError, TypeError):
        return None


def _kept_in_tee(scheme: Any | None) -> frozenset[str]:
    """The kinds of linear layer ``scheme`` keeps in the TEE (its ``in_tee``, which ``converters.partition``
    follows), as ``LinearLayer.kind`` names them."""
    from converters.schemes import kept_in_tee

    return frozenset(LAYER_KINDS[k] for k in kept_in_tee(scheme) if k in LAYER_KINDS)


def _specs(inputs: list[tuple[list[int], str]]) -> str:
    return ", ".join(f"{shape} {dtype}" for shape, dtype in inputs) or "no inputs"


def _linear_layers(graph: Any) -> list[LinearLayer]:
    from converters.graph import is_offloadable

    layers = []
    for i, op in enumerate(graph.ops):
        if is_offloadable(graph, i):
            weights = graph.tensors[op.inputs[1]].data
            layers.append(_layer(op.kind, weights, graph.tensors[op.outputs[0]].name, f"op {i}",
                                 graph.tensors[op.inputs[0]].name))
    return layers


def split_names(manifest: dict) -> tuple[set[str], set[str]]:
    """The outputs (``round_r/yj``) and input buffers of the layers the manifest says are exactly split
    (``converters.exact_split``): public, as the file's shapes show anyway."""
    rounds = manifest.get("rounds", [])
    outputs = {f"{r['signature']}/{o['name']}" for r in rounds for o in r.get("outputs", [])
               if o.get("split")}
    inputs = {t["buffer"] for r in rounds for t in r.get("inputs", []) if t.get("split")}
    return outputs, inputs


def join_halves(seen: dict[str, Any], split: set[str]) -> dict[str, Any]:
    """``seen`` (buffer name -> what the accelerator received, channels last) with each exactly split
    buffer's ``[x_hi | x_lo]`` added back into ``x_hi + x_lo`` (in float64: ``v + r`` exactly), what an
    attacker makes of them; ``split``: ``split_names(manifest)[1]``."""
    joined = dict(seen)
    for name in split & set(seen):
        halves = np.asarray(seen[name])
        c = halves.shape[-1] // 2
        joined[name] = halves[..., :c].astype(np.float64) + halves[..., c:]
    return joined


def untrusted_layers(data: bytes, split: set[str] = frozenset()) -> list[LinearLayer]:
    """The obfuscated linear layers of ``untrusted.tflite``, round by round, in op order within a round.

    The untrusted model holds one subgraph per round (signature ``round_r``), each read as a graph; the
    layers are the linear ops whose weights are float32 constants (the converter writes nothing else).
    A layer whose output is in ``split`` (``split_names``) is attacked through the obfuscated weights
    ``W'`` its exact split holds whole: ``[[W'_hi, 0], [W'_lo, W']]``.
    """
    from converters.graph import is_offloadable
    from converters.tflite_reader import read_model, read_signatures

    try:
        graphs = read_signatures(data) or [read_model(data)]
    except (ModelFormatError, UnsupportedOpError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ArtifactError(f"{UNTRUSTED} is not a readable TFLite model ({first_line})") from None
    graphs.sort(key=lambda g: round_number(g.signature.key if g.signature else "main"))
    layers = []
    for graph in graphs:
        key = graph.signature.key if graph.signature else "main"
        feeds = {t: name for name, t in graph.signature.inputs.items()} if graph.signature else {}
        producer = {t: op for op in graph.ops for t in op.outputs}
        for i, op in enumerate(graph.ops):
            if not is_offloadable(graph, i) or graph.tensors[op.inputs[1]].dtype != np.float32:
                continue  # weights not a float32 constant: nothing to attack
            source = _trace_to_input(op.inputs[0], producer, feeds)
            output = graph.tensors[op.outputs[0]]
            weights, name = graph.tensors[op.inputs[1]].data, output.name
            if name in split:
                weights = weights[weights.shape[0] // 2:, ..., weights.shape[-1] // 2:]
            positions = math.prod(output.shape[:-1]) if output.shape else 1
            layers.append(_layer(op.kind, weights, name, key, source, positions))
    return layers


def _trace_to_input(tensor: int, producer: dict, feeds: dict[int, str]) -> str | None:
    """The signature input a linear op reads, through any single-activation-input ops before it (a PAD,
    a RESHAPE): the tensor the accelerator received for it."""
    seen = set()
    while tensor not in feeds and tensor in producer and tensor not in seen:
        seen.add(tensor)
        tensor = producer[tensor].inputs[0]
    return feeds.get(tensor)


def match_layers(
    reference: list[LinearLayer], obfuscated: list[LinearLayer]
) -> tuple[list[tuple[LinearLayer, LinearLayer]], list[LinearLayer], list[LinearLayer]]:
    """Pair layers as an attacker who knows the architecture does: in order, each reference layer with
    the first unused obfuscated layer of the same family (kernel size and input channels) and at least
    as many output channels. Returns (pairs, unmatched reference layers, unmatched obfuscated layers)."""
    used = [False] * len(obfuscated)
    pairs, missing = [], []
    for ref in reference:
        for j, obf in enumerate(obfuscated):
            if not used[j] and obf.family == ref.family and len(obf.filters) >= len(ref.filters):
                used[j] = True
                pairs.append((ref, obf))
                break
        else:
            missing.append(ref)
    return pairs, missing, [o for j, o in enumerate(obfuscated) if not used[j]]


def _check_reference_covers(reference: list[LinearLayer], obfuscated: list[LinearLayer], source: Any) -> None:
    """``ArtifactError`` unless the reference has the protected model's architecture, near enough: at least
    half of the offloaded layers and half of the reference's linear layers pair up. Another architecture
    that takes the same inputs gave false pairs and a clean report of a broken scheme (a probe's MiniVGG
    against ResNet-44: "0% recovered", exit 0; a review's ResNet-44 against ResNet-404: 14.6%, where its
    own reference finds 99.9%). A similar model with another head, or the converted model whose grouped
    convolutions run in the TEE, pairs up but for a few layers: audited, the rest listed as unmatched."""
    pairs, _, _ = match_layers(reference, obfuscated)
    if 2 * len(pairs) < len(obfuscated) or 2 * len(pairs) < len(reference):
        raise ArtifactError(f"the reference {source} is not the protected model's architecture: "
                            f"{len(pairs)} of its {len(reference)} linear layers pair up with the "
                            f"{len(obfuscated)} offloaded ones: give the .tflite that was converted")


def weight_attacks(reference: list[LinearLayer], obfuscated: list[LinearLayer], progress: bool = False,
                   restores: dict[str, dict] | None = None, unmixed: dict[str, dict] | None = None) -> dict:
    """Every weight attack on every matched layer, and the totals; ``restores`` and ``unmixed``: what the
    crossings gave away of each layer's restore and input mixing (``boundary.learn_restores``,
    ``boundary.unmix_inputs``), for the restore regression and the input unmixing."""
    pairs, missing, extra = match_layers(reference, obfuscated)
    rows = []
    for k, (ref, obf) in enumerate(pairs):
        if progress:
            _progress(f"layer {k + 1}/{len(pairs)} {ref.kind} {ref.name}")
        learnt = (restores or {}).get(obf.name)
        unmixing = (unmixed or {}).get(obf.name)
        from_crossings = {}
        if learnt:
            from_crossings["restore_regression"] = learnt["rows"] @ obf.filters
        if unmixing:
            from_crossings["input_unmixing"] = unmixing["filters"]
        figures = attacks.attack_layer(obf.filters, ref.filters, from_crossings=from_crossings)
        row = {"name": ref.name, "kind": ref.kind, "kernel": list(ref.kernel), "where": ref.where,
               "obfuscated": obf.name, "round": obf.where} | figures
        if learnt:
            row["restore"] = {"rank": learnt["rank"], "relations": len(learnt["rows"]),
                              "tried": learnt["tried"], "follower": learnt["follower"]}
        if unmixing:
            row["input_mixing"] = {"blocks": unmixing["blocks"], "of": unmixing["of"],
                                   "earlier": unmixing["earlier"]}
        rows.append(row)
    return {
        "layers": rows,
        "summary": _summarize(rows),
        "unmatched_reference": [f"{r.kind} {r.name} {list(r.kernel)}" for r in missing],
        "unmatched_obfuscated": [f"{o.kind} {o.name} {list(o.kernel)} ({o.where})" for o in extra],
    }


def _summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for group, kinds in (("conv_dense", ("conv", "dense")), ("depthwise", ("depthwise",))):
        sel = [r for r in rows if r["kind"] in kinds]
        filters = sum(r["filters"] for r in sel)
        names = [*attacks.WEIGHT_ATTACKS, "any"]
        recovered = {a: sum(r["recovered"][a] for r in sel) for a in names}
        out[group] = {
            "layers": len(sel),
            "filters": filters,
            "recovered": recovered,
            "fraction": {a: (recovered[a] / filters if filters else 0.0) for a in names},
            # Expected fraction recovered by chance (random estimates), filter-weighted.
            "chance": {a: (sum(r["chance"][a] * r["filters"] for r in sel) / filters if filters else 0.0)
                       for a in ("direction", "any")},
            "reference_self_match": (sum(r["reference_self_match"] * r["filters"] for r in sel) / filters
                                     if filters else 0.0),
            "subspace": {
                "energy_mean": _weighted(sel, lambda r: r["subspace"]["energy_mean"]),
                "chance_mean": _weighted(sel, lambda r: r["subspace"]["chance"]),
                "excess_mean": _weighted(sel, lambda r: r["subspace"]["excess"]),
            },
        }
    return out


def _weighted(rows: list[dict], value) -> float:
    total = sum(r["filters"] for r in rows)
    return sum(value(r) * r["filters"] for r in rows) / total if total else 0.0


def _progress(message: str) -> None:
    print(f"audit: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Input leakage: what the accelerator receives, against what it should not learn
# ---------------------------------------------------------------------------------------------


def reference_activations(reference: str | os.PathLike, batches: list[list[np.ndarray]],
                          names: set[str]) -> dict[str, np.ndarray]:
    """The reference model's true tensors ``names`` (plus its inputs) on the same inputs, stacked."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():
        # LiteRT warns that keeping every tensor is for debugging: here it is the point.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_path=str(reference), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    index = {d["name"]: d["index"] for d in interpreter.get_tensor_details()}
    inputs = interpreter.get_input_details()
    out: dict[str, list[np.ndarray]] = {}
    for arrays in batches:
        for detail, x in zip(inputs, arrays, strict=True):
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        for name in names:
            if name in index:
                out.setdefault(name, []).append(np.array(interpreter.get_tensor(index[name])))
    return {name: np.stack(values) for name, values in out.items()}


def _round_sources(manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict[str, str | None]:
    """Round input buffer -> the reference tensor it carries (masked): the input of the reference layer
    matched to an obfuscated layer that reads it. The attacker learns this from the layer matching."""
    by_input = {}
    for ref, obf in pairs:
        if obf.input is not None:
            by_input.setdefault((obf.where, obf.input), ref.input)
    sources: dict[str, str | None] = {}
    for r in manifest.get("rounds", []):
        for t in r.get("inputs", []):
            sources[t["buffer"]] = t.get("tensor") or by_input.get((r["signature"], t["name"]))
    return sources


def input_leakage(seen: dict[str, np.ndarray], batches: list[list[np.ndarray]], reference: str | os.PathLike,
                  manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict:
    """Leakage of the user's input and of every round's true activation through the accelerator's inputs
    (``seen``: ``boundary.observe_boundary`` on ``batches``)."""
    inferences = len(batches)
    seen = join_halves({k: v for k, v in seen.items() if k.startswith("round_") and "/in/" in k},
                       split_names(manifest)[1])
    sources = _round_sources(manifest, pairs)
    truth = reference_activations(reference, batches, {s for s in sources.values() if s})
    user = [np.stack([b[i] for b in batches]) for i in range(len(manifest["inputs"]))]
    rows = []
    first: dict[str, float] = {}
    for buffer in sorted(seen, key=lambda b: (round_number(b.split("/")[0]), b)):
        observed = seen[buffer]
        r = round_number(buffer.split("/")[0])
        row: dict[str, Any] = {"round": r, "buffer": buffer, "shape": list(observed.shape[1:]),
                               "tensor": sources.get(buffer)}
        target = truth.get(row["tensor"]) if row["tensor"] else None
        if target is not None:
            row["single"] = single_leakage(observed, target)
            row["difference"] = difference_leakage(observed, target)
        if r == 1:
            # Against the user's raw input itself, whatever tensor round 1 carries (zero-padded, as the model
            # pads it, when round 1 reads the padded input: then its reference tensor is that).
            for k, x in enumerate(user):
                if x.shape != observed.shape and target is not None and target.shape == observed.shape \
                        and len(user) == 1:
                    x = target
                single = single_leakage(observed, x)
                diff = difference_leakage(observed, x)
                known = known_input_leakage(observed, x)
                row[f"user_input_{k}"] = {"single": single, "difference": diff, "known_input": known}
                for key, fig in (("correlation", single), ("difference_correlation", diff),
                                 ("known_input_correlation", known)):
                    if fig.get("correlation") is not None:
                        first[key] = max(first.get(key, 0.0), fig["correlation"])
                for key, fig in (("psnr_db", single), ("known_input_psnr_db", known)):
                    if fig.get("psnr_db") is not None:
                        first[key] = max(first.get(key, -math.inf), fig["psnr_db"])
        rows.append(row)
    singles = [r["single"]["correlation"] for r in rows if r.get("single", {}).get("correlation") is not None]
    diffs = [r["difference"]["correlation"] for r in rows
             if r.get("difference", {}).get("correlation") is not None]
    return {
        "inferences": inferences,
        "first_round": first,
        "max_round_correlation": max(singles) if singles else None,
        "max_round_difference_correlation": max(diffs) if diffs else None,
        "rounds": rows,
    }


# ---------------------------------------------------------------------------------------------
# The whole suite
# ---------------------------------------------------------------------------------------------


def read_manifest(out_dir: str | os.PathLike) -> dict:
    root = Path(out_dir)
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist")
    if not path.is_file() or not (root / UNTRUSTED).is_file():
        raise ArtifactError(f"{root} has no {MANIFEST} or {UNTRUSTED}: not written by `shadownet convert`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a ShadowNet manifest")
    return manifest


def default_inferences(layers: list[LinearLayer]) -> int:
    """The inferences ``audit`` observes unless told: as many as the restore fits want on every conv and
    depthwise layer (``boundary.inferences_needed``), within ``AUTO_INFERENCES``. A dense layer gives one
    position per inference, and the fits want thousands: it is left to ``under_observed``."""
    needed = [inferences_needed(layer) for layer in layers if layer.kind != "dense"]
    low, high = AUTO_INFERENCES
    return min(max([low, *needed]), high)


def under_observed(layers: list[LinearLayer], inferences: int) -> list[dict]:
    """The layers whose results ``inferences`` observed inferences give fewer positions than the restore
    fits want: there the audit's crossing attacks may find less than an attacker who watches longer."""
    return [{"layer": layer.name, "where": layer.where, "positions": layer.positions * inferences,
             "wanted": restore_positions(len(layer.filters)), "inferences_needed": inferences_needed(layer)}
            for layer in layers if inferences_needed(layer) > inferences]


def audit(out_dir: str | os.PathLike, reference: str | os.PathLike, inferences: int | None = None,
          progress: bool = False) -> dict:
    """Run the attack suite on an artifact directory against the reference model; a JSON-ready report.

    ``inferences`` protected inferences are observed at the boundary for the attacks on the crossings (the
    restore regression, the input unmixing) and the input-leakage figures (0 skips them; None: as many as
    the restore fits want, ``default_inferences``). Layers observed too briefly for those fits are listed
    in the report's ``observation`` (``under_observed``).
    """
    started = time.perf_counter()
    manifest = read_manifest(out_dir)
    if progress:
        _progress("reading the untrusted model and the reference")
    obf = untrusted_layers((Path(out_dir) / UNTRUSTED).read_bytes(), split_names(manifest)[0])
    ref = reference_layers(reference, manifest)
    report: dict = {
        "artifacts": str(out_dir),
        "reference": str(reference),
        "scheme": (manifest.get("scheme") or {}).get("name"),
        "threshold": attacks.RECOVERY_COS,
    }
    scheme = _manifest_scheme(manifest)
    kept = _kept_in_tee(scheme)
    if kept:
        # The scheme ran them in the TEE (groupmix:depthwise=tee): nothing of theirs crosses, nothing to pair.
        report["kept_in_tee"] = [f"{r.kind} {r.name} {list(r.kernel)}" for r in ref if r.kind in kept]
        ref = [r for r in ref if r.kind not in kept]
    _check_reference_covers(ref, obf, reference)
    chosen = inferences is None
    if chosen:
        inferences = default_inferences(obf)
    if inferences > 0:
        report["observation"] = {"inferences": inferences, "under_observed": under_observed(obf, inferences)}
    seen: dict[str, np.ndarray] | None = None
    if inferences > 0:
        batches = sample_inputs(manifest["inputs"], inferences)
        if progress:
            why = " (as many as the fits on the crossings want, 4 to 32)" if chosen else ""
            _progress(f"observing {inferences} protected inferences at the boundary{why}")
        try:
            seen = observe_boundary(out_dir, batches)
        except ShadowNetError as exc:
            # The attacks on the weights alone stand on their own; say plainly what could not be measured.
            why = (f"no crossing observed, so no restore regression or input unmixing either: "
                   f"{str(exc).splitlines()[0]}")
            report["input_leakage"] = {"inferences": inferences, "error": why}
    restores = unmixed = None
    if seen is not None:
        restores = learn_restores(seen, obf)
        if hasattr(scheme, "input_blocks"):  # the scheme mixes its layers' inputs in public blocks
            if progress:
                _progress("undoing the input mixing of the layers whose restore the crossings gave away")
            unmixed = unmix_inputs(seen, obf, restores, scheme.input_blocks)
    report |= weight_attacks(ref, obf, progress=progress, restores=restores, unmixed=unmixed)
    if seen is not None:
        pairs, _, _ = match_layers(ref, obf)
        try:
            report["input_leakage"] = input_leakage(seen, batches, reference, manifest, pairs)
        except ShadowNetError as exc:
            report["input_leakage"] = {"inferences": inferences, "error": str(exc).splitlines()[0]}
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def audit_cli(args: Any) -> None:
    """``shadownet audit OUT/ --reference MODEL.tflite [--json F] [--inferences N]``."""
    if args.inferences is not None and args.inferences < 0:
        raise ValueError("--inferences must be >= 0")
    if not Path(args.reference).is_file():
        raise ArtifactError(f"reference model {args.reference} does not exist")
    check_destination(args.json)
    report = audit(args.artifacts, args.reference, inferences=args.inferences, progress=True)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    error = report.get("input_leakage", {}).get("error")
    if error:
        raise ShadowNetError(f"input leakage not measured: {error}")
