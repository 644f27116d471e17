"""Obfuscation schemes: how one linear op's weights are hidden from the accelerator, and undone in the TEE.

A scheme is small: given one linear layer (CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED weights in
LiteRT's layout) and a random generator, it returns the obfuscated weights the accelerator runs, an
optional transform of the layer's input channels (applied by the TEE before the push: a permutation, or
a mixing ``x'[..., c] = sum_j coef[j, c] * x[..., index[j, c]]``), and the restore:
``y[..., n] = sum_j coef[j, n] * y'[..., index[j, n]]``. It also draws the push masks (its
mask plan); the converter pushes each mask through the obfuscated layer and the restore to get the
pop mask, so a scheme never deals with convolutions. Schemes are registered by name in ``SCHEMES``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from converters.graph import Graph
from converters.partition import (
    Partition,
    always_masked,
    input_rounds,
    long_sums,
    narrow_rounds,
    one_layer_from_input,
    partition,
)
from converters.secret_random import Random


@dataclass(frozen=True)
class LinearLayer:
    """One offloadable op's weights, in LiteRT's layout: CONV_2D ``[N, kh, kw, C]``, FULLY_CONNECTED
    ``[N, K]``, DEPTHWISE_CONV_2D ``[1, kh, kw, C * depth_multiplier]``. ``name`` is for messages.
    ``input_channels``: the size of the op input's last axis, the axis an input transform acts on (None:
    unknown; a FULLY_CONNECTED flattens its input, so its ``K`` may be a multiple of it).
    ``raw_input``: the op reads a user's input (round 1's, or one that joins a later round), pushed plainly,
    whose channels may differ in scale by orders of magnitude (a standardization folded into the layer): a
    scheme may scale its channels first (``ObfuscatedLinear.input_scale``). ``peers``: then, the weights of
    the round's other conv and dense layers that read the same input (same layout): one push, one input
    transform, serves them all, so its channels' scales weigh their columns too."""

    kind: str
    weights: np.ndarray
    depth_multiplier: int = 1
    name: str = ""
    input_channels: int | None = None
    raw_input: bool = False
    peers: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class ObfuscatedLinear:
    """What a scheme makes of one layer.

    ``weights``: float32, same layout as the original, ``M`` output channels (the accelerator's).
    ``input_permutation``: int32 ``[C]`` or None; the accelerator's input is ``x[..., input_permutation]``.
    ``restore_index`` (int32) / ``restore_coef`` (float32), both ``[k, N]``: the original output is
    ``y[..., n] = sum_j restore_coef[j, n] * y'[..., restore_index[j, n]]``.
    ``input_index`` (int32) / ``input_coef`` (float32), both ``[k, C]``, or None: a mixing of the input
    channels instead of a permutation (``input_permutation`` is then None): the accelerator's input is
    ``x'[..., c] = sum_j input_coef[j, c] * x[..., input_index[j, c]]``.
    ``input_scale``: float32 ``[C]`` powers of two or None: the mixing is an orthogonal one of the input's
    channels each times its scale, ``x' = B diag(input_scale) x`` (folded into ``input_coef``): the TEE
    measures the spread its one-time mask follows on ``diag(input_scale) x``, the RMS of its largest
    channel (``tee_sim.mask_spread``).
    """

    weights: np.ndarray
    input_permutation: np.ndarray | None
    restore_index: np.ndarray
    restore_coef: np.ndarray
    input_index: np.ndarray | None = None
    input_coef: np.ndarray | None = None
    input_scale: np.ndarray | None = None

    def transform_input(self, x: np.ndarray) -> np.ndarray:
        """The accelerator's input for the layer input ``x``, in float64 (offline: tests)."""
        x = np.asarray(x, np.float64)
        if self.input_index is not None:
            coef = self.input_coef.astype(np.float64)
            out = x[..., self.input_index[0]] * coef[0]
            for j in range(1, len(self.input_index)):
                out += x[..., self.input_index[j]] * coef[j]
            return out
        return x if self.input_permutation is None else x[..., self.input_permutation]

    def transforms_input(self) -> bool:
        """Whether the accelerator's input is the layer input transformed (permuted or mixed)."""
        return self.input_permutation is not None or self.input_index is not None

    def same_input_as(self, other: ObfuscatedLinear) -> bool:
        """Whether ``other`` transforms its input exactly as this layer does, so one push serves both."""
        mine = (self.input_permutation, self.input_index, self.input_coef)
        theirs = (other.input_permutation, other.input_index, other.input_coef)
        return all((a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
                   for a, b in zip(mine, theirs, strict=True))

    def restore(self, y_obf: np.ndarray) -> np.ndarray:
        """The restore in float64 (offline: pop masks and tests; the TEE has its own fused kernel)."""
        y = np.asarray(y_obf, np.float64)
        coef = self.restore_coef.astype(np.float64)
        out = y[..., self.restore_index[0]] * coef[0]
        for j in range(1, len(self.restore_index)):
            out += y[..., self.restore_index[j]] * coef[j]
        return out


@dataclass(frozen=True)
class ActivationStats:
    """What calibration measured of one offloaded input (in the accelerator's channel order): the
    per-channel ``mean`` (float64 ``[C]``), the ``std`` around it and the ``rms``, over all elements;
    ``squares``: the per-channel mean square (float64 ``[C]``; None: unknown, taken as ``rms ** 2``)."""

    mean: np.ndarray
    std: float
    rms: float
    squares: np.ndarray | None = None

    @classmethod
    def unit(cls, channels: int) -> ActivationStats:
        return cls(np.zeros(channels), 1.0, 1.0, np.ones(channels))

    def permuted(self, permutation: np.ndarray | None) -> ActivationStats:
        if permutation is None:
            return self
        return ActivationStats(self.mean[permutation], self.std, self.rms,
                               None if self.squares is None else self.squares[permutation])

    def for_input_of(self, obf: ObfuscatedLinear) -> ActivationStats:
        """The statistics of ``obf``'s accelerator input: the means permuted or mixed as the input is;
        ``std`` and ``rms`` kept (exact for a permutation, and overall for an orthonormal mixing), or, for
        a mixing of scaled channels (``input_scale``), those of the scaled input's largest channel, as the
        TEE measures it (the per-channel squares are no longer the input's: not kept)."""
        if obf.input_index is None:
            return self.permuted(obf.input_permutation)
        mean = ObfuscatedLinear(obf.weights, None, obf.restore_index, obf.restore_coef, obf.input_index,
                                obf.input_coef).transform_input(self.mean)
        if obf.input_scale is None:
            return ActivationStats(mean, self.std, self.rms)
        # Of the largest scaled channel, which the TEE's measure follows too (tee_sim.mask_spread): the
        # scales move the input's power among its channels, and a mask sized on their mean would hide
        # one that holds most of it at a fraction of mask_scale times its own spread.
        scale = np.square(obf.input_scale.astype(np.float64))
        squares = self.squares if self.squares is not None else np.full(len(scale), self.rms ** 2)
        channel_mean = self.mean if len(self.mean) == len(scale) else np.zeros(len(scale))
        rms = math.sqrt(float(np.max(scale * squares)))
        std = math.sqrt(float(np.max(scale * np.maximum(squares - np.square(channel_mean), 0.0))))
        return ActivationStats(mean, std if std > 0 else max(rms, 1.0), rms)


@dataclass(frozen=True)
class MaskDistribution:
    """How a push mask is drawn: ``std * N(0, 1) + mean`` element-wise, ``mean`` per channel (float64
    ``[C]``, in the accelerator's channel order). One-time masks are drawn from it by the TEE at run time.
    Shaped (``bands`` > 0): the ``N(0, 1)`` is a field of unit variance per element whose power is shared
    equally by the ``bands`` frequency bands of ``tee_sim.program.mask_bands``, plus, along ``common``
    (float64 ``[C]``), a second such field shared by the channels (``tee_sim.one_time_masks``). Modular
    (``modular``): uniform over a power-of-two period ``sqrt(12) * std``, no mean, and the input sent modulo
    that period (``tee_sim.modular_masks``)."""

    std: float
    mean: np.ndarray
    bands: int = 0
    common: np.ndarray | None = None
    modular: bool = False


class Scheme(Protocol):
    """The interface every scheme implements (see the module docstring).

    ``static_masks``: True when the push masks are drawn once at conversion and reused by every inference
    (the paper's scheme); False when the TEE draws a fresh one-time mask per inference on the rounds the
    mask policy selects (``converters.per_inference``), from ``mask_distribution``. Optional: ``in_tee``,
    the kinds of offloadable op the scheme keeps in the TEE (``converters.partition``; none when absent).
    """

    name: str
    static_masks: bool

    def public_params(self) -> dict[str, Any]:
        """The parameters that may be written in the (public) manifest."""
        ...

    def obfuscate(self, layer: LinearLayer, rng: Random,
                  input_of: ObfuscatedLinear | None = None) -> ObfuscatedLinear:
        """Hide ``layer``'s weights; every secret comes from ``rng``. ``input_of``: the obfuscation of an
        earlier layer that reads the same tensor in the same round; where ``layer`` can take its input
        transform, it does, so that one push (one transform, one mask) serves both: an attacker given
        copies of a tensor under independent transforms and masks fits more of it from all of them than
        from one."""
        ...

    def push_mask(self, shape: tuple[int, ...], stats: ActivationStats,
                  rng: Random) -> np.ndarray | None:
        """The static float32 mask of ``shape`` for an offloaded input with activation statistics
        ``stats`` on a round without one-time masks; None: that input crosses unmasked."""
        ...

    def mask_distribution(self, stats: ActivationStats, shape: tuple[int, ...] | None = None,
                          common: np.ndarray | None = None, deep: bool = False,
                          modular: bool = False, depth: int = 0) -> MaskDistribution:
        """The distribution ``push_mask`` draws from, for one-time masks drawn in the TEE. ``shape`` and
        ``common`` are given for a push that carries a user input (``converters.partition.carries_input``):
        its shape, and the direction in the accelerator's channels of the input's channels all alike (ones,
        permuted or mixed as the input is), for a scheme that shapes such masks. ``deep``: a round the mask
        policy adds past those every policy masks (``always_masked_for``), which a scheme may mask less.
        ``modular``: a push a modular mask can serve (read by conv and dense layers only), which a scheme
        may give one (``MaskDistribution.modular``; where the push is split, its high half goes modulo the
        period: ``converters.exact_split.plan``). ``depth``: the most layers of weights between a user input
        and the push (``converters.partition.layers_from_input``)."""
        ...


SCHEMES: dict[str, str] = {  # name -> "module:class", imported when chosen
    "shadownet": "converters.schemes.shadownet:ShadowNetScheme",
    "groupmix": "converters.schemes.groupmix:GroupMixScheme",
}
# groupmix: the attack suite recovers no filter from it (SECURITY.md); shadownet, the paper's, is kept to
# show the paper's behaviour, weakness included.
DEFAULT_SCHEME = "groupmix"


# The fewest input channels each group of a grouped CONV_2D must read for ``converters.normalize`` to offload
# it as a CONV_2D per group, for a scheme that does not say (its ``group_min_channels``).
GROUP_MIN_CHANNELS = 8


def group_min_channels(scheme: Any) -> int | None:
    """The fewest input channels each group of a grouped CONV_2D must read for it to be offloaded as a
    CONV_2D per group (``converters.normalize``): ``scheme``'s ``group_min_channels`` when it has one
    (groupmix: the fewest it mixes; None: it mixes none, every grouped conv stays in the TEE), else
    ``GROUP_MIN_CHANNELS``. Narrower groups stay one grouped CONV_2D, in the TEE: their inputs would cross
    unmixed, and where the rounds after the first cross unmasked (``--mask-rounds first``, the default on
    all but small models) an unmixed input gives away the restore of the layer that made it (SECURITY.md,
    "narrow layers' inputs")."""
    return getattr(scheme, "group_min_channels", GROUP_MIN_CHANNELS)


def kept_in_tee(scheme: Any) -> frozenset[str]:
    """The kinds of offloadable op ``scheme`` keeps in the TEE (its optional ``in_tee``: none when absent or
    for no scheme), as ``converters.partition`` takes them."""
    return frozenset(getattr(scheme, "in_tee", ()))


def partition_for(graph: Graph, scheme: Any, longest: int | None = None) -> Partition:
    """The rounds and steps ``scheme`` runs ``graph`` in: the kinds it keeps in the TEE there, and, where
    its one-time masks on the user's input cross as an exact split (groupmix unless ``exact_split=none``
    or ``mask_scale=0``), the layers on that input whose sums are too long to split
    (``converters.partition``'s long sums)."""
    return partition(graph, kept_in_tee(scheme), long_input_sums_in_tee=splits_masks(scheme), longest=longest)


def splits_masks(scheme: Any) -> bool:
    """Whether ``scheme``'s one-time masks cross as exact splits where they can (groupmix unless
    ``exact_split=none`` or ``mask_scale=0``)."""
    return (not getattr(scheme, "static_masks", True) and getattr(scheme, "mask_scale", 0) > 0
            and getattr(scheme, "exact_split", "none") != "none")


def long_sums_after_input(part: Partition, scheme: Any, narrow: bool = True) -> set[int]:
    """The offloaded conv and dense layers too long to split (more than ``exact_split.MAX_DOT_LENGTH`` terms
    per output) on what one layer made of the user's input, or on an input too narrow to mix, where
    ``scheme`` masks those rounds whatever the policy and splits its masks (``always_masked_for``):
    ``converters.normalize.chunked`` cuts them as it cuts the long sums on the input itself (a review: a
    dense layer on a flattened 32x32x16 conv output crossed masked and unsplit; another's on a flattened
    48x48x4 map, up to 1.1e-4 of the outputs off; not with ``narrow=False``, a plan before stop 57's)."""
    if not splits_masks(scheme) or getattr(scheme, "mask_floor", "layers") == "input":
        return set()
    rounds = narrow_rounds(part, group_min_channels(scheme)) if narrow else []
    reading = one_layer_from_input(part) | {part.graph.ops[i].inputs[0] for i in part.offloaded
                                             if part.round_of(i) in rounds}
    return long_sums(part, reading)


def always_masked_for(part: Partition, scheme: Any) -> list[int]:
    """The rounds ``scheme``'s one-time masks cover whatever the mask policy (``groupmix``'s
    ``mask_floor``): ``converters.partition.always_masked``, or with ``mask_floor="input"`` the rounds that
    carry a user input alone (``input_rounds``)."""
    if getattr(scheme, "mask_floor", "layers") == "input":
        return input_rounds(part)
    return always_masked(part, group_min_channels(scheme))


def get_scheme(spec: str | Scheme | None = None, **params: Any) -> Scheme:
    """A scheme from its name (``None``: the default), optionally ``"name:key=value,key=value"``, with
    ``params`` overriding; a ``Scheme`` object is returned as is. ``ValueError`` for an unknown name or
    parameter."""
    if spec is not None and not isinstance(spec, str):
        if not hasattr(spec, "obfuscate"):
            raise TypeError(f"a scheme is a name or a scheme object, not {type(spec).__name__}")
        if params:
            raise ValueError("parameters cannot be given with a scheme object")
        return spec
    # "" names no scheme: it was taken for the default (a helper's probe)
    name, _, text = (DEFAULT_SCHEME if spec is None else spec).partition(":")
    name = name.strip()
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme {name!r}; known schemes: {', '.join(sorted(SCHEMES))}")
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"scheme parameter {item!r} is not key=value")
        if key.strip() in parsed:
            raise ValueError(f"scheme parameter {key.strip()!r} given twice")
        parsed[key.strip()] = _parse_value(value.strip())
    parsed.update(params)
    module, _, cls = SCHEMES[name].partition(":")
    scheme = getattr(importlib.import_module(module), cls)
    known = [k for k in inspect.signature(scheme).parameters if k != "self"]
    unknown = sorted(set(parsed) - set(known))
    if unknown:
        raise ValueError(f"scheme {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(known)}")
    try:
        return scheme(**parsed)
    except TypeError as exc:
        raise ValueError(f"scheme {name!r}: {exc}") from None


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def flag(name: str, value: Any) -> bool:
    """A scheme's yes/no parameter: ``True`` or ``False`` (``true`` / ``false`` in a scheme string), else
    ``ValueError`` - ``bool("no")`` is True."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return bool(value)


def integer(name: str, value: Any, low: int, high: int) -> int:
    """A scheme's whole-number parameter in ``[low, high]``, else ``ValueError`` (``true`` was taken as 1: a
    helper's sweep)."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    if not (whole and low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    return int(value)


def number(name: str, value: Any, low: float, high: float, above_low: bool = False) -> float:
    """A scheme's numeric parameter, finite and in ``[low, high]`` (``(low, high]`` with ``above_low``),
    else ``ValueError``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_) and math.isfinite(value) \
        and (value > low if above_low else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name} must be a number in {'(' if above_low else '['}{low:g}, {high:g}], "
                         f"not {value!r}")
    return float(value)
