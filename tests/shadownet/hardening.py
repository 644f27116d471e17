"""Helpers of the hardening tests (fuzzing, wrong use, faults): a small protected model made without
TensorFlow (``shadownet.fuzz_worker.seed_models``), its LiteRT reference, and artifact surgery."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shadownet import fuzz_worker

SEED = 7  # reproducible secrets: INSECURE, tests only


@dataclass(frozen=True)
class Small:
    original: bytes
    out: Path          # artifact directory, sealed for this process's default secure world
    program: bytes     # the TEE program inside secrets.sealed (captured at conversion)

    def input(self, seed: int = 0) -> np.ndarray:
        spec = json.loads((self.out / "manifest.json").read_text())["inputs"][0]
        return np.random.default_rng(seed).uniform(-1, 1, spec["shape"]).astype(spec["dtype"])

    def reference(self, x: np.ndarray) -> np.ndarray:
        return fuzz_worker._litert(self.original, x)


def protect_small(directory: Path, which: int = 0) -> Small:
    """Convert seed model ``which`` into ``directory / "out"`` (default device), keeping its program."""
    from converters import pipeline

    original = fuzz_worker.seed_models()[which]
    captured: list[bytes] = []
    real = pipeline.provision

    def capture(program: bytes, *args: Any) -> bytes:
        captured.append(program)
        return real(program, *args)

    pipeline.provision = capture
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipeline.convert(original, directory / "out", seed=SEED)
    finally:
        pipeline.provision = real
    return Small(original, directory / "out", captured[-1])




def copy_artifacts(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def rehash(directory: Path, *names: str) -> None:
    """Record the files' current SHA-256 in the manifest, as an attacker who owns the normal world would."""
    manifest = read_manifest(directory)
    for name in names:
        manifest["files"][name]["sha256"] = hashlib.sha256((directory / name).read_bytes()).hexdigest()
    write_manifest(directory, manifest)


def reseal(directory: Path, program: bytes) -> None:
    """Provision ``program`` to this device's trusted app (as a converter would) into ``directory``."""
    from converters.provisioning import provision

    (directory / "secrets.sealed").write_bytes(provision(program))
    rehash(directory, "secrets.sealed")
