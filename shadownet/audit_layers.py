"""The linear layers the attack suite (``shadownet.audit``) compares: the reference model's, as the
attacker's "public pretrained weights", and the obfuscated ones of ``untrusted.tflite`` round by round, as
the normal world reads them (filters as rows, see :mod:`shadownet.attacks`); and which round buffers an
exact split holds in two halves (``converters.exact_split``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from converters.normalize import PLAN_REVISION
from shadownet.artifacts import UNTRUSTED
from shadownet.boundary import round_number
from shadownet.exceptions import ArtifactError, ModelFormatError, UnsupportedOpError


@dataclass(frozen=True)
class LinearLayer:
    """One linear layer as the attacker sees it: filters as rows (see :mod:`shadownet.attacks`)."""

    name: str  # output tensor name
    kind: str  # "conv", "dense" or "depthwise"
    kernel: tuple[int, ...]  # (kh, kw, cin) for conv/dense (dense = (1, 1, in)), (kh, kw) for depthwise
    filters: np.ndarray  # (channels, kh*kw*cin) or (channels, kh*kw)
    where: str  # "round_3" or "op 12", for the report
    input: str | None = None  # reference: the op's input tensor; untrusted: the signature input feeding it
    positions: int = 0  # untrusted: output positions per inference (1 for dense), as the results cross
    channels: int = 0  # the op input's last axis, which an input transform mixes (a dense layer's K or less)

    @property
    def family(self) -> tuple:
        # Dense and 1x1 conv are the same linear map: a converter may turn one into the other.
        return ("depthwise" if self.kind == "depthwise" else "conv", self.kernel)

    @property
    def label(self) -> str:
        """Its name as progress lines show it (``layer_label``)."""
        return layer_label(self.name)


def layer_label(name: str, width: int = 34) -> str:
    """A layer's name for a table or a progress line: TensorFlow's fused names (``a;b;c``) by their first
    part, the layer's own, and at most ``width`` characters (its end kept)."""
    name = name.split(";")[0]
    return name if len(name) <= width else "..." + name[-(width - 3):]


def _layer(kind: str, weights: np.ndarray, name: str, where: str, source: str | None,
           positions: int = 0, channels: int = 0) -> LinearLayer:
    w = np.asarray(weights, dtype=np.float64)
    if kind == "CONV_2D":
        # TFLite conv weights are (out, kh, kw, in).
        return LinearLayer(name, "conv", tuple(w.shape[1:]), w.reshape(w.shape[0], -1), where, source,
                           positions, w.shape[-1])
    if kind == "FULLY_CONNECTED":
        w = w.reshape(w.shape[0], -1)  # (out, in)
        return LinearLayer(name, "dense", (1, 1, w.shape[1]), w, where, source, positions,
                           channels or w.shape[1])
    if kind == "DEPTHWISE_CONV_2D":
        # (1, kh, kw, channels * multiplier): one kh*kw filter per output channel.
        _, kh, kw, c = w.shape
        return LinearLayer(name, "depthwise", (kh, kw), w.reshape(kh * kw, c).T.copy(), where, source,
                           positions, channels)
    raise ValueError(f"not a linear op: {kind}")


def model_bytes(model: str | os.PathLike | bytes) -> bytes:
    """A reference model's bytes (given, or read from its path: ``ModelFormatError`` if it cannot be)."""
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    try:
        return Path(model).read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"cannot read {model}: {exc.strerror or exc}") from None


# The longest sum per output an exact split took before stop 56, whose converter cut no long sum into chunks
# (it kept the longer ones on the user's input in the TEE): its artifacts' summary has no ``long_sum_terms``.
LEGACY_LONGEST = 1 << 14


class Planning(NamedTuple):
    """How a converter planned a model (``converters.normalize.normalize_for``), as its manifest's summary
    says: ``longest``, None when it cut sums longer than ``exact_split.MAX_DOT_LENGTH`` into chunks (since
    stop 56; ``summary.long_sum_terms``), else the longest sum it split without chunks (``LEGACY_LONGEST``);
    ``revision``, what its normalization did beyond stop 56's (``converters.normalize.PLAN_REVISION``, since
    stop 57; ``summary.plan_revision``, 0 when absent)."""

    longest: int | None = None
    revision: int = PLAN_REVISION


CURRENT = Planning()  # this version's


def planned_as(manifest: dict) -> Planning:
    """How the converter of ``manifest`` planned its model (``Planning``): an artifact converted before
    stop 56 (a review: the audit refused those, its plan of their reference another) or 57 is audited as
    it was planned. ``ArtifactError`` for another version's."""
    from converters import exact_split

    summary = manifest.get("summary") or {}
    if not isinstance(summary, dict):
        summary = {}
    # (the commits of stop 57 before ``plan_revision`` wrote ``dense_as_conv``)
    revision = summary.get("plan_revision", 1 if summary.get("dense_as_conv") is True else 0)
    if not isinstance(revision, int) or isinstance(revision, bool) or not 0 <= revision <= PLAN_REVISION:
        raise ArtifactError(f"manifest.json: summary.plan_revision {revision!r}: converted by another "
                            f"version of shadownet (this one plans revision {PLAN_REVISION}); audit it with "
                            "that version")
    if "long_sum_terms" not in summary:
        return Planning(LEGACY_LONGEST, revision)
    terms = summary["long_sum_terms"]
    if terms != exact_split.MAX_DOT_LENGTH or isinstance(terms, bool):
        raise ArtifactError(f"manifest.json: summary.long_sum_terms {terms!r}: converted by a version of "
                            f"shadownet whose exact split took sums of other lengths (this one's: "
                            f"{exact_split.MAX_DOT_LENGTH}); audit it with that version")
    return Planning(None, revision)


def reference_graph(model: str | os.PathLike | bytes, scheme: Any = None, name: Any = None,
                    what: str = "reference", planning: Planning = CURRENT) -> Any:
    """The reference model as the converter planned and normalized it for ``scheme``, the protected
    model's (``converters.original_model.planning_graph``, then ``converters.normalize.normalize_for``: its
    grouped convolutions split by group, its dense layers on 4-D tensors computed as convolutions and its
    long sums on the user's input cut into chunks where it did; None: no scheme's, grouped convolutions as
    for the default; ``planning``: an older converter's plan, ``planned_as``). A ``ModelFormatError`` names
    it (``what`` and ``name``, else its path)."""
    from converters.normalize import normalize_for
    from converters.original_model import planning_graph

    label = name if name is not None else None if isinstance(model, bytes) else model
    try:
        return normalize_for(planning_graph(model_bytes(model)), scheme, chunks=planning.longest is None,
                             revision=planning.revision)
    except ModelFormatError as exc:
        if label is None:
            raise
        raise ModelFormatError(f"{what} {label}: {exc}") from None


def reference_layers(model: str | os.PathLike | bytes, manifest: dict | None = None,
                     scheme: Any = None, graph: Any = None) -> list[LinearLayer]:
    """The linear layers of the reference model, in execution order, as ``reference_graph`` reads it
    (``graph``: already read so).
    With the protected model's ``manifest`` (that lists its inputs): ``ArtifactError`` unless the reference
    takes the same inputs (shapes and dtypes) - another model's figures would be meaningless, and its
    inference would fail halfway through."""
    if graph is None:
        graph = reference_graph(model, scheme)
    if manifest is not None and "inputs" in manifest:
        given = [(list(graph.tensors[i].shape), str(np.dtype(graph.tensors[i].dtype))) for i in graph.inputs]
        want = [(list(t.get("shape", [])), str(t.get("dtype"))) for t in manifest.get("inputs", [])]
        if given != want:
            raise ArtifactError(f"the reference model takes {_specs(given)} but the protected model "
                                f"{_specs(want)}: give the model that was converted")
    return _linear_layers(graph)


# A linear op's kind as ``LinearLayer.kind`` names it (``_layer``).
LAYER_KINDS = {"CONV_2D": "conv", "FULLY_CONNECTED": "dense", "DEPTHWISE_CONV_2D": "depthwise"}


def _specs(inputs: list[tuple[list[int], str]]) -> str:
    return ", ".join(f"{shape} {dtype}" for shape, dtype in inputs) or "no inputs"


def _linear_layers(graph: Any) -> list[LinearLayer]:
    from converters.graph import is_offloadable

    layers = []
    for i, op in enumerate(graph.ops):
        if is_offloadable(graph, i):
            weights, source = graph.tensors[op.inputs[1]].data, graph.tensors[op.inputs[0]]
            layers.append(_layer(op.kind, weights, graph.tensors[op.outputs[0]].name, f"op {i}",
                                 source.name, channels=int(source.shape[-1]) if len(source.shape) else 0))
    return layers


def split_names(manifest: dict) -> tuple[set[str], set[str]]:
    """The outputs (``round_r/yj``) and input buffers of the layers the manifest says are exactly split
    (``converters.exact_split``): public, as the file's shapes show anyway."""
    rounds = manifest.get("rounds", [])
    outputs = {f"{r['signature']}/{o['name']}" for r in rounds for o in r.get("outputs", [])
               if o.get("split")}
    inputs = {t["buffer"] for r in rounds for t in r.get("inputs", []) if t.get("split")}
    return outputs, inputs


def join_halves(seen: dict[str, Any], split: set[str]) -> dict[str, Any]:
    """``seen`` (buffer name -> what the accelerator received, channels last) with each exactly split
    buffer's ``[x_hi | x_lo]`` added back into ``x_hi + x_lo`` (in float64: ``v + r`` exactly), what an
    attacker makes of them; ``split``: ``split_names(manifest)[1]``."""
    joined = dict(seen)
    for name in split & set(seen):
        halves = np.asarray(seen[name])
        c = halves.shape[-1] // 2
        joined[name] = halves[..., :c].astype(np.float64) + halves[..., c:]
    return joined


def untrusted_layers(data: bytes, split: set[str] = frozenset()) -> list[LinearLayer]:
    """The obfuscated linear layers of ``untrusted.tflite``, round by round, in op order within a round.

    The untrusted model holds one subgraph per round (signature ``round_r``), each read as a graph; the
    layers are the linear ops whose weights are float32 constants (the converter writes nothing else).
    A layer whose output is in ``split`` (``split_names``) is attacked through the obfuscated weights
    ``W'`` its exact split holds whole: ``[[W'_hi, 0], [W'_lo, W']]``.
    """
    from converters.graph import is_offloadable
    from converters.tflite_reader import read_model, read_signatures

    try:
        graphs = read_signatures(data) or [read_model(data)]
    except (ModelFormatError, UnsupportedOpError) as exc:
        first_line = str(exc).splitlines()[0]
        raise ArtifactError(f"{UNTRUSTED} is not a readable TFLite model ({first_line})") from None
    graphs.sort(key=lambda g: round_number(g.signature.key if g.signature else "main"))
    layers = []
    for graph in graphs:
        key = graph.signature.key if graph.signature else "main"
        feeds = {t: name for name, t in graph.signature.inputs.items()} if graph.signature else {}
        producer = {t: op for op in graph.ops for t in op.outputs}
        for i, op in enumerate(graph.ops):
            if not is_offloadable(graph, i) or graph.tensors[op.inputs[1]].dtype != np.float32:
                continue  # weights not a float32 constant: nothing to attack
            source = _trace_to_input(op.inputs[0], producer, feeds)
            output = graph.tensors[op.outputs[0]]
            weights, name = graph.tensors[op.inputs[1]].data, output.name
            if name in split:
                weights = weights[weights.shape[0] // 2:, ..., weights.shape[-1] // 2:]
            positions = math.prod(output.shape[:-1]) if output.shape else 1
            layers.append(_layer(op.kind, weights, name, key, source, positions))
    return layers


def _trace_to_input(tensor: int, producer: dict, feeds: dict[int, str]) -> str | None:
    """The signature input a linear op reads, through any single-activation-input ops before it (a PAD,
    a RESHAPE): the tensor the accelerator received for it."""
    seen = set()
    while tensor not in feeds and tensor in producer and tensor not in seen:
        seen.add(tensor)
        tensor = producer[tensor].inputs[0]
    return feeds.get(tensor)


def match_layers(
    reference: list[LinearLayer], obfuscated: list[LinearLayer]
) -> tuple[list[tuple[LinearLayer, LinearLayer]], list[LinearLayer], list[LinearLayer]]:
    """Pair layers as an attacker who knows the architecture does: in order, each reference layer with
    the first unused obfuscated layer of the same family (kernel size and input channels) and at least
    as many output channels. Returns (pairs, unmatched reference layers, unmatched obfuscated layers)."""
    used = [False] * len(obfuscated)
    pairs, missing = [], []
    for ref in reference:
        for j, obf in enumerate(obfuscated):
            if not used[j] and obf.family == ref.family and len(obf.filters) >= len(ref.filters):
                used[j] = True
                pairs.append((ref, obf))
                break
        else:
            missing.append(ref)
    return pairs, missing, [o for j, o in enumerate(obfuscated) if not used[j]]
