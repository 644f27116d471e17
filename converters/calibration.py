"""What the converter learns by running the ORIGINAL model in LiteRT on calibration inputs (the user's,
``--calibration FILE.npz``, or random ones): each offloaded input's activation scale, which the masks
match (``activation_stats``), and what a mask's float32 rounding costs the model's outputs
(``split_needed``), which decides where round 1 needs an exact split (``converters.exact_split``).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from converters import exact_split
from converters.fidelity import relative_error
from converters.graph import Graph, write_model
from converters.schemes import ActivationStats, Scheme
from shadownet.exceptions import ModelFormatError
from tee_sim.program import MAX_INPUT

CALIBRATION_SAMPLES = 4


def calibration_inputs(graph: Graph, calibration: Any) -> list[list[np.ndarray]]:
    """Lists of model inputs (one list per sample). ``calibration``: None (random inputs), an ``.npz`` or a
    mapping keyed by input names, or for a single-input model an ``.npy`` or an array - the forms and names
    ``shadownet run`` takes (tensor names, or the signature's input names). Each input's array holds one
    or more samples stacked along the batch axis (``[k * batch, ...]``: one input of the model's own shape
    is one sample) or on a new leading axis (``[k, *shape]``)."""
    shapes = [graph.tensors[t].shape for t in graph.inputs]
    names = [graph.tensors[t].name for t in graph.inputs]
    dtypes = [graph.tensors[t].dtype for t in graph.inputs]
    if calibration is None:
        rng = np.random.default_rng(0)  # not a secret: representative inputs only
        # An integer or bool input (a class label, an index) gets zeros: a valid index into any table (a
        # divisor, or a label counted from 1, needs the user's values).
        return [[rng.standard_normal(s).astype(d) if d.kind == "f" else np.zeros(s, d)
                 for s, d in zip(shapes, dtypes, strict=True)] for _ in range(CALIBRATION_SAMPLES)]
    if isinstance(calibration, (str, os.PathLike)):
        calibration = _read(calibration)
    data = _by_input(graph, calibration)
    columns = []
    for name, shape, dtype in zip(names, shapes, dtypes, strict=True):
        try:
            given, shape = np.asarray(data[name]), tuple(shape)
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"calibration {name!r} is not numbers: {exc}") from None
        if given.dtype.kind not in "biuf":  # complex was cast to real with a warning, and taken (a helper's
            # sweep); text of digits was read as numbers
            raise ModelFormatError(f"calibration {name!r} is not real numbers ({given.dtype.name}) but "
                                   f"the input is {dtype.name}")
        with np.errstate(invalid="ignore", over="ignore"):  # NaN or out of range for an integer input
            a = given.astype(dtype)
        if dtype.kind != "f" and not np.array_equal(a, given):
            raise ModelFormatError(f"calibration {name!r} holds values a {dtype.name} input cannot take")
        if not shape and a.ndim <= 1 and a.size:  # a scalar input: one value, or k of them
            a = a.reshape(-1, 1)
        elif shape and a.ndim == len(shape) + 1 and a.shape[1:] == shape and a.shape[0]:  # [k, *shape]
            a = a.reshape(-1, *shape[1:])
        elif not shape or a.shape[1:] != shape[1:] or not a.shape[0] or a.shape[0] % shape[0]:
            raise ModelFormatError(f"calibration {name!r} has shape {a.shape}; the input is {list(shape)} "
                                   "(give k inputs stacked along its first axis, or as [k, *shape])")
        if not np.isfinite(a).all():
            raise ModelFormatError(f"calibration {name!r} holds {int(np.count_nonzero(~np.isfinite(a)))} NaN "
                                   "or infinite value(s): the mask scales are measured on these inputs")
        if a.dtype.kind == "f" and np.abs(a).max() > MAX_INPUT:  # as the runtime refuses such inputs
            raise ModelFormatError(f"calibration {name!r} holds values of magnitude {np.abs(a).max():.3g}: a "
                                   f"protected model takes inputs up to 2**40 ({MAX_INPUT:.10g})")
        rows = shape[0] if shape else 1
        columns.append([a[i:i + rows].reshape(shape) for i in range(0, a.shape[0], rows)])
    if len({len(column) for column in columns}) > 1:
        counts = ", ".join(f"{n}: {len(c)}" for n, c in zip(names, columns, strict=True))
        raise ModelFormatError(f"calibration inputs hold different numbers of samples ({counts})")
    return [list(sample) for sample in zip(*columns, strict=True)]


def _read(path: str | os.PathLike) -> Any:
    """An ``.npy`` file's array, or an ``.npz`` file's arrays by name. The twin of ``shadownet.api.
    read_inputs`` (and ``_by_input`` of ``shadownet.model_io.check_inputs``'s names), kept apart on
    purpose: the converter imports nothing of the runtime but its exceptions (``tests/test_packages.py``),
    and the runtime's on-device path nothing of the converter; change the two together."""
    if not os.path.exists(path):
        raise ModelFormatError(f"calibration file {path} does not exist")
    if not os.path.isfile(path):  # a FIFO would block the read for ever, a directory fail obscurely
        raise ModelFormatError(f"calibration file {path} is not a regular file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:  # each member is read (and can fail) here
            others = [name for name in loaded.zip.namelist() if not name.endswith((".npy", "/"))]
            if others:  # numpy reads them as bytes: a Keras model's config.json was taken for an input's name
                raise ModelFormatError(f"calibration file {path} is a zip archive but not an .npz (it holds "
                                       f"{', '.join(others[:3])}, not .npy arrays)")
            return {k: loaded[k] for k in loaded.files if not k.endswith("/")}  # a directory's entry: none
    except MemoryError:  # a header that claims an array larger than memory
        raise ModelFormatError(f"calibration file {path} claims an array too large to read") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        try:
            with open(path, "rb") as f:  # numpy takes any other file for a pickle, and says so
                known = f.read(6).startswith((b"\x93NUMPY", b"PK\x03\x04"))
        except OSError:
            known = True  # numpy's own error says why it could not be opened
        if not known:
            raise ModelFormatError(f"calibration file {path} is not an .npy or .npz file") from None
        raise ModelFormatError(f"cannot read calibration file {path} as .npz/.npy: {exc}") from None


def _by_input(graph: Graph, data: Any) -> dict[str, Any]:
    """``data`` (one array, or arrays by input or signature input name) keyed by the inputs' tensor names;
    ModelFormatError on an unknown, missing or repeated name, or one array for several inputs."""
    names = [graph.tensors[t].name for t in graph.inputs]
    if not isinstance(data, Mapping):
        if len(names) != 1:
            raise ModelFormatError(f"the model has {len(names)} inputs: give calibration data keyed by "
                                   f"their names {names} (an .npz)")
        return {names[0]: data}
    aliases: dict[str, str] = {}
    if graph.signature is not None:
        aliases.update((key, graph.tensors[t].name) for key, t in graph.signature.inputs.items()
                       if t in graph.inputs)
    aliases.update((name, name) for name in names)  # a tensor's name wins, as in the runtime's name table
    unknown = [key for key in data if key not in aliases]
    if unknown:  # each input under every name it is taken by, as the runtime lists them (a helper's review)
        listed = ", ".join(" or ".join(repr(k) for k in [name, *(k for k, n in aliases.items()
                                                                 if n == name and k != name)])
                           for name in names)
        raise ModelFormatError(f"calibration data: unknown input name(s) {unknown}; the model's inputs are "
                               f"{listed}")
    keyed = {aliases[key]: value for key, value in data.items()}
    twice = sorted(name for name in keyed if sum(aliases[key] == name for key in data) > 1)
    if twice:  # said "missing input(s) given twice under two names" (a helper's sweep)
        given = [key for key in data if aliases[key] in twice]
        raise ModelFormatError(f"calibration data: input(s) {twice} given twice, under the names {given}; "
                               "give each once")
    missing = [name for name in names if name not in keyed]
    if missing:
        raise ModelFormatError(f"calibration data: missing input(s) {missing}; the model takes {names}")
    return keyed


def activation_stats(graph: Graph, tensors: set[int],
                     samples: list[list[np.ndarray]]) -> dict[int, ActivationStats]:
    """Per-channel mean, standard deviation and RMS of each tensor in ``tensors`` over the calibration
    ``samples``, from LiteRT running the original (normalized) graph, so the masks match what they hide."""
    # The tensors to measure become extra model outputs, so LiteRT runs at full speed (XNNPACK) and
    # hands them back; model inputs are read from the samples themselves.
    probes = sorted(t for t in tensors if t not in graph.inputs)
    run = litert_runner(graph, probes)
    sums = {t: np.zeros(graph.tensors[t].shape[-1] if graph.tensors[t].shape else 1) for t in tensors}
    squares = {t: np.zeros_like(sums[t]) for t in tensors}  # per channel
    count = 0
    for sample in samples:
        values = dict(zip(probes, run(sample)[len(graph.outputs):], strict=True))
        values.update((t, x) for t, x in zip(graph.inputs, sample, strict=True) if t in tensors)
        for t in tensors:
            value = values[t]
            if value.shape != graph.tensors[t].shape:
                raise AssertionError(f"tensor {t}: LiteRT has {value.shape}, the graph has "
                                     f"{graph.tensors[t].shape}")
            flat = value.reshape(-1, value.shape[-1] if value.ndim else 1).astype(np.float64)  # (a scalar)
            sums[t] += flat.mean(axis=0)
            squares[t] += np.mean(np.square(flat), axis=0)
        count += 1
    stats = {}
    for t in tensors:
        mean = sums[t] / count
        channel_squares = squares[t] / count
        rms = float(np.sqrt(np.mean(channel_squares)))
        std = float(np.sqrt(max(float(np.mean(channel_squares)) - float(np.mean(np.square(mean))), 0.0)))
        if not (np.isfinite(rms) and np.all(np.isfinite(mean)) and np.all(np.isfinite(channel_squares))):
            mean, rms, std, channel_squares = np.zeros_like(mean), 1.0, 1.0, np.ones_like(mean)
        stats[t] = ActivationStats(mean, std if std > 0 else max(rms, 1.0), rms, channel_squares)
    return stats


def split_needed(graph: Graph, samples: list[list[np.ndarray]], stats: dict[int, ActivationStats],
                 scheme: Scheme) -> dict[int, bool]:
    """For each float model input, and each part of a SPLIT of one on its channel axis (a grouped first
    layer's groups, which round 1 pushes each on its own): whether a one-time mask on it costs the outputs
    precision enough to need the exact split (``converters.exact_split``). Measured on the calibration
    samples with LiteRT on the original: the largest relative change of the outputs (max |diff| / max
    |output|, the fidelity measure) when the input (the part's channels of it) is replaced by
    ``fl(x + r) - r`` - ``r`` a mask as the scheme draws it, the sum rounded to float32 as the accelerator
    receives it, the mask taken back exactly - against
    ``exact_split.NEEDED_ABOVE`` (the protected model's error without the split measured 2-9x this: the
    first layer's float32 sums run at the mask's magnitude too). A shaped mask (``MaskDistribution.bands``)
    is always split: its smooth field adds up coherently in the first layer's sums, which this measure of
    the input's rounding does not see (the zoo MiniVGG unsplit: 1.0-1.2e-4 from LiteRT's outputs on [0, 1]
    inputs, 40x what it measured, against 6x for a white mask: a review of stop 39). Empty when the scheme
    draws no masks (no ``mask_distribution``)."""
    # What round 1 pushes of a model input: the input, or each part of a SPLIT of it on the channel axis
    # (a grouped first layer: converters.normalize), its mask drawn on the part's statistics.
    # tensor -> (input position, its channels of the input; None: all of it)
    pushed: dict[int, tuple[int, slice | None]] = {}
    for k, t in enumerate(graph.inputs):
        if graph.tensors[t].dtype == np.float32 and t in stats:
            pushed[t] = (k, None)
    for op in graph.ops:
        source = op.inputs[1] if op.kind == "SPLIT" and len(op.inputs) == 2 else None
        axis = graph.tensors[op.inputs[0]].data if source in pushed else None
        rank = len(graph.tensors[source].shape) if source in pushed else 0
        if axis is not None and axis.size == 1 and rank and int(axis.reshape(-1)[0]) % rank == rank - 1:
            start = 0
            for part in op.outputs:
                width = graph.tensors[part].shape[-1]
                if part in stats:
                    pushed[part] = (pushed[source][0], slice(start, start + width))
                start += width
    if not pushed or not hasattr(scheme, "mask_distribution"):
        return {}
    dists = {}
    for t in pushed:
        shape = tuple(graph.tensors[t].shape)
        dists[t] = scheme.mask_distribution(stats[t], shape, np.ones(shape[-1]) if shape else None)
    measured = {t: where for t, where in pushed.items() if not dists[t].bands}
    cost = {t: 0.0 for t in measured}
    run = litert_runner(graph) if measured else None
    rng = np.random.default_rng(1)  # not a secret: masks like the scheme's, for an estimate
    for sample in samples if measured else []:
        want = run(sample)
        for t, (k, channels) in measured.items():
            x = sample[k] if channels is None else sample[k][..., channels]
            dist = dists[t]
            r = (rng.standard_normal(x.shape) * dist.std + dist.mean).astype(np.float32)
            r = r.reshape(x.shape)  # (a scalar input's per-channel mean has one element)
            rounded = ((x + r).astype(np.float64) - r.astype(np.float64)).astype(np.float32)  # fl(x + r) - r
            if channels is not None:
                rounded, part = np.array(sample[k], np.float32), rounded
                rounded[..., channels] = part
            got = run([*sample[:k], rounded, *sample[k + 1:]])
            cost[t] = max(cost[t], relative_error(got, want))
    return {t: t not in cost or cost[t] > exact_split.NEEDED_ABOVE for t in pushed}


def litert_runner(graph: Graph, probes: list[int] | None = None) -> Any:
    """``run(sample) -> outputs`` (float64) of LiteRT (XNNPACK, as the converter measures) on ``graph``:
    the model's outputs, then the tensors ``probes`` as extra outputs."""
    from ai_edge_litert.interpreter import Interpreter

    probed = Graph(graph.tensors, graph.ops, list(graph.inputs), list(graph.outputs) + list(probes or []))
    interpreter = Interpreter(model_content=write_model(probed), num_threads=2)
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    outputs = [d["index"] for d in interpreter.get_output_details()]

    def run(sample: list[np.ndarray]) -> list[np.ndarray]:
        for d, x in zip(details, sample, strict=True):
            interpreter.set_tensor(d["index"], x)
        try:
            interpreter.invoke()
        except RuntimeError as exc:  # an op refusing an input's values (a GATHER index out of range, say)
            message = " ".join(str(exc).split()) or type(exc).__name__
            raise ModelFormatError(f"LiteRT cannot run the model on a calibration input: {message}") from None
        return [interpreter.get_tensor(i).astype(np.float64) for i in outputs]
    return run
