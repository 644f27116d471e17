"""``convert``: a float model in, the protected artifact directory out (the vendor's side, offline).

(This module is not named ``convert``: the package exposes the function ``converters.convert``, which a
submodule of the same name would shadow.)

Steps: read the model (``.tflite``; Keras files and SavedModel directories go through TensorFlow's
converter first), normalize, partition into rounds, estimate each offloaded input's activation scale by
running the ORIGINAL model in LiteRT on calibration inputs, obfuscate and mask with the scheme, lay out
the TEE program, provision it to the target device's ShadowNet trusted app through attestation (so no
secret is ever written in clear), and write ``untrusted.tflite``, ``secrets.sealed`` and
``manifest.json`` atomically.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as schema_fb

from converters import tf_input
from converters.calibration import activation_stats, calibration_inputs, split_needed
from converters.graph import Graph, is_offloadable, write_model
from converters.non_float import CARRIED
from converters.normalize import normalize
from converters.partition import input_rounds, partition
from converters.per_inference import DEFAULT_MASK_ROUNDS, parse_mask_rounds
from converters.plan import LINEAR_KINDS, build
from converters.provisioning import device_file, fingerprint_of, manifest_digest, provision, ta_uuid
from converters.schemes import Scheme, get_scheme, group_min_channels, kept_in_tee
from converters.shape_folding import DATA_SHAPED, SHAPE_INPUTS, fold_shapes
from converters.tflite_reader import read_model, read_signatures
from shadownet.exceptions import ArtifactError, ModelFormatError, UnsupportedOpError
from tee_sim.program import round_of, write_program

FORMAT = "shadownet-artifacts"
FORMAT_VERSION = 1
UNTRUSTED, SECRETS, MANIFEST = "untrusted.tflite", "secrets.sealed", "manifest.json"
ARTIFACTS = frozenset({UNTRUSTED, SECRETS, MANIFEST})


def convert(model: Any, out_dir: str | os.PathLike, scheme: str | Scheme | None = None,
            seed: int | None = None,
            calibration: str | os.PathLike | dict[str, np.ndarray] | np.ndarray | None = None,
            device: Any = None,
            force: bool = False, mask_rounds: str | Sequence[int] | None = None,
            device_key: str | None = None, signature: str | None = None) -> dict[str, Any]:
    """Protect ``model`` into ``out_dir``; return the manifest.

    ``model``: a float ``.tflite`` (path or bytes), a Keras model file or a SavedModel directory.
    ``scheme``: a registered name (default ``converters.schemes.DEFAULT_SCHEME``, groupmix),
    ``"name:key=value,..."`` or a ``Scheme``.
    ``seed``: INSECURE, reproducible secrets for tests only (anyone who guesses it regenerates the fakes,
    scales and permutations and gets the weights back); the manifest records ``"seeded": true``.
    ``calibration``: an ``.npz`` (or dict) of representative inputs keyed by input name (tensor or signature
    name; for a single-input model also an ``.npy`` or an array), one sample of the input's shape or several
    stacked on the batch axis; default: random normal inputs.
    ``device``: None (this machine's simulated device), a device identity file written by
    ``shadownet device export`` on the target device (read once, before any work), or a ``tee_sim.Context``
    of the target device.
    ``device_key``: with a device file, the fingerprint its device key must have (``shadownet device export``
    prints it on the device); without, the file's key is trusted as it is, with a warning naming it.
    ``force``: replace a non-empty ``out_dir``.
    ``mask_rounds``: the rounds that get one-time masks when the scheme's masks are not static (``"first"``,
    ``"all"``, ``"1,2,5"``; default ``converters.per_inference.DEFAULT_MASK_ROUNDS``; round 1 always, and
    every round a user input joins later: ``converters.partition.input_rounds``).
    ``signature``: the key of the signature to protect, in a model that has several (one protected model
    runs one signature); a model of one signature is protected whole.
    Raises ``ModelFormatError``, ``UnsupportedOpError``, ``ArtifactError``, ``SecurityError``.
    """
    out = Path(out_dir)
    _check_output(out, force, [p for p in (model, calibration, device) if isinstance(p, str | os.PathLike)])
    if device_key is not None:
        fingerprint_of(device_key)
        if device is None or hasattr(device, "open_session"):
            raise ValueError("a device key is pinned for a device file: give the file too (--device FILE)")
    if device is not None and not hasattr(device, "open_session"):
        device = device_file(device, device_key, warn=True)  # read once, before the work
    chosen = get_scheme(scheme)
    if not getattr(chosen, "static_masks", True) and getattr(chosen, "mask_scale", None) == 0:
        warnings.warn(f"{chosen.name}:mask_scale=0 sends the user's input to the accelerator unmasked (for "
                      "measurements: the input's protection is gone)", stacklevel=2)
    original = one_signature(_model_bytes(model, signature), signature)
    read = read_model(original)
    _check_interface(read)
    samples = calibration_inputs(read, calibration)
    _shape_as_litert(original, read, samples[0] if calibration is not None else None)
    graph = normalize(read, group_min_channels(chosen))
    _check_static(graph)
    part = partition(graph, kept_in_tee(chosen))
    if not part.rounds:
        raise UnsupportedOpError(_nothing_offloaded(graph, chosen))
    rng = secret_rng(seed)
    needed = {graph.ops[i].inputs[0] for r in part.rounds for i in r}
    floats = {t for t in graph.inputs if graph.tensors[t].dtype == np.float32}
    stats = activation_stats(graph, needed | floats, samples)
    static = getattr(chosen, "static_masks", True)
    if static and mask_rounds is not None:
        warnings.warn(f"scheme {chosen.name} uses static masks: mask_rounds={mask_rounds!r} is ignored",
                      stacklevel=2)
    carrying = input_rounds(part)  # round 1, and any round a user input joins later: always masked
    one_time = [] if static else parse_mask_rounds(mask_rounds, len(part.rounds), carrying)
    deeper = [r for r in one_time if r not in carrying]  # what the policy adds, at its costs
    if not static and len(carrying) > 1:
        warnings.warn(f"round(s) {carrying[1:]} carry a user input that joins after round 1 with no "
                      "offloaded layer between: they get one-time masks as round 1 does, each such layer "
                      "computing at the mask's magnitude in float32 and taking secure memory in every pool "
                      "entry", stacklevel=2)
    if deeper:
        warnings.warn(f"one-time masks on {len(deeper)} round(s) besides those that carry the user's input: "
                      "each such layer "
                      "computes at the mask's magnitude (by default 10x its input's) in float32, and each "
                      "takes secure memory in every pool entry (with 'all', MobileNet's outputs measured "
                      "7e-4 relative error at the median, up to 3e-3, against 5e-5 and 1.7e-4 with "
                      "'first'; see SECURITY.md)", stacklevel=2)
    _warn_of_large_refill_layers(graph, part, one_time)
    # Where round 1's exact split is worth its cost (converters.exact_split): measured, for the auto policy.
    needs_split = split_needed(graph, samples, stats, chosen) \
        if one_time and getattr(chosen, "exact_split", None) == "auto" else {}
    plan = build(graph, part, chosen, rng, stats, one_time, needs_split, samples)
    masks = plan.program.get("one_time", {}).get("masks", {}).values()
    # A one-time mask follows its input's spread in the TEE (tee_sim.mask_spread); these do not: static
    # masks, and a one-time mask whose input had no spread on the calibration inputs (all zeros).
    unfollowed = sorted({round_of(m["buffer"], "in") for m in masks if "spread" not in m})
    fixed = ["static masks"] if static or getattr(chosen, "static_mask_scale", 0) > 0 else []
    if unfollowed:
        fixed.append(f"the one-time masks of round(s) {unfollowed}")
    if calibration is None and fixed:
        warnings.warn(f"no calibration inputs: {' and '.join(fixed)} are sized on the activations of random "
                      "N(0, 1) inputs "
                      "(zeros for integer and bool inputs); inputs of a larger spread "
                      "(0-255 pixels, say) are hidden less by them, of a much smaller one lose precision to "
                      "them: give representative inputs (--calibration FILE.npz; calibration= in Python)",
                      stacklevel=2)
    if calibration is None and needs_split and any(
            m["buffer"].startswith("round_1/") and "split" not in m for m in masks):
        # The auto policy measured the mask's rounding on random inputs, which can understate it.
        warnings.warn("round 1's masked input crosses unsplit (converters/exact_split.py): the auto policy "
                      "measured the mask's rounding on random N(0, 1) inputs, which can understate it (a "
                      "probe's ResNet50: 3e-6 on them, 6e-5 on its own inputs, its outputs then up to 4e-4 "
                      "from LiteRT's): give --calibration (calibration=), or --scheme (scheme=) "
                      "groupmix:exact_split=first", stacklevel=2)
    plan.program["untrusted_sha256"] = hashlib.sha256(plan.untrusted).hexdigest()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "scheme": {"name": chosen.name, "params": chosen.public_params()},
        "seeded": seed is not None,
        **_io_description(original),
        "rounds": plan.rounds, "buffers": plan.buffers, "shared_memory_size": plan.shared_memory_size,
        "ta_uuid": str(ta_uuid()),
        "summary": plan.summary,
        "created_by": f"shadownet {_version()}",
        "masks": {"one_time_rounds": one_time, "static": static, "input_rounds": carrying,
                  "policy": None if static else str(mask_rounds or DEFAULT_MASK_ROUNDS)},
    }
    # The manifest's fields the runtime acts on are sealed with the program: the TA refuses, at LOAD_MODEL,
    # a manifest edited or damaged after conversion instead of running with the wrong layout.
    plan.program["manifest_sha256"] = manifest_digest(manifest).hex()
    program = write_program(plan.program, plan.arrays)
    del plan.arrays
    sealed = provision(program, device, device_key)
    del program
    manifest["files"] = {UNTRUSTED: {"sha256": hashlib.sha256(plan.untrusted).hexdigest()},
                         SECRETS: {"sha256": hashlib.sha256(sealed).hexdigest()}}
    _write_artifacts(out, force, {UNTRUSTED: plan.untrusted, SECRETS: sealed,
                                  MANIFEST: (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()})
    return manifest


# -- inputs ------------------------------------------------------------------------------------------------

def _model_bytes(model: Any, signature: str | None = None) -> bytes:
    """The ``.tflite`` bytes of ``model`` (bytes, a ``.tflite``, a Keras file or a SavedModel directory, whose
    signature ``signature`` TensorFlow converts)."""
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    path = Path(model)
    if not path.exists():
        raise ModelFormatError(f"model {path} does not exist")
    if path.is_dir():
        if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
            raise ModelFormatError(f"{path} is a directory but not a SavedModel (no saved_model.pb)")
        return tf_input.convert(path, "saved_model", signature)
    data = path.read_bytes()
    if data[4:8] == b"TFL3":
        return data
    keras_container = data[:4] in (b"PK\x03\x04", b"\x89HDF")  # a .keras zip, an .h5 HDF5 file
    if path.suffix in (".keras", ".h5", ".hdf5") and not keras_container:
        # Refused before TensorFlow is imported: it would log to stderr and say "File not found".
        raise ModelFormatError(f"{path} is not a Keras model file (a .keras file is a zip archive, an .h5 "
                               "file HDF5)")
    if data[:4] == b"PK\x03\x04" and not _keras_zip(path):
        raise ModelFormatError(f"{path} is a zip archive but not a Keras model file (no config.json in it)")
    if keras_container:
        return tf_input.convert(path, "keras")
    raise ModelFormatError(f"{path} is neither a .tflite, a Keras model file nor a SavedModel directory")


# Half of OP-TEE's default secure memory (tee_sim's default cap is 64 MiB).
LARGE_REFILL_LAYER = 32 << 20


def _warn_of_large_refill_layers(graph: Any, part: Any, one_time: Sequence[int]) -> None:
    """Warn when a layer of a round with one-time masks holds LARGE_REFILL_LAYER bytes of weights or more:
    the trusted app reads a layer's obfuscated weights into secure memory, whole, to make its unblinding
    terms at every refill (``tee_sim.obfuscated_weights.Weights``), on top of everything else it holds (a
    32768 x 512 dense first layer, 64 MiB, does not load under the 64 MiB cap)."""
    large = []
    for r in one_time:
        for i in part.rounds[r - 1]:
            data = graph.tensors[graph.ops[i].inputs[1]].data
            if data is not None and data.size * 4 >= LARGE_REFILL_LAYER:
                large.append(f"{graph.describe_op(i)} of round {r}: {data.size * 4 / (1 << 20):.0f} MiB")
    if large:
        warnings.warn(f"one-time masks on layers with large weights ({'; '.join(large)}): the trusted app "
                      "reads such a layer's weights into secure memory whole at every refill of its pool, "
                      "beside what else it holds; under OP-TEE's default 64 MiB the model may not load",
                      stacklevel=3)


def _keras_zip(path: Path) -> bool:
    """Whether a zip archive is a Keras v3 model file (config.json at its top), not e.g. an .npz."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "config.json" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def secret_rng(seed: int | None) -> np.random.Generator:
    """The generator every secret comes from: seeded with 256 bits from the OS CSPRNG, or (INSECURE,
    tests only) from ``seed`` with a warning."""
    if seed is None:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(secrets.randbits(256))))
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer (or None), not {seed!r}")
    warnings.warn(f"converting with seed={seed}: the secrets are reproducible by anyone who guesses the seed "
                  "(INSECURE, for tests only)", stacklevel=3)
    return np.random.Generator(np.random.PCG64(seed))


def one_signature(original: bytes, key: str | None) -> bytes:
    """``original`` as a model of the one signature to protect: itself when it has at most one (``key``, if
    given, must name it), else the subgraph of signature ``key`` written as a model of its own, with that
    signature (``read_model`` reads subgraph 0 only: without a key the others would be left out silently,
    so a model of several signatures needs one)."""
    try:  # a cheap look before the whole file is read and checked (read_model reports a damaged one)
        count = schema_fb.Model.GetRootAs(original, 0).SignatureDefsLength()
    except Exception:  # noqa: BLE001 - the flatbuffer reader fails however a bad offset leads it to
        count = 0
    if count <= 1 and key is None:
        return original
    graphs = read_signatures(original)
    keys = [g.signature.key for g in graphs]
    listed = ", ".join(map(repr, keys))
    if key is None:
        raise UnsupportedOpError(f"the model has {len(keys)} signatures ({listed}): a protected model runs "
                                 "one; choose it with --signature KEY (signature= in Python)")
    if key not in keys:  # a wrong argument, as an unknown scheme is
        raise ValueError(f"the model has no signature {key!r}" + (f" (it has {listed})" if keys else
                                                                   " (it has none)"))
    return original if len(keys) == 1 else write_model(graphs[keys.index(key)])


def _check_interface(graph: Graph) -> None:
    """Refuse, before any work, model inputs and outputs the protected model cannot have: of a type no
    float32 carries (``converters.non_float``), or inputs with an open dimension besides the batch (LiteRT
    gives such a dimension size 1 in the file's shape, which the converter would otherwise plan with,
    silently)."""
    for kind, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            tensor = graph.tensors[t]
            if tensor.dtype != np.float32 and tensor.dtype not in CARRIED:
                raise UnsupportedOpError(f"model {kind} {tensor.name!r} is {np.dtype(tensor.dtype).name}: a "
                                         f"protected model's {kind}s are float32, integers, bool, float16 or "
                                         "float64")
            signature = tensor.shape_signature
            if kind == "input" and signature is not None and any(d < 0 for d in signature[1:]):
                raise ModelFormatError(f"model input {tensor.name!r} has open dimensions (shape signature "
                                       f"{list(signature)}): convert the model with a fixed input shape (an "
                                       "open batch alone is taken as 1)")


def _check_static(graph: Graph) -> None:
    """Refuse what the TEE program cannot hold: shapes decided at run time, outputs no op computes."""
    open_batch = any((graph.tensors[t].shape_signature or (0,))[:1] == (-1,) for t in graph.inputs)
    hint = (" (the model's batch dimension is open: convert it with batch size 1, or give ShadowNet the "
            "Keras model or SavedModel, which it converts at batch size 1)") if open_batch else ""
    for i, op in enumerate(graph.ops):
        if op.kind in DATA_SHAPED:
            raise UnsupportedOpError(f"{graph.describe_op(i)}: its output's shape depends on the data, which "
                                     "the TEE program, its buffers fixed, cannot hold")
        for position in SHAPE_INPUTS.get(op.kind, ()):
            if position < len(op.inputs) and op.inputs[position] >= 0 \
                    and graph.tensors[op.inputs[position]].data is None:
                name = graph.tensors[op.inputs[position]].name
                raise UnsupportedOpError(f"{graph.describe_op(i)} takes its shape from the computed tensor "
                                         f"{name!r}: shapes decided at run time are not supported{hint}")
    written = {t for op in graph.ops for t in op.outputs}
    for t in graph.outputs:
        if t not in written and t not in graph.inputs:
            raise UnsupportedOpError(f"model output {graph.tensors[t].name!r} is a constant: nothing to "
                                     "protect there, and ShadowNet's outputs are computed")
    if all(t in graph.inputs for t in graph.outputs):
        raise UnsupportedOpError("every model output is a model input: nothing to protect")


def _nothing_offloaded(graph: Graph, scheme: Scheme) -> str:
    """Why a model has no round, for the refusal: no linear op with constant weights, or only ones the TEE
    runs itself (which, and what would offload them)."""
    kept = kept_in_tee(scheme)
    linear = [(op.kind, is_offloadable(graph, i)) for i, op in enumerate(graph.ops)
              if op.kind in LINEAR_KINDS]
    if not linear:
        return "the model has no linear op (CONV_2D, FULLY_CONNECTED, ...): nothing to protect"
    kinds = ", ".join(sorted({kind for kind, _ in linear}))
    why = []
    if any(kind in kept and offloadable for kind, offloadable in linear):
        why.append(f"scheme {scheme.name} keeps {', '.join(sorted(kept))} in the TEE (--scheme "
                   "groupmix:depthwise=offload offloads depthwise layers)")
    if any(not offloadable for _, offloadable in linear):
        narrow = group_min_channels(scheme)
        groups = "grouped convolutions" if narrow is None else \
            f"grouped convolutions of groups narrower than {narrow} input channels"
        why.append(f"{groups}, matrix products, 3-D convolutions, convolutions dilated so far that their "
                   "taps lie more than twice their input apart and layers of computed weights run in the TEE")
    if any(offloadable and kind not in kept for kind, offloadable in linear):  # partition.offloads' last rule
        why.append("a layer whose input is a constant is computed with it, in the TEE")
    return (f"nothing to offload: the model's linear ops ({kinds}) all run in the TEE, weights and all: "
            f"{'; '.join(why)}")


def planning_graph(original: bytes) -> Graph:
    """A ``.tflite`` as the converter plans with it (before ``normalize``): read, run once by LiteRT, which
    gives a tensor of open shape its shape at batch 1, and shapes computed from shapes folded. For what must
    see the graph the converter saw: the audit's reference, the bench's count of what is offloaded (read
    without it, a Keras model's transposed convolution at an open batch was no linear layer: a probe)."""
    graph = read_model(original)
    _shape_as_litert(original, graph)
    return graph


def _shape_as_litert(original: bytes, graph: Graph, sample: list[np.ndarray] | None = None) -> None:
    _check_litert_runs(original, graph, sample)
    fold_shapes(graph, original)


def _check_litert_runs(original: bytes, graph: Graph, sample: list[np.ndarray] | None = None) -> None:
    """LiteRT prepares and runs the model once (on ``sample``, the user's first calibration input, else on
    zeros): its own checks of what the graph layer does not model (op arity, ranks, options) refuse a
    damaged model here, as a ModelFormatError, before any work; and every tensor's shape in the file must
    be the one LiteRT computes (the converter plans with the file's; a tensor of open shape takes LiteRT's,
    at batch 1). Without the XNNPACK delegate: its kernels take the file's shapes on trust, the builtin
    kernels' Prepare checks them and computes every output shape. (The user's inputs, not zeros, where
    they are given: a model that divides by an integer input fails on zeros.)"""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    computed: dict[int, tuple[int, ...]] = {}
    # Then with XNNPACK, which the converter and the runtime use and which checks some options itself.
    for resolver in (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, OpResolverType.AUTO):
        on = ""  # where it failed: preparing the model, or running it on the user's input
        try:
            interpreter = Interpreter(model_content=original, num_threads=1,
                                      experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
            for i, d in enumerate(interpreter.get_input_details()):
                interpreter.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]) if sample is None
                                       else sample[i])
            on = "" if sample is None else " on the first calibration input"  # its values may be why
            interpreter.invoke()
            computed = computed or {d["index"]: tuple(int(n) for n in d["shape"])
                                    for d in interpreter.get_tensor_details()}
        except (ValueError, RuntimeError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ModelFormatError(f"LiteRT cannot run the model{on}: {message}") from None
    for t, tensor in enumerate(graph.tensors):
        if t in computed and computed[t] != tensor.shape:
            if any(d < 0 for d in tensor.shape_signature or ()):
                # A tensor of open shape (an open batch's): the file holds a placeholder, LiteRT's shape at
                # batch 1 is the one to plan with (_check_static refuses shapes that ops compute at run time).
                graph.tensors[t] = dataclasses.replace(tensor, shape=computed[t])
                continue
            raise ModelFormatError(f"corrupt TFLite model: tensor {t} {tensor.name!r} has shape "
                                   f"{list(tensor.shape)} in the file, LiteRT computes {list(computed[t])}")


def _io_description(original: bytes) -> dict[str, Any]:
    """The original model's inputs / outputs as LiteRT reports them, and its signature."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=original)

    def spec(d: dict[str, Any]) -> dict[str, Any]:
        return {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                "index": int(d["index"]), "shape_signature": [int(x) for x in d["shape_signature"]]}

    inputs = [spec(d) for d in interpreter.get_input_details()]
    outputs = [spec(d) for d in interpreter.get_output_details()]
    result: dict[str, Any] = {"inputs": inputs, "outputs": outputs}
    signatures = interpreter._get_full_signature_list()
    if signatures:
        key, sig = next(iter(signatures.items()))
        names = {d["index"]: d["name"] for d in (*inputs, *outputs)}
        try:
            signature = {"key": key, "inputs": {k: names[v] for k, v in sig["inputs"].items()},
                         "outputs": {k: names[v] for k, v in sig["outputs"].items()}}
        except KeyError:
            signature = None
        # Kept only when it names each input and output once (what the runtime accepts), else the
        # tensor names serve, as for a model without signature.
        def same(named: dict[str, str], details: list[dict[str, Any]]) -> bool:
            return sorted(named.values()) == sorted(d["name"] for d in details)

        if signature and same(signature["inputs"], inputs) and same(signature["outputs"], outputs):
            result["signature"] = signature
    # One name per tensor: an output may repeat another output or be an input (Keras's Model(x, [y, y]),
    # Model(x, [x, y])), as LiteRT reports it - the same tensor, named and indexed once.
    by_name = {d["name"]: d["index"] for d in (*inputs, *outputs)}
    if (not inputs or not outputs or len(by_name) != len({d["index"] for d in (*inputs, *outputs)})
            or len({d["name"] for d in inputs}) != len(inputs)):
        names = [d["name"] for d in (*inputs, *outputs)]
        raise ModelFormatError(f"the model's inputs and outputs must be at least one each, with one name per "
                               f"tensor and distinct inputs: {names}")
    return result


# -- output ------------------------------------------------------------------------------------------------

def _check_output(out: Path, force: bool, reads: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse an output directory the conversion cannot write, or may not replace: the current directory
    or one above it, a file, a non-empty directory without ``force`` (with it, one that holds anything but
    a conversion's files), or one that holds a file or directory in ``reads`` (the model, calibration and
    device files given by path), which replacing it would delete."""
    out = Path(os.path.realpath(out))
    try:
        here = Path(os.path.realpath(os.getcwd()))
    except OSError:  # the working directory was deleted: nothing to protect
        here = None
    if here is not None and (out == here or out in here.parents):
        raise ArtifactError(f"output directory {out} is the current directory or holds it: the conversion "
                            "renames its directory into place, so give the name of another directory")
    for path in reads:
        real = Path(os.path.realpath(path))
        if real == out or out in real.parents:
            raise ArtifactError(f"output directory {out} holds {path}, which the conversion reads: replacing "
                                "the directory would delete it, so give the name of another directory")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ArtifactError(f"output directory {out} is not empty (--force, or force=True, replaces an "
                            "earlier conversion's)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ARTIFACTS or not p.is_file()) \
        if out.is_dir() else []
    if foreign:  # force replaces an earlier conversion, not whatever a mistyped -o named
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ArtifactError(f"output directory {out} holds what no conversion wrote ({listed}): replacing it "
                            "would delete them, so move them or give the name of another directory")


def _write_artifacts(out: Path, force: bool, files: dict[str, bytes]) -> None:
    """Write into a temporary sibling directory, manifest.json last, then rename it into place: a reader
    never sees half, and a sibling left by a killed conversion lacks its manifest (``load`` refuses it)
    unless it is complete. Such leftovers (named after a process that no longer runs) are removed first.
    A directory replaced with ``force`` is put back if its replacement fails. The sibling is made beside
    where ``out`` really is (a symlink's target: the rename stays on one file system)."""
    out = Path(os.path.realpath(out))
    _check_output(out, force)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, out.name)
    stem = f".{out.name}.{os.getpid()}."
    try:
        tmp = Path(tempfile.mkdtemp(prefix=stem, suffix=".tmp", dir=parent))
    except OSError as exc:  # the output's name, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(out)) from exc
    old: Path | None = None
    try:
        for name in sorted(files, key=lambda n: n == MANIFEST):
            with open(tmp / name, "wb") as f:
                f.write(files[name])
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        if out.exists() and any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=stem, suffix=".old", dir=parent))
            os.replace(out, old / "replaced")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "replaced", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)  # onto an empty directory too: one rename
        _sync_directory(parent)  # the rename itself survives a power cut
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not (old / "replaced").exists():
            shutil.rmtree(old, ignore_errors=True)
        if isinstance(exc, OSError):  # say what it was writing (e.g. a full disk), not the temporary name
            raise OSError(exc.errno, exc.strerror, str(out)) from exc
        raise


def _remove_leftovers(parent: Path, name: str) -> None:
    """Delete ``.NAME.PID.*.tmp`` / ``.old`` siblings of conversions whose process is gone."""
    for entry in parent.glob(f".{glob.escape(name)}.*"):
        pid, _, rest = entry.name[len(name) + 2:].partition(".")
        if pid.isdigit() and rest.endswith((".tmp", ".old")) and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _version() -> str:
    """The installed package's version (``shadownet.__version__``, which converters may not import)."""
    try:
        from importlib.metadata import version

        return version("shadownet")
    except Exception:  # noqa: BLE001 - a source tree that was never installed
        return "(not installed)"
