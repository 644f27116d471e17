"""Soak: many protected inferences on one model shared by several threads, checked and measured.

``python -m shadownet.soak [--model resnet44] [--inferences 10000] [--threads 4]`` protects the model (a zoo
name or a float ``.tflite``), loads it once and lets ``--threads`` threads call it until ``--inferences``
calls are done. Every result is compared with LiteRT's output for the same input on the ORIGINAL model:
inputs come from a pool whose references are computed once, and every ``--fresh-every``-th call uses a
new random input whose reference LiteRT computes right then. It reports the wrong results, the resident
memory of both worlds (sampled; growth after warm-up in %), and what is left after ``close()``: file
descriptors and shared-memory segments (memfds) of this process and of the secure world, and the secure
world's allocated bytes. Exit status 1 if any result was wrong or anything leaked. Not a test: it takes
minutes; its figures go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.fidelity import relative_error
from shadownet.exceptions import ArtifactError, SecurityError, ShadowNetError
from shadownet.files import check_destination, write_atomically

TOLERANCE = 1e-3  # worst |protected - LiteRT| over max |LiteRT|: the paper scheme's float cancellation


def _page_kib() -> int:
    return os.sysconf("SC_PAGE_SIZE") // 1024


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (``/proc/PID/statm``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * _page_kib()


def open_fds(pid: int | str = "self") -> dict[str, int]:
    """File descriptors of a process: ``fds`` in all, ``memfds`` among them (shared-memory segments)."""
    fds = memfds = 0
    root = f"/proc/{pid}/fd"
    for name in os.listdir(root):
        try:
            target = os.readlink(f"{root}/{name}")
        except OSError:  # closed while we looked (listdir's own descriptor, another thread's file)
            continue
        fds += 1
        memfds += target.startswith("/memfd:")
    return {"fds": fds, "memfds": memfds}


class Reference:
    """LiteRT on the original model, one interpreter per thread: its outputs, in the model's order."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self.local = threading.local()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        interpreter = getattr(self.local, "interpreter", None)
        if interpreter is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = self.local.interpreter = Interpreter(model_content=self.model, num_threads=1)
            interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def _prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """The original .tflite and its artifact directory."""
    import shadownet
    from shadownet.cli import ZOO_NAMES

    if args.model.endswith(".tflite"):
        original = Path(args.model)
    elif args.model not in ZOO_NAMES:  # a typo was a CalledProcessError's traceback from the zoo's child
        raise ShadowNetError(f"--model {args.model!r} is neither a .tflite file nor a zoo model "
                             f"({', '.join(ZOO_NAMES)})")
    else:
        original = work / f"{args.model}.tflite"
        if not original.exists():
            # In a child: TensorFlow in this process would dwarf the runtime's resident memory.
            print(f"exporting zoo model {args.model} ...", flush=True)
            done = subprocess.run([sys.executable, "-m", "shadownet", "zoo", args.model, "-o", str(original)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode:
                raise ShadowNetError(f"exporting zoo model {args.model} failed: "
                                     f"{(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    out = work / f"{original.stem}.protected"
    print(f"converting {original} -> {out} (scheme {args.scheme or 'default'}) ...", flush=True)
    shadownet.convert(str(original), str(out), scheme=args.scheme, force=True)
    return original, out


def _input(rng: np.random.Generator, spec: Any, scale: float) -> np.ndarray:
    """A float input uniform in [-1, 1] times ``scale``; another type's as the bench draws it (integers cast
    from those floats were all 0 or -1, the same input every time)."""
    from shadownet.model_io import random_input

    if np.dtype(spec.dtype).kind == "f":
        return (rng.uniform(-1, 1, spec.shape) * scale).astype(spec.dtype)
    return random_input(rng, spec.shape, spec.dtype)


def soak(original: Path, out: Path, inferences: int, threads: int, pool_size: int = 16,
         fresh_every: int = 100, warmup: int = 500, samples: int = 20, tolerance: float = TOLERANCE,
         num_threads: int | None = 1, verify: bool = False,
         scales: tuple[float, ...] = (1.0,)) -> dict[str, Any]:
    """Run the soak on an artifact directory ``out`` of ``original``; return its figures. ``scales``: the
    inputs are uniform [-1, 1] values times these in turn (round 1's one-time mask follows each input's
    spread: ``tee_sim.mask_spread``)."""
    import shadownet
    import tee_sim

    context = tee_sim.default_context()
    reference = Reference(original.read_bytes())
    # One load / call / stats / close first: the secure world, and the context's reusable bounce buffer
    # for small transfers (64 KiB, one per process), exist before the baseline; what follows is per model.
    with shadownet.load(out, num_threads=num_threads, verify=verify) as warm:
        warm(*[np.zeros(t.shape, t.dtype) for t in warm.inputs])
        warm.stats()
    world = context.secure_world_pid
    before = {"normal": open_fds(), "secure": open_fds(world) if world else None,
              "secure_bytes": context.memory_stats()["used"]}

    model = shadownet.load(out, num_threads=num_threads, verify=verify)
    if len(model.inputs) != 1:
        model.close()
        raise ValueError(f"the soak feeds one input; {original.name} has {len(model.inputs)}")
    (spec,) = model.inputs
    rng = np.random.default_rng(1)
    # Pool input j at scale j % len(scales), a fresh input i at i % len(scales).
    pool = [_input(rng, spec, scales[j % len(scales)]) for j in range(pool_size)]
    wants = [reference(x) for x in pool]

    lock = threading.Lock()
    state = {"next": 0, "done": 0, "wrong": 0, "fresh": 0, "worst": 0.0}
    failures: list[str] = []
    rss: list[tuple[int, int, int]] = []  # (calls done, normal-world KiB, secure-world KiB)
    every = max(1, inferences // samples)

    def sample(done: int) -> None:
        secure = context.secure_world_pid
        rss.append((done, rss_kib(), rss_kib(secure) if secure else 0))

    def work(thread: int) -> None:
        try:
            reference(pool[0])  # this thread's LiteRT interpreter exists before the memory baseline
            while True:
                with lock:
                    i = state["next"]
                    if i >= inferences:
                        return
                    state["next"] += 1
                fresh = fresh_every > 0 and i % fresh_every == fresh_every - 1
                if fresh:
                    x = _input(np.random.default_rng(1000 + i), spec, scales[i % len(scales)])
                    want = reference(x)
                else:
                    x, want = pool[i % pool_size], wants[i % pool_size]
                got = model(x)  # an array, or a dict by output name when there are several
                outputs = [got[t.name] for t in model.outputs] if isinstance(got, dict) else [got]
                error = relative_error(outputs, want)
                with lock:
                    state["done"] += 1
                    state["fresh"] += fresh
                    state["worst"] = max(state["worst"], error)
                    if error > tolerance:
                        state["wrong"] += 1
                        if len(failures) < 5:
                            failures.append(f"call {i} (thread {thread}): relative error {error:.3g}")
                    done = state["done"]
                    if done == warmup or done % every == 0:
                        sample(done)
                    if done % max(1, inferences // 10) == 0:
                        print(f"  {done}/{inferences} calls, {state['wrong']} wrong", flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            with lock:
                failures.append(f"thread {thread}: {type(exc).__name__}: {exc}")

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(t,), name=f"soak-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if not rss:  # every call failed before the first sample: one now, so that the failures get reported
        sample(state["done"])
    model_stats = model.stats()
    model.close()
    after = {"normal": open_fds(), "secure": open_fds(context.secure_world_pid) if world else None,
             "secure_bytes": context.memory_stats()["used"]}

    warm = [r for r in rss if r[0] >= warmup] or rss
    first, last = warm[0], warm[-1]
    growth = {side: 100.0 * (last[k] - first[k]) / first[k] if first[k] else 0.0
              for side, k in (("normal", 1), ("secure", 2))}
    peak_growth = {side: 100.0 * (max(r[k] for r in warm) - first[k]) / first[k] if first[k] else 0.0
                   for side, k in (("normal", 1), ("secure", 2))}
    leaks = {
        "normal_fds": after["normal"]["fds"] - before["normal"]["fds"],
        "normal_memfds": after["normal"]["memfds"] - before["normal"]["memfds"],
        "secure_fds": (after["secure"]["fds"] - before["secure"]["fds"]) if world else None,
        "secure_memfds": (after["secure"]["memfds"] - before["secure"]["memfds"]) if world else None,
        "secure_bytes": after["secure_bytes"] - before["secure_bytes"],
    }
    return {
        "model": str(original), "scheme": model_stats.get("scheme"), "rounds": model_stats.get("rounds"),
        "verify": verify,
        "threads": threads, "calls": state["done"], "fresh_inputs_checked": state["fresh"],
        "wrong": state["wrong"], "worst_relative_error": state["worst"], "tolerance": tolerance,
        "failures": failures, "seconds": elapsed, "calls_per_s": state["done"] / elapsed,
        "rss_kib": rss, "rss_growth_after_warmup_pct": growth,
        "rss_peak_growth_after_warmup_pct": peak_growth,
        "warmup_calls": warmup, "before": before, "after": after, "leaks": leaks,
        "secure_memory_peak": model_stats.get("secure_memory_peak"), "scales": list(scales),
        "masks_moved": (model_stats.get("pool") or {}).get("rescaled"),  # on an inference's path
        "model_secure_memory": model_stats.get("model_secure_memory"),
    }


def _scales(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"scales must be positive and finite: {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadownet.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet44", help="zoo name or float .tflite (default resnet44)")
    parser.add_argument("--artifacts", help="an artifact directory converted from --model, which must then "
                        "be the original .tflite file (default: convert now)")
    parser.add_argument("--scheme", default=None)
    parser.add_argument("--inferences", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pool", type=int, default=16, help="inputs whose references are computed once")
    parser.add_argument("--fresh-every", type=int, default=100, help="every Nth call: a new input, checked")
    parser.add_argument("--warmup", type=int, default=500, help="calls before the memory baseline")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    parser.add_argument("--verify", action="store_true", help="the TEE checks every accelerator result")
    parser.add_argument("--workdir", help="where models and artifacts go (default: a temporary directory)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--scales", type=_scales, default=(1.0,),
                        help="comma-separated input scales, taken in turn (default 1: uniform [-1, 1])")
    args = parser.parse_args(argv)
    if args.inferences < 1:
        parser.error(f"--inferences must be at least 1, not {args.inferences}")
    try:
        check_destination(args.json, reads=[p for p in (args.model, args.artifacts) if p])
    except (OSError, ValueError) as exc:
        parser.error(f"--json: {exc}")
    if args.artifacts and not Path(args.model).is_file():
        parser.error(f"--artifacts: --model must be the .tflite they were converted from, not {args.model!r}")
    with tempfile.TemporaryDirectory(prefix="shadownet-soak-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            if args.artifacts:
                original, out = Path(args.model), Path(args.artifacts)
            else:
                original, out = _prepare(args, work)
            print(f"soak: {args.inferences} protected inferences on {original.name}, {args.threads} threads",
                  flush=True)
            figures = soak(original, out, args.inferences, args.threads, args.pool, args.fresh_every,
                           args.warmup, tolerance=args.tolerance, verify=args.verify, scales=args.scales)
        except (ValueError, ShadowNetError, OSError) as exc:  # one line, as the CLI's
            print(f"python -m shadownet.soak: error: {(str(exc).splitlines() or [type(exc).__name__])[0]}",
                  file=sys.stderr)
            # 2: a model the soak cannot feed (a usage error); 1: one it cannot read or convert
            # (SecurityError, a ValueError as LiteRT's unopenable model is: a tampered or foreign artifact)
            usage = isinstance(exc, ValueError) and not isinstance(exc, ArtifactError | SecurityError)
            return 2 if usage else 1
    if args.json:
        write_atomically(args.json, json.dumps(figures, indent=1) + "\n")
    growth, leaks = figures["rss_growth_after_warmup_pct"], figures["leaks"]
    peak = figures["rss_peak_growth_after_warmup_pct"]
    first = next((r for r in figures["rss_kib"] if r[0] >= figures["warmup_calls"]), figures["rss_kib"][0])
    print(f"calls {figures['calls']} ({figures['fresh_inputs_checked']} on fresh inputs) in "
          f"{figures['seconds']:.0f} s ({figures['calls_per_s']:.1f}/s), scheme {figures['scheme']}, "
          f"{figures['rounds']} rounds{', verified' if figures['verify'] else ''}")
    if figures["scales"] != [1.0]:
        print(f"input scales {figures['scales']} in turn: round 1's mask moved {figures['masks_moved']} "
              "times on an inference's path")
    print(f"wrong results: {figures['wrong']} (worst relative error {figures['worst_relative_error']:.2e}, "
          f"tolerance {figures['tolerance']:g})")
    print(f"resident memory after {first[0]} warm-up calls: normal world "
          f"{first[1] / 1024:.1f} MiB -> {growth['normal']:+.2f}% at the end (peak {peak['normal']:+.2f}%), "
          f"secure world {first[2] / 1024:.1f} MiB -> {growth['secure']:+.2f}% (peak {peak['secure']:+.2f}%)")
    print(f"after close: fds {leaks['normal_fds']:+d}, memfds {leaks['normal_memfds']:+d} (this process); "
          f"fds {leaks['secure_fds']:+d}, memfds {leaks['secure_memfds']:+d} (secure world); "
          f"secure memory {leaks['secure_bytes']:+d} bytes")
    for failure in figures["failures"]:
        print(f"failure: {failure}")
    leaked = leaks["normal_memfds"] or leaks["secure_memfds"] or leaks["secure_bytes"]
    return 1 if figures["wrong"] or figures["failures"] or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
