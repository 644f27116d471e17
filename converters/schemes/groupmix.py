"""Group mixing: each group of output channels leaves as a random orthonormal basis of its filters' span.

Conv / dense (dense is a 1x1 conv), real filters ``W`` as rows ``[N, D]`` (``D = kh * kw * C``):

- Inputs (CONV_2D, and FULLY_CONNECTED when its input's channel count is known): the TEE mixes each
  group of ``input_group`` consecutive input channels by a random orthogonal ``B_h`` (``x' = B x``, one
  small matmul per group in the push); the filters become ``W B^-1``. Inputs of fewer than
  ``input_group / 2`` channels (an RGB image) are left alone. Every weight the accelerator
  holds is then a sum of 16, Gaussian enough that blind source separation (ICA), which takes any
  output-side mixing apart when the real weights are heavy-tailed or sparse (trained, pruned), finds
  nothing (measured on 64 filters 3x3x32: Laplace weights 57 recovered with a permutation of the inputs
  instead, 0 with the mixing; 50%-sparse 64 -> 0; 70%-sparse 64 -> 7).
- A user's raw input (round 1's layers, and those of a later round that a user input joins, where it is
  pushed plainly) whose filters' columns - of every layer its push serves - differ in norm by more than 4x
  (a standardization folded into the layer: features of 1e-3 beside ones of 1e3, an RGB-D image's depth in
  millimetres) is scaled per channel first, by powers of two of those norms (``input_scales``): the TEE
  mixes ``x' = B diag(s) x`` (an input of a few channels, or any under ``input_group`` 0, otherwise left
  alone: ``x' = diag(s) x``; under ``input_group`` 1, permuted after), the filters become
  ``W diag(s)^-1 B^-1``, and everything below - each group's basis, the mask, the exact split - sees
  channels of one scale instead of rounding the small ones at the grid of the largest. A push that carries
  a user input beside other features (a vector concatenated to pooled ones) is scaled whole, each channel
  by its columns: exact in float32, the scales only even out each channel's share of the rounding.
- The ``N`` output channels are cut into ``ceil(N / group_size)`` groups of consecutive channels, as
  equal as possible (15 or 16 for the default 16). Group ``g`` with real filters ``B_g`` ``[n_g, D]``
  gets an ``r_g``-dimensional subspace: ``span(B_g)``, plus random directions orthogonal to it when its
  rank is below ``min_group`` (fakes, only for groups that are that small; ``r_g <= D``), with an
  orthonormal basis ``Q0_g`` ``[r_g, D]``.
- ``m_g = max(n_g, r_g)`` obfuscated filters: ``W'_g = S_g O_g[:, :r_g] Q0_g``, ``O_g`` a Haar-random
  orthogonal ``[m_g, m_g]``, ``S_g`` random row norms (the group's RMS filter norm times a log-uniform
  factor in [1/2, 2]). When ``m_g = r_g`` (the usual case) the rows are an orthonormal basis of the
  span in a random orientation; otherwise a tight frame of it.
- ``O_g`` is redrawn (up to ``tries`` times, the best kept) until no obfuscated filter has
  ``|cos| > max_cos`` with ANY real filter of the layer, correlated ones of other groups included
  (in the accelerator's input coordinates: even for an attacker who knows ``B``).
- The accelerator's output holds the groups as contiguous blocks, in a secret order of the groups.
- Restore: ``y_j = sum_i c_ji y'_i`` over the ``m_g`` outputs of ``j``'s group, with ``c_j`` the
  least-squares solution of ``B_j = c_j W'_g`` against the float32 weights the accelerator runs (exact up
  to their rounding, as ``B_j`` lies in their span). The restore is block diagonal: the TA runs one small
  matmul per group (``tee_sim.ta_shadownet_linears.restore_blocks``).

Why an orthonormal basis and not GroupCover's random dense ``A_g``: the restore then costs no precision
(``y_j`` is ``w_j . x`` computed in a rotated basis: the float32 error grows by at most ``sqrt(m_g)``,
whatever the filters' norms and correlations), and every attack that pairs two filters of a group
degenerates: the component of one filter orthogonal to another (the fake-partner estimate) is the filter
itself. With random ``A_g`` those pair estimates land near real filters (measured: 15-20% of filters
recovered at group size 4, ~1% at 8); here 0 at any group size.

Depthwise layers run in the TEE by default (``depthwise="tee"``, 3% of a MobileNet's multiply-adds):
offloaded, their rounds give the neighbouring pointwise layers away (``depthwise``, SECURITY.md).
Offloaded (``depthwise="offload"``; one input channel per output, so nothing to mix): each output channel
gets a secret scale, log-uniform in [1/2, 2] (not the paper's U(0, 1], whose tiny scales cost precision).
No permutation: it would cost a gather in the block restore before it and hide nothing that direction
matching does not undo. Directions survive; the attack suite reports depthwise filters separately,
against the chance rate.

Masks: one-time (``static_masks = False``: the TEE draws a fresh one per inference on the rounds the mask
policy selects), normal noise of ``mask_scale`` (10) times the activations' RMS, minus their per-channel
mean: the masked input's correlation with the true one is at most about ``1 / sqrt(1 + mask_scale^2)`` = 0.1.
Where the push carries a user's input (round 1, and any round a user input joins later), the mask is shaped
(``shaped_masks``): white noise holds almost all its power in the finest octaves, where an image has
little, so an attacker who averages neighbours (or channels that repeat one image) first took the image
back at 0.12-0.22. A shaped mask has ``mask_scale`` times the input's RMS in every octave of spatial
frequency (``tee_sim.program.mask_bands``: 6-9 bands on the zoo's images, the mean included) and again
along the direction in which all the input's channels agree, so its spread per element is
``sqrt(2 * bands)`` times a white mask's (35-42x the input's RMS on the zoo's RGB images): an input whose
power fills any one band, in each channel or repeated over all of them, stays at 0.1 whatever the filter
an attacker applies first (not one whose power sits in a few frequencies within an octave: SECURITY.md).
Its magnitude costs no precision where the exact split carries it (below). Where the push carries no user
input and every policy masks it (round 2 of a plain CNN: what one layer made of the input) and conv and dense
layers read it, the mask is modular (``modular_masks``, since stop 61; ``tee_sim.modular_masks``): uniform
over a power-of-two period about ``sqrt(12) * mask_scale`` times the RMS, the input sent modulo it, so that
what crosses is uniform whatever the input. A Gaussian mask's fixed mean is what a fit over many chosen
inferences sees through (``shadownet.mask_fit``: MiniVGG's first layer, 30 of 32 filters from 1,600); a
modular one gives it nothing to average.
The other rounds get static masks at ``static_mask_scale`` times the RMS, by default 0: none. A static mask
hides one inference's features but cancels in the difference of two (the attack suite recovers them whole),
while it costs what one-time masks cost in secure memory (the mask and its unblinding term, full tensors: 44
MiB on MobileNet with its depthwise layers offloaded, SECURITY.md) and, at 10x, three bits of float32
precision per layer (the accelerator accumulates ``x + r``): MobileNet's worst relative error is 1.8e-3 with
static masks on every round, 6e-4 with round 1's one-time mask alone. A one-time-masked conv or dense layer
therefore receives its input as an exact split (``exact_split``, ``converters.exact_split``): the mask's
magnitude is computed exactly and round 1's mask costs nothing (MobileNet: 3e-6 - 7e-5 over 12 inferences,
against 6e-6 - 8e-5 with no mask at all). By default (``auto``) only round 1's, where its mask is shaped
(always, by default) or calibration measured that a white mask's rounding costs the outputs precision or the
split is cheap, and a round's that a user input joins later (a U-Net's skip from the image) where its split
weights fit ``converters.exact_split.LATE_SPLIT_BYTES``: the first layer is small (the split adds 5.7% to
MobileNet's multiply-adds), the deeper one-time rounds of ``--mask-rounds all`` are not (``exact_split=all``
pays it). Unmasked rounds show the accelerator their features through the input mixing only, which an attacker
fitting an affine map (the audit's measure) undoes; they need only their bias in secure memory.

What this does not hide (measured and reported by ``shadownet audit``): each group's span, in the
accelerator's input coordinates (an attacker who could undo ``B`` and held close public
weights could project them onto it); the group structure (obfuscated filters of one group are mutually
orthogonal); with ``depthwise="offload"``, depthwise kernel directions.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from converters.schemes import (
    ActivationStats,
    LinearLayer,
    MaskDistribution,
    ObfuscatedLinear,
    flag,
    integer,
    number,
)
from converters.secret_random import Random
from tee_sim.program import mask_bands, modular_std

SPLIT_POLICIES = ("auto", "first", "all", "none")
DEPTHWISE_PLACES = ("offload", "tee")
MASK_FLOORS = ("layers", "input")
MAX_MASK_SCALE = 1e4  # mask_scale, deep_mask_scale, static_mask_scale
MAX_GROUP = 1 << 16  # group_size, input_group: past the channels of any layer this project has met
MAX_TRIES = 10_000  # draws of a group's mixing before the best is kept
MAX_DEPTH = 1 << 16  # modular_depth: past the layers of any model ("all" is unbounded)
# The default modular_depth: every deeper round's. A fit of two layers through round 3's Gaussian 1x mask took
# MiniVGG's first two, and with round 3's mask modular one of three layers through round 4's took them again
# and 28 of the third's 64 (SECURITY.md): a Gaussian mask on any round leaves the layers before it to a fit.
MODULAR_DEPTH = "all"
# A user's raw input is scaled per channel before its mixing (``input_scales``) where its filters' columns
# differ by more than SCALE_BITS powers of two (within them, 2 bits of float32 at most are lost in the
# mixing: the zoo's first layers are left as they were); scales go down to 2 ** -MAX_SCALE_BITS.
SCALE_BITS, MAX_SCALE_BITS = 2, 60


class GroupMixScheme:
    """Orthonormal group mixing (module docstring). Parameters: ``group_size`` (16), ``min_group`` (8),
    ``max_cos`` (0.75), ``tries`` (64), ``input_group`` (16; 1: permute the inputs only, 0: leave them;
    a raw input's channels are scaled still),
    ``mask_scale`` (10.0, times the activations' RMS, one-time masks on the rounds every policy masks),
    ``deep_mask_scale`` (1.0, the same for the one-time masks the policy adds past those: they drown a
    chosen-input attacker's probes, not the activations' values - SECURITY.md), ``static_mask_scale``
    (0.0: rounds without one-time masks go unmasked), ``center_masks`` (True), ``shaped_masks`` (True:
    the one-time masks of pushes that carry a user input have ``mask_scale`` times its RMS in every
    frequency band and along the channels' common direction; False: white, at ``mask_scale`` per
    element), ``exact_split`` (``"auto"``: round 1's one-time-masked conv and dense inputs cross in two
    exact halves where the mask is shaped, and a white mask where calibration measured that its float32
    rounding costs the outputs precision or the split is cheap, a later round's that a user input joins
    where its split weights fit ``exact_split.LATE_SPLIT_BYTES``; ``"first"``: those rounds' always;
    ``"all"``: every one-time round's, at 4x those layers' multiply-adds; ``"none"``),
    ``depthwise`` (``"tee"``: depthwise layers run in the TEE; ``"offload"``: on the accelerator, where
    a depthwise round's input and results cross channel by channel, unmixed: with the rounds after the
    first unmasked, the audit then learns the restore of the layer before it and the input mixing of the
    layer after it, the real pointwise filters of a MobileNet - SECURITY.md), ``mask_floor`` (the rounds
    one-time masks cover whatever ``--mask-rounds`` says: ``"layers"``, those that carry a user input, those
    one layer from it and those too narrow to mix - ``converters.partition.always_masked``; ``"input"``,
    those that carry a user input alone, as before stop 56, whose unmasked round 2 gave a first layer away
    to chosen inputs: for measuring the attacks on unmasked crossings - SECURITY.md), ``modular_masks``
    (True: the one-time masks at ``mask_scale`` of pushes that carry no user input and are read by conv and
    dense layers only are uniform over a power-of-two period, RMS within ``2**(+-1/2)`` of ``mask_scale``
    times the input's, and the input crosses modulo that period (an exact split's high half, where the
    ``exact_split`` policy splits it) - ``tee_sim.modular_masks``; a
    Gaussian mask's mean is what a fit over many inferences sees, and it gave a first layer away through
    round 2: SECURITY.md; False: Gaussian, as before stop 61), ``modular_depth`` (``"all"``: the
    deeper rounds' small masks, at ``deep_mask_scale``, modular too where ``modular_masks`` would make them
    so at ``mask_scale`` and the round's input is at most this many layers of weights from a user input,
    ``converters.partition.layers_from_input``; 0: none, as before stop 63. A fit of the layers before a round
    through its Gaussian 1x mask took MiniVGG's first two through round 3 and again through round 4 -
    SECURITY.md; a modular mask of about its input's spread wraps a large share of its elements, each a
    read-modify-write of its layer's outputs in the TEE: ResNet-44's TA 2 -> 6-8 ms)."""

    name = "groupmix"
    static_masks = False  # one-time masks, drawn by the TEE per inference (converters.per_inference)

    def __init__(self, group_size: int = 16, min_group: int = 8, max_cos: float = 0.75, tries: int = 64,
                 input_group: int = 16, mask_scale: float = 10.0, deep_mask_scale: float = 1.0,
                 static_mask_scale: float = 0.0, center_masks: bool = True, shaped_masks: bool = True,
                 exact_split: str = "auto",
                 depthwise: str = "tee", mask_floor: str = "layers", modular_masks: bool = True,
                 modular_depth: int | str = MODULAR_DEPTH) -> None:
        group_size = integer("group_size", group_size, 2, MAX_GROUP)
        min_group = integer("min_group", min_group, 1, group_size)
        self.max_cos = number("max_cos", max_cos, 0, 1, above_low=True)
        tries = integer("tries", tries, 1, MAX_TRIES)
        input_group = integer("input_group", input_group, 0, MAX_GROUP)
        # Masks in float32: at 1e4x its input, an input keeps about 3 of its digits under its mask.
        self.mask_scale = number("mask_scale", mask_scale, 0, MAX_MASK_SCALE)
        self.deep_mask_scale = number("deep_mask_scale", deep_mask_scale, 0, MAX_MASK_SCALE)
        self.static_mask_scale = number("static_mask_scale", static_mask_scale, 0, MAX_MASK_SCALE)
        self.group_size, self.min_group, self.tries = group_size, min_group, tries
        self.input_group = input_group
        self.center_masks = flag("center_masks", center_masks)
        self.shaped_masks = flag("shaped_masks", shaped_masks)
        self.modular_masks = flag("modular_masks", modular_masks)
        self.modular_depth = (math.inf if modular_depth == "all"
                              else integer("modular_depth", modular_depth, 0, MAX_DEPTH))
        if exact_split not in SPLIT_POLICIES:
            raise ValueError(f"exact_split must be one of {', '.join(SPLIT_POLICIES)}, not {exact_split!r}")
        self.exact_split = exact_split
        if depthwise not in DEPTHWISE_PLACES:
            raise ValueError(f"depthwise must be one of {', '.join(DEPTHWISE_PLACES)}, not {depthwise!r}")
        self.depthwise = depthwise
        if mask_floor not in MASK_FLOORS:
            raise ValueError(f"mask_floor must be one of {', '.join(MASK_FLOORS)}, not {mask_floor!r}")
        self.mask_floor = mask_floor
        # Kinds of offloadable op kept in the TEE (converters.partition).
        self.in_tee = frozenset({"DEPTHWISE_CONV_2D"}) if depthwise == "tee" else frozenset()

    @property
    def group_min_channels(self) -> int | None:
        """The fewest input channels it mixes (``_mix_inputs``); None when it mixes none (``input_group``
        0, or 1: it permutes them): ``converters.schemes.group_min_channels``."""
        return max(2, self.input_group // 2) if self.input_group >= 2 else None

    def public_params(self) -> dict[str, Any]:
        # Sizes and distribution parameters; the secrets are the draws.
        return {"group_size": self.group_size, "min_group": self.min_group, "max_cos": self.max_cos,
                "tries": self.tries, "input_group": self.input_group, "mask_scale": self.mask_scale,
                "deep_mask_scale": self.deep_mask_scale, "static_mask_scale": self.static_mask_scale,
                "center_masks": self.center_masks,
                "shaped_masks": self.shaped_masks, "exact_split": self.exact_split,
                "depthwise": self.depthwise, "mask_floor": self.mask_floor,
                "modular_masks": self.modular_masks,
                "modular_depth": "all" if self.modular_depth == math.inf else self.modular_depth}

    def obfuscate(self, layer: LinearLayer, rng: Random,
                  input_of: ObfuscatedLinear | None = None) -> ObfuscatedLinear:
        if layer.kind == "DEPTHWISE_CONV_2D":
            return self._depthwise(layer, rng)  # its input is not transformed: input_of does not apply
        return self._filters(layer, rng, input_of)

    # -- conv / dense ------------------------------------------------------------------------------------
    def _filters(self, layer: LinearLayer, rng: Random,
                 input_of: ObfuscatedLinear | None = None) -> ObfuscatedLinear:
        w = np.asarray(layer.weights, np.float64)
        n = w.shape[0]
        # The input side: channels on the last axis of the op's input (a dense layer's K may hold several
        # positions of them, flattened); unknown for a dense layer: left alone.
        channels = w.shape[-1] if layer.kind == "CONV_2D" else layer.input_channels
        permutation = input_index = input_coef = input_scale = None
        if (self.input_group or layer.raw_input) and channels and w.reshape(n, -1).shape[1] % channels == 0:
            peers = None  # a raw input's: the other filters its channels' scales weigh
            if layer.raw_input:
                peers = [np.asarray(p, np.float64).reshape(len(p), -1, channels) for p in layer.peers
                         if p.ndim >= 2 and p.size % (len(p) * channels) == 0]
            w, permutation, input_index, input_coef, input_scale = self._mix_inputs(
                w.reshape(n, -1, channels), rng, input_of, peers)
            w = w.reshape(layer.weights.shape)
        rows = w.reshape(n, -1)
        d = rows.shape[1]
        norms = np.linalg.norm(rows, axis=1)
        units = np.divide(rows, norms[:, None], out=np.zeros_like(rows), where=norms[:, None] > 0)
        layer_norm = float(np.sqrt(np.mean(norms ** 2))) or 1.0
        groups = split_groups(n, self.group_size)
        bases = [self._basis(rows[a:b], d, rng) for a, b in groups]
        # Every real filter of the layer in every group's basis, as one matmul (float32 is plenty for
        # cosines against 0.75): per group it would stream all the filters once each, memory-bound.
        coords = np.vstack(bases).astype(np.float32) @ units.T.astype(np.float32)
        ends = np.cumsum([len(basis) for basis in bases])
        mixed = [self._mix(rows[a:b], basis, coords[end - len(basis):end], layer_norm, rng)
                 for (a, b), basis, end in zip(groups, bases, ends, strict=True)]
        order = rng.permutation(len(groups))  # accelerator block p holds group order[p]
        starts = np.zeros(len(groups), np.int64)
        starts[order] = np.cumsum([0] + [len(mixed[g]) for g in order[:-1]])
        k = max(len(m) for m in mixed)
        index = np.zeros((k, n), np.int32)
        coef = np.zeros((k, n), np.float32)
        for g, ((a, b), obf) in enumerate(zip(groups, mixed, strict=True)):
            m = len(obf)
            c = restore_coefficients(rows[a:b], obf)
            index[:, a:b] = starts[g]  # unused terms: coefficient 0 on the group's first output
            index[:m, a:b] = (starts[g] + np.arange(m))[:, None]
            coef[:m, a:b] = c.T
        weights = np.concatenate([mixed[g] for g in order]).reshape(-1, *w.shape[1:])
        return ObfuscatedLinear(np.ascontiguousarray(weights), permutation, index, coef, input_index,
                                input_coef, input_scale)

    def input_blocks(self, channels: int) -> list[tuple[int, int]] | None:
        """The ``[a, b)`` blocks of consecutive input channels that a conv layer's input of ``channels`` is
        mixed in (public: the secret is each block's matrix); None where it is not mixed."""
        if self.group_min_channels is None or channels < self.group_min_channels:
            return None
        return split_groups(channels, self.input_group)

    def _mix_inputs(self, w: np.ndarray, rng: Random, input_of: ObfuscatedLinear | None = None,
                    peers: list[np.ndarray] | None = None) -> tuple[np.ndarray | None, ...]:
        """``w`` ``[N, positions, C]`` -> (the filters in the accelerator's input coordinates, and the
        input transform: ``(permutation, None, None, None)`` or ``(None, index, coef, scale)`` of a
        mixing), that of ``input_of`` when it transforms ``C`` channels (another reader of the same
        tensor). A user's raw input (``peers`` not None: the filters ``[N', positions', C]`` of the other
        layers its push serves) whose filters' columns differ in scale, its own's or its peers', is mixed
        after its channels are scaled (``input_scales``); with ``input_group`` 0 or 1, scaled only
        (and permuted)."""
        c = w.shape[-1]
        if input_of is not None and input_of.input_permutation is not None \
                and len(input_of.input_permutation) == c:
            permutation = input_of.input_permutation
            return w[..., permutation], permutation, None, None, None
        if input_of is not None and input_of.input_index is not None and input_of.input_index.shape[1] == c:
            index, coef = input_of.input_index, input_of.input_coef
            moved = np.empty_like(w)
            for a, b in self.input_blocks(c) or [(a, a + 1) for a in range(c)]:
                # the block's input channels: a..b mixed, or one channel scaled (and permuted)
                block = coef[:b - a, a:b].T.astype(np.float64)
                moved[..., a:b] = w[..., index[:b - a, a]] @ np.linalg.inv(block)
            return moved, None, index, coef, input_of.input_scale
        scale = input_scales(w, *peers) if peers is not None else None
        if self.input_group == 0 or c < max(2, self.input_group // 2):
            # A few channels (an RGB image): mixing them would Gaussianize little and costs a slow narrow
            # matmul on the largest tensor, permuting them hides little and costs a gather; ICA needs far
            # more samples than such filters (kh * kw * C numbers) hold anyway. Left alone (any input under
            # input_group 0), but for their scales (an RGB-D image's depth in millimetres beside colours).
            if scale is None:
                return w, None, None, None, None
            index = np.arange(c, dtype=np.int32)[None, :]
            return w / scale.astype(np.float64), None, index, scale[None, :].copy(), scale
        if self.input_group == 1:
            permutation = rng.permutation(c)
            if scale is None:
                return w[..., permutation], permutation.astype(np.int32), None, None, None
            # x'_c = s_p x_p, p = permutation[c]: a gather of one term
            moved = (w / scale.astype(np.float64))[..., permutation]
            return moved, None, permutation.astype(np.int32)[None, :], scale[None, permutation], scale
        # x'_c = sum_j B[c, j] s_j x_j over c's group of consecutive channels (B orthogonal blocks, stored
        # float32; s the channels' scales, powers of two, or ones); the filters W' = W diag(s)^-1 B^-1, so
        # W' x' = W x with the float32 B exactly. No permutation first: the push reads each group as a
        # contiguous slice (one matmul, no gather), and the mixing already hides every channel.
        groups = self.input_blocks(c)
        k = max(b - a for a, b in groups)
        index = np.zeros((k, c), np.int32)
        coef = np.zeros((k, c), np.float32)
        moved = np.empty_like(w)
        unscaled = w if scale is None else w / scale.astype(np.float64)
        for a, b in groups:
            block = haar_orthogonal(b - a, rng).astype(np.float32)
            index[:, a:b] = a  # unused terms: coefficient 0
            index[:b - a, a:b] = np.arange(a, b)[:, None]
            # a power of two: the scaled block is the float32 block's, scaled exactly
            coef[:b - a, a:b] = block.T if scale is None else block.T * scale[a:b, None]
            moved[..., a:b] = unscaled[..., a:b] @ np.linalg.inv(block.astype(np.float64))
        return moved, None, index, coef, scale

    def _basis(self, b: np.ndarray, d: int, rng: Random) -> np.ndarray:
        """``Q0``: an orthonormal basis ``[r, D]`` of the group's span, topped up with random orthogonal
        directions to ``min_group`` (at most ``D``)."""
        basis = span_basis(b)
        r = min(d, max(len(basis), self.min_group))
        if r > len(basis):
            basis = np.vstack([basis, orthogonal_directions(basis, r - len(basis), d, rng)])
        return basis

    def _mix(self, b: np.ndarray, basis: np.ndarray, coords: np.ndarray, layer_norm: float,
             rng: Random) -> np.ndarray:
        """One group's obfuscated filters (float32 rows): ``S O[:, :r] Q0`` as in the module docstring;
        ``coords`` ``[r, N]``: every real filter of the layer (unit norm) in the basis."""
        r, m = len(basis), max(len(b), len(basis))
        best, best_cos = None, math.inf
        for _ in range(self.tries):
            frame = haar_orthogonal(m, rng)[:, :r]
            cos = np.abs(frame @ coords) / np.linalg.norm(frame, axis=1)[:, None]
            worst = float(cos.max(initial=0.0))
            if worst < best_cos:
                best, best_cos = frame, worst
            if worst <= self.max_cos:
                break
        rows = best @ basis
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        group_norm = float(np.sqrt(np.mean(np.sum(b * b, axis=1)))) or layer_norm
        scales = group_norm * np.exp(rng.uniform(-math.log(2), math.log(2), m))
        return (rows * scales[:, None]).astype(np.float32)

    # -- depthwise ---------------------------------------------------------------------------------------
    def _depthwise(self, layer: LinearLayer, rng: Random) -> ObfuscatedLinear:
        k = np.asarray(layer.weights, np.float64)
        mult = int(layer.depth_multiplier)
        cm = k.shape[-1]
        if mult < 1 or cm % mult:
            raise ValueError(f"{layer.name}: {cm} depthwise channels with depth multiplier {mult}")
        # Scales only: a channel permutation would hide nothing that direction matching does not undo
        # (the suite recovers every depthwise kernel under any permutation) and would cost a gather in
        # the restore before it, which a block restore cannot fold in.
        scales = np.exp(rng.uniform(-math.log(2), math.log(2), cm)).astype(np.float32)
        weights = (k * scales.astype(np.float64)).astype(np.float32)
        index = np.arange(cm, dtype=np.int32)[None, :]
        coef = (1.0 / scales.astype(np.float64)).astype(np.float32)[None, :]
        return ObfuscatedLinear(weights, None, index, coef)

    # -- masks -------------------------------------------------------------------------------------------
    def mask_distribution(self, stats: ActivationStats, shape: tuple[int, ...] | None = None,
                          common: np.ndarray | None = None, deep: bool = False,
                          modular: bool = False, depth: int = 0) -> MaskDistribution:
        # The RMS (>= the std): calibration inputs unlike the real ones shift the per-channel means, and a
        # mask at the std of the calibration alone then leaves that shift visible (measured: ResNet-44's
        # pooled features, correlation 0.36 at 10x the std).
        spread = (self.deep_mask_scale if deep else self.mask_scale) * max(stats.std, stats.rms)
        if (modular and self.modular_masks and shape is None and (not deep or depth <= self.modular_depth)
                and 0 < spread < math.inf):
            # Modular (tee_sim.modular_masks): uniform, sent modulo its period, so that no number of
            # inferences averages it out (a first layer's fit through round 2: SECURITY.md). No mean: centred
            # on the calibration's, to wrap fewer elements, it made the TA no faster (stop 63: MiniVGG's
            # slower, ResNet-44's the same; the wraps themselves not counted).
            return MaskDistribution(modular_std(spread), np.zeros_like(stats.mean), modular=True)
        mean = -stats.mean if self.center_masks else np.zeros_like(stats.mean)
        if not self.shaped_masks or shape is None or len(shape) < 2:
            return MaskDistribution(spread, mean)
        _, bands = mask_bands(tuple(int(d) for d in shape[1:-1]))
        if common is not None and len(common) < 2:
            common = None  # one channel: its own field is the common one
        # Per element, the TEE's field gives each band 1 / bands of the variance, and with a common direction
        # d it weighs the channels' own fields by 1 / sqrt(1 + max d^2), the common one by d / sqrt(...):
        # each band of each channel, and of the common direction (|d|^2 = C: ones, orthonormally mixed),
        # then holds spread^2 (per channel of the common direction).
        widen = bands * (1.0 + float(np.max(np.square(common)))) if common is not None else bands
        return MaskDistribution(spread * math.sqrt(widen), mean, bands,
                                None if common is None else np.asarray(common, np.float64))

    def push_mask(self, shape: tuple[int, ...], stats: ActivationStats,
                  rng: Random) -> np.ndarray | None:
        # As mask_distribution, at static_mask_scale; None: the round goes unmasked.
        if self.static_mask_scale == 0:
            return None
        spread = max(stats.std, stats.rms)
        noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(self.static_mask_scale * spread)
        if self.center_masks:
            noise -= stats.mean.astype(np.float32)
        return noise


def input_scales(*filters: np.ndarray) -> np.ndarray | None:
    """Per input channel of ``filters`` ``[N, positions, C]`` (each layer that reads the input), the power
    of two nearest its largest column's norm over the layers, over the largest column's (float32, at most 1;
    None where they all lie within ``SCALE_BITS`` powers of two): a channel that any of the layers weighs
    as a large one is kept large (a folded standardization beside a layer of uniform columns that read
    its input first shared that layer's unscaled push, its outputs 8e-3 off LiteRT's, when only the first
    layer's columns counted). A standardization folded into a layer (``W = A diag(1 / sigma)``) sets the
    columns' norms to about ``1 / sigma``: the input scaled so, ``diag(s) x``, has channels of one scale
    whatever the input's own (which calibration with random inputs does not know). The mixing, the basis of
    each group's span (in the mixed coordinates) and the one-time mask (sized on the mixed input) then
    treat every channel alike, where in the input's own coordinates a feature of 1e-3 was rounded at the
    grid of one of 1e3 (a probe: outputs 2e-4 - 1e-2 off LiteRT's). Powers of two: the scaled input, and
    the filters scaled back, are exact in float32. A column of zeros, or one ``MAX_SCALE_BITS`` under the
    largest, is scaled by ``2 ** -MAX_SCALE_BITS``: it adds nothing to the outputs, and scaled by 1 a large
    unused channel would bury the others in the mixing."""
    norms = np.max([np.sqrt(np.sum(np.square(w.astype(np.float64)), axis=(0, 1))) for w in filters], axis=0)
    if len(norms) < 2 or not np.any(norms > 0) or not np.all(np.isfinite(norms)):
        return None
    exponents = np.full(len(norms), -np.inf)
    exponents[norms > 0] = np.rint(np.log2(norms[norms > 0]))
    top = exponents.max()
    exponents = np.clip(exponents - top, -MAX_SCALE_BITS, 0)
    if -exponents.min() <= SCALE_BITS:
        return None
    return (2.0 ** exponents).astype(np.float32)


def split_groups(n: int, size: int) -> list[tuple[int, int]]:
    """``[a, b)`` ranges of consecutive channels: ``ceil(n / size)`` groups as equal as possible."""
    count = max(1, -(-n // size))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def span_basis(b: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """Orthonormal rows spanning the rows of ``b`` (directions whose singular value is below ``rtol`` of
    the largest dropped: the filters' part outside the kept span is at most that relative size). A QR of
    the tall ``b.T`` first, so only a small ``[n, n]`` SVD is needed."""
    if not np.any(b):
        return np.zeros((0, b.shape[1]))
    q, r = np.linalg.qr(b.T)  # b.T = q r, q [D, n] orthonormal columns
    u, sv, _ = np.linalg.svd(r)
    keep = int((sv > rtol * sv[0]).sum())
    return (q @ u[:, :keep]).T


def orthogonal_directions(basis: np.ndarray, count: int, d: int, rng: Random) -> np.ndarray:
    """``count`` random orthonormal directions orthogonal to the rows of ``basis``."""
    g = rng.standard_normal((count, d))
    if len(basis):
        g -= (g @ basis.T) @ basis
    q, _ = np.linalg.qr(g.T)
    q = q.T[:count]
    if len(basis):  # one more pass: the projection above is exact only up to rounding
        q -= (q @ basis.T) @ basis
        q, _ = np.linalg.qr(q.T)
        q = q.T
    return q


def haar_orthogonal(m: int, rng: Random) -> np.ndarray:
    """A uniformly random (Haar) orthogonal ``[m, m]`` matrix."""
    q, r = np.linalg.qr(rng.standard_normal((m, m)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def restore_coefficients(real: np.ndarray, obfuscated: np.ndarray) -> np.ndarray:
    """``c`` ``[n, m]`` with ``real ~= c @ obfuscated`` (least squares, minimum norm, float64), against
    the float32 rows the accelerator runs."""
    obf = obfuscated.astype(np.float64)
    # Through the [m, m] Gram matrix: well conditioned for an orthonormal basis with row norms within
    # 4x of each other (cond <= 16); for a tight frame (more rows than span dimensions) the cutoff drops
    # the directions that only the float32 rounding of the rows spans.
    return (real @ obf.T) @ np.linalg.pinv(obf @ obf.T, rcond=1e-10, hermitian=True)
