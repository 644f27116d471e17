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
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.normalize import PLAN_REVISION
from shadownet import attacks
from shadownet.artifacts import MANIFEST, UNTRUSTED, artifact_directory, read_checked
from shadownet.audit_layers import (
    LAYER_KINDS,
    LinearLayer,
    Planning,
    match_layers,
    planned_as,
    reference_graph,
    reference_layers,
    split_names,
    untrusted_layers,
)
from shadownet.audit_leakage import input_leakage
from shadownet.audit_reference import check_covers, check_outputs, protected_signature
from shadownet.audit_report import format_report, write_json
from shadownet.boundary import (
    inferences_needed,
    learn_restores,
    observe_boundary,
    sample_inputs,
    unmix_inputs,
)
from shadownet.chosen_inputs import chosen_input_attack
from shadownet.critical_points import BUDGET, critical_point_attack
from shadownet.crossing_fits import restore_positions
from shadownet.exceptions import ArtifactError, InputError, ShadowNetError
from shadownet.files import check_destination
from shadownet.load_arguments import check_flags, whole
from shadownet.mask_fit import BUDGET as FIT_BUDGET
from shadownet.mask_fit import mask_fit_attack
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
        params.setdefault("mask_floor", "input")  # (before stop 56)
    try:
        return get_scheme(scheme["name"], **params)
    except (ValueError, TypeError):
        return None


def _kept_in_tee(scheme: Any | None) -> frozenset[str]:
    """The kinds of linear layer ``scheme`` keeps in the TEE (its ``in_tee``, which ``converters.partition``
    follows), as ``LinearLayer.kind`` names them."""
    from converters.schemes import kept_in_tee

    return frozenset(LAYER_KINDS[k] for k in kept_in_tee(scheme) if k in LAYER_KINDS)


def _planned(reference: bytes, given: Any, manifest: dict, scheme: Any | None,
             obfuscated: list) -> tuple[Any, list, set[str], Planning]:
    """The reference as the protected model's converter planned it (``audit_layers.reference_graph``), its
    linear layers, those it kept in the TEE for their long sums (``_long_sums``) and the ``Planning``
    (``planned_as``): the manifest's, where it names it; else - an artifact of a converter between two
    markers (stop 56's first commits chunked long sums before ``long_sum_terms``; stop 57's rewrote dense
    layers before ``plan_revision``) - of the plans whose long sums are the manifest's, the one whose layers
    pair best with the untrusted model's, the manifest's on a tie (a review: such artifacts were refused, or
    their first layer went unaudited, unmatched). ``ArtifactError`` when none pairs (``check_covers``,
    ``_long_sums``: the last plan's)."""
    first = planned_as(manifest)
    summary = manifest.get("summary") if isinstance(manifest.get("summary"), dict) else {}
    plans = [first]
    if not {"long_sum_terms", "plan_revision"} <= set(summary):
        plans += [Planning(longest, revision) for longest in (first.longest, None)
                  for revision in (first.revision, PLAN_REVISION, 0)]
    best, error = None, None
    for planning in dict.fromkeys(plans):
        graph = reference_graph(reference, scheme, name=given, planning=planning)
        ref = reference_layers(reference, manifest, graph=graph)
        try:
            kinds, ops = _kept_in_tee(scheme), _long_sums(manifest, graph, scheme, planning.longest)
            crossing = [r for r in ref if r.kind not in kinds and r.where not in ops]
            check_covers(crossing, obfuscated, given)
        except ArtifactError as exc:
            error = exc
            continue
        pairs = len(match_layers(crossing, obfuscated)[0])
        if best is None or pairs > best[0]:
            best = (pairs, graph, ref, ops, planning)
    if best is None:
        raise error
    return best[1:]


def _long_sums(manifest: dict, graph: Any, scheme: Any | None, longest: int | None = None) -> set[str]:
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
    rule = set(partition_for(graph, scheme, longest).long_sums) if scheme is not None else set()
    if listed != rule:
        raise ArtifactError(f"manifest.json: summary.long_sums lists ops {sorted(listed)} kept in the TEE, "
                            f"where the converter keeps {sorted(rule)} of this reference: the manifest was "
                            "edited, or the reference is not the model that was converted")
    return {f"op {i}" for i in listed}


def weight_attacks(reference: list[LinearLayer], obfuscated: list[LinearLayer], progress: bool = False,
                   restores: dict[str, dict] | None = None, unmixed: dict[str, dict] | None = None,
                   chosen: dict[str, np.ndarray] | None = None,
                   critical: dict[str, np.ndarray] | None = None,
                   fitted: dict[str, np.ndarray] | None = None) -> dict:
    """Every weight attack on every matched layer, and the totals; ``restores`` and ``unmixed``: what the
    crossings gave away of each layer's restore and input mixing (``boundary.learn_restores``,
    ``boundary.unmix_inputs``), for the restore regression and the input unmixing; ``chosen`` and
    ``critical``, ``fitted``: the chosen-input, the critical-point and the mask-fit attacks' estimates by
    reference layer name (``chosen_inputs.chosen_input_attack``, ``critical_points.critical_point_attack``,
    ``mask_fit.mask_fit_attack``). A layer's ``any``
    counts a filter once, whichever attacks found it."""
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
        if ref.name in (chosen or {}):
            from_crossings["chosen_input"] = chosen[ref.name]
        if ref.name in (critical or {}):
            from_crossings["critical_point"] = critical[ref.name]
        if ref.name in (fitted or {}):
            from_crossings["mask_fit"] = fitted[ref.name]
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
          progress: bool = False, public: str | os.PathLike | None = None,
          critical_points: bool | int = False, mask_fit: bool | int = False) -> dict:
    """Run the attack suite on an artifact directory against the reference model; a JSON-ready report.

    ``inferences`` protected inferences are observed at the boundary for the attacks on the crossings (the
    restore regression, the input unmixing) and the input-leakage figures (0 skips them; None: as many as
    the restore fits want, ``default_inferences``). Layers observed too briefly for those fits are listed
    in the report's ``observation`` (``under_observed``). ``public``: public weights of the same
    architecture that the protected model was made from (fine-tuned); the report's ``private_change`` then
    says how much of the change an attacker holding them learns (``shadownet.private_change``).
    ``critical_points``: also run the critical-point attack on the first layer (``shadownet.critical_points``,
    the report's ``critical_points``) within its default budget of inferences (True) or this many (an int);
    its estimates count in that layer's ``critical_point`` and ``any`` figures, as the other attacks' do.
    ``mask_fit``: likewise the mask-fit attack (``shadownet.mask_fit``, the report's ``mask_fit``) with its
    default budget of inferences (True) or this many, counted in ``mask_fit`` and ``any``.
    Its numpy work is many small matrices: with OpenBLAS's threads on (``OPENBLAS_NUM_THREADS`` unset when
    numpy is imported; the CLI sets it to 1) a helper measured it 9x slower.
    """
    started = time.perf_counter()
    # Before any work (a helper's sweep: -1 ran as 0, True as 1, "5" was a raw TypeError, numpy's int64
    # made the report no longer JSON, progress="no" printed progress)
    if inferences is not None and (not whole(inferences) or inferences < 0):
        raise ValueError(f"inferences must be a non-negative int or None, not {inferences!r}")
    for name, value in (("critical_points", critical_points), ("mask_fit", mask_fit)):
        if not isinstance(value, bool) and not (whole(value) and value > 0):
            raise ValueError(f"{name} must be a bool or a positive int, not {value!r}")
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
    scheme = _manifest_scheme(manifest)
    graph, ref, ops, planning = _planned(reference, given, manifest, scheme, obf)
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
    kinds = _kept_in_tee(scheme)
    # The scheme ran them in the TEE (groupmix:depthwise=tee; layers on the input with sums too long to
    # split): nothing of theirs crosses, nothing to pair. Always in the JSON, [] when none (it was missing
    # under the paper's scheme: a helper's probe).
    report["kept_in_tee"] = [f"{r.kind} {r.name} {list(r.kernel)}" for r in ref
                             if r.kind in kinds or r.where in ops]
    ref = [r for r in ref if r.kind not in kinds and r.where not in ops]
    if public is not None:  # before any other work: a wrong file is refused at once
        published = public_layers(public, manifest, scheme, ref, ops, planning)
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
    restores = unmixed = estimates = None
    told = _progress if progress else None
    if seen is not None:
        restores = learn_restores(seen, obf, told)
        if hasattr(scheme, "input_blocks"):  # the scheme mixes its layers' inputs in public blocks
            unmixed = unmix_inputs(seen, obf, restores, scheme.input_blocks, told)
        estimates, report["chosen_inputs"] = chosen_input_attack(out_dir, graph, manifest, ref, obf, scheme,
                                                                 told)
    critical = None
    if critical_points:
        budget = BUDGET if critical_points is True else int(critical_points)
        try:
            critical, report["critical_points"] = critical_point_attack(out_dir, graph, manifest, ref, obf,
                                                                        budget, told)
        except ShadowNetError as exc:
            report["critical_points"] = {"error": str(exc).splitlines()[0], "inferences": 0, "recovered": 0}
    fitted = None
    if mask_fit:
        budget = FIT_BUDGET if mask_fit is True else int(mask_fit)
        try:
            fitted, report["mask_fit"] = mask_fit_attack(out_dir, graph, manifest, ref, obf, budget, told)
        except ShadowNetError as exc:
            report["mask_fit"] = {"error": str(exc).splitlines()[0], "inferences": 0, "recovered": 0}
    report |= weight_attacks(ref, obf, progress=progress, restores=restores, unmixed=unmixed,
                             chosen=estimates, critical=critical, fitted=fitted)
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
    [--inferences N] [--critical-points [BUDGET]] [--mask-fit [BUDGET]]`` (its counts are checked by the
    parser and by ``audit``)."""
    public = getattr(args, "public", None)
    from converters.original_model import model_path_problem

    for what, path in (("reference", args.reference), ("public", public)):
        why = None if path is None else model_path_problem(Path(path))
        if why:  # before any work (a SavedModel is a directory)
            raise ArtifactError(f"{what} model {path} {why}")
    check_destination(args.json, reads=[p for p in (args.artifacts, args.reference, public) if p is not None])
    report = audit(args.artifacts, args.reference, inferences=args.inferences, progress=True,
                   public=public, critical_points=getattr(args, "critical_points", False),
                   mask_fit=getattr(args, "mask_fit", False))
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
