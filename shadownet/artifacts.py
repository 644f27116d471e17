"""Reading and checking an artifact directory (``untrusted.tflite``, ``secrets.sealed``, ``manifest.json``).

The manifest is public metadata written by the converter (its fields are the ones checked below; the file
names are ../shared/design/ARCHITECTURE.md's contract).
Everything in it is checked here, once, before any of it is used: the normal world may have edited it, and a
buffer layout that overflows the shared memory must fail here, not as a crash in the hot path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.output_directory import FORMAT, MANIFEST, SECRETS, UNTRUSTED
from shadownet.exceptions import ArtifactError, SecurityError
from tee_sim.program import wire_dtype

KNOWN_VERSIONS = frozenset({1})
ALIGNMENT = 64
MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists tensors and buffers: megabytes at most
MAX_SIZE = 1 << 40  # bound on any byte count or offset (a damaged number must not reach mmap or numpy)
MAX_DIM = 1 << 31
DTYPES = frozenset({"float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                    "uint32", "uint64", "bool", "complex64", "complex128"})


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    index: int                      # the original model's LiteRT tensor index
    shape_signature: tuple[int, ...]  # the original's (-1: a dimension it left open; this model's is fixed)


@dataclass(frozen=True)
class BufferSpec:
    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class RoundSpec:
    signature: str
    inputs: tuple[tuple[str, str], ...]   # (signature input name, buffer name)
    outputs: tuple[tuple[str, str], ...]  # (signature output name, buffer name)


@dataclass(frozen=True)
class Signature:
    key: str
    inputs: dict[str, str]    # signature input name -> original tensor name
    outputs: dict[str, str]   # signature output name -> original tensor name


@dataclass(frozen=True)
class Artifacts:
    directory: Path
    manifest: dict[str, Any]
    scheme: str
    seeded: bool
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    rounds: tuple[RoundSpec, ...]
    buffers: dict[str, BufferSpec]
    shared_memory_size: int
    ta_uuid: str
    signature: Signature
    untrusted: bytes
    secrets: bytes

    def input_positions(self) -> dict[str, int]:
        """Each input's position by its tensor name, or by its signature name where that is no input's
        tensor name (a signature may call tensor "b" "a" and tensor "a" "b": the tensor names win, as
        ``set_tensor``'s details say)."""
        by_tensor = {t.name: i for i, t in enumerate(self.inputs)}
        return {k: by_tensor[v] for k, v in self.signature.inputs.items()} | by_tensor

    def crossing_bytes(self) -> tuple[int, int]:
        """Bytes that cross the boundary per inference through shared memory: into the TEE (the model's
        inputs, every round's results) and out of it (every round's inputs, the model's outputs)."""
        nbytes = {name: b.nbytes for name, b in self.buffers.items()}
        to_tee = sum(nbytes[f"input/{i}"] for i in range(len(self.inputs))) + \
            sum(nbytes[b] for r in self.rounds for _, b in r.outputs)
        from_tee = sum(nbytes[f"output/{i}"] for i in range(len(self.outputs))) + \
            sum(nbytes[b] for r in self.rounds for _, b in r.inputs)
        return to_tee, from_tee


def artifact_directory(directory: str | os.PathLike) -> Path:
    """``directory`` as a ``Path``, once it is a directory: ``ArtifactError`` for a file or nothing there."""
    if not os.fspath(directory):  # "" was the current directory: ". has no manifest.json" (a helper's sweep)
        raise ArtifactError("the artifact directory's path is empty")
    root = Path(directory)
    if not root.is_dir():
        if root.is_file():
            raise ArtifactError(f"{root} is a file, not an artifact directory (see `shadownet convert`)")
        if root.exists():  # /dev/null was said not to exist
            raise ArtifactError(f"{root} is not a directory, so not an artifact directory (see `shadownet "
                                "convert`)")
        raise ArtifactError(f"artifact directory {root} does not exist")
    return root


def read_artifacts(directory: str | os.PathLike) -> Artifacts:
    """Read and validate an artifact directory; ArtifactError / SecurityError name what is wrong."""
    root = artifact_directory(directory)
    path = root / MANIFEST
    if not path.is_file():
        if path.exists():  # a FIFO there was "has no manifest.json" (a helper's sweep)
            raise ArtifactError(f"{path} is not a regular file: not a directory written by `shadownet "
                                "convert`")
        raise ArtifactError(f"{root} has no {MANIFEST}: not a directory written by `shadownet convert`")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, or an integer of over 4300 digits
        raise ArtifactError(f"{path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a ShadowNet manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not _is_int(version) or version not in KNOWN_VERSIONS:
        known = ", ".join(map(str, sorted(KNOWN_VERSIONS)))
        if _is_int(version) and version > max(KNOWN_VERSIONS):
            raise ArtifactError(f"{path}: unknown format_version {version} (this runtime reads {known}): "
                                "written by a newer shadownet; upgrade shadownet to load it")
        raise ArtifactError(f"{path}: unknown format_version {version!r} (this runtime reads {known}); "
                            "re-convert the model with this version of shadownet")
    try:
        _check_schema(manifest, _SCHEMA, "manifest")
    except ArtifactError as exc:
        raise ArtifactError(f"{path} is malformed: {exc}") from None
    # The files the manifest names, read and checked against its hashes, outside the manifest's own errors
    # (a missing untrusted.tflite was "manifest.json is malformed": a helper's probe).
    files = {name: read_checked(root, name, manifest["files"]) for name in (UNTRUSTED, SECRETS)}
    try:
        return _parse(root, manifest, files)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise ArtifactError(f"{path} is malformed ({type(exc).__name__}: {exc})") from None


def _parse(root: Path, m: dict[str, Any], files: dict[str, bytes]) -> Artifacts:
    inputs = _tensor_specs(m["inputs"], first_index=0)
    outputs = _tensor_specs(m["outputs"], first_index=len(inputs))
    if not inputs or not outputs:
        raise ArtifactError("the manifest lists no model input or no model output")
    _check_one_tensor_per_name(inputs, outputs)
    size = _int(m["shared_memory_size"], "shared_memory_size")
    buffers: dict[str, BufferSpec] = {}
    for b in m["buffers"]:
        spec = BufferSpec(str(b["name"]), _int(b["offset"], "offset"), _int(b["nbytes"], "nbytes"),
                          _shape(b["shape"]), np.dtype(b["dtype"]))
        _check_buffer(spec, size)
        buffers[spec.name] = spec
    rounds = tuple(
        RoundSpec(str(r["signature"]),
                  tuple((str(t["name"]), str(t["buffer"])) for t in r["inputs"]),
                  tuple((str(t["name"]), str(t["buffer"])) for t in r["outputs"]))
        for r in m["rounds"]
    )
    expected = [(f"input/{i}", t) for i, t in enumerate(inputs)] + \
        [(f"output/{i}", t) for i, t in enumerate(outputs)]
    for name, tensor in expected:
        b = buffers.get(name)
        if b is None or b.shape != tensor.shape or b.dtype != wire_dtype(tensor.dtype):
            raise ArtifactError(f"buffer {name!r} is missing or does not match tensor {tensor.name!r}")
    for r in rounds:
        for _, name in r.inputs + r.outputs:
            if name not in buffers:
                raise ArtifactError(f"round {r.signature!r} names buffer {name!r} that the layout lacks")
    return Artifacts(
        directory=root, manifest=m, scheme=str(m["scheme"]["name"]), seeded=bool(m.get("seeded", False)),
        inputs=inputs, outputs=outputs, rounds=rounds, buffers=buffers, shared_memory_size=size,
        ta_uuid=str(m["ta_uuid"]), signature=_signature(m.get("signature"), inputs, outputs),
        untrusted=files[UNTRUSTED], secrets=files[SECRETS],
    )


def read_checked(root: Path, name: str, hashes: dict[str, Any]) -> bytes:
    """``root / name``, refused unless its SHA-256 is the one ``hashes`` (the manifest's ``files``) records
    for it: ``ArtifactError`` when it is missing or unreadable, ``SecurityError`` when it differs."""
    path = root / name
    if not path.is_file():  # a FIFO or a directory there was "missing" too (a helper's review)
        raise ArtifactError(f"{root} is incomplete: {name} is missing" if not path.exists() else
                            f"{path} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    expected = hashes[name]["sha256"]
    if hashlib.sha256(data).hexdigest() != str(expected).lower():
        # Either file may have been swapped or damaged; both are what an attacker would do.
        raise SecurityError(f"{path} does not match the SHA-256 recorded in {MANIFEST} (tampered, truncated "
                            "or swapped)")
    return data


# --- the manifest's schema: every field the runtime reads, with its type; checked before anything is used.
# A dict spec lists keys ("?" prefix: optional); unknown keys are ignored (the TA's digest of the manifest
# covers them). Leaves: a type, or one of the checks below.
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_SIZE


def _dim(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= MAX_DIM


def _signature_dim(value: Any) -> bool:
    return _is_int(value) and -1 <= value <= MAX_DIM


def _dtype(value: Any) -> bool:
    return isinstance(value, str) and value in DTYPES


def _uuid(value: Any) -> bool:
    try:
        return isinstance(value, str) and str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdefABCDEF" for c in value)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


class _MapOf:
    """A JSON object with any keys (strings) whose values all match ``spec``."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


_TENSOR = {"name": str, "shape": [_dim], "dtype": _dtype, "?index": _count,
           "?shape_signature": [_signature_dim]}
_NAMED_BUFFER = {"name": str, "buffer": str}
_SCHEMA = {
    "format": str, "format_version": int,
    "scheme": {"name": str, "?params": dict},
    "?seeded": bool,
    "inputs": [_TENSOR], "outputs": [_TENSOR],
    "?signature": {"key": str, "inputs": _MapOf(str), "outputs": _MapOf(str)},
    "rounds": [{"signature": str, "inputs": [_NAMED_BUFFER], "outputs": [_NAMED_BUFFER]}],
    "buffers": [{"name": str, "offset": _count, "nbytes": _count, "shape": [_dim], "dtype": _dtype}],
    "shared_memory_size": _count,
    "ta_uuid": _uuid,
    "files": {UNTRUSTED: {"sha256": _sha256}, SECRETS: {"sha256": _sha256}},
    "?masks": {"?one_time_rounds": [_count], "?static": bool, "?policy": _optional_str},
    "?summary": dict, "?created_by": str,
}


def _check_schema(value: Any, spec: Any, where: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ArtifactError(f"manifest field {where} must be an object, not {type(value).__name__}")
        for key, sub in spec.items():
            name = key.removeprefix("?")
            if name in value:
                _check_schema(value[name], sub, f"{where}.{name}")
            elif not key.startswith("?"):
                raise ArtifactError(f"manifest field {where}.{name} is missing")
    elif isinstance(spec, list):
        if not isinstance(value, list):
            raise ArtifactError(f"manifest field {where} must be a list, not {type(value).__name__}")
        for i, item in enumerate(value):
            _check_schema(item, spec[0], f"{where}[{i}]")
    elif isinstance(spec, _MapOf):
        if not isinstance(value, dict):
            raise ArtifactError(f"manifest field {where} must be an object, not {type(value).__name__}")
        for key, item in value.items():
            _check_schema(item, spec.spec, f"{where}.{key}")
    elif isinstance(spec, type):
        if not isinstance(value, spec) or (spec is int and isinstance(value, bool)):
            raise ArtifactError(f"manifest field {where} must be {spec.__name__}, not {value!r:.60}")
    elif not spec(value):
        raise ArtifactError(f"manifest field {where} has an invalid value {value!r:.60}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArtifactError(f"manifest field {what} must be a non-negative integer, not {value!r}")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(_int(d, "shape") for d in value)


def _tensor_specs(entries: list[dict[str, Any]], first_index: int) -> tuple[TensorSpec, ...]:
    specs = []
    for i, e in enumerate(entries):
        shape = _shape(e["shape"])
        signature = tuple(int(d) for d in e.get("shape_signature", shape))
        index = int(e.get("index", first_index + i))
        specs.append(TensorSpec(str(e["name"]), shape, np.dtype(e["dtype"]), index, signature))
    return tuple(specs)


def _check_one_tensor_per_name(inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """Inputs distinct; an output may repeat another output or an input (the same tensor, as LiteRT reports
    ``Model(x, [y, y])`` or ``Model(x, [x, y])``), but one name is one tensor."""
    names = [s.name for s in inputs]
    if len(set(names)) != len(names):
        raise ArtifactError(f"input tensor names are not unique: {names}")
    tensor: dict[str, TensorSpec] = {}
    for spec in (*inputs, *outputs):
        if tensor.setdefault(spec.name, spec) != spec:
            raise ArtifactError(f"two different tensors are named {spec.name!r}")


def _check_buffer(b: BufferSpec, size: int) -> None:
    if b.offset % ALIGNMENT:
        raise ArtifactError(f"buffer {b.name!r} offset {b.offset} is not {ALIGNMENT}-byte aligned")
    if b.nbytes != math.prod(b.shape) * b.dtype.itemsize:
        raise ArtifactError(f"buffer {b.name!r}: {b.nbytes} bytes for shape {b.shape} {b.dtype}")
    if b.offset + b.nbytes > size:
        raise ArtifactError(f"buffer {b.name!r} ends past shared_memory_size {size}")


def _signature(entry: Any, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> Signature:
    if not entry:
        return Signature("serving_default", {t.name: t.name for t in inputs},
                         {t.name: t.name for t in outputs})
    sig = Signature(str(entry["key"]), {str(k): str(v) for k, v in entry["inputs"].items()},
                    {str(k): str(v) for k, v in entry["outputs"].items()})
    if sorted(sig.inputs.values()) != sorted(t.name for t in inputs) \
            or sorted(sig.outputs.values()) != sorted(t.name for t in outputs):
        raise ArtifactError("the manifest's signature does not name exactly the model's inputs and outputs")
    return sig


def place_buffers(buffers: dict[str, BufferSpec], rounds: Sequence[RoundSpec], page_offsets: dict[str, int],
                  page: int) -> tuple[int, dict[str, int]]:
    """A layout of the shared memory in which the buffers named in ``page_offsets`` - those whose pages the
    accelerator shares with its own tensors - start at those offsets within a page, each on pages of its
    own, and every other buffer ``ALIGNMENT``-aligned. Returns (size, {name: offset}).

    Every round's inputs reuse one region and every round's outputs another: step ``r`` reads round
    ``r``'s outputs and writes round ``r + 1``'s inputs, round ``r`` reads its inputs and writes its
    outputs, so nothing that is live at once overlaps, and the shared memory stays two rounds big (it is
    the memory of LiteRT's round tensors too, whose own pages it replaces): MobileNet 6.7 MiB instead of
    41.8, ResNet-404 0.3 instead of 32.8 (the caller's proportional set size after load -17 and -20 MiB,
    the secure world's the rest). Each step then writes memory a round or two old, still in the caches,
    instead of memory last touched an inference ago: one process per variant, alternated, MobileNet's TA
    2.14-2.56 -> 1.70-1.89 ms and its inference 7.2-8.2 -> 6.2-7.3 ms, ResNet-404 16.8-23.2 -> 15.0-18.8
    ms; ResNet-44 (3.8 MiB either way) and yolov4-tiny unchanged within the noise. The manifest's layout
    reuses memory too, but puts a round's inputs where its outputs are, which shared pages cannot. The TA
    accepts any placement in which no step's buffers overlap (``tee_sim.ta_shadownet``)."""
    offsets: dict[str, int] = {}

    def pack(names: Sequence[str], start: int) -> int:
        end = start
        for name in names:
            residue = page_offsets.get(name)
            if residue is not None and residue % ALIGNMENT == 0 and 0 <= residue < page:
                offsets[name] = -(-end // page) * page + residue
                end = -(-(offsets[name] + buffers[name].nbytes) // page) * page
            else:
                offsets[name] = -(-end // ALIGNMENT) * ALIGNMENT
                end = offsets[name] + max(buffers[name].nbytes, 1)
        return end

    in_rounds = {name for r in rounds for _, name in (*r.inputs, *r.outputs)}
    end = pack([name for name in buffers if name not in in_rounds], 0)
    for side in ("inputs", "outputs"):
        start = -(-end // page) * page
        end = max([start, *(pack([name for _, name in getattr(r, side)], start) for r in rounds)])
    return max(end, 1), offsets
