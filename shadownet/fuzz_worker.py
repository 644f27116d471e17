"""The cases of ``shadownet.fuzz``, run in its worker subprocess (``--worker``): the seed models and the
prepared inputs (``prepare``), the mutation of case N of a target (``Worker.mutation``), running it and
judging its outcome (``Worker.run``, ``Result``)."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
import signal
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.fidelity import relative_error
from shadownet.fuzz_mutations import flatbuffer_structure, mutate_bytes, mutate_json

TARGETS = ("tflite", "untrusted", "secrets", "manifest", "program")
TOLERANCE = 1e-3  # protected vs LiteRT: worst absolute difference over the largest reference value
OUTLIER = 1e3  # a mutated weight this many times the seed's largest is an outlier (see "imprecise")
SEED_CHECK = 7  # the conversion seed of the fuzz artifacts (INSECURE by design: test data only)


# ------------------------------------------------------------------------------------------- seed models

def seed_models() -> list[bytes]:
    """Two small float models built with ``converters.graph`` (no TensorFlow): every op kind ShadowNet
    offloads, TEE ops between rounds, a signature, absent optional inputs."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, Signature, write_model

    rng = np.random.default_rng(0)

    def const(g: Graph, name: str, shape: tuple[int, ...], scale: float = 0.3) -> int:
        return g.add_tensor(name, shape, np.float32, (rng.standard_normal(shape) * scale).astype(np.float32))

    a = Graph()
    x = a.add_tensor("x", (1, 8, 8, 3), np.float32)
    c1 = a.add_tensor("conv", (1, 8, 8, 4), np.float32)
    a.add_op("CONV_2D", [x, const(a, "conv/w", (4, 3, 3, 3)), const(a, "conv/b", (4,))], [c1],
             fb.Conv2DOptionsT(padding=fb.Padding.SAME, strideW=1, strideH=1,
                               fusedActivationFunction=fb.ActivationFunctionType.RELU))
    d1 = a.add_tensor("dw", (1, 8, 8, 4), np.float32)
    a.add_op("DEPTHWISE_CONV_2D", [c1, const(a, "dw/w", (1, 3, 3, 4)), const(a, "dw/b", (4,))], [d1],
             fb.DepthwiseConv2DOptionsT(padding=fb.Padding.SAME, strideW=1, strideH=1, depthMultiplier=1,
                                        fusedActivationFunction=fb.ActivationFunctionType.RELU6))
    s1 = a.add_tensor("sum", (1, 8, 8, 4), np.float32)
    a.add_op("ADD", [c1, d1], [s1], fb.AddOptionsT())
    p1 = a.add_tensor("pool", (1, 4, 4, 4), np.float32)
    a.add_op("MAX_POOL_2D", [s1], [p1], fb.Pool2DOptionsT(padding=fb.Padding.VALID, strideW=2, strideH=2,
                                                          filterWidth=2, filterHeight=2))
    r1 = a.add_tensor("flat", (1, 64), np.float32)
    shape = a.add_tensor("flat/shape", (2,), np.int32, np.array([1, 64], np.int32))
    a.add_op("RESHAPE", [p1, shape], [r1], fb.ReshapeOptionsT(newShape=[1, 64]))
    f1 = a.add_tensor("logits", (1, 5), np.float32)
    a.add_op("FULLY_CONNECTED", [r1, const(a, "fc/w", (5, 64), 0.1), const(a, "fc/b", (5,))], [f1],
             fb.FullyConnectedOptionsT())
    y = a.add_tensor("y", (1, 5), np.float32)
    a.add_op("SOFTMAX", [f1], [y], fb.SoftmaxOptionsT(beta=1.0))
    a.inputs, a.outputs = [x], [y]
    a.signature = Signature("serving_default", list(range(len(a.ops))), {"x": x}, {"y": y})

    b = Graph()
    x = b.add_tensor("image", (1, 6, 6, 2), np.float32)
    c = b.add_tensor("conv", (1, 2, 2, 3), np.float32)
    b.add_op("CONV_2D", [x, const(b, "conv/w", (3, 3, 3, 2)), -1], [c],
             fb.Conv2DOptionsT(padding=fb.Padding.VALID, strideW=2, strideH=2))
    r = b.add_tensor("relu", (1, 2, 2, 3), np.float32)
    b.add_op("RELU", [c], [r])
    flat = b.add_tensor("flat", (1, 12), np.float32)
    shape = b.add_tensor("flat/shape", (2,), np.int32, np.array([1, 12], np.int32))
    b.add_op("RESHAPE", [r, shape], [flat], fb.ReshapeOptionsT(newShape=[1, 12]))
    out = b.add_tensor("scores", (1, 4), np.float32)
    b.add_op("FULLY_CONNECTED", [flat, const(b, "fc/w", (4, 12)), -1], [out], fb.FullyConnectedOptionsT())
    b.inputs, b.outputs = [x], [out]
    return [write_model(a), write_model(b)]


def _rng(seed: int, target: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TARGETS.index(target), index])


# ------------------------------------------------------------------------------------------ preparation

def prepare(work: Path) -> None:
    """Make ``work``'s seed models, a device home, the fuzz artifacts and their reference outputs."""
    import tee_sim
    from converters import pipeline

    work.mkdir(parents=True, exist_ok=True)
    if (work / "ready").exists():
        return
    models = seed_models()
    for i, data in enumerate(models):
        (work / f"seed{i}.tflite").write_bytes(data)
    captured: list[bytes] = []
    real = pipeline.provision

    def capture(program: bytes, *args: Any) -> bytes:
        captured.append(program)
        return real(program, *args)

    context = tee_sim.Context("inprocess", home=work / "home")
    pipeline.provision = capture
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(context.close)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pipeline.convert(models[0], work / "artifacts", seed=SEED_CHECK, device=context, force=True)
    finally:
        pipeline.provision = real
    (work / "program.bin").write_bytes(captured[-1])
    x = _fixed_input(json.loads((work / "artifacts" / "manifest.json").read_text()))
    np.save(work / "input.npy", x)
    np.save(work / "reference.npy", _litert(models[0], x))
    (work / "ready").write_text("")


def _fixed_input(manifest: dict[str, Any]) -> np.ndarray:
    spec = manifest["inputs"][0]
    return np.random.default_rng(3).uniform(-1, 1, spec["shape"]).astype(spec["dtype"])


def _litert(model: bytes, x: np.ndarray) -> np.ndarray:
    """LiteRT's first output of ``model`` on ``x`` as its first input (any other input: zeros)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    interpreter.set_tensor(details[0]["index"], x)
    for d in details[1:]:
        interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


# ------------------------------------------------------------------------------------------------ worker

@dataclass
class Result:
    index: int
    # "ok", "refused:<Error>", "differs" (program target: an authenticated program that computes something
    # else), "imprecise" (tflite target: a mutated outlier weight costs masked float32 precision), or a
    # failure: "wrong", "unexpected:<Type>", "crash", "hang".
    outcome: str
    mutation: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return not (self.outcome in ("ok", "differs", "imprecise") or self.outcome.startswith("refused:"))


def _classify(exc: BaseException) -> tuple[str, str]:
    from shadownet.exceptions import ShadowNetError, TEECommunicationError

    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TEECommunicationError):
        return "unexpected:TEECommunicationError", detail  # the secure world died or hung on input
    if type(exc) is ShadowNetError:
        return "unexpected:ShadowNetError", detail  # no class says what failed
    if isinstance(exc, ShadowNetError):
        return f"refused:{type(exc).__name__}", detail
    return f"unexpected:{type(exc).__name__}", detail


def _largest_weight(model: bytes) -> float:
    """The largest finite magnitude among a model's float constants."""
    from converters.tflite_reader import read_model

    values = [np.abs(t.data[np.isfinite(t.data)]).max(initial=0.0) for t in read_model(model).tensors
              if t.data is not None and t.data.dtype.kind == "f" and t.data.size]
    return float(max(values, default=0.0))


class Worker:
    """Runs cases of one target in this process (the driver's subprocess)."""

    def __init__(self, target: str, seed: int, work: Path) -> None:
        self.target, self.seed, self.work = target, seed, work
        self.models = [(work / f"seed{i}.tflite").read_bytes() for i in range(2)]
        self.artifacts = work / "artifacts"
        self.files = {name: (self.artifacts / name).read_bytes()
                      for name in ("untrusted.tflite", "secrets.sealed", "manifest.json")}
        self.manifest = json.loads(self.files["manifest.json"])
        self.program = (work / "program.bin").read_bytes()
        self.x = np.load(work / "input.npy")
        self.reference = np.load(work / "reference.npy")
        self.scratch = Path(tempfile.mkdtemp(prefix=f"case-{target}-", dir=work))
        self.structures = {i: flatbuffer_structure(m) for i, m in enumerate(self.models)}
        self.largest_weight = max(_largest_weight(m) for m in self.models)
        self.untrusted_structure = flatbuffer_structure(self.files["untrusted.tflite"])

    # Cases.
    def mutation(self, index: int) -> tuple[Any, str]:
        rng = _rng(self.seed, self.target, index)
        if self.target == "tflite":
            i = int(rng.integers(len(self.models)))
            data, what = mutate_bytes(self.models[i], rng, [self.models[1 - i]], self.structures[i])
            return data, f"seed{i}: {what}"
        if self.target == "untrusted":
            data, what = mutate_bytes(self.files["untrusted.tflite"], rng, self.models,
                                      self.untrusted_structure)
            return (data, rng.random() < 0.75), what
        if self.target == "secrets":
            # "SNS1" | kind | "TSB1" | format u16 | version u32 | nonce | ciphertext | tag
            header = [(0, 4), (4, 1), (5, 4), (9, 2), (11, 4), (15, 4)]
            data, what = mutate_bytes(self.files["secrets.sealed"], rng, [self.files["untrusted.tflite"]],
                                      header=header)
            return (data, rng.random() < 0.75), what
        if self.target == "manifest":
            if rng.random() < 0.7:
                doc, what = mutate_json(self.manifest, rng)
                return json.dumps(doc, indent=1, sort_keys=True).encode(), what
            return mutate_bytes(self.files["manifest.json"], rng)
        if self.target == "program":
            return self._program_mutation(rng)
        raise ValueError(f"unknown target {self.target!r}")

    def _program_mutation(self, rng: np.random.Generator) -> tuple[bytes, str]:
        from tee_sim.program import read_program, write_program

        if rng.random() < 0.6:
            program, arrays = read_program(self.program)
            doc, what = mutate_json(program, rng)
            return write_program(doc, arrays), f"program header JSON: {what}"
        # magic | version u16 | reserved u16 | header length u64
        header_len = struct.unpack_from("<Q", self.program, 8)[0]
        limit = 16 + header_len  # mutate the container, not the LiteRT model inside (vendor-made)
        data, what = mutate_bytes(self.program[:limit], rng, header=[(0, 4), (4, 2), (6, 2), (8, 8)])
        return data + self.program[limit:], f"program container: {what}"

    @functools.cached_property
    def _original_program(self) -> tuple[Any, dict[str, np.ndarray]]:
        """The seed's program, parsed once (read_program: its header's JSON, its arrays)."""
        from tee_sim.program import read_program

        return read_program(self.program)

    def _program_changed(self, mutated: bytes) -> bool:
        """Whether a container mutation left a well-formed program that says something else (its header's
        JSON parses, to another program or other arrays): a program change like the JSON mutations'."""
        from tee_sim.program import read_program

        try:
            program, arrays = read_program(mutated)
        except ValueError:  # ProgramFormatError, a JSON error: refused by the TA as well
            return False
        original, original_arrays = self._original_program
        return program != original or arrays.keys() != original_arrays.keys() or any(
            a.shape != original_arrays[k].shape or not np.array_equal(a, original_arrays[k])
            for k, a in arrays.items())

    def run(self, index: int, mutated: Any, what: str) -> tuple[str, str]:
        try:
            if self.target == "tflite":
                return self._run_convert(index, mutated)
            return self._run_load(index, mutated, what)
        except Exception as exc:  # noqa: BLE001 - classified, never swallowed: any other type fails the case
            return _classify(exc)

    def _run_convert(self, index: int, data: bytes) -> tuple[str, str]:
        import warnings

        import shadownet

        out = self.scratch / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shadownet.convert(data, out, seed=SEED_CHECK, force=True)
        manifest = json.loads((out / "manifest.json").read_text())
        spec = manifest["inputs"][0]
        x = np.random.default_rng(3).uniform(-1, 1, spec["shape"]).astype(spec["dtype"])
        with shadownet.load(out) as model:
            got = model(*[x] + [np.zeros(t.shape, t.dtype) for t in model.inputs[1:]]) \
                if len(model.inputs) > 1 else model(x)
        got = next(iter(got.values())) if isinstance(got, dict) else got
        want = _litert(data, x)
        error = relative_error(got, want)
        if error > TOLERANCE:
            largest = _largest_weight(data)
            if largest > OUTLIER * self.largest_weight:
                # A weight the mutation made huge (below the converter's limit): the masks' float32
                # cancellation then costs that many digits of the layer's other outputs (SECURITY.md).
                return "imprecise", (f"relative error {error:.3g}; the mutation made a weight of magnitude "
                                     f"{largest:.3g} (the seed's largest: {self.largest_weight:.3g})")
            return "wrong", f"relative error {error:.3g} against LiteRT on the mutated model"
        return "ok", ""

    def _run_load(self, index: int, mutated: Any, what: str) -> tuple[str, str]:
        import shadownet

        case = self.scratch / "artifacts"
        if case.exists():
            shutil.rmtree(case)
        files = dict(self.files)
        manifest = copy.deepcopy(self.manifest)
        fix_hash = False
        if self.target == "manifest":
            files["manifest.json"] = mutated
        elif self.target == "program":
            from converters.provisioning import provision

            files["secrets.sealed"] = provision(mutated)
            fix_hash = True
        else:
            data, fix_hash = mutated
            files["untrusted.tflite" if self.target == "untrusted" else "secrets.sealed"] = data
        if fix_hash:
            for name in ("untrusted.tflite", "secrets.sealed"):
                manifest["files"][name]["sha256"] = hashlib.sha256(files[name]).hexdigest()
            files["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
        case.mkdir()
        for name, data in files.items():
            (case / name).write_bytes(data)
        with shadownet.load(case) as model:
            got = model(self.x)
            got = next(iter(got.values())) if isinstance(got, dict) else got
            again = model(self.x)  # a second inference on the same session works too
            again = next(iter(again.values())) if isinstance(again, dict) else again
        error = max(relative_error(got, self.reference), relative_error(again, self.reference))
        if error > TOLERANCE:
            if self.target == "program" and ("JSON" in what or self._program_changed(mutated)):
                # An authenticated program is the specification: one that computes something else (an
                # instruction dropped, a field renamed by a bit flip in the container's JSON) was provisioned
                # so by whoever made it - anyone may, with their own data only (SECURITY.md) - and the TA
                # cannot tell what its maker meant; it must only stay within what the program names.
                return "differs", f"relative error {error:.3g}: the authenticated program computes that"
            return "wrong", f"relative error {error:.3g} against LiteRT on the original"
        return "ok", ""


def worker_main(target: str, seed: int, work: Path, start: int, stop: int, channel: int) -> None:
    out = os.fdopen(channel, "w", buffering=1)
    worker = Worker(target, seed, work)
    # "crash:N" / "hang:N": case N segfaults / hangs on purpose (tests prove the driver reports both).
    selftest = os.environ.get("SHADOWNET_FUZZ_SELFTEST", "")
    for index in range(start, stop):
        mutated, what = worker.mutation(index)
        out.write(json.dumps({"start": index, "mutation": what}) + "\n")
        if selftest == f"crash:{index}":
            os.kill(os.getpid(), signal.SIGSEGV)
        if selftest == f"hang:{index}":
            time.sleep(3600)
        outcome, detail = worker.run(index, mutated, what)
        out.write(json.dumps({"index": index, "outcome": outcome, "detail": detail[:500]}) + "\n")
    shutil.rmtree(worker.scratch, ignore_errors=True)
