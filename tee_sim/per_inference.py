"""Per-inference material in the ShadowNet TA: one-time masks from a pool refilled offline, and the
integrity checks of the accelerator's results (``tee_sim.freivalds``).

One-time masks (the program's ``one_time`` entry, ``converters.per_inference``). Every inference takes
one pool entry and never gives it back: an entry holds, for each one-time push, its mask, drawn from a
fresh 256-bit key of the TEE's CSPRNG (``tee_sim.one_time_masks``; the key is then forgotten), and for
each restore of a one-time round its offset ``bias - L(mask)`` (the pop mask of Slalom and of the paper:
the mask pushed through the layer's obfuscated weights and the restore, in float64; an exact split's is
its pop mask before the restore, ``tee_sim.exact_split``); round 1's masks at the power of two the last
input's spread called for, moved when an input calls for another (``tee_sim.mask_spread``); for a modular
mask (``tee_sim.modular_masks``), its period, and its restores' offsets (a split's pop mask) get back
the periods its push takes off before they are read (the unwrap, in the same call as the push). The mask
is drawn once, offline, for its pop mask, and kept for the push: drawing it again at the push cost 6.4 ms of
yolov4-tiny's inference (a 2 MB mask, its 256 KiB quantile table out of cache by then; 512 KiB since the
table holds its cells' widths too) against 2 MB of
secure memory. Each push and restore that uses a slot's mask or offsets is compiled once per pool slot,
on that slot's arrays, and runs the current slot's: nothing is copied or drawn on the hot path. Entries
are made offline, between inferences (``refill``, a few milliseconds of work at
a time, asked by the normal world's background thread; or at once when an inference finds the pool
empty and the policy allows it), all free entries together one layer at a time (a layer's weights are
read once per batch), and kept in secure memory: a pool stored outside would have to be sealed and
streamed back in, one AES-GCM pass over the entry on the hot path (measured: about 2 GB/s, 0.8 ms for
MobileNet's 1.6 MB entry), for nothing the background refill does not already give; its memory is the
price (``stats``: ``pool_bytes``; 4 MiB by default). The weights the refills need are not kept either
(``tee_sim.obfuscated_weights.Weights``): read back from the normal world's copy and checked by a keyed
hash (Poly1305).

Every entry is used by one inference at most: ``begin`` (step 0, or between inferences for the next one:
``tee_sim.ta_shadownet_steps.take_ahead``) takes a ready entry, and the entry is discarded when the
inference ends, fails or is abandoned (a new step 0), never put back; with an empty pool ``begin`` makes
one now (``refill`` policy) or fails with ``TEE_ERROR_NO_DATA`` (``fail``).

Integrity (``verify``): each inference also takes, from its entry, fresh secret projections for every layer
(normal draws from a PCG64 generator seeded per entry with 256 bits of the TEE's CSPRNG, projected in C:
``LayerCheck.draw``); the TEE keeps a secure copy of what it sends (the round input, written by the push
kernel beside shared memory) and prepares the check from it; the restore kernel copies what comes back into
secure memory a tile at a time and checks each tile there before any of its values is used. A depthwise layer
with multiplier 1 is computed instead (``computed``; its check would compute it in full): the push computes it
from the secure copy into a result buffer of secure memory and its restore reads that, not the accelerator's
result; a round made only of such layers is not run (the runtime's ``skipped_rounds``) and nothing is sent for
it, its input written to the secure copy alone. MobileNet's 13 such layers took 4.7 ms of prepares and checks
per inference and take 2.6 ms computed (kernels timed alone, medians of 40 calls); the result buffers are
handed out in program order and shared by layers whose lifetimes do not overlap (MobileNet's 13 share one of
1.6 MB).

This module holds the material and its pool; the pushes and restores that use it are wrapped in
``tee_sim.per_inference_kernels``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tee_sim.errors import TEE_ERROR_NO_DATA, TEEC_ORIGIN_TRUSTED_APP, TEEError
from tee_sim.exact_split import SplitPop
from tee_sim.freivalds import POPPED, LayerCheck, direct
from tee_sim.freivalds_directions import COMPUTED_TOTAL_BYTES
from tee_sim.mask_spread import SpreadFollower, small_mask_ratio
from tee_sim.modular_masks import Unwrap
from tee_sim.obfuscated_weights import Weights, weight_regions
from tee_sim.one_time_masks import MaskStream, PopMask, check_pop, composed_weights, gaussian_table
from tee_sim.per_inference_kernels import PerInferenceKernels
from tee_sim.program import round_of

DEFAULT_POOL_BYTES = 4 << 20  # default capacity: entries that fit in 4 MiB, at least 1 and at most 8
MIN_POOL, MAX_POOL = 1, 8
BLOCK = 1 << 18  # secure memory for small arrays comes in blocks of 256 KiB
BOUND_EVERY = 8  # the achieved detection bound is measured on the first 8 inferences, then 1 in 8


@dataclass
class Entry:
    """One inference's material."""

    slot: int = 0  # pushes and restores of one-time rounds are compiled once per slot, on its arrays
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    offsets: dict[str, np.ndarray] = field(default_factory=dict)  # of a split restore: its pop mask
    projections: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    exponents: dict[str, int] = field(default_factory=dict)  # per followed mask: its power of two
    # Per modular mask (tee_sim.modular_masks): its period now (float32 [1]: its power of two moves it).
    periods: dict[str, np.ndarray] = field(default_factory=dict)
    rng: np.random.Generator | None = None  # while it is made: its projections' generator, freshly seeded


class PerInference:
    """The one-time masks and checks of one loaded model (see the module docstring).

    ``program``/``arrays``: the TEE program; ``shm_shapes``: shared buffer name -> shape; ``untrusted``:
    the normal world's ``untrusted.tflite`` (authenticated as it is read: ``Weights``);
    ``alloc(shape, dtype)``: accounted secure memory; ``scratch(purpose, shape, dtype)``: secure memory used
    within one call only, which the trusted app may share between its sessions (``tee_sim.memory.
    SharedScratch``; None: ``alloc``'s);
    ``random_bytes(n)``: the TEE's CSPRNG.
    """

    def __init__(self, program: dict[str, Any], arrays: dict[str, np.ndarray],
                 shm_shapes: dict[str, tuple[int, ...]], untrusted: Any, alloc: Callable[..., np.ndarray],
                 random_bytes: Callable[[int], bytes], verify: bool = False, capacity: int = 0,
                 fail_when_empty: bool = False, weights_outside: bool = False,
                 scratch: Callable[..., np.ndarray] | None = None) -> None:
        one_time = program.get("one_time") or {"rounds": [], "masks": {}, "offsets": {}}
        layers: dict[str, dict[str, Any]] = program.get("layers") or {}
        self.rounds = [int(r) for r in one_time["rounds"]]
        self.verify, self.fail_when_empty = bool(verify), bool(fail_when_empty)
        self._alloc, self._random = alloc, random_bytes
        self._take = scratch
        self.secure_bytes = 0
        self._block: np.ndarray | None = None
        self._block_used = 0
        if verify and not layers:
            raise ValueError("verification needs the program's layers (convert again with this version)")
        needed = {layers[o["layer"]]["weights"] for o in one_time["offsets"].values()}
        if verify:
            needed |= {layer["weights"] for layer in layers.values()}
        # Checks: one per accelerator output, prepared from its input buffer. A depthwise layer with
        # multiplier 1, which a check would compute in full anyway (LayerCheck's direct), a dense layer
        # whose check costs more than it, and a dense or conv layer whose results have too few directions
        # for a check (LayerCheck.cheaper_computed) are computed instead (``computed``): the TEE uses its
        # own result, not the accelerator's. Each is made from its
        # layer's weights as the load reads them (its norms; a computed layer's weights, kept).
        # An exact split's layer has a second check, of its popped result (``POPPED``, LayerCheck's popped).
        made: dict[str, LayerCheck] = {}
        readers: dict[str, list[str]] = {}
        for out, layer in layers.items() if verify else ():
            readers.setdefault(layer["weights"], []).append(out)
        split = {spec["layer"] for spec in one_time["offsets"].values() if spec.get("split")}
        small = {spec.get("buffer"): small_mask_ratio(spec, arrays[spec["mean"]])
                 for spec in one_time["masks"].values() if not spec.get("split")}

        kept = 0  # bytes of computed dense layers' weights (a conv's as one), against COMPUTED_TOTAL_BYTES

        def make_checks(name: str, weights: np.ndarray) -> None:
            nonlocal kept
            for out in readers.get(name, ()):
                layer = layers[out]
                own = direct(layer["kind"], weights.shape, shm_shapes[layer["input"]])
                made[out] = LayerCheck(layer, weights, shm_shapes[layer["input"]], shm_shapes[out],
                                       self.account, computed=own, shared_results=True,
                                       input_mask=small.get(layer["input"], 0.0))
                made[out].room = COMPUTED_TOTAL_BYTES - kept
                if out not in split and made[out].cheaper_computed():  # (it held no secure memory)
                    made[out] = LayerCheck(layer, weights, shm_shapes[layer["input"]], shm_shapes[out],
                                           self.account, computed=True, shared_results=True,
                                           known=made[out].directions)
                    kept += made[out].computed_bytes
                if out in split:
                    made[out + POPPED] = LayerCheck(layer, weights, shm_shapes[layer["input"]],
                                                    shm_shapes[out], self.account, shared_results=True,
                                                    popped=True)

        # A modular mask's restores (tee_sim.modular_masks) keep their layers' weights composed with the
        # restore in secure memory, made as the load reads the weights.
        # An exact split's (its pop mask before the restore) keep -[W'_hi | W'_lo], the blocks its high half
        # meets: the periods come off both halves of the pop mask.
        modular = {name: spec for name, spec in one_time["offsets"].items()
                   if (one_time["masks"].get(spec.get("mask")) or {}).get("modular") is True}
        composed: dict[str, np.ndarray] = {}

        def visit(name: str, weights: np.ndarray) -> None:
            make_checks(name, weights)
            for offset, spec in modular.items():
                if layers[spec["layer"]]["weights"] != name:
                    continue
                if spec.get("split"):
                    m, c = weights.shape[0] // 2, weights.shape[-1] // 2
                    blocks = [weights[:m, ..., :c], weights[m:, ..., :c]]  # W'_hi, W'_lo
                    made = np.concatenate([-b.reshape(m, -1).T for b in blocks], axis=1)
                else:
                    perm = spec.get("permutation")
                    made = composed_weights(weights, arrays[spec["index"]], arrays[spec["coef"]],
                                            None if perm is None else arrays[perm].astype(np.intp))
                composed[offset] = self.account(made.shape, np.float32)
                composed[offset][...] = made

        # Read from the normal world's untrusted.tflite once, with its SHA-256 checked on the same bytes.
        self.weights = Weights(untrusted, weight_regions(layers, needed), program.get("untrusted_sha256"),
                               self.account, weights_outside, random_bytes, visit)
        # One-time masks: the buffers the instructions read under the program's mask / offset names, so the
        # ordinary push and restore code runs on them unchanged, on the masks and offsets of the pool slot
        # in use (one compiled push / restore per slot).
        self.streams: dict[str, MaskStream] = {}
        for name, spec in one_time["masks"].items():
            # A mask is its buffer's shape (an exact split's: half its channels), checked before anything is
            # made for it (a shaped mask's bands are computed over its positions).
            buffer = spec.get("buffer")
            shape = shm_shapes.get(buffer) if isinstance(buffer, str) else None
            if shape is not None and spec.get("split"):
                shape = (*shape[:-1], shape[-1] // 2)
            if shape is None or list(spec.get("shape") or []) != list(shape):
                raise ValueError(f"mask {name}: shape {spec.get('shape')!r} is not that of its buffer "
                                 f"{buffer!r} ({shape})")
            common = spec.get("common")  # a shaped mask's common direction (tee_sim.one_time_masks)
            if common is not None and (not isinstance(common, str) or common not in arrays):
                raise ValueError(f"mask {name}: common direction {common!r} is not an array of the program")
            scale = spec.get("scale")  # the input's channel scales its spread is measured with
            if scale is not None and (not isinstance(scale, str) or scale not in arrays):
                raise ValueError(f"mask {name}: channel scales {scale!r} are not an array of the program")
            self.streams[name] = MaskStream(spec, arrays[spec["mean"]], self.account,
                                            None if common is None else arrays[common],
                                            None if scale is None else arrays[scale], self.scratch)
        self.pops: dict[str, PopMask | SplitPop] = {}
        for name, spec in one_time["offsets"].items():
            layer = layers[spec["layer"]]
            geo = check_pop(spec, layer, self.weights.shapes[layer["weights"]], shm_shapes, self.streams,
                            arrays)
            mask = spec["mask"]
            if spec.get("split"):
                self.pops[name] = SplitPop(layer["weights"], geo, mask, self.streams[mask].split)
                continue
            perm = spec.get("permutation")
            permutation = None if perm is None else arrays[perm].astype(np.intp)
            self.pops[name] = PopMask(layer["weights"], geo, mask, arrays[spec["bias"]],
                                      arrays[spec["index"]], arrays[spec["coef"]], permutation)
            self.pops[name].dense(geo.y_shape[-1], self.account)
        # A modular mask's restores unwrap what its push took off (tee_sim.modular_masks).
        self.unwraps: dict[str, dict[str, Unwrap]] = {}  # by mask, by offset
        for name, pop in self.pops.items():
            if name in composed:
                geo = pop.geometry  # a split layer's reads 2C channels, [x_hi | x_lo]; the wraps are x_hi's
                if isinstance(pop, SplitPop):
                    geo = replace(geo, x_shape=(*geo.x_shape[:-1], geo.x_shape[-1] // 2))
                self.unwraps.setdefault(pop.mask, {})[name] = Unwrap(geo, composed[name])
        self._offset_shapes = {name: shm_shapes[spec["layer"]] if spec.get("split") else
                               (*shm_shapes[spec["layer"]][:-1], arrays[spec["bias"]].shape[0])
                               for name, spec in one_time["offsets"].items()}
        self.checks: dict[str, LayerCheck] = {}
        self.computed: dict[str, LayerCheck] = {}
        self.by_input: dict[str, list[str]] = {}
        # Checked rounds whose input crosses masked without an exact split (the kernels' wrap finds them):
        # their checks tolerate the mask's rounding, not the input's (tee_sim.freivalds, the popped check).
        self.unsplit_masked: set[int | None] = set()
        self.computed_rounds: set[int] = set()
        self._layer_weights = {out: layer["weights"] for out, layer in layers.items()}
        self._layer_weights.update({out + POPPED: layers[out]["weights"] for out in split})
        if verify:
            for out, layer in layers.items():
                check = made[out]
                (self.computed if check.computed else self.checks)[out] = check
                self.by_input.setdefault(layer["input"], []).append(out)
                if out + POPPED in made:
                    self.checks[out + POPPED] = made[out + POPPED]
                    self.by_input[layer["input"]].append(out + POPPED)
            self._bind_results()
            # Rounds whose every layer the TEE computes: the accelerator does not run them (the runtime's
            # ``skipped_rounds``), so their pushes write the secure copy alone, nothing to shared memory:
            # MobileNet's 13 depthwise rounds, 12.5 MB a verified inference wrote for nobody (its TA 5.5-7.1
            # -> 4.8-6.1 ms, one process per variant, alternated, a busy host).
            by_round: dict[int, list[str]] = {}
            for out in layers:
                r = round_of(out)
                if r is not None:
                    by_round.setdefault(r, []).append(out)
            self.computed_rounds = {r for r, outs in by_round.items()
                                    if all(o in self.computed for o in outs)}
            everything = [*self.checks.values(), *self.computed.values()]
            scratch = self.account(max(c.scratch_elements for c in everything), np.float32)
            for check in everything:
                check.bind_scratch(scratch)
        # Its pushes and restores (``wrap``) and the secure memory they share.
        self.kernels = PerInferenceKernels(self, shm_shapes, one_time["masks"])
        self.enabled = bool(self.streams or self.checks or self.computed)
        # The pool.
        self._items: list[tuple[str, str]] = [("masks", "")] + [("pop", n) for n in self.pops]
        self._items += [("check", o) for o in self.checks]
        self.entry_bytes = sum(math.prod(shape) * 4 for shape in self._offset_shapes.values())
        self.entry_bytes += sum(stream.size * 4 for stream in self.streams.values())
        for check in self.checks.values():
            u, f = check.projection_shapes()
            self.entry_bytes += 4 * (math.prod(u) + math.prod(f))
        if capacity <= 0:
            capacity = int(min(MAX_POOL, max(MIN_POOL, DEFAULT_POOL_BYTES // max(self.entry_bytes, 1))))
        self.capacity = capacity
        self.entries = [self._new_entry(slot) for slot in range(capacity if self.enabled else 0)]
        # Per slot, by checked output: the check's parameters for the restore kernel and its prepare's C
        # struct (the kernels' wrap fills them), read by tally.
        self.fused: list[dict[str, Any]] = [{} for _ in self.entries]
        self.prepared_structs: list[dict[str, Any]] = [{} for _ in self.entries]
        # One-time masks follow their input's spread by powers of two (``tee_sim.mask_spread``).
        self.spread = SpreadFollower(self.streams, self.pops, len(self.entries))
        self._free = deque(self.entries)
        self.pool_bytes = len(self.entries) * self.entry_bytes
        # What the instructions' shapes are checked against when they compile (the TA merges these into
        # its array table; attach gives it back).
        self.live: dict[str, np.ndarray] = {name: self.entries[0].offsets[name] for name in self.pops}
        self.live.update({name: self.entries[0].masks[name] for name in self.streams})
        self.arrays: dict[str, np.ndarray] = {}  # the model's arrays, once the TA merged ours (attach)
        self._ready: deque[Entry] = deque()
        self._batch: list[Entry] = []  # entries being made, ``_step`` work items done
        self._step = 0
        self.current: Entry | None = None
        # While an instruction runs on in Python from the call where the secure world's fast path stopped
        # it: what that call answered (``ta_shadownet_steps.run_step``); else None.
        self.stopped_with: int | None = None
        if self.streams:
            gaussian_table()  # made once per process, at the first load that needs it
        self.made = 0
        self.offline_s = 0.0
        self.synchronous = 0
        self.checked = 0
        self.inferences = 0
        self.worst_ratio = 0.0
        self.worst_bound_log2 = -math.inf

    # -- memory --------------------------------------------------------------------------------------
    def _bind_results(self) -> None:
        """Each check's z and tau live from the push into its round (step r - 1) to the restore of its
        result (step r), where the next round's pushes prepare theirs: the checks of rounds of one parity
        share one bank, each round's at its own offsets. Secure memory of a verified model (in-process,
        after one inference): ResNet-404 18.4 -> 11.4 MiB (its 406 checks' 6.2 MiB of z and tau in two
        banks of under 100 KB), yolov4-tiny 41.8 -> 39.5, ResNet-44 6.1 -> 5.1, MobileNet 16.9 -> 16.6;
        no change in speed measurable on a busy host. A result buffer not named ``round_N/out/...`` keeps
        memory of its own."""
        placed: dict[str, tuple[int, int]] = {}  # output -> (parity, offset in its bank)
        used: dict[int, int] = {}  # round -> floats its checks take
        for out, check in self.checks.items():
            r = round_of(out)
            if r is None:
                check.bind_results(self.account((check.results_elements,), np.float32))
                continue
            placed[out] = (r % 2, used.get(r, 0))
            used[r] = used.get(r, 0) + -(-check.results_elements // 16) * 16  # 64-byte aligned
        size = [max([0, *(n for r, n in used.items() if r % 2 == parity)]) for parity in (0, 1)]
        banks = [self.account((n,), np.float32) if n else None for n in size]
        for out, (parity, offset) in placed.items():
            check = self.checks[out]
            check.bind_results(banks[parity][offset:offset + check.results_elements])

    def scratch(self, purpose: str, shape: Any, dtype: Any) -> np.ndarray:
        """Secure memory for ``purpose`` used within one call: the trusted app's shared buffer (``scratch``),
        else ``account``'s; counted in ``secure_bytes`` either way (this model's view, ``stats``'
        ``per_inference_secure_memory``). (A method: a closure kept on the object made a cycle that kept a
        closed session's material until a collection.)"""
        if self._take is None:
            return self.account(shape, dtype)
        array = self._take(purpose, shape, dtype)
        self.secure_bytes += array.nbytes
        return array

    def account(self, shape: Any, dtype: Any) -> np.ndarray:
        """Zeroed secure memory; small arrays are carved out of shared blocks (a deep model has thousands
        of them, and every allocation of the secure OS has its bookkeeping)."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(d) for d in shape)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > BLOCK // 8:
            array = self._alloc(shape, dtype)
            self.secure_bytes += array.nbytes
            return array
        if self._block is None or self._block_used + nbytes > BLOCK:
            self._block, self._block_used = self._alloc(BLOCK, np.uint8), 0
            self.secure_bytes += BLOCK
        start = self._block_used
        self._block_used = -(-(start + nbytes) // 64) * 64
        return self._block[start:start + nbytes].view(dtype).reshape(shape)

    def _new_entry(self, slot: int) -> Entry:
        entry = Entry(slot)
        for name, stream in self.streams.items():
            entry.masks[name] = self.account(stream.shape, np.float32)
            if stream.modular:
                entry.periods[name] = self.account((1,), np.float32)
                entry.periods[name][0] = stream.period
        for name, shape in self._offset_shapes.items():
            entry.offsets[name] = self.account(shape, np.float32)
        for out, check in self.checks.items():
            u, f = check.projection_shapes()
            entry.projections[out] = (self.account(u, np.float32), self.account(f, np.float32))
        return entry

    # -- the pool ------------------------------------------------------------------------------------
    @property
    def ready(self) -> int:
        return len(self._ready)

    def refill(self, budget_s: float | None = None, entries: int = 0) -> int:
        """Make pool entries until the pool is full, ``entries`` were completed, or (after at least one
        work item) ``budget_s`` seconds passed; returns the number of ready entries. Free entries are
        made together, a work item (a layer's pop masks or projections) at a time for all of them, so a
        layer's weights are read back and checked once per batch, not once per entry."""
        start = time.perf_counter()
        completed = 0
        while True:
            if not self._batch:
                want = len(self._free) if not entries else min(len(self._free), entries - completed)
                if want <= 0:
                    break
                self._batch = [self._free.popleft() for _ in range(want)]
                self._step = 0
                if self.checks:  # one generator per entry, seeded from the TEE's CSPRNG, for all its layers
                    for entry in self._batch:
                        entry.rng = np.random.Generator(np.random.PCG64(int.from_bytes(self._random(32),
                                                                                       "little")))
            t = time.perf_counter()
            self._make(self._batch, *self._items[self._step])
            self._step += 1
            self.offline_s += time.perf_counter() - t
            if self._step == len(self._items):
                for entry in self._batch:
                    entry.rng = None
                self._ready.extend(self._batch)
                self.made += len(self._batch)
                completed += len(self._batch)
                self._batch = []
            elif budget_s is not None and time.perf_counter() - start >= budget_s:
                break
        return len(self._ready)

    def _make(self, batch: list[Entry], kind: str, name: str) -> None:
        if kind == "masks":
            for entry in batch:
                for mask, stream in self.streams.items():
                    stream.draw(self._random(32), entry.masks[mask])
                    self.spread.drawn(entry, mask)
        elif kind == "pop":
            pop = self.pops[name]
            weights = self.weights.get(pop.weights)
            prepared = pop.prepare(weights)  # once for the batch: the same weights for every entry
            masks = [entry.masks[pop.mask] for entry in batch]
            offsets = [entry.offsets[name] for entry in batch]
            if isinstance(pop, SplitPop):  # on the grid of its mask's power of two
                pop.compute_many(masks, weights, offsets, prepared, [self.spread.grid(e, pop) for e in batch])
            else:
                pop.compute_many(masks, weights, offsets, prepared)
        else:
            weights = self.weights.get(self._layer_weights[name])
            for entry in batch:
                u, f = entry.projections[name]
                self.checks[name].draw(entry.rng, u, f, weights)

    def remake(self, entry: Entry, name: str) -> None:
        """``entry``'s offset ``name`` made again from its mask, as a refill makes it (mask_spread)."""
        self._make([entry], "pop", name)

    def redraw(self, entry: Entry, name: str) -> None:
        """``entry``'s mask ``name`` drawn anew from a fresh key, at its target power of two, and the offsets
        made from it made again: a restore's fused push that makes what it sends in the mask's own buffer
        consumed the mask, and it must move (``tee_sim.per_inference_kernels``, ``mask_spread``)."""
        self.streams[name].draw(self._random(32), entry.masks[name])
        self.spread.drawn(entry, name)
        for pop_name, pop in self.pops.items():
            if pop.mask == name:
                self.remake(entry, pop_name)

    def begin(self) -> None:
        """Step 0: the inference's entry (the previous one, finished or not, is discarded)."""
        self.end()
        if not self.enabled:
            return
        if not self._ready:
            if self.fail_when_empty:
                raise TEEError(TEE_ERROR_NO_DATA, TEEC_ORIGIN_TRUSTED_APP,
                               "the one-time mask pool is empty (refill it between inferences)")
            self.synchronous += 1
            self.refill(entries=1)
        self.current = self._ready.popleft()
        self.spread.retarget(self.current, self.remake)  # off the path when the entry is taken ahead
        self.inferences += 1
        # The achieved bound (a statistic, one more pass over each result) on the first inferences, then 1
        # in 8.
        want = int(self.inferences <= BOUND_EVERY or self.inferences % BOUND_EVERY == 0)
        for out, fused in self.fused[self.current.slot].items():
            fused.want_norm = want and not self.checks[out].popped  # a popped check claims no bound

    def end(self) -> None:
        """The inference is over (or abandoned): its entry is spent, to be made anew."""
        if self.current is not None:
            self._free.append(self.current)
            self.current = None

    def attach(self, arrays: dict[str, np.ndarray]) -> None:
        """The model's array table (with ``live`` merged in): per-slot restores compile against it."""
        self.arrays = arrays

    def tally(self) -> None:
        """The inference passed every check: add its outcomes to the statistics (the checks ran in the
        kernels, on the C fast path or not)."""
        if self.current is None:
            return
        made = self.prepared_structs[self.current.slot]
        for out, fused in self.fused[self.current.slot].items():
            check = self.checks[out]
            check.tau_norm = made[out].tau_norm  # this inference's prepare
            worst, bound = check.outcome(fused)
            self.checked += not check.popped  # a layer's checks: its popped one is part of it
            self.worst_ratio = max(self.worst_ratio, worst)
            if bound is not None:
                self.worst_bound_log2 = max(self.worst_bound_log2, bound)

    @staticmethod
    def idle_stats() -> dict[str, Any]:
        """``stats`` of a model loaded without one-time masks or checks (the paper's scheme without
        ``verify``): the same keys, nothing counted - ``stats()['verify']['checked']`` was a KeyError there
        (a review). ``tests/shadownet/test_runtime.py`` holds the keys to ``stats``'."""
        return {
            "one_time_rounds": [],
            "pool": {"capacity": 0, "ready": 0, "entry_bytes": 0, "pool_bytes": 0, "made": 0,
                     "offline_s": 0.0, "synchronous": 0, "rescaled": 0, "mask_exponents": {}},
            "verify": {"enabled": False, "layers": 0, "computed": 0, "popped": 0, "computed_rounds": [],
                       "projections": 0, "checked": 0, "capped": 0, "unsplit_masked_rounds": [],
                       "worst_ratio": 0.0, "worst_bound_log2": None},
            "secure_bytes": 0,
        }

    def stats(self, ahead: int = 0) -> dict[str, Any]:
        """The pool's and the checks' figures; ``ahead``: 1 when the current entry is the next inference's,
        taken ahead (``tee_sim.ta_shadownet_steps.take_ahead``), a ready one all the same."""
        return {
            "one_time_rounds": self.rounds,
            "pool": {"capacity": self.capacity, "ready": self.ready + ahead, "entry_bytes": self.entry_bytes,
                     "pool_bytes": self.pool_bytes, "made": self.made, "offline_s": self.offline_s,
                     "synchronous": self.synchronous, "rescaled": self.spread.rescaled,
                     "mask_exponents": dict(self.spread.target)},  # round 1's: the last input's power of two
            "verify": {"enabled": self.verify, "layers": sum(not c.popped for c in self.checks.values()),
                       "computed": len(self.computed), "popped": sum(c.popped for c in self.checks.values()),
                       "computed_rounds": sorted(self.computed_rounds),  # not run: skipped_rounds
                       "projections": sum(c.k for c in self.checks.values()), "checked": self.checked,
                       # layers whose bound cannot be counted on (LayerCheck.weak)
                       "capped": sum(c.weak and not c.popped for c in self.checks.values()),
                       "unsplit_masked_rounds": sorted(r for r in self.unsplit_masked if r is not None),
                       "worst_ratio": self.worst_ratio,
                       "worst_bound_log2": None if self.checked == 0 else self.worst_bound_log2},
            "secure_bytes": self.secure_bytes,
        }

