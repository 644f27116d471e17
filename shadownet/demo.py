"""``shadownet demo``: the README's main job, end to end on this machine.

1. train MiniVGG on scikit-learn's handwritten digits, protect it, compare original vs protected test
   accuracy on the held-out split;
2. export MobileNet, protect it, compare protected vs unprotected latency (2 threads, medians of
   interleaved runs), world switches per inference, and agreement on random inputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from converters.fidelity import relative_error
from shadownet.files import working_directory

THREADS = 2
LATENCY_RUNS = 10
AGREEMENT_INPUTS = 4


def _progress(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _input_shape(path: Path) -> tuple[int, ...]:
    from ai_edge_litert.interpreter import Interpreter

    return tuple(int(d) for d in Interpreter(model_path=str(path)).get_input_details()[0]["shape"])


def _litert(path: Path, num_threads: int = THREADS) -> Callable[[np.ndarray], np.ndarray]:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    interpreter.allocate_tensors()
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        return interpreter.get_tensor(index_out)

    return run


def _reused(path: Path, train: str | None) -> bool:
    """Whether an export kept at ``path`` (and its test set, when trained) is reused."""
    from models.zoo import testset_path

    return path.is_file() and (train is None or Path(testset_path(path)).is_file())


def _export(name: str, path: Path, what: str, train: str | None = None) -> None:
    from models.zoo import export

    if _reused(path, train):
        _progress(f"reusing {path}")
        return
    _progress(f"{what} ...")
    export(name, str(path), seed=0, train=train)


def _protect(model: Path, out: Path, calibration: np.ndarray) -> float:
    """Convert, its masks sized on ``calibration`` (inputs like the ones the demo then feeds)."""
    from shadownet.api import convert

    start = time.perf_counter()
    convert(str(model), str(out), force=True, calibration=calibration)
    return time.perf_counter() - start


# What the demo writes in the work directory (checked before any work): the exports, reused when there, and
# the conversions' directories, replaced by each run.
DIGITS_MODEL, MOBILENET_MODEL = "minivgg_digits.tflite", "mobilenet.tflite"
DIGITS_OUT, MOBILENET_OUT = "minivgg_digits.protected", "mobilenet.protected"


def digits_accuracy(workdir: Path) -> dict[str, Any]:
    from models.zoo import testset_path
    from shadownet.runtime import load

    path = workdir / DIGITS_MODEL
    _export("minivgg", path, "training MiniVGG on scikit-learn's handwritten digits", train="digits")
    out = workdir / DIGITS_OUT
    _progress("protecting it (masks sized on 64 of the training images) ...")
    from models.digits import load_split

    seconds = _protect(path, out, load_split(seed=0)[0][:64])
    with np.load(testset_path(path)) as data:
        x, y = data["x"], data["y"]
    original = _litert(path, num_threads=1)
    with load(out, num_threads=1) as model:
        _progress(f"protected in {seconds:.1f} s ({model.num_rounds} rounds); classifying {len(y)} test "
                  "images with the original and the protected model ...")
        shape, dtype = model.inputs[0].shape, model.inputs[0].dtype
        plain = np.array([np.argmax(original(xi.reshape(shape).astype(dtype))) for xi in x])
        protected = np.array([np.argmax(model(xi.reshape(shape).astype(dtype))) for xi in x])
    return {"n": len(y), "original": float(np.mean(plain == y)), "protected": float(np.mean(protected == y)),
            "same_predictions": int(np.sum(plain == protected)), "rounds": model.num_rounds}


def mobilenet_latency(workdir: Path) -> dict[str, Any]:
    from shadownet.bench_measure import steady_seconds
    from shadownet.runtime import load

    path = workdir / MOBILENET_MODEL
    _export("mobilenet", path, "exporting MobileNet (ImageNet shape, calibrated random weights)")
    out = workdir / MOBILENET_OUT
    _progress("protecting it (masks sized on inputs uniform in [-1, 1], as the demo feeds) ...")
    samples = np.random.default_rng(1).uniform(-1, 1, (4, *_input_shape(path)[1:])).astype(np.float32)
    seconds = _protect(path, out, samples)
    original = _litert(path)
    # No background refill: its offline mask work would run while unprotected is timed; the masks are made
    # between runs instead, untimed, as the bench does.
    with load(out, num_threads=THREADS, background_refill=False) as model:
        shape, dtype = model.inputs[0].shape, model.inputs[0].dtype
        rng = np.random.default_rng(0)
        _progress(f"protected in {seconds:.1f} s ({model.num_rounds} rounds); checking agreement on "
                  f"{AGREEMENT_INPUTS} random inputs ...")
        worst, same_argmax = 0.0, 0
        for _ in range(AGREEMENT_INPUTS):
            x = rng.uniform(-1, 1, size=shape).astype(dtype)
            want, got = original(x), model(x)
            worst = max(worst, relative_error(got, want))
            same_argmax += int(np.argmax(got) == np.argmax(want))
        _progress(f"timing {LATENCY_RUNS} interleaved runs each, {THREADS} threads (each after an untimed "
                  "run of its own; one-time masks made between runs, untimed) ...")
        x = rng.uniform(-1, 1, size=shape).astype(dtype)
        plain_s, protected_s, parts = [], [], []
        for _ in range(LATENCY_RUNS):
            # Each timed call right after an untimed one of its own, as the bench times its modes.
            plain_s.append(steady_seconds(lambda: original(x)))
            model.refill_masks()
            protected_s.append(steady_seconds(lambda: model(x), model.refill_masks))
            parts.append(model.stats())
        stats = parts[-1]
    median = statistics.median
    return {
        "rounds": model.num_rounds, "world_switches": stats["world_switches"],
        "plain_ms": median(plain_s) * 1e3, "protected_ms": median(protected_s) * 1e3,
        "accelerator_ms": median(p["accelerator_s"] for p in parts) * 1e3,
        "tee_ms": median(p["tee_s"] for p in parts) * 1e3,
        "ta_ms": median(p["ta_s"] for p in parts) * 1e3,
        "boundary_mb": (stats["bytes_to_tee"] + stats["bytes_from_tee"]) / 1e6,
        "secure_mb": stats.get("model_secure_memory", stats.get("secure_memory_peak", 0)) / 2**20,
        "worst_rel_error": worst, "same_argmax": same_argmax, "inputs": AGREEMENT_INPUTS,
        "shape": "x".join(str(d) for d in shape),
    }


def main(args: argparse.Namespace) -> None:
    """Run the demo in ``args.workdir`` (kept) or a temporary directory (deleted)."""
    from models.backend import require_tensorflow

    require_tensorflow()  # one clear line (TensorFlowMissingError) without the tf extra
    from tee_sim.attestation import device_identity

    device_identity()  # the device's keys: an unusable SHADOWNET_HOME is said now, not after the training
    workdir = getattr(args, "workdir", None)
    if workdir is not None:
        from converters.output_directory import check_output
        from models.zoo import testset_path
        from shadownet.files import check_destination

        kept = Path(working_directory(workdir))
        # Said now, not after the training (helpers' reviews: a user's file in mobilenet.protected, a
        # directory named mobilenet.tflite)
        for model, train in ((kept / DIGITS_MODEL, "digits"), (kept / MOBILENET_MODEL, None)):
            if not _reused(model, train):
                check_destination(model)
                if train:
                    check_destination(testset_path(model))
        for name in (DIGITS_OUT, MOBILENET_OUT):
            check_output(kept / name, force=True)
        _report(kept)
    else:
        with tempfile.TemporaryDirectory(prefix="shadownet-demo-") as tmp:
            print(f"working in {tmp}, removed at the end (shadownet demo --workdir DIR keeps the files)")
            _report(Path(tmp))


def _report(workdir: Path) -> None:
    start = time.perf_counter()
    digits = digits_accuracy(workdir)
    mobile = mobilenet_latency(workdir)
    print()
    from converters.schemes import DEFAULT_SCHEME

    print(f"ShadowNet demo summary (scheme {DEFAULT_SCHEME}, the default)")
    print(f"  MiniVGG on digits ({digits['n']} held-out images, {digits['rounds']} rounds):")
    print(f"    test accuracy     original {digits['original']:.2%}   protected {digits['protected']:.2%}   "
          f"(same prediction on {digits['same_predictions']}/{digits['n']})")
    print(f"  MobileNet ({mobile['shape']}, {mobile['rounds']} rounds, {THREADS} threads, median of "
          f"{LATENCY_RUNS} interleaved runs):")
    m = mobile
    print(f"    latency           unprotected {m['plain_ms']:.1f} ms   protected {m['protected_ms']:.1f} ms"
          f"   ({m['protected_ms'] / m['plain_ms']:.2f}x)")
    print(f"    protected split   accelerator {m['accelerator_ms']:.1f} ms   TEE calls {m['tee_ms']:.1f} ms "
          f"(inside the trusted app {m['ta_ms']:.1f} ms)")
    print(f"    per inference     {m['world_switches']} world switches, {m['boundary_mb']:.1f} MB across "
          f"the boundary; {m['secure_mb']:.1f} MiB of secure memory")
    print(f"    agreement         worst relative error {mobile['worst_rel_error']:.2e}, same argmax on "
          f"{mobile['same_argmax']}/{mobile['inputs']} random inputs")
    print(f"  total {time.perf_counter() - start:.0f} s")
