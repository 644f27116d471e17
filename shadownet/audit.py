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
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadownet import attacks
from shadownet.exceptions import ArtifactError

UNTRUSTED = "untrusted.tflite"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer as the attacker sees it: filters as rows (see :mod:`shadownet.attacks`)."""

    name: str  # output tensor name
    kind: str  # "conv", "dense" or "depthwise"
    kernel: tuple[int, ...]  # (kh, kw, cin) for conv/dense (dense = (1, 1, in)), (kh, kw) for depthwise
    filters: np.ndarray  # (channels, kh*kw*cin) or (channels, kh*kw)
    where: str  # "round_3" or "op 12", for the report

    @property
    def family(self) -> tuple:
        # Dense and 1x1 conv are the same linear map: a converter may turn one into the other.
        return ("depthwise" if self.kind == "depthwise" else "conv", self.kernel)


def _layer(kind: str, weights: np.ndarray, name: str, where: str) -> LinearLayer:
    w = np.asarray(weights, dtype=np.float64)
    if kind == "CONV_2D":
        # TFLite conv weights are (out, kh, kw, in).
        return LinearLayer(name, "conv", tuple(w.shape[1:]), w.reshape(w.shape[0], -1), where)
    if kind == "FULLY_CONNECTED":
        w = w.reshape(w.shape[0], -1)  # (out, in)
        return LinearLayer(name, "dense", (1, 1, w.shape[1]), w, where)
    if kind == "DEPTHWISE_CONV_2D":
        # (1, kh, kw, channels * multiplier): one kh*kw filter per output channel.
        _, kh, kw, c = w.shape
        return LinearLayer(name, "depthwise", (kh, kw), w.reshape(kh * kw, c).T.copy(), where)
    raise ValueError(f"not a linear op: {kind}")


def reference_layers(model: str | os.PathLike | bytes) -> list[LinearLayer]:
    """The linear layers of the reference model, in execution order."""
    from converters.graph import is_offloadable, normalize, read_model

    graph = normalize(read_model(model))
    layers = []
    for i, op in enumerate(graph.ops):
        if is_offloadable(graph, i):
            weights = graph.tensors[op.inputs[1]].data
            layers.append(_layer(op.kind, weights, graph.tensors[op.outputs[0]].name, f"op {i}"))
    return layers


def untrusted_layers(data: bytes) -> list[LinearLayer]:
    """The obfuscated linear layers of ``untrusted.tflite``, round by round, in op order within a round.

    The untrusted model holds one subgraph per round (signature ``round_r``); ``converters.graph``
    reads subgraph 0 only, so the weights are read here straight from the flatbuffer (plain float32
    constants: the converter writes nothing else).
    """
    from ai_edge_litert import schema_py_generated as schema_fb
    from ai_edge_litert.tools import flatbuffer_utils

    names = {v: k for k, v in vars(schema_fb.BuiltinOperator).items() if not k.startswith("_")}
    try:
        model = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    except Exception as exc:  # the flatbuffer reader fails with whatever a bad offset leads to
        raise ArtifactError(f"{UNTRUSTED} is not a readable TFLite model ({type(exc).__name__})") from None
    signatures = sorted(model.signatureDefs or [], key=lambda s: _round_number(_text(s.signatureKey)))
    order = [(s.subgraphIndex, _text(s.signatureKey)) for s in signatures] or [(0, "main")]
    layers = []
    for index, key in order:
        sub = model.subgraphs[index]
        for op in sub.operators or []:
            kind = names.get(flatbuffer_utils.get_builtin_code_from_operator_code(
                model.operatorCodes[op.opcodeIndex]))
            if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
                continue
            t = sub.tensors[op.inputs[1]]
            buf = model.buffers[t.buffer].data
            if buf is None or t.type != schema_fb.TensorType.FLOAT32:
                continue  # not a float constant: nothing to attack
            weights = np.frombuffer(np.asarray(buf, dtype=np.uint8).tobytes(), np.float32).reshape(t.shape)
            layers.append(_layer(kind, weights, _text(sub.tensors[op.outputs[0]].name), key))
    return layers


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _round_number(key: str) -> int:
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


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


def weight_attacks(reference: list[LinearLayer], obfuscated: list[LinearLayer],
                   progress: bool = False) -> dict:
    """Every weight attack on every matched layer, and the totals."""
    pairs, missing, extra = match_layers(reference, obfuscated)
    rows = []
    for k, (ref, obf) in enumerate(pairs):
        if progress:
            _progress(f"layer {k + 1}/{len(pairs)} {ref.kind} {ref.name}")
        figures = attacks.attack_layer(obf.filters, ref.filters)
        rows.append({"name": ref.name, "kind": ref.kind, "kernel": list(ref.kernel), "where": ref.where,
                     "obfuscated": obf.name, "round": obf.where} | figures)
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


def audit(out_dir: str | os.PathLike, reference: str | os.PathLike, inferences: int = 4,
          progress: bool = False) -> dict:
    """Run the attack suite on an artifact directory against the reference model; a JSON-ready report.

    ``inferences`` protected inferences are observed at the boundary for the input-leakage figures
    (0 skips them).
    """
    started = time.perf_counter()
    manifest = read_manifest(out_dir)
    if progress:
        _progress("reading the untrusted model and the reference")
    obf = untrusted_layers((Path(out_dir) / UNTRUSTED).read_bytes())
    ref = reference_layers(reference)
    report: dict = {
        "artifacts": str(out_dir),
        "reference": str(reference),
        "scheme": (manifest.get("scheme") or {}).get("name"),
        "threshold": attacks.RECOVERY_COS,
    }
    report |= weight_attacks(ref, obf, progress=progress)
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def format_report(report: dict) -> str:
    """The report as a table for a terminal."""
    names = [*attacks.WEIGHT_ATTACKS, "any"]
    short = {"direction": "dir", "fake_partner": "fp", "fake_partner_top3": "fp3", "variance_paired": "var",
             "cluster_variance": "cvar", "any": "any"}
    head = (f"{'layer':<34} {'kind':<9} {'N':>5} {'M':>5} {'D':>5} "
            + " ".join(f"{short[a]:>4}" for a in names) + f" {'subsp':>6} {'chance':>6}")
    lines = [f"scheme {report.get('scheme')}: filters recovered (|cos| >= {report['threshold']}) per attack",
             head, "-" * len(head)]
    for r in report["layers"]:
        name = r["name"] if len(r["name"]) <= 34 else "..." + r["name"][-31:]
        lines.append(
            f"{name:<34} {r['kind']:<9} {r['filters']:>5} {r['obfuscated_filters']:>5} {r['dim']:>5} "
            + " ".join(f"{r['recovered'][a]:>4}" for a in names)
            + f" {r['subspace']['excess']:>6.2f} {r['chance']['any']:>6.0e}")
    lines.append("")
    for group, label in (("conv_dense", "conv + dense"), ("depthwise", "depthwise")):
        s = report["summary"][group]
        if not s["filters"]:
            continue
        per = ", ".join(f"{a} {100 * s['fraction'][a]:.1f}%" for a in names)
        lines.append(f"{label}: {s['filters']} filters in {s['layers']} layers; recovered: {per}")
        chance = s["chance"]
        lines.append(f"  chance: {100 * chance['any']:.3g}% (direction {100 * chance['direction']:.3g}%)"
                     f"; reference filters already matched by another: {100 * s['reference_self_match']:.1f}%"
                     f"; subspace energy {s['subspace']['energy_mean']:.3f} vs chance "
                     f"{s['subspace']['chance_mean']:.3f} (excess {s['subspace']['excess_mean']:.3f})")
    for key in ("unmatched_reference", "unmatched_obfuscated"):
        if report.get(key):
            lines.append(f"{key.replace('_', ' ')}: {', '.join(report[key])}")
    return "\n".join(lines)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically (a reader never sees half a file)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, sort_keys=True, default=_json_default)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def audit_cli(args: Any) -> None:
    """``shadownet audit OUT/ --reference MODEL.tflite [--json F] [--inferences N]``."""
    if args.inferences < 0:
        raise ValueError("--inferences must be >= 0")
    if not Path(args.reference).is_file():
        raise ArtifactError(f"reference model {args.reference} does not exist")
    report = audit(args.artifacts, args.reference, inferences=args.inferences, progress=True)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
