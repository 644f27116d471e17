"""Seeded mutation fuzzing of every file a user or the normal world hands ShadowNet.

Targets (what is mutated, what is run on it):

- ``tflite``: a float ``.tflite`` given to ``convert`` (then, if it converts, ``load`` and one inference);
- ``untrusted`` / ``secrets`` / ``manifest``: one file of an artifact directory given to ``load`` and one
  inference (for the first two, the manifest's SHA-256 is usually fixed up, as an attacker who owns the
  normal world would, so the secure world's own checks are what refuses);
- ``program``: the TEE program (the plaintext inside ``secrets.sealed``), provisioned to the device's
  trusted app as a vendor would, then ``load`` and one inference: what a converter of another version
  produces (stale or newer format) must be refused with a clear error, never crash the trusted app.

Each case must end in one of ``shadownet.exceptions``'s errors, or succeed with outputs that match LiteRT
on the (mutated) original model. A segfault, a hang, a traceback of another exception type, a secure
world that dies (``TEECommunicationError``), the bare base class ``ShadowNetError`` or a wrong result is a
failure. Two outcomes are accepted and counted apart: ``imprecise`` (``tflite``: the mutation made one weight
huge, below the converter's limit, and float32 masking then keeps fewer digits of that layer's small outputs)
and ``differs`` (``program``: an authentic program that computes something else: only its vendor makes one).
Cases run in a worker subprocess (``--worker``) so that a crash in native code (LiteRT) is seen
and reported instead of killing the driver; the driver restarts the worker after the case that crashed.

Mutations are drawn from ``numpy.random.default_rng([seed, target, index])``: a case is reproduced from
its seed and index alone. Byte level: bit flips, byte overwrites, truncations, splices of two files,
insertions and deletions. Structure aware: flatbuffer vector / string lengths, offsets, scalar fields and
index vectors (positions found by reading the file with an instrumented flatbuffer table), the
container headers of ``secrets.sealed`` and of the program, and JSON type confusion, key deletion,
unknown keys and numeric tweaks in ``manifest.json`` and the program's header.

``python -m shadownet.fuzz --cases N --seed S [--target T ...]`` runs a campaign and prints the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TARGETS = ("tflite", "untrusted", "secrets", "manifest", "program")
ARTIFACT_TARGETS = ("untrusted", "secrets", "manifest", "program")
TOLERANCE = 1e-3  # protected vs LiteRT: worst absolute difference over the largest reference value
OUTLIER = 1e3  # a mutated weight this many times the seed's largest is an outlier (see "imprecise")
CASE_TIMEOUT = 60.0  # seconds one case may take before it counts as a hang (generous: a busy machine)
SEED_CHECK = 7  # the conversion seed of the fuzz artifacts (INSECURE by design: test data only)
_U32 = (0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


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


# --------------------------------------------------------------------------------------------- mutations

@dataclass
class Structure:
    """Positions in a flatbuffer, found by reading it: ``lengths`` of vectors and strings, ``offsets``
    (uoffsets to tables, vectors, strings), ``scalars`` (position, byte width) of table fields and
    ``elements`` (position, byte width) of scalar vectors (shapes, tensor indices, ...)."""

    lengths: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    scalars: list[tuple[int, int]] = field(default_factory=list)
    elements: list[tuple[int, int]] = field(default_factory=list)


def flatbuffer_structure(data: bytes) -> Structure:
    """Read a ``.tflite`` with the schema's object API through an instrumented ``flatbuffers`` table and
    record where its lengths, offsets and scalars are (big constant buffers' bytes are skipped)."""
    from ai_edge_litert.tools import flatbuffer_utils
    from flatbuffers import encode, table
    from flatbuffers import number_types as N

    found = Structure()
    original = {k: getattr(table.Table, k) for k in ("String", "VectorLen", "Indirect", "Get",
                                                     "GetVectorAsNumpy", "Union")}

    def string(self: Any, off: int) -> bytes:
        found.offsets.append(off)
        found.lengths.append(off + encode.Get(N.UOffsetTFlags.packer_type, self.Bytes, off))
        return original["String"](self, off)

    def vector_len(self: Any, off: int) -> int:
        at = off + self.Pos
        found.offsets.append(at)
        found.lengths.append(at + encode.Get(N.UOffsetTFlags.packer_type, self.Bytes, at))
        return original["VectorLen"](self, off)

    def indirect(self: Any, off: int) -> int:
        found.offsets.append(off)
        return original["Indirect"](self, off)

    def get(self: Any, flags: Any, off: int) -> Any:  # table fields, vtable entries, vtable offsets
        found.scalars.append((off, flags.bytewidth))
        return original["Get"](self, flags, off)

    def as_numpy(self: Any, flags: Any, off: int) -> Any:
        result = original["GetVectorAsNumpy"](self, flags, off)
        if flags.bytewidth > 1 and len(result) <= 64:  # index and shape vectors, not weights
            start = self.Vector(off)
            found.elements.extend((start + i * flags.bytewidth, flags.bytewidth) for i in range(len(result)))
        return result

    def union(self: Any, t2: Any, off: int) -> None:
        found.offsets.append(off + self.Pos)
        original["Union"](self, t2, off)

    replaced = {"String": string, "VectorLen": vector_len, "Indirect": indirect, "Get": get,
                "GetVectorAsNumpy": as_numpy, "Union": union}
    try:
        for k, v in replaced.items():
            setattr(table.Table, k, v)
        flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    finally:
        for k, v in original.items():
            setattr(table.Table, k, v)
    found.lengths = sorted(set(found.lengths))
    found.offsets = sorted(set(found.offsets))
    found.scalars = sorted(set(found.scalars))
    found.elements = sorted(set(found.elements))
    return found


def _put(data: bytearray, at: int, width: int, value: int) -> None:
    if 0 <= at and at + width <= len(data):
        data[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")


def _extreme(rng: np.random.Generator, width: int, old: int) -> int:
    choices = [0, 1, -1, old + 1, old - 1, old * 2 + 1, (1 << (8 * width - 1)) - 1, 1 << (8 * width - 1),
               int(rng.integers(0, 1 << min(8 * width, 62)))]
    return int(choices[int(rng.integers(len(choices)))])


def mutate_bytes(data: bytes, rng: np.random.Generator, others: list[bytes] = (),
                 structure: Structure | None = None, header: list[tuple[int, int]] = ()) -> tuple[bytes, str]:
    """One random mutation of ``data``; returns the bytes and a description. ``others``: files to splice
    with; ``structure``: flatbuffer positions; ``header``: (position, width) of a container's fields."""
    kinds = ["bitflip", "overwrite", "truncate", "splice", "insert", "delete"]
    if structure is not None:
        kinds += ["length", "length", "offset", "scalar", "element", "element"]
    if header:
        kinds += ["header", "header"]
    kind = kinds[int(rng.integers(len(kinds)))]
    out = bytearray(data)
    n = len(out)

    def pos(limit: int = n) -> int:
        # Half the time near the start, where headers and tables are.
        if rng.random() < 0.5:
            return int(rng.integers(0, max(1, min(limit, 256))))
        return int(rng.integers(0, max(1, limit)))

    if kind == "bitflip":
        flips = [(pos(), int(rng.integers(8))) for _ in range(int(rng.integers(1, 9)))]
        for p, bit in flips:
            if p < n:
                out[p] ^= 1 << bit
        return bytes(out), f"bitflip {flips}"
    if kind == "overwrite":
        p, k = pos(), int(rng.integers(1, 17))
        fill = [bytes(k), b"\xff" * k, bytes(rng.integers(0, 256, k, dtype=np.uint8))][int(rng.integers(3))]
        out[p:p + k] = fill[:max(0, min(k, n - p))]
        return bytes(out), f"overwrite {k} bytes at {p} with {fill[:8].hex()}"
    if kind == "truncate":
        cut = int(rng.choice([pos(), n - int(rng.integers(1, min(n, 64) + 1)), int(rng.integers(0, 9))]))
        return bytes(out[:max(0, cut)]), f"truncate to {max(0, cut)} of {n} bytes"
    if kind == "splice" and others:
        other = others[int(rng.integers(len(others)))]
        i, j = pos(), int(rng.integers(0, max(1, len(other))))
        return bytes(out[:i]) + other[j:], f"splice [:{i}] + other[{j}:]"
    if kind == "insert" or kind == "splice":
        p, k = pos(), int(rng.integers(1, 65))
        return bytes(out[:p]) + bytes(rng.integers(0, 256, k, dtype=np.uint8)) + bytes(out[p:]), \
            f"insert {k} bytes at {p}"
    if kind == "delete":
        p, k = pos(), int(rng.integers(1, 65))
        return bytes(out[:p]) + bytes(out[p + k:]), f"delete {k} bytes at {p}"
    if kind == "header":
        at, width = header[int(rng.integers(len(header)))]
        old = int.from_bytes(out[at:at + width], "little") if at + width <= n else 0
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"header field at {at} ({width} bytes) {old} -> {value}"
    assert structure is not None
    if kind == "length" and structure.lengths:
        at = structure.lengths[int(rng.integers(len(structure.lengths)))]
        old = int.from_bytes(out[at:at + 4], "little")
        value = int(rng.choice([old + 1, old * 2 + 1, old + 1000, *_U32[5:]]))
        _put(out, at, 4, value)
        return bytes(out), f"vector length at {at}: {old} -> {value}"
    if kind == "offset" and structure.offsets:
        at = structure.offsets[int(rng.integers(len(structure.offsets)))]
        old = int.from_bytes(out[at:at + 4], "little")
        value = int(rng.choice([0, 4, old + 4, old - 4, n - at, n, *_U32[7:]]))
        _put(out, at, 4, value)
        return bytes(out), f"offset at {at}: {old} -> {value}"
    if kind == "scalar" and structure.scalars:
        at, width = structure.scalars[int(rng.integers(len(structure.scalars)))]
        old = int.from_bytes(out[at:at + width], "little")
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"scalar at {at} ({width} bytes): {old} -> {value}"
    if kind == "element" and structure.elements:
        at, width = structure.elements[int(rng.integers(len(structure.elements)))]
        old = int.from_bytes(out[at:at + width], "little", signed=True)
        value = _extreme(rng, width, old)
        _put(out, at, width, value)
        return bytes(out), f"vector element at {at} ({width} bytes): {old} -> {value}"
    return mutate_bytes(data, rng, others, None, header)  # the structure had nothing of that kind


_CONFUSED = [None, True, False, 0, -1, 1, 1.5, -0.0, 2 ** 31, 2 ** 63, 10 ** 30, -(2 ** 63), "", "x",
             "float64", "../x", [], [0], [-1, 2 ** 40], {}, {"a": 1}, float("nan"), float("inf")]


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def mutate_json(doc: Any, rng: np.random.Generator) -> tuple[Any, str]:
    """One random structural mutation of a JSON document: type confusion, a deleted or unknown key, a
    numeric tweak, a list element dropped, duplicated or swapped, a string changed."""
    doc = copy.deepcopy(doc)
    paths = [p for p in _paths(doc) if p]
    path = paths[int(rng.integers(len(paths)))]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    old = parent[key]
    where = "/".join(map(str, path))
    choice = int(rng.integers(8))
    if choice == 0 or (choice == 1 and not isinstance(old, int | float)):
        new = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
        parent[key] = new
        return doc, f"{where}: {old!r:.40} -> {new!r}"
    if choice == 1:
        new = old + int(rng.choice([1, -1, 4, 64, -64, 4096])) if not isinstance(old, bool) else not old
        if isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.3:
            new = old * 2
        parent[key] = new
        return doc, f"{where}: {old!r} -> {new!r}"
    if choice == 2:
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
        return doc, f"{where}: deleted"
    if choice == 3 and isinstance(parent, dict):
        parent[f"unknown_{int(rng.integers(100))}"] = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
        return doc, f"{'/'.join(map(str, path[:-1]))}: unknown key added"
    if choice == 4 and isinstance(old, list) and old:
        i = int(rng.integers(len(old)))
        old.insert(i, copy.deepcopy(old[i]))
        return doc, f"{where}[{i}]: duplicated"
    if choice == 5 and isinstance(old, list) and len(old) > 1:
        i, j = (int(v) for v in rng.choice(len(old), 2, replace=False))
        old[i], old[j] = old[j], old[i]
        return doc, f"{where}: items {i} and {j} swapped"
    if choice == 6 and isinstance(old, str):
        new = old[:-1] + chr(ord(old[-1]) ^ 1) if old else "x"
        parent[key] = new
        return doc, f"{where}: {old!r:.40} -> {new!r:.40}"
    new = _CONFUSED[int(rng.integers(len(_CONFUSED)))]
    parent[key] = new
    return doc, f"{where}: {old!r:.40} -> {new!r}"


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

    def capture(program: bytes, device: Any = None) -> bytes:
        captured.append(program)
        return real(program, device)

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
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
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


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf
    same_nan = np.isnan(got) == np.isnan(want)
    if not same_nan.all():
        return math.inf
    finite = np.isfinite(want)
    if not np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)]):
        return math.inf
    if not finite.any():
        return 0.0
    scale = float(np.max(np.abs(want[finite]))) or 1.0
    return float(np.max(np.abs(got[finite] - want[finite]))) / scale


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
        from converters.program import read_program, write_program

        if rng.random() < 0.6:
            program, arrays = read_program(self.program)
            doc, what = mutate_json(program, rng)
            return write_program(doc, arrays), f"program header JSON: {what}"
        # magic | version u16 | reserved u16 | header length u64
        header_len = struct.unpack_from("<Q", self.program, 8)[0]
        limit = 16 + header_len  # mutate the container, not the LiteRT model inside (vendor-made)
        data, what = mutate_bytes(self.program[:limit], rng, header=[(0, 4), (4, 2), (6, 2), (8, 8)])
        return data + self.program[limit:], f"program container: {what}"

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
        want = self._litert_first_output(data, x, len(manifest["inputs"]))
        error = _relative_error(got, want)
        if error > TOLERANCE:
            largest = _largest_weight(data)
            if largest > OUTLIER * self.largest_weight:
                # A weight the mutation made huge (below the converter's limit): the masks' float32
                # cancellation then costs that many digits of the layer's other outputs (SECURITY.md).
                return "imprecise", (f"relative error {error:.3g}; the mutation made a weight of magnitude "
                                     f"{largest:.3g} (the seed's largest: {self.largest_weight:.3g})")
            return "wrong", f"relative error {error:.3g} against LiteRT on the mutated model"
        return "ok", ""

    @staticmethod
    def _litert_first_output(model: bytes, x: np.ndarray, inputs: int) -> np.ndarray:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=model, num_threads=1)
        interpreter.allocate_tensors()
        details = interpreter.get_input_details()
        interpreter.set_tensor(details[0]["index"], x)
        for d in details[1:]:
            interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

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
            from converters.pipeline import provision

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
        error = max(_relative_error(got, self.reference), _relative_error(again, self.reference))
        if error > TOLERANCE:
            if self.target == "program" and "JSON" in what:
                # The vendor's authenticated program is the specification: one that computes something
                # else (an instruction dropped) is not the normal world's doing and cannot be detected.
                return "differs", f"relative error {error:.3g}: the authenticated program computes that"
            return "wrong", f"relative error {error:.3g} against LiteRT on the original"
        return "ok", ""


def _worker_main(target: str, seed: int, work: Path, start: int, stop: int, channel: int) -> None:
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


# ------------------------------------------------------------------------------------------------ driver

@dataclass
class Report:
    target: str
    seed: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.failed]

    def counts(self) -> Counter:
        return Counter(r.outcome for r in self.results)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        return (f"{self.target}: {len(self.results)} cases (seed {self.seed}) in {self.seconds:.0f} s, "
                f"{len(self.failures)} failed: {counts}")


def _worker_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SHADOWNET_HOME"] = str(work / "home")
    env["SHADOWNET_TEE_TRANSPORT"] = "inprocess"  # a TA crash then kills the worker: seen, not hidden
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_campaign(target: str, cases: int, seed: int, work: str | os.PathLike, start: int = 0,
                 timeout: float = CASE_TIMEOUT, progress: bool = False) -> Report:
    """Run cases ``start .. start + cases - 1`` of ``target`` in worker subprocesses (restarted after a
    crash or a hang); ``work`` holds the prepared inputs (``prepare`` is called if needed)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    work = Path(work)
    prepare(work)
    report = Report(target, seed)
    begin = time.perf_counter()
    index, stop = start, start + cases
    while index < stop:
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-m", "shadownet.fuzz", "--worker", target, "--seed", str(seed), "--work",
             str(work), "--start", str(index), "--stop", str(stop), "--channel", str(write_fd)],
            pass_fds=(write_fd,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=_worker_env(work), start_new_session=True)
        os.close(write_fd)
        index = _follow(proc, read_fd, report, index, stop, timeout, progress)
    report.seconds = time.perf_counter() - begin
    return report


def _follow(proc: subprocess.Popen, fd: int, report: Report, index: int, stop: int, timeout: float,
            progress: bool) -> int:
    """Read one worker's reports until it ends; return the next case to run."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    running: dict[str, Any] | None = None
    deadline = time.monotonic() + 120.0  # the worker's start-up: imports and reading the seeds
    buffered = ""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill(proc)
                if running is None:
                    raise RuntimeError("the fuzz worker did not start")
                report.results.append(Result(running["start"], "hang", running["mutation"],
                                             f"no answer within {timeout:g} s"))
                return running["start"] + 1
            if not poller.poll(remaining * 1000):
                continue
            chunk = os.read(fd, 65536).decode()
            if not chunk:  # the worker ended
                code = proc.wait()
                if running is None:
                    if code != 0 and index < stop:
                        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
                        raise RuntimeError(f"the fuzz worker failed (exit {code}): {err}")
                    return stop
                err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
                what = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                report.results.append(Result(running["start"], "crash", running["mutation"],
                                             f"{what}: {err.strip()}"))
                return running["start"] + 1
            buffered += chunk
            *lines, buffered = buffered.split("\n")
            for line in lines:
                message = json.loads(line)
                if "start" in message:
                    running = message
                    deadline = time.monotonic() + timeout
                else:
                    assert running is not None
                    result = Result(message["index"], message["outcome"], running["mutation"],
                                    message["detail"])
                    report.results.append(result)
                    index = result.index + 1
                    running = None
                    if progress and result.failed:
                        print(f"  FAILED case {result.index}: {result.outcome} [{result.mutation}] "
                              f"{result.detail}", flush=True)
    finally:
        os.close(fd)
        if proc.poll() is None:
            _kill(proc)
        if proc.stderr:
            proc.stderr.close()


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadownet.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000, help="cases per target (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default: all")
    parser.add_argument("--work", help="directory for the seeds and artifacts (default: temporary)")
    parser.add_argument("--timeout", type=float, default=CASE_TIMEOUT, help="seconds before a case hangs")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--channel", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(args.worker, args.seed, Path(args.work), args.start, args.stop, args.channel)
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="shadownet-fuzz-") as tmp:
        work = Path(args.work or tmp)
        for target in args.target or TARGETS:
            report = run_campaign(target, args.cases, args.seed, work, timeout=args.timeout, progress=True)
            print(report.summary(), flush=True)
            for r in report.failures[:20]:
                print(f"  case {r.index}: {r.outcome} [{r.mutation}] {r.detail}")
            failed += len(report.failures)
    print(f"{'FAILED' if failed else 'passed'}: {failed} failing case(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
