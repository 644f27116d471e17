"""Whether the reference a user gives ``shadownet audit`` is the model that was converted: the attacks score
against its filters, so another model's would make any report meaningless (a clean one of a broken scheme, or
a broken one of a sound scheme). ``check_covers``: its architecture; ``check_outputs``: its outputs on the
audit's inputs; ``protected_signature``: of a file of several signatures, the one converted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from shadownet.audit_layers import LinearLayer, match_layers, model_bytes
from shadownet.exceptions import ArtifactError, ModelFormatError, ShadowNetError


def check_covers(reference: list[LinearLayer], obfuscated: list[LinearLayer], source: Any) -> None:
    """``ArtifactError`` unless the reference has the protected model's architecture, near enough: at least
    half of the offloaded layers and half of the reference's linear layers pair up. Another architecture
    that takes the same inputs gave false pairs and a clean report of a broken scheme (a probe's MiniVGG
    against ResNet-44: "0% recovered", exit 0; a review's ResNet-44 against ResNet-404: 14.6%, where its
    own reference finds 99.9%). A similar model with another head, or the converted model whose narrow
    grouped convolutions run in the TEE, pairs up but for a few layers: audited, the rest listed as
    unmatched."""
    pairs, _, _ = match_layers(reference, obfuscated)
    if 2 * len(pairs) < len(obfuscated) or 2 * len(pairs) < len(reference):
        raise ArtifactError(f"the reference {source} is not the protected model's architecture: "
                            f"{len(pairs)} of its {len(reference)} linear layers pair up with the "
                            f"{len(obfuscated)} offloaded ones: give the model that was converted")


# The reference computes the protected model's outputs when they are within REFERENCE_TOLERANCE of their
# largest, or correlate at REFERENCE_CORRELATION or more over the audit's inputs: the paper's scheme errs
# by an absolute amount (its fakes, its masks' size), 4.5e-3 on the zoo but 0.05 of ResNet-44's outputs
# calibrated on 0-255 images and fed [0, 1] ones, where they still correlate at 0.9994 (a review); another
# model of the same architecture is of order 1 off (0.03-0.05 through an untrained softmax's near-uniform
# outputs) and correlates at 0.2.
REFERENCE_TOLERANCE = 0.01
REFERENCE_CORRELATION = 0.99


def check_outputs(reference: Any, manifest: dict, batches: list[list[np.ndarray]],
                  seen: dict[str, np.ndarray], given: Any) -> None:
    """``ArtifactError`` unless the reference computes the protected model's outputs on the audit's inputs:
    a model of the same architecture with other weights pairs up layer by layer, and the attacks then
    score against the wrong filters (a probe: the paper's scheme '0% recovered', exit 0, where its own
    reference finds 100%)."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.fidelity import relative_error

    interpreter = Interpreter(model_content=model_bytes(reference), num_threads=1)
    interpreter.allocate_tensors()
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    names = [t["name"] for t in manifest.get("outputs", [])]
    ours: list[np.ndarray] = []
    theirs: list[np.ndarray] = []
    for k, batch in enumerate(batches):
        for d, x in zip(inputs, batch, strict=True):
            interpreter.set_tensor(d["index"], x)
        interpreter.invoke()
        for d, name in zip(outputs, names, strict=False):
            protected = seen.get(f"output/{name}")
            # Float outputs: an integer one (an argmax) may flip on a near tie, honestly.
            if protected is not None and protected.dtype.kind == "f":
                ours.append(protected[k].reshape(-1))
                theirs.append(interpreter.get_tensor(d["index"]).reshape(-1))
    if len(outputs) != len(names) or [a.size for a in ours] != [b.size for b in theirs]:
        raise ArtifactError(f"the reference {given} has other outputs than the protected model: give the "
                            "model that was converted")
    if not ours:
        return  # nothing to compare (integer outputs only)
    got, want = np.concatenate(ours).astype(np.float64), np.concatenate(theirs).astype(np.float64)
    off = relative_error(got, want)
    got, want = got - got.mean(), want - want.mean()
    scale = math.sqrt(float(got @ got) * float(want @ want))
    correlation = float(got @ want) / scale if scale > 0 else 0.0
    if off > REFERENCE_TOLERANCE and correlation < REFERENCE_CORRELATION:
        raise ArtifactError(f"the reference {given} does not compute the protected model's outputs on "
                            f"the audit's inputs (off by {off:.2g} of their largest, correlation "
                            f"{correlation:.3f}): give the model that was converted")


def protected_signature(reference: Any, manifest: dict, what: str = "reference") -> bytes:
    """The reference model's ``.tflite`` bytes, read once - from any form ``convert`` takes (bytes, a
    ``.tflite``, a Keras model file or a SavedModel directory, converted as ``convert`` converts them: a
    Keras file was "not a TFLite model", a helper's review); of a reference of several signatures the one
    converted (``convert --signature``; the manifest's key): the audit read subgraph 0 otherwise, another
    signature's (a review: the right file refused, 'off by 0.5')."""
    from ai_edge_litert import schema_py_generated as schema_fb

    from converters.original_model import one_signature, tflite_bytes

    key = (manifest.get("signature") or {}).get("key")
    if isinstance(reference, bytes | bytearray | memoryview):
        data = bytes(reference)
    else:
        try:  # a SavedModel converted with --signature: that signature, as convert took it
            data = tflite_bytes(reference, key if Path(reference).is_dir() else None)
        except OSError as exc:
            raise ModelFormatError(f"cannot read {what} {reference}: {exc.strerror or exc}") from None
        except ModelFormatError as exc:  # its message begins with the path, or "model PATH"
            raise ModelFormatError(f"{what} {exc}") from None
    try:
        count = schema_fb.Model.GetRootAs(data, 0).SignatureDefsLength()
    except Exception:  # noqa: BLE001 - a damaged file: reference_graph says so
        return data
    if count <= 1:
        return data
    try:
        return one_signature(data, key)
    except (ValueError, ShadowNetError) as exc:
        raise ArtifactError(f"{what} {reference}: {exc}") from None
