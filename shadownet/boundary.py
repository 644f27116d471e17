"""What the normal world sees at the boundary while a protected model runs, for the attack suite
(``shadownet.audit``): every round's inputs as the accelerator receives them, every round's results as it
returns them, and the model's outputs as the app gets them; and what those crossings tell about each
offloaded layer's secrets: the rows of its restore (``learn_restores``), then its input mixing
(``unmix_inputs``), by the fits of ``shadownet.crossing_fits``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from shadownet import crossing_fits
from shadownet.model_io import random_input

PROBE = 8  # follower channels tried first (``learn_restores``)
MAX_PAD = 4  # a follower this many pixels larger each way is tried at every placement (``_crops``)


class RecordingAccelerator:
    """An accelerator wrapper that keeps a copy of every round's inputs before running the round and of
    its results after: exactly what a compromised driver sees (``shadownet.load(OUT,
    accelerator=RecordingAccelerator)``). ``names``: keep only those buffers (None: every one; thousands of
    inferences of one round input are kept in the memory of that one)."""

    def __init__(self, inner: Any, names: Collection[str] | None = None) -> None:
        self.inner = inner
        self.names = None if names is None else frozenset(names)
        self.buffers: dict[str, np.ndarray] = {}
        self.seen: dict[str, list[np.ndarray]] = {}

    def bind(self, buffers: Any) -> None:
        self.buffers = dict(buffers)
        self.inner.bind(buffers)

    def _keep(self, prefix: str) -> None:
        for name, view in self.buffers.items():
            if name.startswith(prefix) and (self.names is None or name in self.names):
                self.seen.setdefault(name, []).append(np.array(view))

    def run_round(self, r: int) -> None:
        self._keep(f"round_{r}/in/")
        self.inner.run_round(r)
        self._keep(f"round_{r}/out/")

    def close(self) -> None:
        self.inner.close()


class Crossing:
    """The normal world's view of one round input over many inferences: the protected model run on inputs
    of the attacker's choosing in one session, that buffer alone kept as the recording accelerator sees it
    (thousands of inferences are observed), an exactly split one's halves added back
    (``audit_layers.join_halves``). A context manager; ``count``: inferences run so far."""

    def __init__(self, out_dir: str | os.PathLike, buffer: str, split: set[str]) -> None:
        self.out_dir, self.buffer, self.split, self.count = out_dir, buffer, split, 0
        self.recorders: list[RecordingAccelerator] = []

    def __enter__(self) -> Crossing:
        import shadownet

        def wrap(inner: Any) -> RecordingAccelerator:
            self.recorders.append(RecordingAccelerator(inner, {self.buffer}))
            return self.recorders[-1]

        self._context = shadownet.load(self.out_dir, accelerator=wrap)
        self.model = self._context.__enter__()
        return self

    def observe(self, batches: list[list[np.ndarray]]) -> np.ndarray:
        """The buffer for each inference of ``batches`` (each the model's inputs), ``[K, *shape]``, as it
        crossed: float32, or float64 where an exactly split buffer's halves were added back."""
        from shadownet.audit_layers import join_halves  # (audit_layers imports this module)

        seen = self.recorders[-1].seen
        seen.clear()
        for arrays in batches:
            self.model(*arrays)
            self.count += 1
        return join_halves({self.buffer: np.stack(seen.pop(self.buffer))}, self.split)[self.buffer]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        """The crossing for each input of a one-input model (``inputs``: ``[K, *input shape]`` without the
        batch axis), ``[K, h, w, channels]``. (In float64 YOLOv4-tiny's grid points, 295 crossings of
        104x104x64, their differences and Jacobians, took the critical-point attack to 7.8 GB; 3.2 GB as they
        cross, and the difference of two close crossings is exact in float32.)"""
        return self.observe([[np.asarray(x, np.float32)[None]] for x in inputs])[:, 0]

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)


def sample_inputs(specs: list[dict], count: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``count`` inputs per manifest input spec: smooth random images in [0, 1] (neighbouring pixels
    correlate as in natural images, which is what makes a masked image recognisable), or uniform
    values for inputs that are not NHWC images."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        arrays = []
        for spec in specs:
            shape = tuple(int(d) for d in spec["shape"])
            dtype = np.dtype(spec.get("dtype", "float32"))
            if len(shape) == 4 and shape[1] >= 4 and shape[2] >= 4 and dtype.kind in "fiu":
                coarse = rng.uniform(0, 1, (shape[0], -(-shape[1] // 4), -(-shape[2] // 4), shape[3]))
                x = coarse.repeat(4, axis=1).repeat(4, axis=2)[:, : shape[1], : shape[2]]
                x = np.clip(x + 0.03 * rng.standard_normal(shape), 0, 1)
                if dtype.kind in "iu":  # an 8-bit image: its pixels (cast from [0, 1): 99% zeros, a review)
                    x = np.round(x * min(255, np.iinfo(dtype).max))
            else:  # an integer input's values 0 or 1 (cast from [0, 1): all 0, one input N times: a probe)
                x = random_input(rng, shape, dtype)
            arrays.append(x.astype(dtype))
        batches.append(arrays)
    return batches


def observe_boundary(out_dir: str | os.PathLike, batches: list[list[np.ndarray]],
                     names: Collection[str] | None = None) -> dict[str, np.ndarray]:
    """Run protected inferences and return, stacked per name, every round input the accelerator received
    (``"round_1/in/x0"``), every round result it returned (``"round_1/out/y0"``) and every model output
    the app got (``"output/NAME"``): ``array (K, *shape)`` for K inferences. ``names``: of the round
    buffers, only those (None: every one)."""
    import shadownet

    recorders: list[RecordingAccelerator] = []

    def wrap(inner: Any) -> RecordingAccelerator:
        recorders.append(RecordingAccelerator(inner, names))
        return recorders[-1]

    outputs: dict[str, list[np.ndarray]] = {}
    with shadownet.load(out_dir, accelerator=wrap) as model:
        for arrays in batches:
            got = model(*arrays)
            for name, value in (got.items() if isinstance(got, dict) else [(model.outputs[0].name, got)]):
                outputs.setdefault(f"output/{name}", []).append(np.array(value))
    seen = recorders[-1].seen | outputs
    return {name: np.stack(values) for name, values in seen.items()}


def inferences_needed(layer: Any) -> int:
    """Inferences an attacker watches for ``learn_restores`` to have the positions of ``layer``'s results
    that its fits want (``crossing_fits.restore_positions``; ``layer.positions`` per inference)."""
    return -(-crossing_fits.restore_positions(len(layer.filters)) // max(layer.positions, 1))


def learn_restores(seen: dict[str, np.ndarray], layers: list[Any],
                   progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """For each offloaded layer (``audit_layers.untrusted_layers``) whose results were observed, the rows of
    its restore that the later crossings give away (``crossing_fits.restore_rows``), tried against every
    later round input and model output with the same positions (or padded: ``_crops``). By layer name:
    ``{"rows": (k, M) the relations found, "rank": how many of them are independent (at most M),
    "tried": follower channels tried, "follower": the tensor that gave the most, None for none}``.
    ``progress`` is told of each layer fitted."""
    learnt: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for k, layer in enumerate(layers):
        signature, _, output = layer.name.partition("/")
        results = seen.get(f"{signature}/out/{output}")
        m = len(layer.filters)
        if results is None or results.shape[-1] != m:
            continue  # not observed, or an exact split's halves (round 1's: masked)
        if progress:
            progress(f"restore regression: layer {k + 1}/{len(layers)} ({layer.label})")
        y = results.reshape(-1, m).astype(np.float64)
        r = round_number(signature)
        found, tried, most, follower_name = [], 0, 0, None
        for name, follower in seen.items():
            later = name.startswith("output/") or (name.startswith("round_") and "/in/" in name
                                                   and round_number(name.split("/")[0]) > r)
            if not later:
                continue
            for cropped in _crops(follower, results.shape):
                flat = cropped.reshape(-1, cropped.shape[-1])
                # A few channels first: a follower that is not this layer's (mixed, masked, another
                # layer's output) fits none of them, and a wide layer's fit costs a second a channel.
                rows, n = crossing_fits.restore_rows(y, flat, rng, channels=PROBE)
                tried += n
                if len(rows):
                    rows, n = crossing_fits.restore_rows(y, flat, rng)
                    tried += n
                found.append(rows)
                if len(rows) > most:
                    most, follower_name = len(rows), name
        if found:
            rows = np.vstack(found)
            learnt[layer.name] = {"rows": rows, "rank": crossing_fits.rank(rows), "tried": tried,
                                  "follower": follower_name}
    return learnt


def unmix_inputs(seen: dict[str, np.ndarray], layers: list[Any], restores: dict[str, dict],
                 input_blocks: Callable[[int], list[tuple[int, int]] | None],
                 progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """For each layer whose restore rows were learnt (``learn_restores``), its input's mixing undone block
    by block (``crossing_fits.input_mixing``) against an earlier round's results that the TEE activated and
    mixed into that input - the nearest earlier one that fits, at the input's positions (cropped where
    the TEE padded it: ``_crops``). The blocks are the scheme's public structure: ``input_blocks(channels)``
    (``GroupMixScheme.input_blocks``; None: not mixed). Conv layers only: a dense layer's input holds
    several positions of its channels, flattened. By layer name: ``{"filters": (k, D) the rows' filters in
    the real input coordinates (0 in a block or column not learnt), "blocks": blocks learnt, "of": blocks in
    all, "earlier": the results that gave them}``; a layer none fits is left out. ``progress`` is told of
    each layer tried."""
    unmixed: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for k, layer in enumerate(layers):
        learnt = restores.get(layer.name)
        signature = layer.name.partition("/")[0]
        mixed = seen.get(f"{signature}/in/{layer.input}") if layer.input else None
        if not learnt or not len(learnt["rows"]) or mixed is None or layer.kind != "conv":
            continue
        channels = layer.kernel[-1]
        cuts = input_blocks(channels)
        if mixed.shape[-1] != channels or not cuts:
            continue
        if progress:
            progress(f"input unmixing: layer {k + 1}/{len(layers)} ({layer.label})")
        r = round_number(signature)
        earlier = sorted((name for name in seen if name.startswith("round_") and "/out/" in name
                          and round_number(name.split("/")[0]) < r and seen[name].shape[-1] == channels),
                         key=lambda name: -round_number(name.split("/")[0]))
        for name in earlier:
            results = seen[name]
            found = _mixings(mixed, results, cuts, rng)
            if found:
                estimates = (learnt["rows"] @ layer.filters).reshape(len(learnt["rows"]), -1, channels)
                filters = np.zeros_like(estimates)
                for (a, b), mixing in found.items():
                    norms = np.linalg.norm(mixing, axis=0)
                    # Unit columns (B is orthogonal: each is |a_c| long); a column not learnt stays 0.
                    scale = np.where(norms > 1e-3 * norms.max(), norms, np.inf)
                    filters[..., a:b] = estimates[..., a:b] @ (mixing / scale)
                unmixed[layer.name] = {"filters": filters.reshape(len(filters), -1), "blocks": len(found),
                                       "of": len(cuts), "earlier": name}
                break
    return unmixed


def _mixings(mixed: np.ndarray, results: np.ndarray, cuts: list[tuple[int, int]],
             rng: np.random.Generator) -> dict[tuple[int, int], np.ndarray]:
    """Each block's mixing learnt from ``results`` at ``mixed``'s positions, at the first placement where
    one of the first two blocks fits (results that fit neither are another tensor)."""
    for placed in _crops(mixed, results.shape):
        x = placed.reshape(-1, placed.shape[-1])
        y = results.reshape(-1, results.shape[-1])
        found = {}
        for i, (a, b) in enumerate(cuts):
            if i == 2 and not found:
                break  # neither of the first two blocks fits: another tensor, or masked
            mixing = crossing_fits.input_mixing(x[:, a:b], y[:, a:b], rng)
            if mixing is not None:
                found[(a, b)] = mixing
        if found:
            return found
    return {}


def _crops(follower: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """``follower`` at the positions of results of ``shape`` ``(K, 1, H, W, M)``: itself when its
    positions are the same; when it is an image up to ``MAX_PAD`` pixels larger each way (the TEE padded it
    for the next layer, by amounts its shape tells), each placement of the results' positions in it; else
    none."""
    if follower.shape[:-1] == shape[:-1]:
        return [follower]
    if follower.ndim != 5 or len(shape) != 5 or follower.shape[:2] != shape[:2]:
        return []
    ph, pw = follower.shape[2] - shape[2], follower.shape[3] - shape[3]
    if not (0 <= ph <= MAX_PAD and 0 <= pw <= MAX_PAD):
        return []
    return [follower[:, :, dy:dy + shape[2], dx:dx + shape[3]]
            for dy in range(ph + 1) for dx in range(pw + 1)]


def round_number(key: str) -> int:
    """The round a signature key or buffer prefix names (``"round_3"`` -> 3; 0 for another)."""
    tail = key.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0
