"""Benchmark of the world switch: ``python -m tee_sim.bench [--json FILE] [--spins 0,20,50,200]``.

Prints, for the process transport:

- the empty ``invoke_command`` round trip, back to back and after an idle gap (the secure world has
  gone to sleep: the ShadowNet pattern, where accelerator work separates TEE entries);
- 1 MiB and 16 MiB tensors moved in and out (normal world copies in, the TA copies input to output in
  shared memory, normal world copies out), against a plain ``memcpy`` of the same size;
- how much a 2-thread LiteRT convolution slows down when it runs right after each TEE call (the secure
  world is still spinning then) and while another thread keeps calling the TEE, per spin setting.

Figures are medians over interleaved repetitions; on a shared machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
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
    """A one-conv float model (3x3, SAME, bias), built without TensorFlow when the graph layer is there."""
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((cout, 3, 3, cin)).astype(np.float32) * 0.1
    bias = rng.standard_normal(cout).astype(np.float32)
    try:
        from ai_edge_litert import schema_py_generated as schema_fb

        from converters.graph import Graph, write_model
    except ImportError:
        return _conv_model_tf(height, width, cin, cout, weights, bias)
    graph = Graph()
    x = graph.add_tensor("x", (1, height, width, cin), np.float32)
    w = graph.add_tensor("w", weights.shape, np.float32, weights)
    b = graph.add_tensor("b", bias.shape, np.float32, bias)
    y = graph.add_tensor("y", (1, height, width, cout), np.float32)
    graph.add_op(
        "CONV_2D",
        [x, w, b],
        [y],
        schema_fb.Conv2DOptionsT(padding=schema_fb.Padding.SAME, strideW=1, strideH=1),
    )
    graph.inputs, graph.outputs = [x], [y]
    return write_model(graph)


def _conv_model_tf(
    height: int, width: int, cin: int, cout: int, weights: np.ndarray, bias: np.ndarray
) -> bytes:
    import tensorflow as tf

    layer = tf.keras.layers.Conv2D(cout, 3, padding="same")
    model = tf.keras.Sequential([tf.keras.Input((height, width, cin)), layer])
    layer.set_weights([weights.transpose(1, 2, 3, 0), bias])
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


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


def slowdown(litert: LiteRT, session: Any, rounds: int, block: int) -> dict[str, float]:
    """LiteRT invoke time alone vs right after a TEE call vs with another thread calling the TEE."""
    alone, after_tee, background = [], [], []
    for _ in range(rounds):  # interleaved blocks, so drifting load from other processes hits all three
        for _ in range(block):
            alone.append(litert.timed())
        for _ in range(block):
            session.invoke_command(Cmd.NOTHING)
            after_tee.append(litert.timed())
        stop = threading.Event()
        thread = threading.Thread(target=_tee_traffic, args=(session, stop))
        thread.start()
        for _ in range(block):
            background.append(litert.timed())
        stop.set()
        thread.join()
    base = statistics.median(alone)
    return {
        "litert_alone_us": base / 1000,
        "after_tee_call_us": statistics.median(after_tee) / 1000,
        "slowdown_after_tee_call_pct": 100 * (statistics.median(after_tee) / base - 1),
        "with_tee_traffic_us": statistics.median(background) / 1000,
        "slowdown_with_tee_traffic_pct": 100 * (statistics.median(background) / base - 1),
    }


def _tee_traffic(session: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        session.invoke_command(Cmd.NOTHING)
        time.sleep(0.0005)  # a TEE entry every ~0.5 ms, as a second protected model would make


def run(spins: list[float], yields: list[bool], quick: bool) -> dict[str, Any]:
    n = 1000 if quick else 5000
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
    for spin_yield in yields:
        for spin in spins:
            with (
                Context("process", home=home, spin_us=spin, spin_yield=spin_yield) as ctx,
                ctx.open_session(TEST_TA_UUID) as session,
            ):
                entry: dict[str, Any] = {"spin_us": spin, "spin_yield": spin_yield}
                entry["empty_round_trip"] = round_trip(session, n)
                entry["round_trip_after_1ms_idle"] = round_trip(session, n // 10, gap_s=0.001)
                entry["litert"] = {
                    name: slowdown(m, session, rounds=3 if quick else 6, block=20 if quick else 40)
                    for name, m in models.items()
                }
                results["settings"].append(entry)
                _print_setting(entry)
    with Context("process", home=home) as ctx, ctx.open_session(TEST_TA_UUID) as session:
        results["throughput"] = [
            throughput(ctx, session, size, 10 if quick else 30) for size in (1 << 20, 16 << 20)
        ]
        for t in results["throughput"]:
            print(
                f"  {t['size_bytes'] >> 20:>2} MiB in+out: {t['round_trip_ms']:.2f} ms  "
                f"{t['in_out_GBps']:.2f} GB/s "
                f"(memcpy {t['memcpy_GBps']:.2f} GB/s; 3 copies per round trip)"
            )
    results["load_avg_at_end"] = os.getloadavg()
    return results


def _print_setting(entry: dict[str, Any]) -> None:
    rt, idle = entry["empty_round_trip"], entry["round_trip_after_1ms_idle"]
    print(
        f"spin {entry['spin_us']:g} us, yield {entry['spin_yield']}: empty round trip median "
        f"{rt['median_us']:.1f} us p90 {rt['p90_us']:.1f} us; "
        f"after 1 ms idle median {idle['median_us']:.1f} us "
        f"p90 {idle['p90_us']:.1f} us"
    )
    for name, s in entry["litert"].items():
        print(
            f"  {name}: alone {s['litert_alone_us']:.0f} us, right after a TEE call "
            f"{s['slowdown_after_tee_call_pct']:+.1f}%, "
            f"with TEE traffic {s['slowdown_with_tee_traffic_pct']:+.1f}%"
        )
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tee_sim.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--spins", default="0,20,50,200", help="spin windows to compare, in microseconds")
    parser.add_argument("--yield", dest="yields", default="1,0", help="spin with sched_yield: 1, 0 or both")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    spins = [float(s) for s in args.spins.split(",")]
    yields = [y.strip() == "1" for y in args.yields.split(",")]
    results = run(spins, yields, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
