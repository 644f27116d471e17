"""``shadownet bench``: what protection costs, where the time goes, and how it compares with the alternatives.

Per model, the modes run interleaved run by run (so that machine drift hits all alike; the order rotates):

- ``unprotected``: LiteRT on the original model, the same threads and delegate (what a vendor ships today);
- ``shadownet``: protected inference (``shadownet.load``) under the secure world's default memory cap;
- ``all-in-tee``: the whole original model inside the secure world (``tee_sim.ta_all_in_tee``), one thread,
  LiteRT with XNNPACK: the strongest honest baseline; ``all-in-tee-builtin``: the same with LiteRT's
  builtin kernels (a TEE without SIMD libraries). Both run in a secure world of their own, without a cap.

For ``shadownet`` the median is split into accelerator, TEE compute (inside the trusted app), boundary
crossing (the rest of the TEE calls' wall time: transport and world switches) and other (the runtime's
own copies and bookkeeping). The break-even accelerator speed ``k`` solves
``accelerator / k + TEE + crossing + other = all-in-tee``; on this machine both sides are the same CPU.
Multiply-adds are counted on the original graph (``count_macs``).
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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shadownet.exceptions import SecureMemoryError, ShadowNetError

MODES = ("unprotected", "shadownet", "all-in-tee", "all-in-tee-builtin")
ZOO = ("mobilenet", "resnet44", "resnet404", "minivgg", "yolov4-tiny")
PROJECTED_K = (5, 20)
NO_CAP = 1 << 40  # the all-in-TEE baseline's secure world: memory is what it measures, not what it gets
MIB = 1 << 20


# --- multiply-adds ------------------------------------------------------------------------------------------
# Ops whose every output element costs one multiply(-add); ops not listed here and not linear move, compare
# or select data (copies, max pools, ReLU) and cost none.
_ELEMENTWISE_MACS = frozenset({"ADD", "SUB", "MUL", "DIV", "SQUARED_DIFFERENCE", "LOGISTIC", "TANH",
                               "SOFTMAX", "LOG_SOFTMAX", "HARD_SWISH", "PRELU", "LEAKY_RELU", "ELU", "GELU",
                               "RESIZE_BILINEAR", "L2_NORMALIZATION"})


def count_macs(graph: Any) -> list[int]:
    """Multiply-adds of each op of a (normalized) graph: a convolution costs ``kh * kw * C_in`` per output
    element (depthwise ``kh * kw``), a dense layer its input width, a mean / average pool one per input
    element, elementwise arithmetic one per output element; data movement nothing."""
    macs = []
    for op in graph.ops:
        tensors = graph.tensors
        out = int(np.prod(tensors[op.outputs[0]].shape, dtype=np.int64)) if op.outputs else 0
        shape_in = tensors[op.inputs[0]].shape if op.inputs and op.inputs[0] >= 0 else ()
        weights = tensors[op.inputs[1]].shape if len(op.inputs) > 1 and op.inputs[1] >= 0 else ()
        if op.kind == "CONV_2D" and len(weights) == 4:
            macs.append(out * weights[1] * weights[2] * weights[3])
        elif op.kind == "DEPTHWISE_CONV_2D" and len(weights) == 4:
            macs.append(out * weights[1] * weights[2])
        elif op.kind == "FULLY_CONNECTED" and len(weights) == 2:
            macs.append(out * weights[1])
        elif op.kind == "TRANSPOSE_CONV" and len(op.inputs) > 2:
            w = tensors[op.inputs[1]].shape
            x = tensors[op.inputs[2]].shape
            macs.append(int(np.prod(x, dtype=np.int64)) * w[0] * w[1] * w[2])
        elif op.kind == "BATCH_MATMUL" and shape_in:
            macs.append(out * shape_in[-1])
        elif op.kind in ("MEAN", "SUM", "AVERAGE_POOL_2D", "L2_POOL_2D"):
            macs.append(int(np.prod(shape_in, dtype=np.int64)) if op.kind in ("MEAN", "SUM") else
                        out * op.options.filterHeight * op.options.filterWidth)
        elif op.kind in _ELEMENTWISE_MACS:
            macs.append(out)
        else:
            macs.append(0)
    return macs


# --- the three modes ----------------------------------------------------------------------------------------
class _Unprotected:
    def __init__(self, model: bytes, num_threads: int, delegates: list[Any]) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_content=model, num_threads=num_threads,
                                       experimental_delegates=delegates or None)
        self.interpreter.allocate_tensors()
        self.inputs = [self.interpreter.tensor(d["index"]) for d in self.interpreter.get_input_details()]
        self.outputs = [self.interpreter.tensor(d["index"]) for d in self.interpreter.get_output_details()]
        self.results = [np.empty(t().shape, t().dtype) for t in self.outputs]

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        for tensor, x in zip(self.inputs, inputs, strict=True):
            np.copyto(tensor(), x)
        self.interpreter.invoke()
        for out, tensor in zip(self.results, self.outputs, strict=True):
            np.copyto(out, tensor())

    def close(self) -> None:
        self.interpreter = None


class _AllInTEE:
    """The whole model run by the all-in-TEE trusted app (``tee_sim.ta_all_in_tee``)."""

    def __init__(self, context: Any, model: bytes, kernels: int, specs: Sequence[tuple[tuple[int, ...], Any]],
                 n_inputs: int) -> None:
        import tee_sim
        from tee_sim.ta_all_in_tee_commands import UUID, Command, io_layout

        self._tee, self._command = tee_sim, Command
        offsets, size = io_layout([int(np.prod(s, dtype=np.int64)) * np.dtype(t).itemsize for s, t in specs])
        self.session = context.open_session(UUID)
        try:
            self.session.invoke_command(Command.LOAD, [tee_sim.TempMemRef(model), tee_sim.Value(a=kernels)])
            self.shm = context.register_shared_memory(size)
            self.session.invoke_command(Command.BIND_SHARED_MEMORY,
                                        [tee_sim.MemRef(self.shm, 0, size, "inout")])
        except BaseException:
            self.session.close()
            raise
        views = [self.shm.ndarray(t, s, o) for (s, t), o in zip(specs, offsets, strict=True)]
        self.inputs, self.outputs = views[:n_inputs], views[n_inputs:]
        self.results = [np.empty(v.shape, v.dtype) for v in self.outputs]
        self._run = int(Command.RUN)

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        for view, x in zip(self.inputs, inputs, strict=True):
            np.copyto(view, x)
        self.session.invoke_command(self._run)
        for out, view in zip(self.results, self.outputs, strict=True):
            np.copyto(out, view)

    def memory(self) -> tuple[int, int]:
        out = self._tee.Value(direction="out")
        self.session.invoke_command(self._command.GET_STATS, [out])
        return out.a, out.b

    def close(self) -> None:
        self.session.close()
        self.shm.release()


class _Protected:
    def __init__(self, out_dir: Path, num_threads: int, delegate: str | None) -> None:
        from shadownet.runtime import load

        self.model = load(out_dir, num_threads=num_threads, delegate=delegate)
        self.results = [np.empty(t.shape, t.dtype) for t in self.model.outputs]
        self.stats: list[dict[str, Any]] = []

    def __call__(self, inputs: Sequence[np.ndarray]) -> None:
        self.model.run_into(inputs, self.results)

    def record(self) -> None:
        self.stats.append(self.model.stats())

    def close(self) -> None:
        self.model.close()


def _frames_per_second(run: Callable[[], None], frames: int) -> float:
    start = time.perf_counter()
    for _ in range(frames):
        run()
    return frames / (time.perf_counter() - start)


def _pipelined_fps(out_dir: Path, num_threads: int, delegate: str | None, inputs: Sequence[np.ndarray],
                   frames: int) -> dict[str, Any]:
    """Protected frames/s with two frames in flight: two sessions of the same model (the TA shares the
    program), one thread each; the accelerator takes one round at a time (one device), so while one
    frame is in the TEE the other runs on the accelerator."""
    import threading

    from shadownet.accelerator import AcceleratorWrapper
    from shadownet.runtime import load

    device = threading.Lock()

    class OneDevice(AcceleratorWrapper):
        def run_round(self, r: int) -> None:
            with device:
                self.inner.run_round(r)

    models: list[Any] = []
    try:
        for _ in range(2):
            models.append(load(out_dir, num_threads=num_threads, delegate=delegate, accelerator=OneDevice))
    except SecureMemoryError as exc:  # the second frame's buffers do not fit under the cap
        for m in models:
            m.close()
        return {"fps": None, "error": str(exc)}
    try:
        results = [[np.empty(t.shape, t.dtype) for t in m.outputs] for m in models]
        for m, r in zip(models, results, strict=True):  # warm both
            m.run_into(inputs, r)
        errors: list[BaseException] = []

        def worker(m: Any, r: list[np.ndarray], count: int) -> None:
            try:
                for _ in range(count):
                    m.run_into(inputs, r)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

        half = max(frames // 2, 1)
        threads = [threading.Thread(target=worker, args=(m, r, half)) for m, r in zip(models, results,
                                                                                        strict=True)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        if errors:
            raise errors[0]
        memory = models[0].stats().get("model_secure_memory", 0)
    finally:
        for m in models:
            m.close()
    return {"fps": 2 * half / elapsed, "secure_memory_mib": memory / MIB}


# --- one model ----------------------------------------------------------------------------------------------
def _summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"min_ms": float(ms.min()), "median_ms": float(np.median(ms)), "max_ms": float(ms.max()),
            "runs": len(ms)}


def _relative_error(got: Sequence[np.ndarray], want: Sequence[np.ndarray]) -> float:
    return max(float(np.max(np.abs(g.astype(np.float64) - w)) / max(float(np.max(np.abs(w))), 1e-30))
               for g, w in zip(got, want, strict=True))


def bench_model(name: str, model_path: Path, workdir: Path, *, scheme: str | None, num_threads: int,
                num_runs: int, warmup_runs: int, delegate: str | None, tee_context: Any,
                progress: Callable[[str, int, int], None], throughput: bool = False) -> dict[str, Any]:
    """Benchmark one ``.tflite``: convert it, run the modes interleaved, return its report entry."""
    from ai_edge_litert.interpreter import Interpreter, load_delegate

    from converters import convert
    from converters.graph import normalize, read_model
    from converters.partition import partition
    from tee_sim.ta_all_in_tee_commands import KERNELS_BUILTIN, KERNELS_XNNPACK

    model = model_path.read_bytes()
    graph = normalize(read_model(model))
    macs = count_macs(graph)
    offloaded = partition(graph).offloaded
    out_dir = workdir / f"{name}.protected"
    progress(f"{name}: converting", 0, 1)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = convert(model, out_dir, scheme=scheme, force=True)
    conversion_s = time.perf_counter() - start

    details = Interpreter(model_content=model)
    specs = [(tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]))
             for d in details.get_input_details() + details.get_output_details()]
    n_inputs = len(details.get_input_details())
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(0, 1, s).astype(t) for s, t in specs[:n_inputs]]
    delegates = [load_delegate(delegate)] if delegate else []
    runners: dict[str, Any] = {}
    try:
        runners["unprotected"] = _Unprotected(model, num_threads, delegates)
        runners["shadownet"] = _Protected(out_dir, num_threads, delegate)
        runners["all-in-tee"] = _AllInTEE(tee_context, model, KERNELS_XNNPACK, specs, n_inputs)
        runners["all-in-tee-builtin"] = _AllInTEE(tee_context, model, KERNELS_BUILTIN, specs, n_inputs)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        clock = time.perf_counter
        total = warmup_runs + num_runs
        for run in range(total):
            progress(f"{name}: run {run + 1}/{total}{' (warm-up)' if run < warmup_runs else ''}", run, total)
            order = MODES[run % len(MODES):] + MODES[:run % len(MODES)]
            for mode in order:
                runner = runners[mode]
                t = clock()
                runner(inputs)
                elapsed = clock() - t
                if run >= warmup_runs:
                    times[mode].append(elapsed)
                    if mode == "shadownet":
                        runner.record()
        protected: _Protected = runners["shadownet"]
        error = _relative_error(protected.results, runners["unprotected"].results)
        memory = protected.model.stats()
        tee_memory = {mode: runners[mode].memory() for mode in ("all-in-tee", "all-in-tee-builtin")}
        streaming = None
        if throughput:
            progress(f"{name}: throughput", total, total + 1)
            frames = 2 * max(num_runs, 5)
            protected.close()  # its session and shared memory: the pipelined pair opens its own
            streaming = {mode: {"fps": _frames_per_second(lambda m=mode: runners[m](inputs), frames)}
                         for mode in ("unprotected", "all-in-tee", "all-in-tee-builtin")}
            streaming["shadownet"] = _pipelined_fps(out_dir, num_threads, delegate, inputs, frames)
            fps = streaming["shadownet"]["fps"]
            streaming["S/U"] = fps / streaming["unprotected"]["fps"] if fps is not None else None
    finally:
        for runner in runners.values():
            runner.close()
        shutil.rmtree(out_dir, ignore_errors=True)

    modes = {mode: _summary(times[mode]) for mode in MODES}
    modes["unprotected"]["secure_memory_mib"] = 0.0
    modes["shadownet"]["secure_memory_mib"] = memory.get("model_secure_memory", 0) / MIB
    for mode, (accounted, resident) in tee_memory.items():
        modes[mode]["secure_memory_mib"] = accounted / MIB
        modes[mode]["resident_growth_mib"] = resident / MIB
    stats = protected.stats
    part = {key: float(np.median([s[key] for s in stats])) * 1e3
            for key in ("accelerator_s", "ta_s", "transport_s")}
    median = modes["shadownet"]["median_ms"]
    breakdown = {"accelerator_ms": part["accelerator_s"], "tee_compute_ms": part["ta_s"],
                 "crossing_ms": part["transport_s"]}
    breakdown["other_ms"] = max(median - sum(breakdown.values()), 0.0)
    unprotected, tee = modes["unprotected"]["median_ms"], modes["all-in-tee"]["median_ms"]
    fixed = median - breakdown["accelerator_ms"]
    # None: shadownet's fixed part alone already takes longer than all-in-tee (no accelerator is enough).
    break_even = breakdown["accelerator_ms"] / (tee - fixed) if tee > fixed else None
    total_macs = sum(macs)
    return {
        "model": name,
        "rounds": len(manifest["rounds"]),
        "scheme": manifest["scheme"]["name"],
        "modes": modes,
        "shadownet": {
            "breakdown": breakdown,
            "world_switches": stats[-1]["world_switches"],
            "bytes_to_tee": stats[-1]["bytes_to_tee"],
            "bytes_from_tee": stats[-1]["bytes_from_tee"],
            "peak_secure_memory_mib": memory.get("model_secure_memory", 0) / MIB,
            "secure_memory_cap_mib": memory.get("secure_memory_cap", 0) / MIB,
            "macs_total": total_macs,
            "macs_offloaded": sum(macs[i] for i in offloaded),
            "macs_offloaded_share": sum(macs[i] for i in offloaded) / total_macs if total_macs else 0.0,
            "conversion_s": conversion_s,
            "relative_error": error,
        },
        "ratios": {"S/U": median / unprotected, "T/S": tee / median,
                   "T_builtin/S": modes["all-in-tee-builtin"]["median_ms"] / median},
        "break_even_k": break_even,
        "projected_ms": {str(k): breakdown["accelerator_ms"] / k + fixed for k in PROJECTED_K},
        **({"throughput": streaming} if streaming is not None else {}),
    }


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
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": memory, "python": platform.python_version(),
            "load_average": [round(x, 2) for x in load] if load else None}


def _sources(models: Sequence[str], workdir: Path) -> list[tuple[str, Path]]:
    """(name, .tflite path) per requested model: zoo names are exported (TensorFlow) into ``workdir``
    once and reused; anything else is a path to a ``.tflite``."""
    sources = []
    for item in models:
        if item in ZOO:
            path = workdir / f"{item}.tflite"
            if not path.exists():
                from models.zoo import export

                export(item, path, seed=0, verbose=False)
            sources.append((item, path))
        else:
            path = Path(item)
            if not path.is_file():
                raise ShadowNetError(f"{item} is neither a zoo model ({', '.join(ZOO)}) nor a .tflite file")
            sources.append((path.stem, path))
    return sources


class _Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, models: int, enabled: bool = True) -> None:
        self.models, self.done, self.enabled = models, 0, enabled
        self._last = 0.0

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

    def finish(self, label: str) -> None:
        """One model is done (or failed)."""
        self.done += 1
        self(label, 0, 1)
        if self.enabled and self.done == self.models:
            sys.stderr.write("\n")

    def clear(self) -> None:
        if self.enabled and self.done < self.models:
            sys.stderr.write("\n")


def run_bench(models: Sequence[str], *, scheme: str | None = None, num_threads: int = 2, num_runs: int = 20,
              warmup_runs: int = 3, delegate: str | None = None, workdir: str | os.PathLike | None = None,
              progress: bool = True, throughput: bool = False) -> dict[str, Any]:
    """Benchmark ``models`` (zoo names or ``.tflite`` paths); return the report (see ``bench_model``)."""
    import tee_sim

    if num_runs < 1 or warmup_runs < 0 or num_threads < 1:
        raise ValueError("--num_runs and --num_threads must be >= 1, --warmup_runs >= 0")
    temporary = workdir is None
    work = Path(tempfile.mkdtemp(prefix="shadownet-bench-")) if temporary else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    bar = _Progress(len(models), progress)
    try:
        sources = _sources(models, work)
        entries = []
        # The all-in-TEE baseline gets a secure world of its own, without a cap.
        with tee_sim.Context(memory_cap=NO_CAP) as tee_context:
            for name, path in sources:
                try:
                    entries.append(bench_model(name, path, work, scheme=scheme, num_threads=num_threads,
                                               num_runs=num_runs, warmup_runs=warmup_runs, delegate=delegate,
                                               tee_context=tee_context, progress=bar, throughput=throughput))
                    bar.finish(f"{name}: done")
                except ShadowNetError as exc:  # e.g. over the secure-memory cap: say so, bench the others
                    entries.append({"model": name, "error": str(exc)})
                    bar.finish(f"{name}: failed")
    finally:
        bar.clear()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    return {"format": "shadownet-bench", "version": 1, "machine": machine(),
            "settings": {"scheme": scheme or "default", "num_threads": num_threads, "num_runs": num_runs,
                         "warmup_runs": warmup_runs, "delegate": delegate, "throughput": throughput},
            "note": "accelerator and TEE are the same CPU here: the ratios compare software paths, the "
                    "break-even k and the projections say how fast an accelerator must be",
            "models": entries}


# --- output -------------------------------------------------------------------------------------------------
def _k(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _fps(value: float | None, width: int = 0, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def _done(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in report["models"] if "error" not in e]


def _failures(report: dict[str, Any]) -> list[str]:
    notes = [f"{e['model']}: not measured: {e['error']}" for e in report["models"] if "error" in e]
    notes += [f"{e['model']}: shadownet throughput not measured: {e['throughput']['shadownet']['error']}"
              for e in _done(report) if e.get("throughput", {}).get("shadownet", {}).get("error")]
    return notes


def table(report: dict[str, Any]) -> str:
    """The report as plain-text tables (stdout)."""
    lines = []
    head = f"{'model':<12} {'mode':<19} {'min ms':>9} {'median ms':>10} {'max ms':>9} {'secure MiB':>11}"
    lines += [head, "-" * len(head)]
    for e in _done(report):
        for mode in MODES:
            m = e["modes"][mode]
            lines.append(f"{e['model']:<12} {mode:<19} {m['min_ms']:9.2f} {m['median_ms']:10.2f} "
                         f"{m['max_ms']:9.2f} {m['secure_memory_mib']:11.1f}")
    lines.append("")
    head = (f"{'model':<12} {'S/U':>5} {'T/S':>5} {'accel':>7} {'TEE':>7} {'cross':>6} {'other':>6} "
            f"{'switch':>6} {'MB/inf':>7} {'MACs off':>8} {'conv s':>6} {'k*':>6} "
            + " ".join(f"{'S(k=' + str(k) + ')':>9}" for k in PROJECTED_K))
    lines += [head, "-" * len(head)]
    for e in _done(report):
        s, b = e["shadownet"], e["shadownet"]["breakdown"]
        traffic = (s["bytes_to_tee"] + s["bytes_from_tee"]) / 1e6
        r = e["ratios"]
        lines.append(
            f"{e['model']:<12} {r['S/U']:5.2f} {r['T/S']:5.2f} {b['accelerator_ms']:7.2f} "
            f"{b['tee_compute_ms']:7.2f} {b['crossing_ms']:6.2f} {b['other_ms']:6.2f} "
            f"{s['world_switches']:6d} {traffic:7.1f} {s['macs_offloaded_share'] * 100:7.2f}% "
            f"{s['conversion_s']:6.2f} {_k(e['break_even_k']):>6} "
            + " ".join(f"{e['projected_ms'][str(k)]:9.2f}" for k in PROJECTED_K))
    streaming = [e for e in _done(report) if "throughput" in e]
    if streaming:
        head = (f"{'model':<12} {'U fps':>8} {'S fps (2 in flight)':>20} {'T fps':>8} {'T builtin fps':>14} "
                f"{'S/U':>5}")
        lines += ["", head, "-" * len(head)]
        for e in streaming:
            x = e["throughput"]
            lines.append(f"{e['model']:<12} {x['unprotected']['fps']:8.1f} {_fps(x['shadownet']['fps'], 20)} "
                         f"{x['all-in-tee']['fps']:8.1f} {x['all-in-tee-builtin']['fps']:14.1f} "
                         f"{_fps(x['S/U'], 5, 2)}")
    lines += [""] + _failures(report)
    lines += ["", "S = shadownet, U = unprotected, T = all-in-tee (XNNPACK, one thread); times in ms "
              "(medians); accel/TEE/cross/other split S's median; k* = break-even accelerator speed vs T.",
              "Accelerator and TEE are the same CPU here: S/U and T/S compare software paths on one "
              "machine."]
    return "\n".join(lines)


def markdown(report: dict[str, Any], command: str | None = None) -> str:
    """The report as Markdown (``--markdown``; BENCHMARKS.md)."""
    m = report["machine"]
    s = report["settings"]
    out = [f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB RAM, Python {m['python']}, "
           f"load average at the end {m['load_average']}.",
           f"Settings: scheme {s['scheme']}, {s['num_threads']} threads, {s['num_runs']} runs after "
           f"{s['warmup_runs']} warm-up runs, delegate {s['delegate'] or 'none (XNNPACK)'}."]
    if command:
        out.append(f"Command: `{command}`")
    out += ["", "| model | mode | min ms | median ms | max ms | secure memory MiB |",
            "|---|---|---:|---:|---:|---:|"]
    for e in _done(report):
        for mode in MODES:
            x = e["modes"][mode]
            out.append(f"| {e['model']} | {mode} | {x['min_ms']:.2f} | {x['median_ms']:.2f} | "
                       f"{x['max_ms']:.2f} | {x['secure_memory_mib']:.1f} |")
    out += ["", "| model | rounds | S/U | T/S | accelerator ms | TEE ms | crossing ms | other ms "
            "| world switches | MB across / inference | MACs offloaded | conversion s | break-even k | "
            + " | ".join(f"S(k={k}) ms" for k in PROJECTED_K) + " |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PROJECTED_K)]
    for e in _done(report):
        x, b = e["shadownet"], e["shadownet"]["breakdown"]
        out.append(
            f"| {e['model']} | {e['rounds']} | {e['ratios']['S/U']:.2f} | {e['ratios']['T/S']:.2f} | "
            f"{b['accelerator_ms']:.2f} | {b['tee_compute_ms']:.2f} | {b['crossing_ms']:.2f} | "
            f"{b['other_ms']:.2f} | "
            f"{x['world_switches']} | {(x['bytes_to_tee'] + x['bytes_from_tee']) / 1e6:.1f} | "
            f"{x['macs_offloaded_share'] * 100:.2f}% | {x['conversion_s']:.2f} | {_k(e['break_even_k'])} | "
            + " | ".join(f"{e['projected_ms'][str(k)]:.2f}" for k in PROJECTED_K) + " |")
    streaming = [e for e in _done(report) if "throughput" in e]
    if streaming:
        out += ["", "Streaming throughput (frames/s; shadownet with two frames in flight: while one frame is "
                "in the TEE the other runs on the accelerator):", "",
                "| model | unprotected | shadownet | all-in-tee | all-in-tee-builtin "
                "| shadownet / unprotected |",
                "|---|---:|---:|---:|---:|---:|"]
        for e in streaming:
            x = e["throughput"]
            out.append(f"| {e['model']} | {x['unprotected']['fps']:.1f} | {_fps(x['shadownet']['fps'])} | "
                       f"{x['all-in-tee']['fps']:.1f} | {x['all-in-tee-builtin']['fps']:.1f} | "
                       f"{_fps(x['S/U'], 0, 2)} |")
    failures = _failures(report)
    if failures:
        out += [""] + [f"- {note}" for note in failures]
    out += ["", "S = shadownet, U = unprotected, T = all-in-tee with XNNPACK (one thread, in the secure "
            "world). The accelerator and the TEE are the same CPU on this machine, so S/U and T/S compare "
            "software paths; the break-even k is how many times faster than one TEE core the accelerator "
            "must be for shadownet to beat all-in-tee, and S(k) projects shadownet's latency on such an "
            "accelerator."]
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Stacked bars of shadownet's breakdown next to unprotected and the two all-in-TEE baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = _done(report)
    if not entries:
        raise ShadowNetError("nothing to plot: no model was measured")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ShadowNetError("--plot needs matplotlib, which is not installed (pip install matplotlib)") \
            from None


def bench_cli(args: argparse.Namespace) -> None:
    """``shadownet bench [--models A,B | FILE.tflite ...] [--scheme] [--num_threads] [--num_runs]
    [--warmup_runs] [--delegate] [--json F] [--markdown F] [--plot F.png] [--throughput]``."""
    if args.plot:
        _require_matplotlib()
    models = list(args.files or [])
    if args.models:
        models += [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        models = list(ZOO)
    report = run_bench(models, scheme=args.scheme, num_threads=args.num_threads, num_runs=args.num_runs,
                       warmup_runs=args.warmup_runs, delegate=args.delegate, workdir=args.workdir,
                       progress=True, throughput=args.throughput)
    report["command"] = "shadownet bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 1 else None
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=_json_default) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(report, report["command"]))
    if args.plot:
        plot(report, args.plot)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
