"""A protected model's inputs and outputs as the API takes and gives them: the arrays a call passes
(``check_inputs``, ``run_into``'s ``check_run_into``), the buffers ``run_into`` fills (``check_outputs``),
the values the TEE will read (``check_input_values``), and the bench's, soak's and audit's random inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shadownet.artifacts import TensorSpec
from shadownet.exceptions import InputError
from tee_sim.program import MAX_INPUT


def _named(specs: tuple[TensorSpec, ...], names: dict[str, int]) -> str:
    """The inputs in order, each under its tensor name and any other name it is given by (its signature's)."""
    return ", ".join(" or ".join(repr(k) for k in [t.name, *(k for k, at in names.items()
                                                             if at == i and k != t.name)])
                     for i, t in enumerate(specs))


def check_inputs(specs: tuple[TensorSpec, ...], names: dict[str, int],
                 inputs: Sequence[Any]) -> list[np.ndarray]:
    """``inputs`` (arrays in order, or one mapping of names to arrays; ``names``: input name -> position) as
    arrays in the order of ``specs``; InputError on a wrong count, name, shape or dtype."""
    if len(inputs) == 1 and isinstance(inputs[0], Mapping):
        given = inputs[0]
        unknown = [k for k in given if k not in names]
        if unknown:
            raise InputError(f"unknown input name(s) {unknown}; the model's inputs are "
                             f"{_named(specs, names)}")
        absent = object()  # not None: {"image": None} was said to miss 'image' (a helper's sweep)
        ordered: list[Any] = [absent] * len(specs)
        for key, value in given.items():
            ordered[names[key]] = value
        missing = [t.name for t, v in zip(specs, ordered, strict=True) if v is absent]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model takes {_named(specs, names)}")
        if len(given) != len(specs):  # one input under its tensor name and its signature name
            twice = sorted({specs[names[k]].name for k in given
                            if sum(names[j] == names[k] for j in given) > 1})
            raise InputError(f"input(s) {twice} given twice, under two names; the model takes "
                             f"{[t.name for t in specs]}")
        inputs = ordered
    if len(inputs) != len(specs):
        raise InputError(f"the model takes {len(specs)} input(s) "
                         f"{[t.name for t in specs]}, {len(inputs)} given")
    arrays = []
    for spec, x in zip(specs, inputs, strict=True):
        if isinstance(x, np.generic) and spec.shape == ():  # a numpy scalar, as LiteRT's set_tensor takes it
            x = np.asarray(x)
        if not isinstance(x, np.ndarray):
            raise InputError(f"input {spec.name!r} must be a numpy array of shape {list(spec.shape)} "
                             f"{spec.dtype}, not {type(x).__name__}")
        # Either byte order, as LiteRT takes it (the common case, the model's own dtype, costs one compare).
        native = x.dtype if x.dtype == spec.dtype else x.dtype.newbyteorder("=")
        if x.shape != spec.shape or native != spec.dtype:
            batch = (" (a protected model runs the batch it was converted at: resizing is not supported)"
                     if x.shape[1:] == spec.shape[1:] and native == spec.dtype else "")
            raise InputError(f"input {spec.name!r} must be {list(spec.shape)} {spec.dtype}, "
                             f"got {list(x.shape)} {x.dtype}{batch}")
        arrays.append(x if x.dtype == spec.dtype else x.astype(spec.dtype))  # another byte order: as LiteRT
    return arrays


def check_outputs(specs: tuple[TensorSpec, ...], outputs: Sequence[Any]) -> None:
    """``run_into``'s buffers: one writable array per output, in order, of its exact shape and dtype;
    InputError otherwise, before the inference (a helper's probe: a wrong one failed after it, its one-time
    mask spent, or took the results cast - logits into int8 zeros - or broadcast)."""
    if not isinstance(outputs, Sequence) or len(outputs) != len(specs):
        given = f"{len(outputs)} buffer(s)" if isinstance(outputs, Sequence) else type(outputs).__name__
        raise InputError(f"the model has {len(specs)} output(s) {[t.name for t in specs]}: give a list of "
                         f"as many arrays, not {given}")
    for spec, out in zip(specs, outputs, strict=True):
        if not isinstance(out, np.ndarray) or out.shape != spec.shape or out.dtype != spec.dtype \
                or not out.flags.writeable:
            got = f"{list(out.shape)} {out.dtype}{'' if out.flags.writeable else ', read-only'}" \
                if isinstance(out, np.ndarray) else type(out).__name__
            raise InputError(f"output {spec.name!r} needs a writable array of shape {list(spec.shape)} "
                             f"{spec.dtype}, not {got}")


def random_input(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """The bench's, the soak's and the audit's random input (the audit's images aside): floats uniform in
    [0, 1); integers 0 or 1 (ids any table has: uniform floats cast to integers were all 0, so 'several
    random inputs' were one); bools either."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        return np.asarray(rng.integers(0, 2, shape), dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    return np.asarray(rng.uniform(0, 1, shape), dtype)


def check_input_values(specs: tuple[TensorSpec, ...], values: Sequence[np.ndarray]) -> None:
    """Refuse NaN, infinity and magnitudes over ``MAX_INPUT`` in float inputs (``InputError``): the masks
    would turn infinities into NaN and spread NaN further than LiteRT does, and near float32's range
    overflow; the integrity checks would take either for tampering. Two passes, no temporary: a NaN
    makes both extremes NaN."""
    for spec, view in zip(specs, values, strict=True):
        if view.dtype.kind != "f" or not view.size or \
                (-MAX_INPUT <= view.min() and view.max() <= MAX_INPUT):
            continue
        bad = int(np.count_nonzero(~np.isfinite(view)))
        if bad:
            raise InputError(f"input {spec.name!r} holds {bad} NaN or infinite value(s): a protected "
                             "model takes finite inputs only")
        largest = float(np.abs(view).max())
        raise InputError(f"input {spec.name!r} holds a value of magnitude {largest:.10g}: a protected "
                         f"model takes inputs up to 2**40 ({MAX_INPUT:.10g}), whose one-time masks, "
                         "obfuscated sums and checks stay inside float32's range")


def check_run_into(inputs: Any, outputs: Any, specs: tuple[TensorSpec, ...], names: dict[str, int],
                   output_specs: tuple[TensorSpec, ...]) -> list[np.ndarray]:
    """``run_into``'s arguments: ``inputs`` a list of arrays (one per input) or a mapping of names to arrays,
    ``outputs`` as ``check_outputs`` takes them; the inputs as arrays in order, or ``InputError``. (A bare
    array was iterated along its batch axis, and None was a raw TypeError: a review.)"""
    if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence | Mapping):
        raise InputError(f"inputs is a list of arrays, one per input, or a mapping of names to arrays, "
                         f"not {type(inputs).__name__}")
    arrays = check_inputs(specs, names, (inputs,) if isinstance(inputs, Mapping) else inputs)
    check_outputs(output_specs, outputs)
    return arrays
