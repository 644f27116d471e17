"""Reading and checking an artifact directory (``untrusted.tflite``, ``secrets.sealed``, ``manifest.json``).

The manifest is public metadata written by the converter (contract: /work/notes/interfaces.md, section 5).
Everything in it is checked here, once, before any of it is used: the normal world may have edited it, and a
buffer layout that overflows the shared memory must fail here, not as a crash in the hot path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadownet.exceptions import ArtifactError, SecurityError

FORMAT = "shadownet-artifacts"
KNOWN_VERSIONS = frozenset({1})
UNTRUSTED = "untrusted.tflite"
SECRETS = "secrets.sealed"
MANIFEST = "manifest.json"
ALIGNMENT = 64


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    index: int                      # the original model's LiteRT tensor index
    shape_signature: tuple[int, ...]


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

    @property
    def untrusted_path(self) -> Path:
        return self.directory / UNTRUSTED


def read_artifacts(directory: str | os.PathLike) -> Artifacts:
    """Read and validate an artifact directory; ArtifactError / SecurityError name what is wrong."""
    root = Path(directory)
    if not root.is_dir():
        if root.is_file():
            raise ArtifactError(f"{root} is a file, not an artifact directory (see `shadownet convert`)")
        raise ArtifactError(f"artifact directory {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: not a directory written by `shadownet convert`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a ShadowNet manifest (format is not {FORMAT!r})")
    version = manifest.get("format_version")
    if version not in KNOWN_VERSIONS:
        known = ", ".join(map(str, sorted(KNOWN_VERSIONS)))
        raise ArtifactError(f"{path}: unknown format_version {version!r} (this runtime reads {known}); "
                            "upgrade shadownet or re-convert")
    try:
        return _parse(root, manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path} is malformed ({type(exc).__name__}: {exc})") from None


def _parse(root: Path, m: dict[str, Any]) -> Artifacts:
    files = {name: _read_checked(root, name, m["files"]) for name in (UNTRUSTED, SECRETS)}
    inputs = _tensor_specs(m["inputs"], first_index=0)
    outputs = _tensor_specs(m["outputs"], first_index=len(inputs))
    if not inputs or not outputs:
        raise ArtifactError("the manifest lists no model input or no model output")
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
        if b is None or b.shape != tensor.shape or b.dtype != tensor.dtype:
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


def _read_checked(root: Path, name: str, hashes: dict[str, Any]) -> bytes:
    path = root / name
    if not path.is_file():
        raise ArtifactError(f"{root} is incomplete: {name} is missing")
    data = path.read_bytes()
    expected = hashes[name]["sha256"]
    if hashlib.sha256(data).hexdigest() != str(expected).lower():
        # Either file may have been swapped or damaged; both are what an attacker would do.
        raise SecurityError(f"{path} does not match the SHA-256 recorded in {MANIFEST} (tampered, truncated "
                            "or swapped)")
    return data


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
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ArtifactError(f"tensor names are not unique: {names}")
    return tuple(specs)


def _check_buffer(b: BufferSpec, size: int) -> None:
    if b.offset % ALIGNMENT:
        raise ArtifactError(f"buffer {b.name!r} offset {b.offset} is not {ALIGNMENT}-byte aligned")
    if b.nbytes != int(np.prod(b.shape, dtype=np.int64)) * b.dtype.itemsize:
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
