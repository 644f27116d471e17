"""The reporting side of ``shadownet bench``: a report (``shadownet.bench.run_bench``) as plain-text tables,
Markdown, JSON and a plot."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from shadownet.bench_measure import (
    FIDELITY_INPUTS,
    FIDELITY_REPEATS,
    FIDELITY_TARGET,
    MODES,
    PROJECTED_K,
    VERIFY_MODE,
)
from shadownet.exceptions import ShadowNetError
from shadownet.files import write_atomically
from shadownet.ta_session import unsplit_masked

_TARGET = f"{FIDELITY_TARGET:.0e}".replace("e-0", "e-")  # 1e-4

# An unprotected median this many times its minimum or more marks noisy timings (the notes say so): on the
# project's shared 2-CPU VMs the larger zoo models' quiet runs stayed at 1.1-1.15 and busy ones reached
# 1.3-2.1 (BENCHMARKS.md); MiniVGG, a 0.3-0.6 ms model, is at 1.9 in quiet runs too.
NOISY_SPREAD = 1.3


def _k(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _memory(mode: dict[str, Any]) -> str:
    """A mode's secure memory in MiB; "+X" for the verified copy measured beside shadownet: what it adds."""
    return f"{'+' if mode.get('secure_memory_added') else ''}{mode['secure_memory_mib']:.1f}"


def _fps(value: float | None, width: int = 0, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def _done(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in report["models"] if "error" not in e]


def _modes(entry: dict[str, Any]) -> list[str]:
    return [mode for mode in (*MODES, VERIFY_MODE) if mode in entry["modes"]]


def _masks_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    """Per measured model, the one-time masks' and the verification's figures as display strings; none
    when no model has a pool or a verify mode (static masks only)."""
    rows = []
    for e in _done(report):
        masks = e.get("masks") or {}
        pool = masks.get("pool")
        rounds = masks.get("one_time_rounds") or []
        row = {"model": e["model"], "policy": masks.get("policy") or "static",
               "rounds": f"{len(rounds)}/{e['rounds']}"}
        if pool:
            per_inference = pool.get("offline_ms_per_inference")
            row.update(entries=str(pool["capacity"]), pool=f"{pool['pool_bytes'] / 1024:.1f}",
                       entry=f"{pool['entry_bytes'] / 1024:.1f}",
                       offline="n/a" if per_inference is None else f"{per_inference:.2f}",
                       sync=f"{pool['synchronous_timed']}/{pool['made_timed']}")  # of the entries used
        else:
            row.update(entries="-", pool="-", entry="-", offline="-", sync="-")
        checks = e.get("verify")
        if checks is None:
            row.update(overhead="-", bound="-")
        elif "error" in checks:
            row.update(overhead="n/a", bound="n/a")
        else:
            bound = checks.get("worst_bound_log2")
            row.update(overhead=f"{checks['overhead'] * 100:+.1f}%",
                       bound="n/a" if bound is None else f"2^{bound:.1f}")
        rows.append(row)
    return rows if any(r["pool"] != "-" or r["overhead"] != "-" for r in rows) else []


def _fidelity_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Per measured model: the protected outputs' relative error against unprotected LiteRT (max |diff| /
    max |ref|) on the bench's input, the verified copy's, the same measure between LiteRT's builtin
    kernels and XNNPACK on the original model (all-in-tee-builtin against unprotected); then over the
    spread's inferences (``bench_measure._fidelity_spread``) the median / worst, the share above the
    target and the builtin kernels' worst, as display strings."""
    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1e}"

    rows = []
    for e in _done(report):
        spread = e["shadownet"].get("fidelity_spread") or {}
        rows.append((e["model"], fmt(e["shadownet"].get("relative_error")),
                     fmt((e.get("verify") or {}).get("relative_error")),
                     fmt(e["shadownet"].get("builtin_vs_xnnpack_error")),
                     f"{fmt(spread.get('median'))} / {fmt(spread.get('max'))}" if spread else "-",
                     f"{spread['above_target'] * 100:.0f}% of {spread['inferences']}" if spread else "-",
                     fmt(spread.get("builtin_vs_xnnpack_max"))))
    return rows


def _spread(mode: dict[str, Any]) -> float:
    """A mode's median over its minimum (0 when the minimum is 0)."""
    return mode["median_ms"] / mode["min_ms"] if mode["min_ms"] > 0 else 0.0


def _notes(report: dict[str, Any]) -> list[str]:
    """What the tables cannot say: noisy timings, models or modes not measured and why."""
    notes = [f"{e['model']}: the unprotected median is {spread:.2f}x its minimum: noisy timings (a busy "
             "machine, or a model too small to time steadily), which move its ratios"
             for e in _done(report) if (spread := _spread(e["modes"]["unprotected"])) >= NOISY_SPREAD]
    notes += [f"{e['model']}: not measured: {e['error']}" for e in report["models"] if "error" in e]
    notes += [f"{e['model']}: {VERIFY_MODE} not measured: {e['verify']['error']}"
              for e in _done(report) if "error" in (e.get("verify") or {})]
    notes += [f"{e['model']}: {VERIFY_MODE} did not fit in the secure-memory cap next to shadownet: measured "
              "alone after the other modes, alternated with unprotected; its overhead compares V / U of that "
              "phase with S / U" for e in _done(report) if (e.get("verify") or {}).get("sequential")]
    notes += [f"{e['model']}: shadownet throughput not measured: {e['throughput']['shadownet']['error']}"
              for e in _done(report) if e.get("throughput", {}).get("shadownet", {}).get("error")]
    notes += [f"{e['model']}: its output on the bench's input (uniform in [0, 1]) is one-hot or zero: the "
              "errors say little (a model made for another input range saturates on it)"
              for e in _done(report) if e["shadownet"].get("output_saturated")]
    notes += [f"{e['model']}: the conversion warned: {warning}" for e in _done(report)
              for warning in e["shadownet"].get("conversion_warnings", ())]
    notes += [f"{e['model']}: {VERIFY_MODE}: {unsplit_masked(rounds)}: its checks tolerate the masked "
              "input's rounding (SECURITY.md)" for e in _done(report)
              if (rounds := (e.get("verify") or {}).get("unsplit_masked_rounds"))]
    return notes


def table(report: dict[str, Any]) -> str:
    """The report as plain-text tables (stdout)."""
    m = report["machine"]
    kernels = m.get("tee_kernels", "?")
    lines = [f"{m['nproc']} CPUs ({m['cpu']}), the trusted app's kernels built for {kernels}", ""]
    if not _done(report):  # no model measured: no empty tables, the reasons
        return "\n".join([*lines, *_notes(report)])
    w = max(12, *(len(e["model"]) for e in _done(report)))  # a file's name may be longer: its columns stay
    head = f"{'model':<{w}} {'mode':<19} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'secure MiB':>11}"
    lines += [head, "-" * len(head)]
    for e in _done(report):
        for mode in _modes(e):
            m = e["modes"][mode]
            lines.append(f"{e['model']:<{w}} {mode:<19} {m['min_ms']:9.2f} {m['median_ms']:10.2f} "
                         f"{m['max_ms']:9.2f} {_memory(m):>11}")
    lines.append("")
    head = (f"{'model':<{w}} {'S/U':>5} {'T/S':>5} {'accel':>7} {'b2b':>6} {'1core':>6} {'TEE':>7} "
            f"{'cross':>6} "
            f"{'other':>6} {'switch':>6} {'MB/inf':>7} {'MACs off':>8} {'conv s':>6} {'k*':>6} "
            + " ".join(f"{'S(k=' + str(k) + ')':>9}" for k in PROJECTED_K))
    lines += [head, "-" * len(head)]
    for e in _done(report):
        s, b = e["shadownet"], e["shadownet"]["breakdown"]
        traffic = (s["bytes_to_tee"] + s["bytes_from_tee"]) / 1e6
        r = e["ratios"]
        lines.append(
            f"{e['model']:<{w}} {r['S/U']:5.2f} {r['T/S']:5.2f} {b['accelerator_ms']:7.2f} "
            f"{s['accelerator_back_to_back_ms']:6.2f} {s['accelerator_one_core_ms']:6.2f} "
            f"{b['tee_compute_ms']:7.2f} "
            f"{b['crossing_ms']:6.2f} {b['other_ms']:6.2f} "
            f"{s['world_switches']:6d} {traffic:7.1f} {s['macs_offloaded_share'] * 100:7.2f}% "
            f"{s['conversion_s']:6.2f} {_k(e['break_even_k']):>6} "
            + " ".join(f"{e['projected_ms'][str(k)]:9.2f}" for k in PROJECTED_K))
    rows = _masks_rows(report)
    if rows:
        head = (f"{'model':<{w}} {'mask policy':<12} {'OT rounds':>9} {'entries':>7} {'pool KiB':>9} "
                f"{'entry KiB':>9} {'offline ms/inf':>14} {'sync':>7} {'V/S-1':>7} {'bound':>9}")
        lines += ["", head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r['model']:<{w}} {r['policy'][:12]:<12} {r['rounds']:>9} {r['entries']:>7} "
                         f"{r['pool']:>9} {r['entry']:>9} {r['offline']:>14} {r['sync']:>7} "
                         f"{r['overhead']:>7} {r['bound']:>9}")
    streaming = [e for e in _done(report) if "throughput" in e]
    if streaming:
        head = (f"{'model':<{w}} {'U fps':>8} {'S fps (2 in flight)':>20} {'T fps':>8} {'T builtin fps':>14} "
                f"{'S/U':>5} {'S fps (1 at a time)':>20} {'S/U':>5}")
        lines += ["", head, "-" * len(head)]
        for e in streaming:
            x = e["throughput"]
            lines.append(f"{e['model']:<{w}} {x['unprotected']['fps']:8.1f} "
                         f"{_fps(x['shadownet']['fps'], 20)} {x['all-in-tee']['fps']:8.1f} "
                         f"{x['all-in-tee-builtin']['fps']:14.1f} "
                         f"{_fps(x['S/U'], 5, 2)} {_fps(x['shadownet'].get('one_at_a_time_fps'), 20)} "
                         f"{_fps(x.get('S/U one at a time'), 5, 2)}")
    head = (f"{'model':<{w}} {'S error':>8} {'S-verify error':>14} {'builtin vs XNNPACK':>18} "
            f"{'S spread: median / max':>23} {f'above {_TARGET}':>12} {'builtin, worst':>14}")
    lines += ["", head, "-" * len(head)]
    lines += [f"{m:<{w}} {err:>8} {verr:>14} {floor:>18} {spread:>23} {above:>12} {worst:>14}"
              for m, err, verr, floor, spread, above, worst in _fidelity_rows(report)]
    lines += [""] + _notes(report)
    lines += ["", "S = shadownet, U = unprotected, T = all-in-tee (XNNPACK, one thread); times in ms "
              "(medians); accel/TEE/cross/other split S's median; b2b = S's accelerator rounds back to back, "
              "with no TEE step between them; 1core = the same on one core; k* = break-even accelerator "
              "speed vs T, in one-core units (accel = 1core / k); secure MiB +X: what the verified copy adds "
              "beside shadownet (the two share the model's program)."]
    if rows:
        lines.append("OT rounds = rounds with one-time masks; pool = S's pool of them in secure memory; "
                     "offline = TEE time to make one entry (one inference's); sync = entries made on an "
                     "inference's path in the timed runs, of those made then (each run's untimed and timed "
                     "call take one each); V/S-1 = shadownet-verify's overhead (target <= "
                     "+10%; depthwise layers of multiplier 1 and small dense layers are computed by the "
                     "TEE there, not checked); "
                     "bound = its weakest detection bound (chance a 1e-3 change of a result goes unnoticed).")
    lines.append("Errors: max |diff| / max |U's output| on the bench's input (target <= 1e-4); builtin vs "
                 "XNNPACK: the original model on LiteRT's two kernel sets, the float32 floor.")
    lines.append("Accelerator and TEE are the same CPU here: S/U and T/S compare software paths on one "
                 "machine.")
    return "\n".join(lines)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The report as Markdown (``--markdown``; BENCHMARKS.md)."""
    m = report["machine"]
    s = report["settings"]
    out = [f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, Python {m['python']}, "
           f"TA kernels built for {m.get('tee_kernels', '?')}, load average at the end {m['load_average']}.",
           f"Settings: scheme {s['scheme']}, {s['num_threads']} threads, {s['num_runs']} runs after "
           f"{s['warmup_runs']} warm-up run{'' if s['warmup_runs'] == 1 else 's'}, "
           f"delegate {s['delegate'] or 'none (XNNPACK)'}, mask rounds "
           f"{s.get('mask_rounds', 'default')}{', verify mode' if s.get('verify') else ''}."]
    if command:
        out.append(f"Command: `{command}`")
    if not _done(report):  # no model measured: no empty tables, the reasons
        return "\n".join([*out, "", *(f"- {note}" for note in _notes(report))]) + "\n"
    out += ["", "| model | mode | min ms | median ms | max ms | secure memory MiB |",
            "|---|---|---:|---:|---:|---:|"]
    for e in _done(report):
        for mode in _modes(e):
            x = e["modes"][mode]
            out.append(f"| {e['model']} | {mode} | {x['min_ms']:.2f} | {x['median_ms']:.2f} | "
                       f"{x['max_ms']:.2f} | {_memory(x)} |")
    out += ["", "| model | rounds (on 1 thread) | S/U | T/S | accelerator ms | accelerator back to back ms "
            "| accelerator on one core ms | TEE ms | crossing ms | other ms | world switches "
            "| MB across / inference | MACs offloaded "
            "| conversion s | break-even k | " + " | ".join(f"S(k={k}) ms" for k in PROJECTED_K) + " |",
            "|---|" + "---:|" * (14 + len(PROJECTED_K))]
    for e in _done(report):
        x, b = e["shadownet"], e["shadownet"]["breakdown"]
        out.append(
            f"| {e['model']} | {e['rounds']} ({x.get('rounds_on_one_thread', 0)}) | "
            f"{e['ratios']['S/U']:.2f} | {e['ratios']['T/S']:.2f} | "
            f"{b['accelerator_ms']:.2f} | {x['accelerator_back_to_back_ms']:.2f} | "
            f"{x['accelerator_one_core_ms']:.2f} | {b['tee_compute_ms']:.2f} | {b['crossing_ms']:.2f} | "
            f"{b['other_ms']:.2f} | "
            f"{x['world_switches']} | {(x['bytes_to_tee'] + x['bytes_from_tee']) / 1e6:.1f} | "
            f"{x['macs_offloaded_share'] * 100:.2f}% | {x['conversion_s']:.2f} | {_k(e['break_even_k'])} | "
            + " | ".join(f"{e['projected_ms'][str(k)]:.2f}" for k in PROJECTED_K) + " |")
    rows = _masks_rows(report)
    if rows:
        out += ["", "One-time masks and verification (pool: shadownet's pool of one-time masks in secure "
                "memory; offline: the TEE's time to make one entry, i.e. one inference's; synchronous: "
                "entries made on an inference's path during the timed runs, of those made then (each run's "
                "untimed and timed call take one each); verify overhead: median "
                "shadownet-verify / median shadownet - 1, target <= +10%, its depthwise layers of multiplier "
                "1 and small dense layers computed by the TEE instead of checked; detection bound: the "
                "weakest "
                "achieved, the chance that a change of 1e-3 of a result's norm goes unnoticed):", "",
                "| model | mask policy | rounds with one-time masks | pool entries | pool KiB | entry KiB "
                "| offline ms / inference | synchronous | verify overhead | detection bound |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['model']} | {r['policy']} | {r['rounds']} | {r['entries']} | {r['pool']} | "
                       f"{r['entry']} | {r['offline']} | {r['sync']} | {r['overhead']} | {r['bound']} |")
    streaming = [e for e in _done(report) if "throughput" in e]
    if streaming:
        out += ["", "Streaming throughput (frames/s; shadownet with two frames in flight: while one frame is "
                "in the TEE the other runs on the accelerator - the target's measure - and one frame at a "
                "time; online work: the one-time masks are made untimed between frames (two in flight: "
                "between bursts of frames), as in the latency runs):", "",
                "| model | unprotected | shadownet | all-in-tee | all-in-tee-builtin "
                "| shadownet / unprotected | shadownet one at a time | its / unprotected |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for e in streaming:
            x = e["throughput"]
            out.append(f"| {e['model']} | {x['unprotected']['fps']:.1f} | {_fps(x['shadownet']['fps'])} | "
                       f"{x['all-in-tee']['fps']:.1f} | {x['all-in-tee-builtin']['fps']:.1f} | "
                       f"{_fps(x['S/U'], 0, 2)} | {_fps(x['shadownet'].get('one_at_a_time_fps'))} | "
                       f"{_fps(x.get('S/U one at a time'), 0, 2)} |")
    out += ["", f"Fidelity (max |diff| / max |unprotected output| on the bench's input; target <= "
            f"{_TARGET}; builtin vs XNNPACK: the original model on LiteRT's builtin kernels "
            "against XNNPACK, the disagreement of two honest float32 computations; spread: shadownet over "
            f"{FIDELITY_INPUTS} more random inputs, {FIDELITY_REPEATS} inferences each with fresh one-time "
            "masks, and the builtin kernels' worst on them):", "",
            f"| model | shadownet | shadownet-verify | builtin vs XNNPACK | spread: median / max | above "
            f"{_TARGET} | builtin vs XNNPACK, worst of {FIDELITY_INPUTS} |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    out += [f"| {' | '.join(row)} |" for row in _fidelity_rows(report)]
    notes = _notes(report)
    if notes:
        out += [""] + [f"- {note}" for note in notes]
    out += ["", "S = shadownet, U = unprotected, T = all-in-tee with XNNPACK (one thread, in the secure "
            "world). The accelerator and the TEE are the same CPU on this machine, so S/U and T/S compare "
            "software paths; the break-even k is how many times faster than one TEE core the accelerator "
            "must be for shadownet to beat all-in-tee (the accelerator's rounds timed on one core, "
            "accelerator on one core ms, divided by k, plus shadownet's TEE, crossing and other), and S(k) "
            "projects shadownet's latency on such an accelerator. Accelerator back to back: shadownet's "
            "accelerator rounds run one after the other "
            "with no TEE step between them; against its accelerator ms, what interleaving with the TEE "
            "costs the accelerator (here its thread pool and the TEE share the same 2 cores). Rounds on 1 "
            "thread: those the accelerator timed faster on one thread than on num_threads at load and that "
            "stayed there when tried on the first inferences (a thread pool's workers fall asleep during "
            "a long TEE step; waking them can cost a small round more than they gain it). Each mode is "
            "timed right after an untimed call of its own (its steady state). Secure memory +X: what "
            "shadownet-verify adds beside shadownet (the two sessions share the model's program; alone it "
            "holds that too)."]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Stacked bars of shadownet's breakdown next to unprotected and the two all-in-TEE baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _done(report)
    if not entries:
        return  # no model was measured: the command fails naming them (bench_cli)
    fig, axes = plt.subplots(1, len(entries), figsize=(3.2 * len(entries), 4), squeeze=False)
    parts = (("accelerator_ms", "accelerator"), ("tee_compute_ms", "TEE compute"),
             ("crossing_ms", "crossing"), ("other_ms", "other"))
    for ax, e in zip(axes[0], entries, strict=True):
        bottom = 0.0
        for key, label in parts:
            value = e["shadownet"]["breakdown"][key]
            ax.bar(1, value, bottom=bottom, label=label)
            bottom += value
        ax.bar(0, e["modes"]["unprotected"]["median_ms"], color="grey")
        ax.bar(2, e["modes"]["all-in-tee"]["median_ms"], color="black")
        ax.bar(3, e["modes"]["all-in-tee-builtin"]["median_ms"], color="dimgrey")
        ax.set_xticks(range(4), ["unprot.", "shadownet", "all-in-TEE", "builtin"], rotation=30)
        ax.set_title(e["model"])
        ax.set_ylabel("median latency (ms)")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, dpi=120, format=_plot_format(path))
    plt.close(fig)
    write_atomically(path, image.getvalue())  # whole or not at all, as the other reports


def _plot_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg"}.get(suffix, suffix)


def require_matplotlib(path: str | os.PathLike) -> None:
    """Before the measuring: matplotlib there, and a file type it writes (``ShadowNetError`` otherwise)."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ShadowNetError("--plot needs matplotlib, which is not installed (pip install matplotlib)") \
            from None
    known = set(FigureCanvasAgg.get_supported_filetypes()) - {"pgf"}  # pgf needs a LaTeX installed
    if _plot_format(path) not in known:
        raise ShadowNetError(f"--plot {path}: matplotlib writes {', '.join('.' + t for t in sorted(known))}")
