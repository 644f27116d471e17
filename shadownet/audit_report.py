"""The attack suite's report (``shadownet.audit``): the table ``shadownet audit`` prints and the JSON it
writes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from shadownet import attacks
from shadownet.audit_layers import layer_label
from shadownet.boundary import round_number
from shadownet.files import json_default, write_atomically


def format_report(report: dict) -> str:
    """The report as a table for a terminal."""
    names = [*attacks.WEIGHT_ATTACKS, "any"]
    short = {"direction": "dir", "fake_partner": "fp", "fake_partner_top3": "fp3", "variance_paired": "var",
             "cluster_variance": "cvar", "restore_regression": "rreg", "input_unmixing": "unmx",
             "chosen_input": "chsn", "critical_point": "crit", "mask_fit": "fit", "any": "any"}
    head = (f"{'layer':<34} {'kind':<9} {'N':>5} {'M':>5} {'D':>5} "
            + " ".join(f"{short[a]:>4}" for a in names) + f" {'subsp':>6} {'chance':>6}")
    lines = [f"scheme {report.get('scheme')}: filters recovered (|cos| >= {report['threshold']}) per attack"]
    observed = "observation" in report  # the attacks on the crossings ran
    critical = "layer" in (report.get("critical_points") or {})  # the critical-point attack ran
    fitted = "layer" in (report.get("mask_fit") or {})  # the mask-fit attack ran

    def measured(attack: str) -> bool:
        if attack == "critical_point":
            return critical
        if attack == "mask_fit":
            return fitted
        return observed or attack not in attacks.CROSSING_ATTACKS

    leak = report.get("input_leakage")
    if not observed and leak and leak.get("error"):
        also = " and the critical-point attack's (crit)" if critical else ""
        lines.append(f"NOT MEASURED: {leak['error']}; rreg, unmx and chsn show '-', and 'any' counts only "
                     f"the attacks on the untrusted model{also}")
    if report.get("seeded"):
        lines.append("INSECURE: converted with --seed: whoever guesses the seed regenerates every secret "
                     "and recovers every filter exactly; the figures below are for secrets that cannot be "
                     "guessed")
    if not report.get("reference_checked", True):
        lines.append("the reference was not checked against the protected model's outputs (no inference "
                     "observed): were its weights other than the model's, the figures below mean nothing")
    lines += [head, "-" * len(head)]
    for r in report["layers"]:
        name = layer_label(r["name"])
        lines.append(
            f"{name:<34} {r['kind']:<9} {r['filters']:>5} {r['obfuscated_filters']:>5} {r['dim']:>5} "
            + " ".join(f"{r['recovered'][a] if measured(a) else '-':>4}" for a in names)
            + f" {r['subspace']['excess']:>6.2f} {r['chance']['any']:>6.0e}")
    learnt = [r for r in report["layers"] if r.get("restore", {}).get("rank")]
    if "input_leakage" not in report:
        lines.append("restore regression (rreg) and input unmixing (unmx): not run (no inference observed)")
    elif learnt:
        rank = sum(r["restore"]["rank"] for r in learnt)
        lines.append(f"restore regression (rreg): {rank} independent rows of {len(learnt)} layers' restores "
                     "learnt from the crossings (where the TEE passed an output channel on alone, unmasked "
                     "and unmixed: a real filter in the coordinates of the layer's input as the accelerator "
                     "receives it)")
    unmixed = [r for r in report["layers"] if r.get("input_mixing")]
    if unmixed:
        blocks = sum(r["input_mixing"]["blocks"] for r in unmixed)
        of = sum(r["input_mixing"]["of"] for r in unmixed)
        lines.append(f"input unmixing (unmx): the input mixing of {blocks} of {of} blocks of {len(unmixed)} "
                     "of those layers learnt from an earlier round's results (activated and mixed by the TEE "
                     "into the layer's input, where they crossed unmixed and unmasked): the real filters")
    if report.get("critical_points"):
        lines.append(_critical_points_line(report["critical_points"]))
    if report.get("mask_fit"):
        lines.append(_mask_fit_line(report["mask_fit"]))
    observation = report.get("observation")
    if observation and observation["under_observed"]:
        short = observation["under_observed"]
        wanted: dict[str, int] = {}  # per round, its most wanting layer's (a round was listed once a layer)
        for r in short:
            wanted[r["where"]] = max(wanted.get(r["where"], 0), r["inferences_needed"])
        kinds = ", ".join(f"{where} ({n})" for where, n in sorted(wanted.items(),
                                                                 key=lambda w: round_number(w[0])))
        layers = f"{len(short)} layer{'s' * (len(short) != 1)}"
        lines.append(f"crossings observed over {observation['inferences']} inferences: too few for the "
                     f"restore fits on {layers}, where an attacker who watches longer may learn more "
                     f"(the inferences they want, by round: {kinds})")
    lines.append("")
    for group, label in (("conv_dense", "conv + dense"), ("depthwise", "depthwise")):
        s = report["summary"][group]
        if not s["filters"]:
            continue
        per = ", ".join(f"{a} {100 * s['fraction'][a]:.1f}%" if measured(a) else f"{a} -" for a in names)
        lines.append(f"{label}: {s['filters']} filters in {s['layers']} layers; recovered: {per}")
        chance = s["chance"]
        lines.append(f"  chance: {100 * chance['any']:.3g}% (direction {100 * chance['direction']:.3g}%)"
                     f"; reference filters already matched by another: {100 * s['reference_self_match']:.1f}%"
                     f"; subspace energy {s['subspace']['energy_mean']:.3f} vs chance "
                     f"{s['subspace']['chance_mean']:.3f} (their layers' mean excess "
                     f"{s['subspace']['excess_mean']:.3f})")
    if report.get("kept_in_tee"):
        lines.append("kept in the TEE, not offloaded (by the scheme, or for sums too long to split): "
                     f"{len(report['kept_in_tee'])} layers "
                     f"({', '.join(sorted({k.split()[0] for k in report['kept_in_tee']}))})")
    for key in ("unmatched_reference", "unmatched_obfuscated"):
        if report.get(key):
            lines.append(f"{key.replace('_', ' ')}: {', '.join(report[key])}")
    if leak and leak.get("error"):
        lines.append("")
        lines.append(f"input leakage: not measured ({leak['error']})")
    elif leak:
        first = leak["first_round"]
        lines.append("")
        lines.append(f"input leakage over {leak['inferences']} inferences (correlation after the best affine "
                     "fit, scored where it was not fitted with the sign it chose: about 0, small negative "
                     "values included, when nothing is learnt; PSNR of the input against that fit, peak = "
                     "its range: a fit that learnt nothing scores the range against the spread, ~10.8 dB on "
                     "the audit's images, uniform in [0, 1]; one that overshoots less)")
        lines.append(f"  user input where it crosses (round 1, and any round it joins later): "
                     f"{_fmt(first.get('correlation'))} "
                     f"(PSNR {_fmt(first.get('psnr_db'), '.1f')} dB); difference of two inferences: "
                     f"{_fmt(first.get('difference_correlation'))}; fitted across inferences: "
                     f"{_fmt(first.get('pooled_correlation'))}; averaging neighbours first: "
                     f"{_fmt(first.get('averaged_correlation'))}; after one chosen input: "
                     f"{_fmt(first.get('known_input_correlation'))} "
                     f"(PSNR {_fmt(first.get('known_input_psnr_db'), '.1f')} dB)")
        unmeasured = sorted({row["round"] for row in leak["rounds"] if row["round"] > 1
                             for key, figs in row.items() if key.startswith("user_input_")
                             and all((fig or {}).get("correlation") is None for fig in figs.values())})
        if leak.get("unmeasured_inputs"):
            lines.append(f"  user input(s) {', '.join(leak['unmeasured_inputs'])}: not measured over "
                         f"{leak['inferences']} inferences, too few values for the fits within one "
                         "inference, of two, or across them (give more with --inferences); the figures above "
                         "leave them out")
        if leak.get("inputs_not_crossing"):
            lines.append(f"  user input(s) {', '.join(leak['inputs_not_crossing'])}: never cross as such "
                         "(only what layers of weights made of them, in the TEE: the rows below); the "
                         "figures above leave them out")
        if unmeasured:  # the figure above is round 1's alone then (a probe took it for both)
            lines.append(f"  the user input that joins round(s) {', '.join(map(str, unmeasured))}: not "
                         f"measured over {leak['inferences']} inferences, too few positions for its fits "
                         "(give more with --inferences)")
        lines.append(f"  {'round buffer':<28} {'true tensor':<40} {'single':>7} {'diff':>7} {'pooled':>7}")
        for row in leak["rounds"]:
            tensor = row["tensor"] or "?"
            tensor = tensor if len(tensor) <= 40 else "..." + tensor[-37:]
            lines.append(f"  {row['buffer']:<28} {tensor:<40} "
                         f"{_fmt(row.get('single', {}).get('correlation')):>7} "
                         f"{_fmt(row.get('difference', {}).get('correlation')):>7} "
                         f"{_fmt(row.get('pooled', {}).get('correlation')):>7}")
        if any(row.get(fit, {}).get("correlation") is None for row in leak["rounds"]
               for fit in ("single", "difference", "pooled")):
            lines.append("  (-: not measured - too few values for that fit in one inference, two, or across "
                         f"the {leak['inferences']} (more with --inferences), or no true tensor to compare)")
    if report.get("private_change"):
        lines += ["", *_private_change_lines(report["private_change"])]
    return "\n".join(lines)


def _critical_points_line(found: dict) -> str:
    """The ``--critical-points`` line: what the attack on the first layer got, or why it did not run."""
    if "error" in found or "skipped" in found:
        return f"critical points: not run ({found.get('error') or found['skipped']})"
    state = "one-time masks" if found["masked"] else "no one-time masks"
    sigma = "-" if found["sigma"] is None else f"{found['sigma']:.2g}"
    line = (f"critical points (crit): {found['recovered']} of {found['filters']} first-layer filters "
            f"({layer_label(found['layer'])}) recovered from {found['buffer']} ({state}, noise sigma "
            f"{sigma}) in {found['inferences']} inferences of a budget of {found['budget']} "
            f"({found['seconds']} s), counted in 'any'")
    if found.get("false_estimates"):
        line += f"; {found['false_estimates']} estimates matched no filter"
    if found["stopped"].startswith(("masked", "a budget")):
        line += f"; stopped: {found['stopped']}"
    return line


def _mask_fit_line(found: dict) -> str:
    """The ``--mask-fit`` line: what the fit of the first layer got, or why it did not run."""
    if "error" in found or "skipped" in found:
        return f"mask fit: not run ({found.get('error') or found['skipped']})"
    state = "one-time masks" if found["masked"] else "no one-time masks"
    return (f"mask fit (fit): {found['recovered']} of {found['filters']} first-layer filters "
            f"({layer_label(found['layer'])}) fitted through {found['buffer']} ({state}) from "
            f"{found['inferences']} inferences ({found['positions']} positions each; {found['seconds']} s), "
            "counted in 'any'")


def _private_change_lines(change: dict) -> list[str]:
    """The ``--public`` section: how much of the private change the attacker's estimates hold."""
    labels = {"span": "span attack", "planes": "partner planes", "weight_attacks": "weight attacks",
              "public": "none: public"}
    lines = [f"private change against the public weights {change['public']} (error of the attacker's "
             "estimate / size of the change: 1 = nothing learnt beyond the public weights, 0 = the private "
             "weights exactly; filters whose change it found at |cos| >= 0.9)",
             f"  {'layer':<34} {'kind':<9} {'N':>5} {'D':>5} {'change':>7} {'attack':<15} {'error':>6} "
             f"{'found':>6}"]
    for r in change["layers"]:
        name = layer_label(r["name"])
        if r.get("unchanged"):
            lines.append(f"  {name:<34} {r['kind']:<9} {r['filters']:>5} {'':>5} {'none':>7} unchanged")
            continue
        best = r[r["best"]]
        lines.append(f"  {name:<34} {r['kind']:<9} {r['filters']:>5} {r['dim']:>5} {best['change']:>7.1%} "
                     f"{labels[r['best']]:<15} {best['ratio']:>6.2f} {best['recovered']:>6}")
    summary = change["summary"]
    for group, label in (("conv_dense", "conv + dense"), ("depthwise", "depthwise")):
        total = summary.get(group) or {}
        if total.get("best"):
            b = total["best"]
            ratio = _fmt(b["ratio"], ".2f")
            lines.append(f"  {label}: {total['changed_filters']} filters changed, in {total['layers']} "
                         f"layers of {total['filters']}; the attacker's estimates err by {ratio} "
                         f"of the change, and found the change of {b['recovered']} "
                         f"({b['recovered'] / max(total['changed_filters'], 1):.1%})")
    if not any((summary.get(group) or {}).get("layers") for group in ("conv_dense", "depthwise")):
        lines.append(f"  no offloaded layer differs from the public model's: no private change to learn "
                     f"({summary['unchanged_layers']} layers the same)")
    return lines


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


def write_json(report: dict, path: str | os.PathLike) -> None:
    """Write the report atomically (``shadownet.files``: a reader never sees half a file)."""
    # Strict JSON: an infinite PSNR (exact recovery) is written as null.
    write_atomically(path, json.dumps(_finite(report), indent=1, sort_keys=True, default=json_default,
                                      allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value
