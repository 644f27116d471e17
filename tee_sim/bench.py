"""Benchmark of the world switch: ``python -m tee_sim.bench [--json FILE] [--settings HARD/TOTAL,...]``.

Prints, for the process transport:

- the empty ``invoke_command`` round trip, back to back and after an idle gap (the secure world has
  gone to sleep: the ShadowNet pattern, where accelerator work separates TEE entries);
- 1 MiB and 16 MiB tensors moved in and out (normal world copies in, the TA copies input to output in
  shared memory, normal world copies out), against a plain ``memcpy`` of the same size;
- rounds of the ShadowNet pattern (one TEE entry, then one 2-thread LiteRT convolution): how much the
  convolution slows down against LiteRT alone (the secure world may still be spinning while it runs),
  what the TEE entry costs, and the whole round, per poll-window setting.

Figures are medians over interleaved repetitions; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from tee_sim import Context, MemRef
from tee_sim.registry import TEST_TA_UUID
from tee_sim.testing_ta import Cmd


def _quantiles(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    return {"median_us": float(np.median(a)), "p90_us": float(np.percentile(a, 90)), "n": len(a)}


def round_trip(session: Any, n: int, gap_s: float = 0.0) -> dict[str, float]:
    for _ in range(min(n, 200)):
        session.invoke_command(Cmd.NOTHING)
    samples = []
    for _ in range(n):
        if gap_s:
            time.sleep(gap_s)
        start = time.perf_counter_ns()
        session.invoke_command(Cmd.NOTHING)
        samples.append(time.perf_counter_ns() - start)
    return _quantiles(samples)


def throughput(context: Context, session: Any, size: int, repeats: int) -> dict[str, float]:
    shm = context.register_shared_memory(2 * size)
    source = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    result = np.empty_like(source)
    shm_in, shm_out = shm.ndarray(np.uint8, size, 0), shm.ndarray(np.uint8, size, size)
    params = [MemRef(shm, 0, size, "in"), MemRef(shm, size, size, "out")]
    times, memcpy = [], []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        np.copyto(shm_in, source)
        session.invoke_command(Cmd.COPY, params)
        np.copyto(result, shm_out)
        times.append(time.perf_counter_ns() - start)
        start = time.perf_counter_ns()
        np.copyto(result, source)
        memcpy.append(time.perf_counter_ns() - start)
    assert np.array_equal(result, source)
    shm.release()
    t, m = statistics.median(times) / 1e9, statistics.median(memcpy) / 1e9
    # Three copies of `size` happen (in, inside the TA, out); the reference is one memcpy.
    return {
        "size_bytes": size,
        "round_trip_ms": t * 1e3,
        "in_out_GBps": 2 * size / t / 1e9,
        "memcpy_GBps": size / m / 1e9,
        "copies": 3,
    }


def conv_model(height: int, width: int, cin: int, cout: int) -> bytes:
    """A one-conv float model (3x3, SAME, bias), written with LiteRT's own flatbuffer object API."""
    from ai_edge_litert import schema_py_generated as schema_fb
    from ai_edge_litert.tools import flatbuffer_utils

    rng = np.random.default_rng(0)
    arrays = [None, rng.standard_normal((cout, 3, 3, cin)).astype(np.float32) * 0.1,
              rng.standard_normal(cout).astype(np.float32), None]
    shapes = [(1, height, width, cin), arrays[1].shape, arrays[2].shape, (1, height, width, cout)]
    model = schema_fb.ModelT()
    model.version = 3
    model.buffers = [schema_fb.BufferT()]  # buffer 0: the empty one every model starts with
    sub = schema_fb.SubGraphT()
    sub.tensors = []
    for name, shape, array in zip(("x", "w", "b", "y"), shapes, arrays, strict=True):
        tensor = schema_fb.TensorT()
        tensor.name, tensor.shape, tensor.type = name.encode(), list(shape), schema_fb.TensorType.FLOAT32
        tensor.buffer = len(model.buffers)
        buffer = schema_fb.BufferT()
        if array is not None:
            buffer.data = np.frombuffer(array.tobytes(), np.uint8)
        model.buffers.append(buffer)
        sub.tensors.append(tensor)
    code = schema_fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema_fb.BuiltinOperator.CONV_2D
    code.version = 1
    model.operatorCodes = [code]
    op = schema_fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType = schema_fb.BuiltinOptions.Conv2DOptions
    options = op.builtinOptions = schema_fb.Conv2DOptionsT()
    options.padding, options.strideH, options.strideW = schema_fb.Padding.SAME, 1, 1
    sub.operators, sub.inputs, sub.outputs = [op], [0], [3]
    model.subgraphs = [sub]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


class LiteRT:
    def __init__(self, model: bytes, threads: int = 2) -> None:
        from ai_edge_litert.interpreter import Interpreter

        saved = os.dup(2)  # LiteRT's "Created TensorFlow Lite XNNPACK delegate" line: not on the terminal
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            self.interpreter = Interpreter(model_content=model, num_threads=threads)
            self.interpreter.allocate_tensors()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
        detail = self.interpreter.get_input_details()[0]
        x = np.random.default_rng(1).standard_normal(detail["shape"]).astype(np.float32)
        self.interpreter.set_tensor(detail["index"], x)
        for _ in range(5):
            self.interpreter.invoke()

    def timed(self) -> int:
        start = time.perf_counter_ns()
        self.interpreter.invoke()
        return time.perf_counter_ns() - start


def rounds(litert: LiteRT, session: Any, repeats: int, block: int) -> dict[str, float]:
    """The ShadowNet pattern, one TEE entry then one accelerator call per round, against LiteRT alone.

    Blocks of "alone" and "round" iterations are interleaved so that load drifting in from other
    processes hits both. The secure world's spin after each answer overlaps the LiteRT call.
    """
    alone, tee, accel, total = [], [], [], []
    for _ in range(repeats):
        for _ in range(block):
            alone.append(litert.timed())
        for _ in range(block):
            start = time.perf_counter_ns()
            session.invoke_command(Cmd.NOTHING)
            middle = time.perf_counter_ns()
            litert.interpreter.invoke()
            end = time.perf_counter_ns()
            tee.append(middle - start)
            accel.append(end - middle)
            total.append(end - start)
    base = statistics.median(alone)
    return {
        "litert_alone_us": base / 1000,
        "litert_in_rounds_us": statistics.median(accel) / 1000,
        "litert_slowdown_pct": 100 * (statistics.median(accel) / base - 1),
        "tee_entry_us": statistics.median(tee) / 1000,
        "tee_entry_p90_us": float(np.percentile(tee, 90)) / 1000,
        "round_us": statistics.median(total) / 1000,
    }


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:  # first field: nanoseconds spent on a CPU
        return int(f.read().split()[0])


def spin_theft(models: dict[str, LiteRT], home: str, repeats: int) -> dict[str, Any]:
    """Upper bound of what a polling secure world takes from LiteRT: conv time while the secure world
    sleeps, yield-spins or hard-spins during the *whole* LiteRT call (a window longer than any call),
    and the CPU time the secure world got meanwhile (robust to other load on the machine)."""
    modes = {"asleep": (0.0, 0.0), "yield_spin": (0.0, 1e9), "hard_spin": (1e9, 1e9)}
    samples: dict[str, dict[str, list[int]]] = {m: {name: [] for name in models} for m in modes}
    cpu = {m: [0, 0] for m in modes}  # secure world's CPU ns, wall ns
    for _ in range(repeats):
        for mode, (hard, window) in modes.items():
            with Context("process", home=home, spin_us=window, hard_spin_us=hard, caller_spin_us=0) as ctx:
                with ctx.open_session(TEST_TA_UUID) as session:
                    session.invoke_command(Cmd.NOTHING)  # from here on the secure world polls (or sleeps)
                    pid = ctx.secure_world_pid
                    assert pid is not None
                    cpu_start, wall_start = _cpu_ns(pid), time.perf_counter_ns()
                    for name, litert in models.items():
                        samples[mode][name].extend(litert.timed() for _ in range(_BLOCK[name]))
                    cpu[mode][0] += _cpu_ns(pid) - cpu_start
                    cpu[mode][1] += time.perf_counter_ns() - wall_start
    result: dict[str, Any] = {
        "secure_world_cpu_pct_of_one_core": {m: 100 * c / w for m, (c, w) in cpu.items()}
    }
    for name in models:
        base = statistics.median(samples["asleep"][name])
        result[name] = {"asleep_us": base / 1000}
        for mode in ("yield_spin", "hard_spin"):
            median = statistics.median(samples[mode][name])
            result[name][f"{mode}_us"] = median / 1000
            result[name][f"{mode}_slowdown_pct"] = 100 * (median / base - 1)
    return result


_BLOCK = {"small_conv_32x32x16_to_32": 40, "medium_conv_56x56x64_to_64": 4}


def run(settings: list[tuple[float, float]], caller_spin: float | None, quick: bool) -> dict[str, Any]:
    n = 1000 if quick else 5000
    repeats = 4 if quick else 12
    home = tempfile.mkdtemp(prefix="tee_sim-bench-")
    results: dict[str, Any] = {
        "machine_cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "settings": [],
    }
    models = {
        "small_conv_32x32x16_to_32": LiteRT(conv_model(32, 32, 16, 32)),
        "medium_conv_56x56x64_to_64": LiteRT(conv_model(56, 56, 64, 64)),
    }
    for hard, window in settings:
        with (
            Context(
                "process", home=home, spin_us=window, hard_spin_us=hard, caller_spin_us=caller_spin
            ) as ctx,
            ctx.open_session(TEST_TA_UUID) as session,
        ):
            entry: dict[str, Any] = {
                "spin_us": window,
                "hard_spin_us": hard,
                "caller_spin_us": ctx._transport.caller_spin_us,
                "empty_round_trip": round_trip(session, n),
                "round_trip_after_1ms_idle": round_trip(session, n // 10, gap_s=0.001),
                "rounds": {
                    name: rounds(m, session, repeats, _BLOCK[name] // (2 if quick else 1))
                    for name, m in models.items()
                },
            }
            results["settings"].append(entry)
            _print_setting(entry)
    results["spin_theft"] = spin_theft(models, home, 3 if quick else 8)
    print("LiteRT while the secure world polls through the whole call (upper bound of the theft):")
    share = results["spin_theft"]["secure_world_cpu_pct_of_one_core"]
    print(
        f"  secure world's CPU time meanwhile: asleep {share['asleep']:.1f}%, yield-spinning "
        f"{share['yield_spin']:.1f}%, hard-spinning {share['hard_spin']:.1f}% of one core"
    )
    for name in models:
        t = results["spin_theft"][name]
        print(
            f"  {name}: asleep {t['asleep_us']:.0f} us, yield-spinning {t['yield_spin_slowdown_pct']:+.1f}%, "
            f"hard-spinning {t['hard_spin_slowdown_pct']:+.1f}%"
        )
    with Context("process", home=home) as ctx, ctx.open_session(TEST_TA_UUID) as session:
        results["throughput"] = [
            throughput(ctx, session, size, 10 if quick else 30) for size in (1 << 20, 16 << 20)
        ]
    print("Tensors in and out (normal world copies in, TA copies in shared memory, normal world copies out):")
    for t in results["throughput"]:
        print(
            f"  {t['size_bytes'] >> 20:>2} MiB: {t['round_trip_ms']:.2f} ms per round trip, "
            f"{t['in_out_GBps']:.2f} GB/s in+out (one memcpy here: {t['memcpy_GBps']:.2f} GB/s)"
        )
    results["load_avg_at_end"] = os.getloadavg()
    print(
        f"load average (1, 5, 15 min) at start {results['load_avg_at_start']}, "
        f"at end {results['load_avg_at_end']}"
    )
    return results


def _print_setting(entry: dict[str, Any]) -> None:
    rt, idle = entry["empty_round_trip"], entry["round_trip_after_1ms_idle"]
    print(
        f"secure world polls {entry['spin_us']:g} us (first {min(entry['hard_spin_us'], entry['spin_us']):g} "
        f"without yielding), caller {entry['caller_spin_us']:g} us: "
        f"empty round trip median {rt['median_us']:.1f} us "
        f"(p90 {rt['p90_us']:.1f}); after 1 ms idle {idle['median_us']:.1f} us (p90 {idle['p90_us']:.1f})"
    )
    for name, r in entry["rounds"].items():
        print(
            f"  rounds of TEE entry + {name}: LiteRT {r['litert_in_rounds_us']:.0f} us vs alone "
            f"{r['litert_alone_us']:.0f} us ({r['litert_slowdown_pct']:+.1f}%), "
            f"TEE entry {r['tee_entry_us']:.1f} us "
            f"(p90 {r['tee_entry_p90_us']:.1f}), round {r['round_us']:.0f} us"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tee_sim.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--settings",
        default="0/0,0/200,0/1000,0/5000,20/1000,1000/1000",
        help="secure-world poll windows to compare, HARD/TOTAL microseconds each (HARD: without yielding)",
    )
    parser.add_argument("--caller-spin", type=float, default=None, help="normal-world spin window (us)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    settings = [(float(h), float(w)) for h, w in (x.split("/") for x in args.settings.split(","))]
    results = run(settings, args.caller_spin, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
