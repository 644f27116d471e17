"""The public Python API (``convert``, ``load``, ``ProtectedModel``, ``Interpreter``) and the CLI's
``convert`` and ``run`` sub-commands.

The work lives elsewhere: conversion in ``converters`` (the vendor's side), protected inference in
``shadownet.runtime``, the accelerator it drives in ``shadownet.accelerator``, the LiteRT facade in
``shadownet.interpreter``, artifact checks in ``shadownet.artifacts``; this module only re-exports them
and turns CLI arguments into calls.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from shadownet.accelerator import Accelerator, AcceleratorWrapper, LiteRTAccelerator
from shadownet.artifacts import MANIFEST
from shadownet.exceptions import InputError
from shadownet.files import check_destination, write_atomically
from shadownet.interpreter import Interpreter, SignatureRunner
from shadownet.runtime import ProtectedModel, load

__all__ = ["convert", "load", "ProtectedModel", "Interpreter", "SignatureRunner", "Accelerator",
           "AcceleratorWrapper", "LiteRTAccelerator", "convert_cli", "run_cli"]


def convert(model: Any, out_dir: Any, scheme: str | None = None, seed: int | None = None, **kw: Any) -> Any:
    """Protect ``model`` (a float ``.tflite`` path or bytes, a Keras file or a SavedModel directory) into the
    artifact directory ``out_dir`` and return its manifest (a dict). ``seed`` is INSECURE (reproducible
    secrets, for tests only). Other keywords (``mask_rounds``, ``calibration``, ``device``, ``device_key``,
    ``force``, ``signature``) go to ``converters.convert``."""
    from converters import convert as _convert

    return _convert(model, out_dir, scheme=scheme, seed=seed, **kw)


# --- CLI ----------------------------------------------------------------------------------------------------
def convert_cli(args: argparse.Namespace) -> None:
    """``shadownet convert MODEL -o OUT [--scheme] [--seed] [--calibration] [--device [--device-key]]
    [--force] [--mask-rounds auto|first|all|1,2,5] [--signature KEY]``."""
    import json

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        manifest = convert(args.model, args.output, scheme=args.scheme, seed=args.seed,
                           calibration=args.calibration, device=args.device, force=args.force,
                           mask_rounds=getattr(args, "mask_rounds", None),
                           device_key=getattr(args, "device_key", None),
                           signature=getattr(args, "signature", None))
    elapsed = time.perf_counter() - start
    if not isinstance(manifest, dict):
        manifest = json.loads((Path(args.output) / MANIFEST).read_text(encoding="utf-8"))
    rounds = len(manifest.get("rounds", ()))
    summary = manifest.get("summary") or {}
    parts = [f"scheme {manifest['scheme']['name']}",
             f"{_count(rounds, 'round')} ({rounds + 1} TEE entries per inference)"]
    if "offloaded_ops" in summary:
        parts.append(f"{_count(summary['offloaded_ops'], 'linear op')} offloaded to the accelerator")
    masks = manifest.get("masks") or {}
    if not masks.get("static", True):  # which rounds the policy masked: "auto" decides per model
        masked = masks.get("one_time_rounds") or []
        which = "every round" if len(masked) == rounds else _count(len(masked), "round")
        parts.append(f"one-time masks on {which} (--mask-rounds {masks.get('policy')})")
    if summary.get("tee_linear_ops"):  # heavy work the TEE does itself: the user should know
        parts.append(f"{summary['tee_linear_ops']} run in the TEE ({', '.join(summary['tee_linear_kinds'])})")
    print(f"protected {args.model} -> {args.output}: {', '.join(parts)}, {elapsed:.1f} s")
    _print_warnings(caught)
    if manifest.get("seeded") and not any("seed" in str(w.message) for w in caught):
        print("warning: converted with --seed: the secrets are reproducible (INSECURE, for tests only)",
              file=sys.stderr)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def read_inputs(path: str, model: ProtectedModel) -> list[np.ndarray]:
    """Inputs from ``X.npy`` (single-input models) or ``X.npz`` keyed by input tensor names (or the
    signature's input names)."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would be waited on for ever
        raise InputError(f"input {path} is not a regular file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except MemoryError:  # a header that claims an array larger than memory
        raise InputError(f"{path} claims an array too large to read") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        with open(path, "rb") as f:  # numpy takes any other file for a pickle, and says so
            known = f.read(6).startswith((b"\x93NUMPY", b"PK\x03\x04"))
        if not known:
            raise InputError(f"{path} is not an .npy or .npz file") from None
        raise InputError(f"cannot read {path} as .npy/.npz: {exc}") from None
    if isinstance(loaded, np.ndarray):
        if len(model.inputs) != 1:
            raise InputError(f"the model has {len(model.inputs)} inputs: give an .npz keyed by "
                             f"{[t.name for t in model.inputs]}")
        return model.check_inputs([loaded])
    try:
        with loaded:  # each member is read (and can fail) here
            others = [name for name in loaded.zip.namelist() if not name.endswith((".npy", "/"))]
            if others:  # numpy reads them as bytes (converters.calibration._read's twin)
                raise InputError(f"{path} is a zip archive but not an .npz (it holds "
                                 f"{', '.join(others[:3])}, not .npy arrays)")
            arrays = {key: loaded[key] for key in loaded.files if not key.endswith("/")}  # a directory's
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"cannot read {path} as .npz: {exc}") from None
    except MemoryError:
        raise InputError(f"{path} claims an array too large to read") from None
    return model.check_inputs([arrays])


def write_outputs(path: str, outputs: dict[str, np.ndarray]) -> None:
    """Write ``outputs`` as an .npz at ``path`` atomically (``shadownet.files``)."""
    buffer = io.BytesIO()
    np.savez(buffer, **outputs)
    write_atomically(path, buffer.getvalue())


def _check_output(output: str, artifacts: str, given: str) -> None:
    """Refuse an ``--output`` that would replace what the run reads: a file of the protected model's
    directory (it would be lost: the model converted again) or the input file (``check_destination``), and
    one not named .npz (``y.npy`` was written as a zip of arrays under that name: a helper's probe)."""
    if output and not output.lower().endswith(".npz"):
        raise InputError(f"--output {output}: the outputs are written as an .npz keyed by output name; name "
                         "it .npz")
    check_destination(output, reads=(given, artifacts))


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Our warnings for the CLI's user, as one line each on stderr; LiteRT's debugging notices are not."""
    sys.stdout.flush()
    for w in caught:
        if "ai_edge_litert" not in w.filename:
            print(f"warning: {w.message}", file=sys.stderr)


def run_cli(args: argparse.Namespace) -> None:
    """``shadownet run OUT --input X.npy|X.npz [--output Y.npz] [--num_threads N] [--delegate PATH]
    [--verify]``; ``--verify``: the TEE checks every accelerator result (``IntegrityError`` if off by more
    than its float32 tolerance)."""
    verify = bool(getattr(args, "verify", False))
    if args.output is not None:
        _check_output(args.output, args.artifacts, args.input)
    with warnings.catch_warnings(record=True) as caught:  # the load's (verify's weak checks), as one line
        warnings.simplefilter("always")
        with load(args.artifacts, num_threads=args.num_threads, delegate=args.delegate,
                  verify=verify) as model:
            inputs = read_inputs(args.input, model)
            outputs = [np.empty(t.shape, t.dtype) for t in model.outputs]
            model.run_into(inputs, outputs)
            stats = model.stats()
    _print_warnings(caught)
    named = {t.name: o for t, o in zip(model.outputs, outputs, strict=True)}
    if args.output:
        write_outputs(args.output, named)
        print(f"wrote {args.output}: {', '.join(named)}")
    else:
        for name, value in named.items():
            print(_summary(name, value))
    ms = {key: stats[f"{key}_s"] * 1e3 for key in ("total", "accelerator", "tee")}
    print(f"{_count(stats['rounds'], 'round')}, {stats['world_switches']} TEE entries, {ms['total']:.2f} ms "
          f"(accelerator {ms['accelerator']:.2f} ms, TEE {ms['tee']:.2f} ms)")
    if verify:
        checks = stats.get("verify") or {}
        bound = checks.get("worst_bound_log2")
        if bound is None:
            print("verified: no accelerator result to check")
        else:
            print(f"verified: {checks.get('checked', 0)} accelerator results passed the TEE's checks "
                  f"({checks.get('projections', 0)} secret projections over {checks.get('layers', 0)} "
                  f"layers; a change of 1e-3 of a result passes them with probability <= 2^{bound:.0f}; "
                  "changes below their float32 tolerance pass: SECURITY.md)")


def _summary(name: str, value: np.ndarray) -> str:
    line = f"{name}: shape {list(value.shape)} {value.dtype}"
    if value.size and np.issubdtype(value.dtype, np.number):
        rows = value.reshape(-1, value.shape[-1] if value.ndim else 1)
        # Scores (floats) get their argmax and top 5; integers (indices, counts) are not scores.
        if rows.shape[0] <= 4 and rows.shape[1] > 1 and value.dtype.kind == "f":
            parts = []
            for row in rows:
                top = np.argsort(row)[::-1][:5]
                parts.append("top-5 " + ", ".join(f"{i}:{row[i]:.4g}" for i in top))
            line += "; argmax " + ", ".join(str(int(np.argmax(r))) for r in rows) + "; " + "; ".join(parts)
        else:
            line += f"; min {value.min():.4g}, max {value.max():.4g}, mean {value.mean():.4g}"
    return line
