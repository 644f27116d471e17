"""The measuring side of ``shadownet bench`` (the method is in ``shadownet.bench``'s docstring):
``bench_model``, one model's report entry, with what it measures - the modes' steady timing
(``steady_seconds``), the verified copy alone, the fidelity spread and multiply-adds on the original graph
(``count_macs``). The modes' runners are in ``shadownet.bench_runners``.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters import linear
from converters.fidelity import relative_error
from shadownet.bench_runners import AllInTEE, Protected, Unprotected
from shadownet.bench_throughput import MIB, frames_per_second, one_at_a_time_fps, pipelined_fps
from shadownet.exceptions import SecureMemoryError, ShadowNetError
from shadownet.model_io import random_input

MODES = ("unprotected", "shadownet", "all-in-tee", "all-in-tee-builtin")
VERIFY_MODE = "shadownet-verify"  # with ``--verify``: the same artifacts, every accelerator result checked
PROJECTED_K = (5, 20)
FIDELITY_TARGET = 1e-4  # issue 4: worst relative error against LiteRT on the original
FIDELITY_INPUTS, FIDELITY_REPEATS = 8, 4  # the spread: inputs, protected inferences of each (fresh masks)


# --- multiply-adds ------------------------------------------------------------------------------------------
# Ops whose every output element costs one multiply(-add); ops not listed here and not linear move, compare
# or select data (copies, max pools, ReLU) and cost none.
_ELEMENTWISE_MACS = frozenset({"ADD", "SUB", "MUL", "DIV", "SQUARED_DIFFERENCE", "LOGISTIC", "TANH",
                               "SOFTMAX", "LOG_SOFTMAX", "HARD_SWISH", "PRELU", "LEAKY_RELU", "ELU", "GELU",
                               "RESIZE_BILINEAR", "L2_NORMALIZATION"})


def count_macs(graph: Any) -> list[int]:
    """Multiply-adds of each op of a (normalized) graph: a convolution costs ``kh * kw * C_in`` per output
    element (depthwise ``kh * kw``), a dense layer its input width (``converters.linear.macs``), a mean /
    average pool one per input element, elementwise arithmetic one per output element; data movement
    nothing."""
    macs = []
    for op in graph.ops:
        tensors = graph.tensors
        out = int(np.prod(tensors[op.outputs[0]].shape, dtype=np.int64)) if op.outputs else 0
        shape_in = tensors[op.inputs[0]].shape if op.inputs and op.inputs[0] >= 0 else ()
        weights = tensors[op.inputs[1]].shape if len(op.inputs) > 1 and op.inputs[1] >= 0 else ()
        if len(weights) == {"CONV_2D": 4, "DEPTHWISE_CONV_2D": 4, "FULLY_CONNECTED": 2}.get(op.kind):
            macs.append(linear.macs(op.kind, tensors[op.outputs[0]].shape, weights))
        elif op.kind == "TRANSPOSE_CONV" and len(op.inputs) > 2:
            w = tensors[op.inputs[1]].shape
            x = tensors[op.inputs[2]].shape
            macs.append(int(np.prod(x, dtype=np.int64)) * w[0] * w[1] * w[2])
        elif op.kind == "BATCH_MATMUL" and len(shape_in) >= 2:  # adj_x: the left operand transposed
            macs.append(out * shape_in[-2 if getattr(op.options, "adjX", False) else -1])
        elif op.kind in ("MEAN", "SUM", "AVERAGE_POOL_2D", "L2_POOL_2D"):
            macs.append(int(np.prod(shape_in, dtype=np.int64)) if op.kind in ("MEAN", "SUM") else
                        out * op.options.filterHeight * op.options.filterWidth)
        elif op.kind in _ELEMENTWISE_MACS:
            macs.append(out)
        else:
            macs.append(0)
    return macs


# --- timing -----------------------------------------------------------------------------------------------
def steady_seconds(call: Callable[[], Any], between: Callable[[], Any] | None = None) -> float:
    """Seconds of one ``call()`` made right after an untimed one (and ``between()``, untimed, after that:
    a protected model's refill of the one-time masks it used): its steady state, as an app that runs it
    frame after frame sees it, whatever ran before. Timing the first call after another mode flattered
    S/U: ResNet-44's unprotected median was 3.3-3.4 ms right after all-in-tee-builtin against 1.8-1.9 ms
    after a call of its own, while shadownet's moved by 10%. (``shadownet demo`` times with it too.)"""
    call()
    if between is not None:
        between()
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def protected_dir(workdir: Path, name: str) -> Path:
    """Where the bench writes a model's protected copy."""
    return workdir / f"{name}.protected"


def _saturated(output: np.ndarray) -> bool:
    """Whether an output of several values has at most one of its finite values above 1e-6 of the largest
    (a one-hot softmax), or all zero: errors relative to its largest then say little (a helper's
    MobileNetV3, made for inputs in [0, 255], reported 4e-38 on the bench's [0, 1] input). A single value
    is judged only when zero; NaN and inf are not judged (the error compares finite values)."""
    if not np.issubdtype(output.dtype, np.floating):
        return False
    magnitude = np.abs(output.astype(np.float64))
    magnitude = magnitude[np.isfinite(magnitude)]
    if magnitude.size <= 1:
        return magnitude.size == 1 and magnitude[0] == 0 and output.size == 1
    return bool(np.count_nonzero(magnitude > 1e-6 * magnitude.max()) <= 1)


def _steady(runner: Any, inputs: Sequence[np.ndarray]) -> float:
    """``steady_seconds`` of one mode's call on ``inputs``, a protected model's refill between."""
    return steady_seconds(lambda: runner(inputs), runner.refill if isinstance(runner, Protected) else None)


def _verify_alone(out_dir: Path, num_threads: int, delegate: str | None, unprotected: Any,
                  inputs: Sequence[np.ndarray], warmup_runs: int, num_runs: int,
                  progress: Callable[[str, int, int], None], name: str, total: int
                  ) -> tuple[str | None, dict[str, Any] | None]:
    """The verified copy measured on its own (it did not fit next to shadownet): ``(error, None)`` when it
    does not fit alone either, else ``(None, {"verified", "times", "unprotected_median_ms"})``, its runs
    alternated with ``unprotected``'s."""
    try:
        checked = Protected(out_dir, num_threads, delegate, inputs, verify=True)
    except SecureMemoryError as exc:
        return f"does not fit in the secure-memory cap, alone or next to shadownet: {exc}", None
    times: list[float] = []
    plain: list[float] = []
    try:
        for run in range(warmup_runs + num_runs):
            progress(f"{name}: {VERIFY_MODE} alone, run {run + 1}/{warmup_runs + num_runs}", total, total + 1)
            for runner, into in ((unprotected, plain), (checked, times)):
                elapsed = _steady(runner, inputs)
                if run >= warmup_runs:
                    into.append(elapsed)
                    if runner is checked:
                        checked.record()
            checked.refill()
        verified = {"memory": checked.model.stats(), "stats": checked.stats,
                    "error": relative_error(checked.results, unprotected.results)}
    finally:
        checked.close()
    return None, {"verified": verified, "times": times,
                  "unprotected_median_ms": float(np.median(plain)) * 1e3}


# --- one model ----------------------------------------------------------------------------------------------
def _fidelity_spread(protected: Protected, unprotected: Any, builtin: Any, specs: Sequence[tuple[Any, Any]],
                     n_inputs: int) -> dict[str, Any]:
    """The protected model's relative error against unprotected LiteRT over ``FIDELITY_INPUTS`` random
    inputs (uniform in [0, 1], as the bench's own), ``FIDELITY_REPEATS`` inferences of each with fresh
    one-time masks: its median, its worst and the share above ``FIDELITY_TARGET`` - the tail one input
    does not show - next to the worst disagreement of LiteRT's builtin kernels with XNNPACK on them."""
    rng = np.random.default_rng(1)
    errors, floor = [], 0.0
    for _ in range(FIDELITY_INPUTS):
        x = [random_input(rng, shape, dtype) for shape, dtype in specs[:n_inputs]]
        unprotected(x)
        builtin(x)
        floor = max(floor, relative_error(builtin.results, unprotected.results))
        for _ in range(FIDELITY_REPEATS):
            protected.refill()
            protected(x)
            errors.append(relative_error(protected.results, unprotected.results))
    return {"inputs": FIDELITY_INPUTS, "inferences": len(errors), "median": float(np.median(errors)),
            "max": float(np.max(errors)),
            "above_target": float(np.mean(np.asarray(errors) > FIDELITY_TARGET)),
            "builtin_vs_xnnpack_max": floor}


def _summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"min_ms": float(ms.min()), "median_ms": float(np.median(ms)), "max_ms": float(ms.max()),
            "runs": len(ms)}


def _finite(value: Any) -> float | None:
    """A float for strict JSON: None for a missing, NaN or infinite figure."""
    return float(value) if value is not None and np.isfinite(value) else None


def _pool(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """A protected model's pool of per-inference material (``ProtectedModel.stats()['pool']``) at the end,
    plus what the timed runs alone did: entries made (``made_timed``) and made on an inference's path
    (``synchronous_timed``), from the counters before the first timed run (``before``)."""
    pool = after.get("pool")
    if not pool or not pool["capacity"]:  # none (the paper's scheme without verify: a capacity of 0)
        return None
    start = before.get("pool") or {}
    per_inference = pool.get("offline_s_per_inference")
    return {**pool, "offline_ms_per_inference": per_inference * 1e3 if per_inference is not None else None,
            "made_timed": max(pool["made"] - start.get("made", 0), 0),
            "synchronous_timed": max(pool["synchronous"] - start.get("synchronous", 0), 0)}


def bench_model(name: str, model_path: Path, workdir: Path, *, scheme: str | None, num_threads: int,
                num_runs: int, warmup_runs: int, delegate: str | None, tee_context: Any,
                progress: Callable[[str, int, int], None], throughput: bool = False, verify: bool = False,
                mask_rounds: str | None = None, signature: str | None = None) -> dict[str, Any]:
    """Benchmark one model (a ``.tflite``, a Keras file or a SavedModel, at its signature ``signature``
    when it has several - a model of one ignores it -, as ``convert`` reads it): convert it (one-time
    masks on the rounds ``mask_rounds`` says; None: the converter's default), run the modes interleaved
    (``verify``: also ``shadownet-verify``), return its report entry. ``SecureMemoryError`` (a
    ``ShadowNetError``) when the protected model does not fit in the secure world's cap; a verified copy
    that does not fit is reported in the entry instead."""
    from ai_edge_litert.interpreter import Interpreter

    from converters import convert
    from converters.normalize import normalize
    from converters.original_model import one_signature, planning_graph, tflite_bytes
    from converters.per_inference import DEFAULT_MASK_ROUNDS, parse_mask_rounds
    from converters.schemes import get_scheme, group_min_channels, partition_for
    from shadownet.delegates import load_delegates
    from tee_sim.ta_all_in_tee_commands import KERNELS_BUILTIN, KERNELS_XNNPACK

    # The same .tflite for every mode (the unprotected one runs it as LiteRT would)
    given = tflite_bytes(model_path, signature if model_path.is_dir() else None, several_only=True)
    model = one_signature(given, signature, several_only=True)
    chosen = get_scheme(scheme)
    graph = normalize(planning_graph(model), group_min_channels(chosen))
    macs = count_macs(graph)
    part = partition_for(graph, chosen)
    offloaded = part.offloaded
    policy = mask_rounds if mask_rounds is not None else DEFAULT_MASK_ROUNDS
    try:  # rounds this model does not have: this model's error, the others still run
        parse_mask_rounds(mask_rounds, len(part.rounds))
    except ValueError as exc:
        raise ShadowNetError(f"--mask-rounds {policy}: {exc}") from None
    out_dir = protected_dir(workdir, name)
    progress(f"{name}: converting", 0, 1)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # the report's notes say them, not mid-progress:
        warnings.simplefilter("always")  # a user's model's diagnosis was dropped (a helper's probe)
        manifest = convert(model, out_dir, scheme=scheme, force=True, mask_rounds=mask_rounds)
    conversion_s = time.perf_counter() - start
    conversion_warnings = list(dict.fromkeys(str(w.message) for w in caught))

    details = Interpreter(model_content=model)
    specs = [(tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]))
             for d in details.get_input_details() + details.get_output_details()]
    n_inputs = len(details.get_input_details())
    rng = np.random.default_rng(0)
    inputs = [random_input(rng, s, t) for s, t in specs[:n_inputs]]
    delegates = load_delegates(delegate)
    masks = manifest.get("masks") or {}
    static = masks.get("static", True)
    runners: dict[str, Any] = {}
    verify_error = None
    verify_alone = False  # the verified copy did not fit next to shadownet: measured after it
    try:
        runners["unprotected"] = Unprotected(model, num_threads, delegates)
        try:
            runners["shadownet"] = Protected(out_dir, num_threads, delegate, inputs)
        except SecureMemoryError as exc:  # e.g. one-time masks on more rounds than the cap holds
            # Not blamed on the policy: a model may fit under no policy (a large first layer: a probe).
            what = f"scheme {manifest['scheme']['name']}" + ("" if static else f", mask policy {policy!r}")
            raise SecureMemoryError(f"the protected model ({what}) does not fit in the secure-memory cap: "
                                    f"{exc}") from exc
        runners["all-in-tee"] = AllInTEE(tee_context, model, KERNELS_XNNPACK, specs, n_inputs)
        runners["all-in-tee-builtin"] = AllInTEE(tee_context, model, KERNELS_BUILTIN, specs, n_inputs)
        if verify:
            try:  # a second protected model: both must fit under the cap at once
                runners[VERIFY_MODE] = Protected(out_dir, num_threads, delegate, inputs, verify=True)
            except SecureMemoryError:
                verify_alone = True
        active = MODES + ((VERIFY_MODE,) if VERIFY_MODE in runners else ())
        times: dict[str, list[float]] = {mode: [] for mode in active}
        back_to_back: list[float] = []  # shadownet's accelerator rounds without the TEE between them
        one_core: list[float] = []  # the same work on one core (the break-even k's unit)
        before: dict[str, dict[str, Any]] = {}
        total = warmup_runs + num_runs
        for run in range(total):
            progress(f"{name}: run {run + 1}/{total}{' (warm-up)' if run < warmup_runs else ''}", run, total)
            if run == warmup_runs:  # the pools' counters before the timed runs (outside any timing)
                before = {mode: runners[mode].model.stats() for mode in active
                          if isinstance(runners[mode], Protected)}
            order = active[run % len(active):] + active[:run % len(active)]
            for mode in order:
                runner = runners[mode]
                elapsed = _steady(runner, inputs)
                if run >= warmup_runs:
                    times[mode].append(elapsed)
                    if isinstance(runner, Protected):
                        runner.record()
                if isinstance(runner, Protected):
                    runner.refill()
                if mode == "shadownet" and run >= warmup_runs:
                    back_to_back.append(runner.rounds_back_to_back())
                    # Its steady state, as every mode's (cold: MiniVGG +28%, a review)
                    one_core.append(steady_seconds(runner.rounds_on_one_core))
        protected: Protected = runners["shadownet"]
        # Rounds the accelerator runs on one thread (shadownet.accelerator: timed at load, then tried)
        one_thread = sum(t == 1 for t in getattr(protected.model.accelerator, "round_threads", ()))
        error = relative_error(protected.results, runners["unprotected"].results)
        # The same model, input and float32, on LiteRT's other kernels: how far two honest float32
        # computations of the original already disagree (the floor the protected error sits on).
        floor = relative_error(runners["all-in-tee-builtin"].results, runners["unprotected"].results)
        saturated = all(_saturated(y) for y in runners["unprotected"].results)
        checked: Protected | None = runners.pop(VERIFY_MODE, None)
        verified = None
        if checked is not None:
            # The TA reports its secure memory as a whole (every session): both models' now. Closing the
            # verified copy first leaves shadownet's figures as they are without --verify.
            verified = {"memory": checked.model.stats(), "stats": checked.stats,
                        "error": relative_error(checked.results, runners["unprotected"].results)}
            checked.close()
        memory = protected.model.stats()  # the pool's counters: the timed runs', before the spread's
        tee_memory = {mode: runners[mode].memory() for mode in ("all-in-tee", "all-in-tee-builtin")}
        progress(f"{name}: fidelity over {FIDELITY_INPUTS * FIDELITY_REPEATS} inferences", total, total + 1)
        spread = _fidelity_spread(protected, runners["unprotected"], runners["all-in-tee-builtin"], specs,
                                  n_inputs)
        protected.refill()
        sequential = None
        streaming = None
        if throughput:
            progress(f"{name}: throughput", total, total + 1)
            frames = 2 * max(num_runs, 5)
            streaming = {mode: {"fps": frames_per_second(lambda m=mode: runners[m](inputs), frames)}
                         for mode in ("unprotected", "all-in-tee", "all-in-tee-builtin")}
            one = one_at_a_time_fps(lambda: protected(inputs), protected.refill, frames)
            protected.close()  # its session and shared memory: the pipelined pair opens its own
            streaming["shadownet"] = {**pipelined_fps(out_dir, num_threads, delegate, inputs, frames),
                                      "one_at_a_time_fps": one}
            fps, unprotected = streaming["shadownet"]["fps"], streaming["unprotected"]["fps"]
            streaming["S/U"] = fps / unprotected if fps is not None else None
            streaming["S/U one at a time"] = one / unprotected
        if verify_alone:
            # Not both under the cap at once: shadownet closed (after its throughput, which runs it), the
            # verified copy alone, its runs alternated with unprotected's; the overhead compares each with
            # its own phase's unprotected median.
            protected.close()
            verify_error, sequential = _verify_alone(out_dir, num_threads, delegate, runners["unprotected"],
                                                     inputs, warmup_runs, num_runs, progress, name, total)
            if sequential is not None:
                verified = sequential.pop("verified")
                times[VERIFY_MODE] = sequential.pop("times")
                active = (*active, VERIFY_MODE)
    finally:
        for runner in runners.values():
            runner.close()
        shutil.rmtree(out_dir, ignore_errors=True)

    modes = {mode: _summary(times[mode]) for mode in active}
    modes["unprotected"]["secure_memory_mib"] = 0.0
    modes["shadownet"]["secure_memory_mib"] = memory.get("model_secure_memory", 0) / MIB
    if verified is not None:  # what the verified copy added to the TA's secure memory (alone: all of it)
        both = verified["memory"].get("model_secure_memory", 0)
        alone = 0 if sequential is not None else memory.get("model_secure_memory", 0)
        modes[VERIFY_MODE]["secure_memory_mib"] = max(both - alone, 0) / MIB
        # Beside shadownet it is an increment: the two sessions share the model's program, so the verified
        # copy alone holds more (MobileNet 19.2 MiB against +17.4; a helper's review). The tables mark it.
        modes[VERIFY_MODE]["secure_memory_added"] = sequential is None
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
    # k: how many times faster than one TEE core the accelerator must be - its work timed on one core, as
    # all-in-tee runs (the accelerator's own time is on num_threads). None: shadownet's fixed part alone
    # already takes longer than all-in-tee (no accelerator is enough).
    on_one_core = float(np.median(one_core)) * 1e3
    break_even = on_one_core / (tee - fixed) if tee > fixed else None
    total_macs = sum(macs)
    one_time = {"policy": masks.get("policy"), "one_time_rounds": list(masks.get("one_time_rounds") or []),
                "pool": _pool(before.get("shadownet", {}), memory),
                "per_inference_secure_memory_mib": memory.get("per_inference_secure_memory", 0) / MIB}
    checks: dict[str, Any] | None = None
    if verify_error is not None:
        checks = {"error": verify_error}
    elif verified is not None:
        figures = verified["memory"].get("verify") or {}
        overhead = modes[VERIFY_MODE]["median_ms"] / median - 1
        if sequential is not None:  # V / U (its phase) against S / U (the interleaved runs)
            overhead = (modes[VERIFY_MODE]["median_ms"] / sequential["unprotected_median_ms"]) \
                / (median / modes["unprotected"]["median_ms"]) - 1
        checks = {
            "median_ms": modes[VERIFY_MODE]["median_ms"],
            "overhead": overhead,
            "sequential": sequential is not None,
            # Alone, its overhead is against its own phase's unprotected median: kept, so it can be checked.
            "sequential_unprotected_median_ms": sequential["unprotected_median_ms"] if sequential else None,
            "tee_compute_ms": float(np.median([s["ta_s"] for s in verified["stats"]])) * 1e3,
            "worst_bound_log2": _finite(figures.get("worst_bound_log2")),
            "worst_ratio": _finite(figures.get("worst_ratio")),
            **{key: figures.get(key) for key in ("layers", "projections", "checked", "computed", "popped",
                                                 "capped", "unsplit_masked_rounds")},
            "relative_error": verified["error"],
            "pool": _pool(before.get(VERIFY_MODE, {}), verified["memory"]),
            "per_inference_secure_memory_mib":
                verified["memory"].get("per_inference_secure_memory", 0) / MIB,
        }
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
            "conversion_warnings": conversion_warnings,
            "accelerator_back_to_back_ms": float(np.median(back_to_back)) * 1e3,
            "accelerator_one_core_ms": on_one_core,
            "rounds_on_one_thread": one_thread,
            "relative_error": error,
            "builtin_vs_xnnpack_error": floor,
            "output_saturated": saturated,
            "fidelity_spread": spread,
        },
        "ratios": {"S/U": median / unprotected, "T/S": tee / median,
                   "T_builtin/S": modes["all-in-tee-builtin"]["median_ms"] / median},
        "break_even_k": break_even,
        "projected_ms": {str(k): on_one_core / k + fixed for k in PROJECTED_K},
        "masks": one_time,
        **({"verify": checks} if checks is not None else {}),
        **({"throughput": streaming} if streaming is not None else {}),
    }
