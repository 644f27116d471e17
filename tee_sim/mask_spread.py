"""One-time masks follow their input's spread, by powers of two.

A one-time mask hides the input it is added to only at ~10x that input's spread (``groupmix``'s
``mask_scale``): the converter sizes it on calibration inputs (random N(0, 1) ones without
``--calibration``), and an input of another scale met a mask of the wrong size - raw 0-255 pixels under a
default conversion a mask of 0.13x their spread, input leakage 0.99 (``shadownet audit``'s correlation after
the best affine fit). Round 1 reads the user's raw input, whose scale the vendor cannot know, and every
later round's input scales with it, so the TA measures each masked input ``x``: its spread - its RMS, or its
largest magnitude over ``PEAK_RATIO`` when that is larger (``spread_of``: a sparse input's few lit elements
stand far above its RMS) - and puts the inference's mask at a power of two ``2**k`` that keeps it at least
at its intended ratio to that spread, and under 4x it (``exponent``). Where it measures:

- a plain push (round 1's; a user input's that joins a later round; under ``--mask-rounds``, a deeper
  round's after a TEE op such as a max pool): before it, from its input (``follow``);
- a restore's fused push (the restore writes its results masked as it makes them, a tile at a time): its
  kernel measures the restored tensor as it makes it (``sn_run``'s ``spread``) and, outside the mask's
  band, answers ``SPREAD_OUTSIDE`` after its pass; the mask then moves (``follow_measured``) and the kernel
  runs again, from the accelerator's results, which it only read - and measures again: results the normal
  world rewrote between the two reads move the mask again, and moving it a third time is an integrity error
  (``tee_sim.per_inference_kernels``' ``MAX_MASK_MOVES``). Its pass writes secure memory, sent to shared
  memory only after it (``tee_sim.per_inference_kernels``' ``wrap``): written there directly, the input went
  out under its old mask and again under the same mask scaled, which gives it back (a review).

Measured (``SECURITY.md``): the zoo converted without calibration, fed uniform [0, 1] images times 255:
leakage 0.01-0.03, against 0.99 before; a vector input joining a dense head, times 1000: 0.07, against 1.00
when round 1's mask alone followed; MiniVGG with every round masked, times 255: every round <= 0.06, against
0.85-0.92 for rounds 2-4 then.

A mask on a user's raw input whose channels the converter scales before it mixes them (``scale``:
``converters.schemes.groupmix.input_scales``, features of 1e-3 beside ones of 1e3) follows the spread of the
input scaled so, the RMS of its largest channel (or its peak over ``PEAK_RATIO``): the input's own spread
is that of its largest raw channel, and would size the mask for it, hundreds of times the scaled input;
and the RMS over all channels would hide a scaled channel that holds most of the power (one feature whose
column outweighs the others') at a fraction of ``mask_scale`` times its own spread.

A power of two keeps the mask and an exact split's pop mask and grid exact: times ``2**d`` bit for bit
(``tee_sim.exact_split``). A plain restore's offset ``bias - L(r)`` is rounded at the larger of its two
terms: moved down (``d < 0``) it becomes ``bias - 2**d L(r)`` by scaling (``PopMask.rescale``: its rounding
shrinks with it); moved up it is made again from the scaled mask (``PopMask.compute``, the layer's weights
read back as a refill reads them: 0.3 ms on MiniVGG, 5-7 ms on yolov4-tiny), since scaling would scale its
rounding too - after a blank input, whose offsets are the bias alone to the last bit, the next image's
outputs came out 12x off. Where it happens:

- on the path, once per change of scale: the first input outside the band of the mask's power of two moves
  its entry's mask in place (``follow``; counted in ``rescaled``);
- off the path: pool entries are drawn at the last input's power of two, and an entry made before a change
  is moved when it is taken (``retarget``: between inferences, when the entry is taken ahead).

On the secure world's fast path a plain push's C check (``SN_SPREAD``, ``tee_sim.ta_shadownet_small_ops``)
comes first: the input's squared spread inside the entry's band (``band``) lets the step run in C; outside
it, or not finite, the step goes back to the TA's Python, which moves the mask (``follow``). A restore's
``SPREAD_OUTSIDE`` sends its step back to Python likewise. Python runs the step on from the instruction
that stopped it (``tee_sim.ta_shadownet_steps.resumed_at``), not from its start: an earlier instruction's
input slot may hold a later one's result by then.

What the normal world learns from it: the masked input's spread tells it at least the power of two, the
input's spread (its RMS, or its peak over 6) within a factor of four, and over many inferences at one power
of two more closely (a mask of fixed size told that only of inputs near the mask's own size); of a deeper
round, that of an activation's spread; and a step that went back to Python to move its mask takes longer
(once per change of scale). The user's input is read from shared memory once, into secure memory, and
measured and pushed from there (``tee_sim.per_inference_kernels``' ``wrap``): read twice, the measure could
be shown zeros and the push the input, sent so under the smallest mask. A NaN among the values is refused (no
power of two follows it). Static masks do not follow: they keep calibration's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from tee_sim.errors import TEE_ERROR_GENERIC, TEEC_ORIGIN_TRUSTED_APP, TEEError
from tee_sim.exact_split import SplitPop
from tee_sim.one_time_masks import small_mask
from tee_sim.ta_shadownet_small_ops import compile_spread

# Round 1's mask moves from 2**MIN_EXPONENT to 2**MAX_EXPONENT of calibration's size. Down: at 2**-40 a
# probe's outputs were 3e-3 off for inputs of RMS 1e-16, 0.15 at 1e-20; at 2**-56 inputs keep their precision
# to an RMS of ~1e-17 (the tests feed 1e-16), while a verified model's tolerances, square roots of sums of
# the masked input's squares in float32, stay far from its smallest normal number (1e-38): at 2**-80 a
# blank input's squares underflowed to zero and its honest results failed their checks. Up: inputs are at
# most 2**40 (``tee_sim.program.MAX_INPUT``).
MIN_EXPONENT, MAX_EXPONENT = -56, 40
KEPT = 2  # a mask stays at its power of two while the input's spread is within KEPT powers of two under it
# An input's spread is the larger of its RMS and its largest magnitude over PEAK_RATIO: a sparse input (a
# few lit elements among many) stands sqrt(N / K) times above its RMS, and a mask sized to the RMS left
# them to a matched filter (a review: 61% of 4 lit elements of a 64x64x3 input found, a single one
# always). An image's peak is 1.7-3x its RMS, normal noise's 4-5x over 150,000 values: either kept.
# A small mask (``MaskStream.small``: ``groupmix``'s ``deep_mask_scale``, 1x, on the rounds a policy adds
# past the floor) drowns a chosen-input attacker's probes, not the values: it follows the RMS alone
# (``peak_weight``). Following the peak, on sparse activations (a digit's, a lone pixel's: peaks up to
# 37x their RMS) it rose to 26x the input's RMS, and a verified round's tolerance, which follows the
# masked input, with it: a change of 1e-3 of the round's own output then passed its check 16-31% of the
# time on MiniVGG's rounds 3-4 (a helper, stop 59).
PEAK_RATIO = 6.0


def peak_weight(stream: Any) -> float:
    """What a followed mask's spread weighs its input's largest square by (``spread_of``, ``SN_SPREAD``):
    ``PEAK_RATIO ** -2``, or 0 for a small mask (its RMS alone: the comment above)."""
    return 0.0 if getattr(stream, "small", False) else PEAK_RATIO ** -2


def small_mask_ratio(spec: dict[str, Any], mean: np.ndarray) -> float:
    """The most a small mask of ``spec`` (``MaskStream.small``) may be against its input's RMS as it follows
    it - ``2**KEPT`` times its RMS over the spread it was sized for (``band``): the RMS of its std and of its
    per-channel ``mean``, which moves with its power of two too (centred masks: minus calibration's means;
    left out, masks reached 4.7-5.0x their input's RMS where this said 4x, a helper, stop 59; a draw's RMS
    strays ~1% from its distribution's, within the slack of ``LayerCheck``'s ``1 + q``) - or 0 for any
    other mask (not small: a load calls its check weak) or a spec that is not numbers (``MaskStream``
    refuses it)."""
    std, spread = spec.get("std"), spec.get("spread", 0.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in (std, spread)) or not small_mask(float(std), float(spread)):
        return 0.0
    means = np.asarray(mean, np.float64)
    squares = float(np.mean(means * means)) if means.size else 0.0
    return 2.0 ** KEPT * math.sqrt(float(std) ** 2 + squares) / float(spread)


def spread_of(x: np.ndarray, scale: np.ndarray | None = None, peak: float = PEAK_RATIO ** -2) -> float:
    """An input's spread, which its mask follows: the larger of its RMS and its largest magnitude over
    ``PEAK_RATIO`` (as the fast path's ``SN_SPREAD`` measures it; ``peak``: the weight of its largest
    square, ``peak_weight``, 0 for the RMS alone); with ``scale`` (float32 per channel, the last axis), that
    of ``x * scale`` with the RMS of its largest channel."""
    if scale is not None:
        scaled = (x * scale).reshape(-1, scale.size).astype(np.float64)
        squares = float(np.max(np.mean(scaled * scaled, axis=0), initial=0.0)) if scaled.size else 0.0
        top = float(np.max(np.abs(scaled), initial=0.0)) * math.sqrt(peak)
        return max(math.sqrt(squares), top) if peak else math.sqrt(squares)  # a NaN reaches both
    flat = x.reshape(-1)
    squares = float(np.dot(flat, flat))  # float32 lanes: 1e-6 relative, enough to choose a band
    if squares == math.inf:  # over float32's range: again in float64
        squares = float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))
    rms = math.sqrt(squares / max(flat.size, 1))  # a NaN reaches the sum of squares too
    return max(rms, float(np.max(np.abs(flat), initial=0.0)) * math.sqrt(peak)) if peak else rms


def exponent(rms: float, spread: float, current: int) -> int:
    """The power of two ``k`` at which a mask sized for inputs of spread ``spread`` suits an input of
    spread ``rms`` (``spread_of``: its RMS, or its peak over ``PEAK_RATIO``), from ``current``: kept while
    ``rms`` is in its band (``band``: the mask 1x-4x its intended ratio to the input), else the smallest
    ``k`` with ``rms <= spread * 2**k`` (1x-2x), within
    ``MIN_EXPONENT .. MAX_EXPONENT``; ``current`` for a NaN, the largest for an infinite spread (a restored
    tensor whose squares overflow float32 in the kernel's measure: values over ~1.8e19). So the mask is
    never smaller than intended, and inputs that vary around the calibration's spread do not move it back
    and forth."""
    if math.isnan(rms):
        return current
    if rms == math.inf:
        return MAX_EXPONENT
    lo, hi = band(spread, current)
    if lo < rms * rms <= hi:
        return current
    if rms <= 0:
        return MIN_EXPONENT
    k = math.ceil(math.log2(rms / spread))
    k += (rms > spread * 2.0 ** k) - (rms <= spread * 2.0 ** (k - 1))  # the logarithm's rounding
    return max(MIN_EXPONENT, min(MAX_EXPONENT, k))


def band(spread: float, k: int) -> tuple[float, float]:
    """The squared spreads ``(lo, hi]`` of the inputs that keep a mask at ``2**k`` (the fast path's check)."""
    lo = -math.inf if k <= MIN_EXPONENT else (spread * 2.0 ** (k - KEPT)) ** 2
    hi = math.inf if k >= MAX_EXPONENT else (spread * 2.0 ** k) ** 2
    return lo, hi


class SpreadFollower:
    """The followed masks of one loaded model (``streams`` with a ``spread``) and the pool entries' powers
    of two (``Entry.exponents``); ``pops``: the model's pop masks and offsets by name; ``slots``: pool
    slots. Moving a mask up takes ``remake(entry, pop)``, which makes ``entry``'s offset ``pop`` again from
    its mask (``PopMask``): given by the caller at each move, so that this object holds no reference back to
    its owner (the loaded model's memory is freed when the model is unloaded, not at the next collection)."""

    def __init__(self, streams: dict[str, Any], pops: dict[str, Any], slots: int) -> None:
        self.streams, self.pops = streams, pops
        self.target = {name: 0 for name, stream in streams.items() if stream.spread}  # the last input's
        self.peak = {name: peak_weight(stream) for name, stream in streams.items()}
        self.rescaled = 0  # masks moved on an inference's path
        # Per slot, by followed mask: its push's kernel structure (a split's grid) and its spread check.
        self._bound: list[dict[str, tuple[Any, Any]]] = [{} for _ in range(slots)]

    def follows(self, instr: dict[str, Any]) -> str | None:
        """The followed mask ``instr`` pushes with (a plain push's, or a restore's fused push's), or None."""
        mask = instr.get("mask")
        return mask if mask in self.target and instr["op"] in ("push", "restore") else None

    def measure(self, alloc: Callable[..., np.ndarray], name: str) -> np.ndarray:
        """A restore's spread measure for followed mask ``name``, ``[lo, hi, peak_weight, measured]``
        (``sn_run``'s ``spread``): what its kernel measures the restored tensor against, its band empty until
        ``bind`` sets it."""
        measure = alloc((4,), np.float64)
        measure[:] = (math.inf, -math.inf, self.peak[name], 0.0)
        return measure

    def drawn(self, entry: Any, name: str) -> None:
        """``entry``'s mask ``name`` was just drawn: put it at the target power of two."""
        if name in self.target:
            k = self.target[name]
            np.multiply(entry.masks[name], np.float32(2.0 ** k), out=entry.masks[name])
            self._set(entry, name, k)

    def grid(self, entry: Any, pop: SplitPop) -> float:
        """The grid of ``entry``'s split pop mask ``pop``: its mask's power of two of the program's."""
        return pop.grid * 2.0 ** entry.exponents.get(pop.mask, 0)

    def bind(self, entry: Any, name: str, push: Any, x: np.ndarray, measure: np.ndarray | None = None) -> Any:
        """The compiled push (its ``step``) of followed mask ``name`` in ``entry``'s slot, of input ``x``;
        returns the slot's spread check (None: ``x`` is not dense, numpy measures it in ``follow``). A
        restore's fused push gives its kernel's ``measure`` instead, and gets None."""
        scale = self.streams[name].scale
        if scale is not None and measure is not None:
            # A restore's kernel measures what it restores unweighted: such a mask would be sized for the
            # scaled input and follow the unscaled one's spread (the converter pushes a scaled input plainly).
            raise ValueError(f"mask {name}: a restore's push cannot follow its input's scaled spread")
        check = compile_spread(x, self.peak[name], scale) if measure is None else None
        self._bound[entry.slot][name] = (push.step, check.op if check is not None else measure)
        self._set(entry, name, entry.exponents.get(name, 0))
        return check

    def follow(self, entry: Any, name: str, x: np.ndarray, remake: Callable[[Any, str], None]) -> None:
        """Before the push of ``x`` with ``entry``'s mask ``name``: the mask at the power of two ``x``'s
        spread (``spread_of``) calls for (moved in place if need be), which the next entries are drawn at
        too."""
        self._follow(entry, name, spread_of(x, self.streams[name].scale, self.peak[name]), remake)

    def follow_measured(self, entry: Any, name: str, remake: Callable[[Any, str], None],
                        redraw: Callable[[Any, str], None] | None = None) -> None:
        """After a restore's fused push with ``entry``'s mask ``name`` whose kernel found the restored
        tensor's spread outside the mask's band: the mask moved there (the caller runs the step again);
        ``redraw``: the pass consumed the mask (it made what it sends in the mask's buffer), which is then
        drawn anew at its new power of two instead (``PerInference.redraw``)."""
        measure = self._bound[entry.slot][name][1]
        self._follow(entry, name, math.sqrt(measure[3]) if measure[3] >= 0 else math.nan, remake, redraw)

    def _follow(self, entry: Any, name: str, spread: float, remake: Callable[[Any, str], None],
                redraw: Callable[[Any, str], None] | None = None) -> None:
        if math.isnan(spread):
            # A NaN among the values: no power of two follows them, and the mask it would keep may be far
            # smaller than the other values (a review: one NaN in the accelerator's results left a masked
            # round's input readable, R^2 0.9996). Not sent: the inference fails, as an op of it would.
            raise TEEError(TEE_ERROR_GENERIC, TEEC_ORIGIN_TRUSTED_APP,
                           f"the input its one-time mask {name} hides holds NaN: not sent")
        now = entry.exponents.get(name, 0)
        k = exponent(spread, self.streams[name].spread, now)
        self.target[name] = k
        if k != now:
            if redraw is None:
                self.rescale(entry, name, k - now, remake)
            else:
                redraw(entry, name)  # drawn at the target, ``k``
            self.rescaled += 1

    def retarget(self, entry: Any, remake: Callable[[Any, str], None]) -> None:
        """An entry being taken: its masks made before the last input moved the target, moved there."""
        for name, k in self.target.items():
            if entry.exponents.get(name, 0) != k:
                self.rescale(entry, name, k - entry.exponents.get(name, 0), remake)

    def rescale(self, entry: Any, name: str, delta: int, remake: Callable[[Any, str], None]) -> None:
        """``entry``'s mask ``name`` times ``2**delta``, with what was made from it (the module docstring)."""
        factor = 2.0 ** delta
        np.multiply(entry.masks[name], np.float32(factor), out=entry.masks[name])
        for pop_name, pop in self.pops.items():
            if pop.mask != name:
                continue
            if isinstance(pop, SplitPop):
                np.multiply(entry.offsets[pop_name], np.float32(factor), out=entry.offsets[pop_name])
            elif delta < 0:
                pop.rescale(entry.offsets[pop_name], factor)
            else:  # scaled up, the offset's rounding would grow with it: made again from the mask
                remake(entry, pop_name)
        self._set(entry, name, entry.exponents.get(name, 0) + delta)

    def _set(self, entry: Any, name: str, k: int) -> None:
        """``entry``'s mask ``name`` is at ``2**k``: its slot's push grid and spread band follow."""
        entry.exponents[name] = k
        push, limits = self._bound[entry.slot].get(name, (None, None))  # a check's op, or a measure
        if push is not None and self.streams[name].split:
            push.grid = self.streams[name].split * 2.0 ** k
        if self.streams[name].modular:  # its period (tee_sim.modular_masks), which its push reads
            entry.periods[name][0] = self.streams[name].period * np.float32(2.0 ** k)
        if isinstance(limits, np.ndarray):
            limits[:2] = band(self.streams[name].spread, k)
        elif limits is not None:
            limits.lo, limits.hi = band(self.streams[name].spread, k)
