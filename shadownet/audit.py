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
from pathlib import Path
from typing import Any

import numpy as np

from shadownet import attacks
from shadownet.artifacts import MANIFEST, UNTRUSTED, artifact_directory, read_checked
from shadownet.audit_layers import (
    LAYER_KINDS,
    LinearLayer,
    join_halves,
    match_layers,
    reference_graph,
    reference_layers,
    split_names,
    untrusted_layers,
)
from shadownet.audit_reference import check_covers, check_outputs, protected_signature
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
from shadownet.exceptions import ArtifactError, InputError, ShadowNetError
from shadownet.files import check_destination
from shadownet.input_leakage import (
    averaging_leakage,
    difference_leakage,
    known_input_leakage,
    pooled_leakage,
    single_leakage,
)
from shadownet.load_arguments import check_flags, whole
from shadownet.private_change import private_change, public_layers

# The fewest and the most inferences observed by default (``default_inferences``): every crossing of each
# is kept in memory (MobileNet 23.6 MB an inference, yolov4-tiny 53.6 MB).
AUTO_INFERENCES = (4, 32)


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


def _long_sums(manifest: dict, graph: Any, scheme: Any | None) -> set[str]:
    """The layers the converter kept in the TEE for their long sums (``converters.partition``), as
    ``LinearLayer.where`` names them: the manifest's ``summary.long_sums``, which must be what the
    converter's rule gives on the reference ``graph`` under ``scheme`` (the summary is not sealed: an edited
    list made the audit skip an offloaded layer's attacks, a review's). An artifact converted before the
    rule has no list: its layers crossed."""
    from converters.schemes import partition_for

    summary = manifest.get("summary") or {}
    if "long_sums" not in summary:
        return set()
    entries = summary["long_sums"]
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("op"), int) and not isinstance(e.get("op"), bool)
            for e in entries):
        raise ArtifactError("manifest.json: summary.long_sums is not a list of {op, layer}")
    listed = {e["op"] for e in entries}
    rule = set(partition_for(graph, scheme).long_sums) if scheme is not None else set()
    if listed != rule:
        raise ArtifactError(f"manifest.json: summary.long_sums lists ops {sorted(listed)} kept in the TEE, "
                            f"where the converter keeps {sorted(rule)} of this reference: the manifest was "
                            "edited, or the reference is not the model that was converted")
    return {f"op {i}" for i in listed}


def weight_attacks(reference: list[LinearLayer], obfuscated: list[LinearLayer], progress: bool = False,
                   restores: dict[str, dict] | None = None, unmixed: dict[str, dict] | None = None) -> dict:
    """Every weight attack on every matched layer, and the totals; ``restores`` and ``unmixed``: what the
    crossings gave away of each layer's restore and input mixing (``boundary.learn_restores``,
    ``boundary.unmix_inputs``), for the restore regression and the input unmixing."""
    pairs, missing, extra = match_layers(reference, obfuscated)
    rows = []
    for k, (ref, obf) in enumerate(pairs):
        if progress:
            _progress(f"layer {k + 1}/{len(pairs)} {ref.kind} {ref.label}")
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


def reference_activations(graph: Any, batches: list[list[np.ndarray]],
                          names: set[str]) -> dict[str, np.ndarray]:
    """The reference model's true tensors ``names`` (plus its inputs) on the same inputs, stacked. Run as
    the converter normalized it (``graph``: ``audit_layers.reference_graph``, exact), so that the tensors
    the rewrites make - a transposed convolution's padded input, which its phases' pushes carry, a grouped
    convolution's groups' inputs - are there too."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.graph import write_model

    with warnings.catch_warnings():
        # LiteRT warns that keeping every tensor is for debugging: here it is the point.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_content=write_model(graph), experimental_preserve_all_tensors=True)
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


# Layers whose weights stand between a model input and what they make of it: their output is no longer the
# user's input, wherever they run (offloaded, or kept in the TEE). By kind, the input that holds the weights
# when constant (None: either), an embedding's table too (a review) - not a gather's indices, which only
# reorder the input (a review of that)
_WEIGHTS_AT: dict[str, int | None] = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1,
                                      "TRANSPOSE_CONV": 1, "CONV_3D": 1, "BATCH_MATMUL": None, "GATHER": 0,
                                      "GATHER_ND": 0, "EMBEDDING_LOOKUP": 1}


def _raw_tensors(graph: Any, given: int) -> set[str]:
    """The reference tensors made from model input ``given`` (a tensor id) with no layer of weights between
    (padded, sliced, reshaped, concatenated, activated...): where a round carries the user's input itself.
    A first layer kept in the TEE made round 1 carry its hidden activation, which was scored as the user's
    input (a helper's probe)."""
    raw = {given}
    for op in graph.ops:
        at = _WEIGHTS_AT.get(op.kind, -1)
        weights = [] if at == -1 else op.inputs if at is None else op.inputs[at:at + 1]
        weighted = any(graph.tensors[t].data is not None for t in weights if t >= 0 and t not in raw)
        if not weighted and any(t in raw for t in op.inputs if t >= 0):
            raw.update(op.outputs)
    return {graph.tensors[t].name for t in raw}


def input_leakage(seen: dict[str, np.ndarray], batches: list[list[np.ndarray]], reference: Any,
                  manifest: dict, pairs: list[tuple[LinearLayer, LinearLayer]]) -> dict:
    """Leakage of the user's input and of every round's true activation through the accelerator's inputs
    (``seen``: ``boundary.observe_boundary`` on ``batches``; ``reference``: the reference model's graph,
    ``audit_layers.reference_graph``)."""
    inferences = len(batches)
    seen = join_halves({k: v for k, v in seen.items() if k.startswith("round_") and "/in/" in k},
                       split_names(manifest)[1])
    sources = _round_sources(manifest, pairs)
    truth = reference_activations(reference, batches, {s for s in sources.values() if s})
    user = [np.stack([b[i] for b in batches]) for i in range(len(manifest["inputs"]))]
    carrying = set((manifest.get("masks") or {}).get("input_rounds") or [1])  # rounds that push a user input
    # (round 1 always, masked whatever it carries): each input measured only where what crosses is still
    # that input (_raw_tensors)
    raw = [_raw_tensors(reference, t) for t in reference.inputs]
    rows = []
    first: dict[str, float] = {}

    def measure(r: int, buffer: str, observed: np.ndarray, tensor: str | None) -> dict[str, Any]:
        row: dict[str, Any] = {"round": r, "buffer": buffer, "shape": list(observed.shape[1:]),
                               "tensor": tensor}
        target = truth.get(tensor) if tensor else None
        if target is not None:
            row["single"] = single_leakage(observed, target)
            row["difference"] = difference_leakage(observed, target)
            row["pooled"] = pooled_leakage(observed, target)
        if r in carrying:
            # Against the user's raw input itself, whatever tensor round 1 carries: its reference tensor when
            # that is the input zero-padded (as the model pads it) or a group's channels of it (as a grouped
            # convolution reads it), the shape pushed; the input itself for a tensor's copies side by side.
            # Likewise in a round a user input joins later (``input_rounds``), where the fits that match its
            # positions run (a vector beside pooled features: the pooled fit).
            for k, x in enumerate(user):
                if tensor is not None and tensor not in raw[k]:
                    continue
                if x.ndim < 2:  # a scalar per inference (a temperature): no fit has values to score
                    row[f"user_input_{k}"] = {fit: {} for fit in ("single", "difference", "pooled",
                                                                  "averaged", "known_input")}
                    continue
                if r == 1 and x.shape != observed.shape and target is not None and len(user) == 1 and (
                        target.shape == observed.shape or (x.shape[:-1] != observed.shape[:-1]
                                                           and target.shape[:-1] == observed.shape[:-1])):
                    x = target
                single = single_leakage(observed, x)
                diff = difference_leakage(observed, x)
                pooled = pooled_leakage(observed, x)
                averaged = averaging_leakage(observed, x)
                known = known_input_leakage(observed, x)
                row[f"user_input_{k}"] = {"single": single, "difference": diff, "pooled": pooled,
                                          "averaged": averaged, "known_input": known}
                for key, fig in (("correlation", single), ("difference_correlation", diff),
                                 ("pooled_correlation", pooled), ("averaged_correlation", averaged),
                                 ("known_input_correlation", known)):
                    if fig.get("correlation") is not None:
                        first[key] = max(first.get(key, 0.0), fig["correlation"])
                for key, fig in (("psnr_db", single), ("known_input_psnr_db", known)):
                    if fig.get("psnr_db") is not None:
                        first[key] = max(first.get(key, -math.inf), fig["psnr_db"])
        return row

    copies: dict[tuple[int, str], list[str]] = {}
    for buffer in sorted(seen, key=lambda b: (round_number(b.split("/")[0]), b)):
        r = round_number(buffer.split("/")[0])
        rows.append(measure(r, buffer, seen[buffer], sources.get(buffer)))
        if sources.get(buffer):
            copies.setdefault((r, sources[buffer]), []).append(buffer)
    # A tensor that crosses more than once in a round (readers that cannot share one push: SECURITY.md),
    # each copy transformed and masked independently: fitted from all its copies together too.
    for (r, tensor), buffers in copies.items():
        if len(buffers) > 1 and len({seen[b].shape[:-1] for b in buffers}) == 1:
            joint = np.concatenate([seen[b] for b in buffers], axis=-1)
            rows.append(measure(r, "+".join(buffers), joint, tensor) | {"copies": len(buffers)})
    singles = [r["single"]["correlation"] for r in rows if r.get("single", {}).get("correlation") is not None]
    diffs = [r["difference"]["correlation"] for r in rows
             if r.get("difference", {}).get("correlation") is not None]
    pooled = [r["pooled"]["correlation"] for r in rows if r.get("pooled", {}).get("correlation") is not None]
    # A user input no fit could score (a 10-value vector: too few values in one inference, too few
    # inferences for the fit across them): said by name, not a row of dashes (a helper's probe).
    measured = {int(key.rsplit("_", 1)[1]) for row in rows for key, figs in row.items()
                if key.startswith("user_input_") and any((figs.get(fit) or {}).get("correlation") is not None
                                                         for fit in ("single", "difference", "pooled"))}
    crossed = {int(key.rsplit("_", 1)[1]) for row in rows for key in row if key.startswith("user_input_")}
    unmeasured = [f"{spec['name']} {list(spec['shape'])}" for k, spec in enumerate(manifest["inputs"])
                  if k in crossed and k not in measured]
    kept = [f"{spec['name']} {list(spec['shape'])}" for k, spec in enumerate(manifest["inputs"])
            if k not in crossed]
    return {
        "inferences": inferences,
        "first_round": first,
        "unmeasured_inputs": unmeasured,
        "inputs_not_crossing": kept,
        "max_round_correlation": max(singles) if singles else None,
        "max_round_difference_correlation": max(diffs) if diffs else None,
        "max_round_pooled_correlation": max(pooled) if pooled else None,
        "rounds": rows,
    }


# ---------------------------------------------------------------------------------------------
# The whole suite
# ---------------------------------------------------------------------------------------------


def read_manifest(out_dir: str | os.PathLike) -> dict:
    root = artifact_directory(out_dir)  # a file given for it was said not to exist (a helper's probe)
    path = root / MANIFEST
    if not path.is_file() or not (root / UNTRUSTED).is_file():
        raise ArtifactError(f"{root} has no {MANIFEST} or {UNTRUSTED}: not written by `shadownet convert`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a ShadowNet manifest")
    return manifest


def _untrusted_model(out_dir: str | os.PathLike, manifest: dict) -> bytes:
    """The untrusted model the weight attacks read, refused (``SecurityError``) unless it is the one the
    manifest records (``shadownet.artifacts.read_checked``): a changed file would be audited, report and
    all, as if it were the product (a helper's walkthrough flipped a bit). A manifest that records no
    hashes (one made by hand) is taken as it is; a damaged or foreign secrets.sealed is not refused here:
    the weights stand on their own, and the crossings report why they were not observed."""
    files = manifest.get("files")
    if isinstance(files, dict) and isinstance(files.get(UNTRUSTED), dict) and "sha256" in files[UNTRUSTED]:
        return read_checked(Path(out_dir), UNTRUSTED, files)
    return (Path(out_dir) / UNTRUSTED).read_bytes()


def _check_memory(manifest: dict, inferences: int) -> None:
    """Every crossing of the observed inferences is kept in memory: refuse, before any work, a count whose
    observation would take over half of this machine's memory (``--inferences 100000`` on MiniVGG ran for
    minutes, then the swapping machine failed to start the secure world in time, which is what it said)."""
    # Each crossing twice (the recording's list, then its stack) and the true activations beside them: a
    # review measured MobileNet's peak growing by 44 MiB an inference for 22.5 MiB of crossings.
    each = 3 * sum(int(b.get("nbytes", 0)) for b in manifest.get("buffers", []) if isinstance(b, dict))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says
        return
    if each and inferences * each > memory // 2:
        raise InputError(f"{inferences} inferences would take about {inferences * each / 2**30:.1f} GiB to "
                         f"observe ({each / 2**20:.1f} MiB an inference), over half of this "
                         f"machine's {memory / 2**30:.1f} GiB: ask for at most {memory // 2 // each}")


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
          progress: bool = False, public: str | os.PathLike | None = None) -> dict:
    """Run the attack suite on an artifact directory against the reference model; a JSON-ready report.

    ``inferences`` protected inferences are observed at the boundary for the attacks on the crossings (the
    restore regression, the input unmixing) and the input-leakage figures (0 skips them; None: as many as
    the restore fits want, ``default_inferences``). Layers observed too briefly for those fits are listed
    in the report's ``observation`` (``under_observed``). ``public``: public weights of the same
    architecture that the protected model was made from (fine-tuned); the report's ``private_change`` then
    says how much of the change an attacker holding them learns (``shadownet.private_change``).
    Its numpy work is many small matrices: with OpenBLAS's threads on (``OPENBLAS_NUM_THREADS`` unset when
    numpy is imported; the CLI sets it to 1) a helper measured it 9x slower.
    """
    started = time.perf_counter()
    # Before any work (a helper's sweep: -1 ran as 0, True as 1, "5" was a raw TypeError, numpy's int64
    # made the report no longer JSON, progress="no" printed progress)
    if inferences is not None and (not whole(inferences) or inferences < 0):
        raise ValueError(f"inferences must be a non-negative int or None, not {inferences!r}")
    inferences = None if inferences is None else int(inferences)
    check_flags(progress=progress)
    manifest = read_manifest(out_dir)
    if inferences:
        _check_memory(manifest, inferences)
    if progress:
        _progress("reading the untrusted model and the reference")
    split = split_names(manifest)[0]
    obf = untrusted_layers(_untrusted_model(out_dir, manifest), split)
    # The reference read and planned once (planning runs LiteRT on it): its layers, its outputs and its
    # activations all come from these.
    given, reference = reference, protected_signature(reference, manifest)
    graph = reference_graph(reference, _manifest_scheme(manifest), name=given)
    ref = reference_layers(reference, manifest, graph=graph)
    report: dict = {
        "artifacts": str(out_dir),
        "reference": f"({len(given)} bytes of a model)" if isinstance(given, bytes | bytearray) else
        str(given),
        "scheme": (manifest.get("scheme") or {}).get("name"),
        "threshold": attacks.RECOVERY_COS,
        # Converted with --seed: whoever guesses it regenerates every secret; the attacks here assume
        # secrets they cannot guess, and their figures said nothing of it (a helper's probe)
        "seeded": bool(manifest.get("seeded", False)),
    }
    scheme = _manifest_scheme(manifest)
    kinds, ops = _kept_in_tee(scheme), _long_sums(manifest, graph, scheme)
    # The scheme ran them in the TEE (groupmix:depthwise=tee; layers on the input with sums too long to
    # split): nothing of theirs crosses, nothing to pair. Always in the JSON, [] when none (it was missing
    # under the paper's scheme: a helper's probe).
    report["kept_in_tee"] = [f"{r.kind} {r.name} {list(r.kernel)}" for r in ref
                             if r.kind in kinds or r.where in ops]
    ref = [r for r in ref if r.kind not in kinds and r.where not in ops]
    check_covers(ref, obf, given)
    if public is not None:  # before any other work: a wrong file is refused at once
        published = public_layers(public, manifest, scheme, ref, ops)
    # An exactly split layer's results cross in two halves, which no fit reads (``learn_restores``).
    crossing = [layer for layer in obf if layer.name not in split]
    chosen = inferences is None
    if chosen:
        inferences = default_inferences(crossing)
        _check_memory(manifest, inferences)
    seen: dict[str, np.ndarray] | None = None
    if inferences > 0:
        batches = sample_inputs(manifest["inputs"], inferences)
        if progress:
            low, high = AUTO_INFERENCES
            why = f" (as many as the fits on the crossings want, {low} to {high})" if chosen else ""
            _progress(f"observing {inferences} protected inferences at the boundary{why}")
        try:
            seen = observe_boundary(out_dir, batches)
            report["observation"] = {"inferences": inferences,
                                     "under_observed": under_observed(crossing, inferences)}
        except ShadowNetError as exc:
            # The attacks on the weights alone stand on their own; say plainly what could not be measured.
            cause = str(exc).splitlines()[0]
            why = f"no crossing observed, so no restore regression or input unmixing either: {cause}"
            report["input_leakage"] = {"inferences": inferences, "error": why, "cause": cause}
    if seen is not None:
        check_outputs(reference, manifest, batches, seen, given)
    # Without an inference, no output to compare: a reference with other weights gave figures that mean
    # nothing, without a word (a helper's probe); the report says it was not checked
    report["reference_checked"] = seen is not None
    restores = unmixed = None
    told = _progress if progress else None
    if seen is not None:
        restores = learn_restores(seen, obf, told)
        if hasattr(scheme, "input_blocks"):  # the scheme mixes its layers' inputs in public blocks
            unmixed = unmix_inputs(seen, obf, restores, scheme.input_blocks, told)
    report |= weight_attacks(ref, obf, progress=progress, restores=restores, unmixed=unmixed)
    if public is not None:
        report["private_change"] = private_change(public, published, ref, obf, scheme, told)
    if seen is not None:
        pairs, _, _ = match_layers(ref, obf)
        if progress:
            _progress("measuring the input leakage of every round")
        try:
            report["input_leakage"] = input_leakage(seen, batches, graph, manifest, pairs)
        except ShadowNetError as exc:
            report["input_leakage"] = {"inferences": inferences, "error": str(exc).splitlines()[0]}
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def audit_cli(args: Any) -> None:
    """``shadownet audit OUT/ --reference MODEL [--public PUBLIC] [--json F]
    [--inferences N]`` (its count is checked by the parser and by ``audit``)."""
    public = getattr(args, "public", None)
    from converters.original_model import model_path_problem

    for what, path in (("reference", args.reference), ("public", public)):
        why = None if path is None else model_path_problem(Path(path))
        if why:  # before any work (a SavedModel is a directory)
            raise ArtifactError(f"{what} model {path} {why}")
    check_destination(args.json, reads=[p for p in (args.artifacts, args.reference, public) if p is not None])
    report = audit(args.artifacts, args.reference, inferences=args.inferences, progress=True,
                   public=public)
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"report written to {args.json}")
    leakage = report.get("input_leakage", {})
    if leakage.get("cause"):  # the model did not run: its cause first (it came last, after the consequences)
        raise ShadowNetError(f"the protected model did not run here ({leakage['cause']}): the attacks on the "
                             "crossings and the input leakage were not measured (the report above has the "
                             "attacks on the weights)")
    if leakage.get("error"):
        raise ShadowNetError(f"input leakage not measured: {leakage['error']}")
