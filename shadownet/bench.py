"""``shadownet bench``: what protection costs, where the time goes, and how it compares with the alternatives.

Per model, the modes run interleaved run by run (so that machine drift hits all alike; the order rotates),
each timed call right after an untimed call of the same mode (its steady state, as an app running it frame
after frame sees it; timed right after another mode, unprotected LiteRT was up to 1.8x slower):

- ``unprotected``: LiteRT on the original model, the same threads and delegate (what a vendor ships today);
- ``shadownet``: protected inference (``shadownet.load``) under the secure world's default memory cap;
- ``all-in-tee``: the whole original model inside the secure world (``tee_sim.ta_all_in_tee``), one thread,
  LiteRT with XNNPACK: the strongest honest baseline; ``all-in-tee-builtin``: the same with LiteRT's
  builtin kernels (a TEE without SIMD libraries). Both run in a secure world of their own, without a cap;
- ``shadownet-verify`` (``--verify`` only): the same protected artifacts loaded a second time with
  ``verify=True`` (the TEE checks every accelerator result, Freivalds), a model and session of its own next
  to ``shadownet``'s under the same cap. Its overhead is ``median(shadownet-verify) / median(shadownet) - 1``
  (the target is <= 10%); its detection bound is the weakest the TEE achieved (``worst_bound_log2``: log2 of
  the probability that a change of 1e-3 of a result's norm goes unnoticed). A verified copy that does not
  fit under the cap next to shadownet is measured alone after the other modes, its runs alternated with
  unprotected's, its overhead ``(V / U) / (S / U) - 1`` with each phase's own unprotected median (and said
  so); one that does not fit alone either is reported as such. The TA reports its secure memory as a
  whole: the verified copy's is what it adds to shadownet's (read before and after closing it), or all of
  it when alone.

Both protected models' pools are refilled right after each of their runs, untimed, instead of by the
background thread: its refills would otherwise run in the secure world while the other modes are timed,
or while the model's next run waits for the secure world (on two cores the verified copy's slowed
shadownet's median by a quarter; shadownet's own made MiniVGG's crossings ~20x longer). The medians are
then the online work with a ready pool; the offline cost is in the pool figures.

For ``shadownet`` the median is split into accelerator, TEE compute (inside the trusted app), boundary
crossing (the rest of the TEE calls' wall time: transport and world switches) and other (the runtime's
own copies and bookkeeping). The break-even accelerator speed ``k`` solves
``one_core / k + TEE + crossing + other = all-in-tee``, ``one_core`` the accelerator's rounds timed on one
core (``Protected.rounds_on_one_core``): k says how many times faster than one TEE core the accelerator must
be; on this machine both sides are the same CPU.
Multiply-adds are counted on the original graph (``count_macs``).

One-time masks: the model is converted with ``--mask-rounds POLICY`` (default: the converter's,
``first``). Each protected model's pool of per-inference material (``ProtectedModel.stats()['pool']``) is
read after the timed runs: its secure memory (``pool_bytes``, ``entry_bytes``, ``capacity``) and the TEE's
offline cost per inference (``offline_s`` / ``made``: making one entry, off the inference's path when the
pool is refilled between inferences); ``synchronous_timed`` counts the entries made on an inference's path
(pool empty) during the timed runs, from the counters read just before them. Those TEE calls (and the per-run
``stats()``) are made outside the timed calls. A policy whose protected model does not fit under the
secure-memory cap is that model's error (``SecureMemoryError``), as is a round the model does not have.

This module is the command and the whole run; one model's measurements are in ``shadownet.bench_measure``
(the modes' runners in ``shadownet.bench_runners``, the throughput in ``shadownet.bench_throughput``), the
output (tables, Markdown, JSON, plot) in ``shadownet.bench_report``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shadownet import MAX_THREADS
from shadownet.bench_measure import MODES, VERIFY_MODE, bench_model, protected_dir
from shadownet.bench_report import markdown, plot, require_matplotlib, table
from shadownet.cli import MAX_RUNS, ZOO_NAMES
from shadownet.delegates import check_delegate_library
from shadownet.exceptions import InputError, ModelFormatError, ShadowNetError
from shadownet.files import check_destination, json_default, working_directory, write_atomically
from shadownet.load_arguments import check_count, check_flags

NO_CAP = 1 << 40  # the all-in-TEE baseline's secure world: memory is what it measures, not what it gets


# --- the whole run ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal"))
        memory = round(kb / (1 << 20), 1)
    except (OSError, StopIteration, ValueError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    from tee_sim.ta_shadownet_kernels import VARIANT  # the TA kernels' build for this CPU (setup.py)

    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": memory, "python": platform.python_version(),
            "tee_kernels": VARIANT, "load_average": [round(x, 2) for x in load] if load else None}


def _sources(models: Sequence[str], workdir: Path, progress: bool = False) -> list[tuple[str, Path]]:
    """(name, path) per requested model: zoo names are exported (TensorFlow) into ``workdir`` once and
    reused (which ``progress`` says: any file of that name was measured as the zoo model without a word, a
    helper's review); anything else is a path to a model (a ``.tflite``, a Keras file, a SavedModel
    directory)."""
    sources = []
    for item in models:
        if item in ZOO_NAMES:
            path = workdir / f"{item}.tflite"
            if not path.exists():
                from models.zoo import export

                export(item, path, seed=0, verbose=False)
            elif progress:
                print(f"reusing {path} as {item} (delete it to export {item} again)", file=sys.stderr)
            sources.append((item, path))
        else:
            from converters.original_model import model_path_problem

            path = Path(item)
            why = model_path_problem(path)  # before any model is measured (a SavedModel is a directory)
            if why:
                raise ShadowNetError(f"{item} {why}: give a zoo model ({', '.join(ZOO_NAMES)}), a .tflite, a "
                                     "Keras file or a SavedModel directory")
            sources.append((path.stem, path))
    # Files of one stem (two m.tflite) would share a name in the report and a work directory: the parent
    # directory's name goes in front, then a count.
    stems = [name for name, _ in sources]
    named: list[tuple[str, Path]] = []
    taken: set[str] = set()
    for name, path in sources:
        if stems.count(name) > 1 and name not in ZOO_NAMES:
            name = f"{path.resolve().parent.name}-{name}"
        unique, count = name, 1
        while unique in taken:
            count += 1
            unique = f"{name}-{count}"
        taken.add(unique)
        named.append((unique, path))
    return named


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, models: int, enabled: bool = True) -> None:
        self.models, self.done, self.enabled = models, 0, enabled
        self._last = 0.0
        self._drawn = False

    def __call__(self, label: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if step not in (0, total) and now - self._last < 0.1:
            return
        self._last = now
        fraction = min((self.done + (step / total if total else 1)) / self.models, 1.0)
        width = 30
        bar = "#" * int(fraction * width)
        sys.stderr.write(f"\r[{bar:<{width}}] {fraction * 100:5.1f}%  {label[:60]:<60}")
        sys.stderr.flush()
        self._drawn = True

    def finish(self, label: str) -> None:
        """One model is done (or failed)."""
        self.done += 1
        self(label, 0, 1)
        if self.enabled and self.done == self.models:
            sys.stderr.write("\n")

    def clear(self) -> None:
        """End the bar's line (after an error: the message then starts a line of its own)."""
        if self._drawn and self.done < self.models:
            sys.stderr.write("\n")


def run_bench(models: Sequence[str], *, scheme: str | None = None, num_threads: int = 2, num_runs: int = 20,
              warmup_runs: int = 3, delegate: str | None = None, workdir: str | os.PathLike | None = None,
              progress: bool = True, throughput: bool = False, verify: bool = False,
              mask_rounds: str | None = None, signature: str | None = None) -> dict[str, Any]:
    """Benchmark ``models`` (zoo names, or paths of models in any form ``convert`` takes: ``.tflite``, Keras
    file, SavedModel directory); return the report (see ``bench_model``). ``verify``: also run the
    ``shadownet-verify`` mode; ``mask_rounds``: the one-time-mask policy passed to the converter (None: its
    default); ``signature``: the signature to measure of a file of several (as ``convert``'s)."""
    import tee_sim
    from converters.per_inference import mask_rounds_form
    from converters.schemes import get_scheme

    # Before any work (a helper's sweep: a str was taken one character a model, num_threads=100000 built
    # LiteRT interpreters of 100,000 threads - every process on the machine then failed to fork - and a
    # flag "no" was true)
    if isinstance(models, str | bytes | os.PathLike) or not isinstance(models, Sequence):
        raise TypeError(f"models is a list of zoo names or model paths, not {models!r}")
    counts = (("num_threads", num_threads, 1, MAX_THREADS), ("num_runs", num_runs, 1, MAX_RUNS),
              ("warmup_runs", warmup_runs, 0, MAX_RUNS))
    for name, value, low, high in counts:
        check_count(name, value, low, high, optional=False)
    # numpy's integers as Python's: LiteRT refused them for num_threads, and the report's JSON (a review)
    num_threads, num_runs, warmup_runs = int(num_threads), int(num_runs), int(warmup_runs)
    check_flags(progress=progress, throughput=throughput, verify=verify)
    get_scheme(scheme)  # an unknown scheme was each model's error
    if mask_rounds is not None:  # a malformed policy is the whole run's error; a missing round, one model's
        try:
            mask_rounds = mask_rounds_form(mask_rounds)
        except ValueError as exc:
            raise ValueError(f"--mask-rounds: {exc}") from None
        if getattr(get_scheme(scheme), "static_masks", True):  # as convert refuses it
            raise ValueError(f"--mask-rounds {mask_rounds}: the scheme's masks are static (one-time masks "
                             "are groupmix's): it would be ignored")
    if isinstance(delegate, str | os.PathLike):  # once, before the conversions (each model found it after
        check_delegate_library(os.fspath(delegate))  # its own: a helper's sweep)
    temporary = workdir is None
    bar = _Progress(len(models), progress)
    work = Path(tempfile.mkdtemp(prefix="shadownet-bench-") if temporary else working_directory(workdir))
    try:
        sources = _sources(models, work, progress and not temporary)
        entries = []
        # The all-in-TEE baseline gets a secure world of its own, without a cap.
        with tee_sim.Context(memory_cap=NO_CAP) as tee_context:
            for name, path in sources:
                # which file each entry measured (a model given twice is measured twice, under two names)
                source = "zoo" if temporary and path.parent == work else str(path)
                try:
                    entry = bench_model(name, path, work, scheme=scheme, num_threads=num_threads,
                                        num_runs=num_runs, warmup_runs=warmup_runs, delegate=delegate,
                                        tee_context=tee_context, progress=bar, throughput=throughput,
                                        verify=verify, mask_rounds=mask_rounds, signature=signature)
                    entries.append({"model": name, "file": source} | entry)
                    bar.finish(f"{name}: done")
                except (ShadowNetError, ValueError, RuntimeError) as exc:
                    # e.g. over the secure-memory cap, or LiteRT refusing the model: say so, bench the others
                    error = str(exc).replace(str(protected_dir(work, name)), "its protected copy") if \
                        temporary else str(exc)  # a temporary directory is gone when the report is read
                    if isinstance(exc, ModelFormatError) and not temporary and name in ZOO_NAMES and \
                            source == str(work / f"{name}.tflite"):
                        # a damaged export kept in --workdir was reported without its file (a helper's sweep);
                        # not other failures of a model kept there (a review)
                        error += f" (the zoo export kept at {source}: delete it to export it again)"
                    entries.append({"model": name, "file": source,
                                    "error": " ".join(error.split()) or type(exc).__name__})
                    bar.finish(f"{name}: failed")
    finally:
        bar.clear()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return {"format": "shadownet-bench", "version": 1, "machine": machine(),
            "settings": {"scheme": scheme or "default", "num_threads": num_threads, "num_runs": num_runs,
                         "warmup_runs": warmup_runs, "delegate": delegate, "throughput": throughput,
                         "verify": verify, "mask_rounds": mask_rounds or "default",
                         "modes": list(MODES) + ([VERIFY_MODE] if verify else [])},
            "note": "accelerator and TEE are the same CPU here: the ratios compare software paths, the "
                    "break-even k and the projections say how fast an accelerator must be",
            "models": entries}


def _distinct_outputs(args: argparse.Namespace) -> None:
    """``--json``, ``--markdown`` and ``--plot`` name three files: one given twice was written twice, the
    last write kept, exit 0 (a helper's probe)."""
    named: dict[str, str] = {}
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            key = os.path.realpath(path)
            if key in named:
                raise InputError(f"{named[key]} and {flag} name the same file {path}: give each its own")
            named[key] = flag


def bench_cli(args: argparse.Namespace) -> None:
    """``shadownet bench [FILE.tflite ...] [--models A,B] [--scheme] [--num_threads] [--num_runs]
    [--warmup_runs] [--delegate] [--json F] [--markdown F] [--plot F.png] [--throughput] [--verify]
    [--mask-rounds POLICY] [--signature KEY] [--workdir DIR]``. The models that could not be measured are
    reported with the rest, then make the command fail (one line naming them)."""
    if args.plot:
        require_matplotlib(args.plot)
    models = list(args.files or [])
    if args.models is not None:
        named = [m.strip() for m in args.models.split(",") if m.strip()]
        if not named:
            raise ValueError(f"--models {args.models!r} names no model")
        models += named
    for item in models:  # named by the user (the default five are the zoo's), before any export (a review)
        if item in ZOO_NAMES and os.path.lexists(item):  # measured as the zoo's, without a word (a probe)
            raise ShadowNetError(f"{item} names a zoo model and a file or directory here: write ./{item} for "
                                 "the file, or run elsewhere for the zoo model")
    if not models:
        models = list(ZOO_NAMES)
    # Before minutes of measuring, not after; the files it reads, wherever they are named (a model named
    # in --models and as --json was replaced by the report, exit 0: a helper's probe)
    reads = [m for m in models if m not in ZOO_NAMES] + ([args.delegate] if args.delegate else [])
    for path in (args.json, args.markdown, args.plot):
        check_destination(path, reads=reads)
    _distinct_outputs(args)
    report = run_bench(models, scheme=args.scheme, num_threads=args.num_threads, num_runs=args.num_runs,
                       warmup_runs=args.warmup_runs, delegate=args.delegate, workdir=args.workdir,
                       progress=True, throughput=args.throughput, verify=args.verify,
                       mask_rounds=args.mask_rounds, signature=args.signature)
    report["command"] = "shadownet bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else None
    print(table(report))
    if args.json:
        write_atomically(args.json, json.dumps(report, indent=1, default=json_default) + "\n")
    if args.markdown:
        write_atomically(args.markdown, markdown(report, report["command"]))
    if args.plot:
        plot(report, args.plot)
    failed = [f"{e['model']} ({e['error']})" for e in report["models"] if "error" in e]
    if failed:
        raise ShadowNetError(f"{len(failed)} of {len(report['models'])} model(s) not measured: "
                             + "; ".join(failed))
