"""The span attack: private weights near public ones, from ``untrusted.tflite`` under ``groupmix``.

Each group of a layer's obfuscated filters is an orthonormal basis of its real filters' span (``groupmix``:
``W' = C W B``, ``C`` mixing each group of 16 outputs, ``B`` one orthogonal block per group of input
channels, or a permutation of them, the same at every tap). An attacker who holds public weights ``P`` close
to the private ``W`` fits ``B`` and each group's ``C`` by alternating least squares (each public group on
the obfuscated block whose span holds most of it) and orthogonal Procrustes (each block of ``B`` against
``P``; a matching for a permutation), and converges to ``P`` projected onto each group's span, which holds
``W``: the private change comes back but for its part within that span, about ``sqrt(16 / D)`` of it for
``D`` inputs per filter (stop 44's probe: ``docs/experiments/span_attack/``). Its fits start from the spans'
projectors (``_projector_start``, ``_permutation_start``); its own tests say when it has no estimate
(``span_estimate``). ``shadownet.private_change`` scores it against the private weights.
"""

from __future__ import annotations

import numpy as np

from shadownet import attacks

# Alternations of the span attack's least squares and Procrustes: the probe's fits converged in 7-30.
SPAN_ITERATIONS = 60
# Random combinations the span attack's projector start tries per input block (``_projector_start``), and
# the starts it makes from them (``_starts``) before it gives up on a layer.
PROJECTOR_TRIES = 4
PROJECTOR_STARTS = 4
# Rows of one obfuscated group are orthonormal up to float32 rounding; rows of two groups are not.
ORTHOGONAL_COS = 1e-4


def output_blocks(obfuscated: np.ndarray, tol: float = ORTHOGONAL_COS) -> list[tuple[int, int]]:
    """The ``[a, b)`` runs of consecutive obfuscated filters that are mutually orthogonal: ``groupmix``'s
    groups, as the accelerator holds them (an input mixing by orthogonal blocks keeps them so)."""
    units = attacks.unit_rows(obfuscated)
    blocks, start = [], 0
    for i in range(1, len(units) + 1):
        if i == len(units) or np.abs(units[start:i] @ units[i]).max() > tol:
            blocks.append((start, i))
            start = i
    return blocks


def _span_basis(rows: np.ndarray) -> np.ndarray:
    """An orthonormal basis ``[D, r]`` of ``rows``' span, of its rank: a group with a zero filter (a pruned
    model) spans fewer dimensions than it has rows, and its rows are then a tight frame of them."""
    u, singular, _ = np.linalg.svd(rows.T, full_matrices=False)
    return u[:, singular > 1e-6 * singular[0]] if len(singular) and singular[0] > 0 else u[:, :0]


def group_blocks(obfuscated: np.ndarray, groups: list[tuple[int, int]]) -> list[tuple[int, int]] | None:
    """The obfuscated groups' blocks: the runs of mutually orthogonal filters (``output_blocks``) where they
    can hold the public groups; else, where every group has one size, consecutive blocks of it (a group
    that spans fewer dimensions than it has filters - a zero filter - is a tight frame, not orthogonal:
    a review's pruned layer lost its estimate so). None where neither serves."""
    blocks = output_blocks(obfuscated)
    sizes = sorted(b - a for a, b in groups)
    if len(blocks) == len(groups) and all(
            m >= g for m, g in zip(sorted(b - a for a, b in blocks), sizes, strict=True)):
        return blocks
    if sizes[0] == sizes[-1] and len(obfuscated) == len(groups) * sizes[0]:
        return [(k * sizes[0], (k + 1) * sizes[0]) for k in range(len(groups))]
    return None


def _split(n: int, size: int) -> list[tuple[int, int]]:
    from converters.schemes.groupmix import split_groups

    return split_groups(n, size)


def _mix_inputs(w: np.ndarray, blocks: list[np.ndarray], input_blocks: list[tuple[int, int]]) -> np.ndarray:
    """``w`` ``[N, taps, C]`` with each input block ``[a, b)`` multiplied by its matrix."""
    out = w.copy()
    for (a, b), block in zip(input_blocks, blocks, strict=True):
        out[..., a:b] = w[..., a:b] @ block
    return out


def _procrustes(x: np.ndarray, y: np.ndarray, input_blocks: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per input block, the orthogonal ``B`` minimising ``||x B - y||`` over that block's columns."""
    out = []
    for a, b in input_blocks:
        u, _, vt = np.linalg.svd(x[..., a:b].reshape(-1, b - a).T @ y[..., a:b].reshape(-1, b - a))
        out.append(u @ vt)
    return out


def _group_fit(z: np.ndarray, public: np.ndarray, blocks: list[tuple[int, int]],
               groups: list[tuple[int, int]]) -> np.ndarray:
    """Each public group of filters paired with an obfuscated block (one to one, greedily by the energy the
    block's span holds of it) and replaced by its projection onto that span: ``[N, D]``."""
    bases = [_span_basis(z[c:d]) for c, d in blocks]
    coords = public @ np.hstack(bases)  # every public filter in every block's basis
    ends = np.cumsum([0] + [q.shape[1] for q in bases])
    kept = np.add.reduceat(coords ** 2, ends[:-1], axis=1)  # [N, blocks]: energy each block holds
    held = np.add.reduceat(kept, [a for a, _ in groups], axis=0)  # [groups, blocks]
    estimate = np.zeros_like(public)
    # The pairs that hold the most first: a group's own block holds nearly all of it.
    fits = _sizes(blocks)[None, :] >= _sizes(groups)[:, None]
    for g, k in _pair_greedily(-held, fits).items():
        (a, b), q = groups[g], bases[k]
        estimate[a:b] = coords[a:b, ends[k]:ends[k + 1]] @ q.T
    return estimate


def _sizes(ranges: list[tuple[int, int]]) -> np.ndarray:
    return np.array([b - a for a, b in ranges])


def _pair_greedily(cost: np.ndarray, allowed: np.ndarray | None = None) -> dict[int, int]:
    """Rows of ``cost`` paired one to one with its columns, the pairs of least cost first (only those
    ``allowed``, where given): row -> column, in the order they were paired."""
    pairs: dict[int, int] = {}
    free = set(range(cost.shape[1]))
    for flat in np.argsort(cost, axis=None):
        g, k = divmod(int(flat), cost.shape[1])
        if g not in pairs and k in free and (allowed is None or allowed[g, k]):
            pairs[g] = k
            free.discard(k)
    return pairs


def _diagonal_blocks(rows: np.ndarray, taps: int, input_blocks: list[tuple[int, int]]) -> list[np.ndarray]:
    """The projector onto ``rows``' span, its diagonal block of each input block summed over the taps:
    ``[k, k]`` each. An input mixing ``B`` of those blocks turns each into ``B_h^T A_h B_h``."""
    basis = _span_basis(rows)
    basis = basis.reshape(taps, -1, basis.shape[1])
    return [np.einsum("tim,tjm->ij", basis[:, a:b], basis[:, a:b]) for a, b in input_blocks]


def _projector_start(public: np.ndarray, obfuscated: np.ndarray, blocks: list[tuple[int, int]],
                     groups: list[tuple[int, int]], input_blocks: list[tuple[int, int]], taps: int,
                     rng: np.random.Generator, tries: int = PROJECTOR_TRIES) -> list[np.ndarray]:
    """A first input mixing from each group's span, what the output mixing keeps: per input block ``h``
    the span's projector restricted to ``h`` is the public group's ``A_h`` in the obfuscated block's
    coordinates, ``B_h^T A_h B_h``. Groups are paired with blocks by those blocks' spectra (which ``B``
    keeps); then per ``h`` the eigenvectors of a random combination over the groups, on both sides, give
    ``B_h`` up to the signs of its columns, which the single groups' blocks settle; of ``tries``
    combinations, the ``B_h`` that maps the groups' blocks best."""
    ours = [_diagonal_blocks(public[a:b], taps, input_blocks) for a, b in groups]
    theirs = [_diagonal_blocks(obfuscated[a:b], taps, input_blocks) for a, b in blocks]
    spectra = [np.concatenate([np.linalg.eigvalsh(x) for x in side]) for side in ours]
    seen_spectra = [np.concatenate([np.linalg.eigvalsh(x) for x in side]) for side in theirs]
    distance = np.array([[np.linalg.norm(g - k) for k in seen_spectra] for g in spectra])
    pair = _pair_greedily(distance, _sizes(groups)[:, None] == _sizes(blocks)[None, :])
    weights = rng.standard_normal((tries, len(groups)))
    mixing = []
    for h, (a, b) in enumerate(input_blocks):
        if not pair:
            mixing.append(np.eye(b - a))
            continue
        mine = [ours[g][h] for g in pair]
        seen = [theirs[k][h] for k in pair.values()]
        best, best_cost = np.eye(b - a), np.inf
        # Each combination's eigenvectors are as good as its eigenvalues are apart: several are tried, and
        # the one whose B_h maps every paired group's block best is kept (one alone left the 4th or 9th
        # pointwise layer of MobileNet, or MiniVGG's fc1, stalled; another did not).
        for w in weights:
            u = np.linalg.eigh(sum(c * x for c, x in zip(w[list(pair)], mine, strict=True)))[1]
            v = np.linalg.eigh(sum(c * x for c, x in zip(w[list(pair)], seen, strict=True)))[1]
            agree = sum((u.T @ x @ u) * (v.T @ y @ v) for x, y in zip(mine, seen, strict=True))
            signs = np.sign(np.linalg.eigh(agree)[1][:, -1])
            signs[signs == 0] = 1.0
            candidate = v @ np.diag(signs) @ u.T
            cost = sum(float(np.sum((candidate.T @ y @ candidate - x) ** 2)) for x, y in zip(mine, seen,
                                                                                            strict=True))
            if cost < best_cost:
                best, best_cost = candidate, cost
        mixing.append(best)
    return mixing


def input_mixing(scheme: object | None, channels: int) -> tuple[str, list[tuple[int, int]] | None]:
    """How ``scheme`` transforms a conv or dense layer's input of ``channels`` channels, from its public
    parameters (``converters.schemes.groupmix``: ``_mix_inputs``): ``("blocks", its blocks)``,
    ``("permutation", None)`` (``input_group`` 1) or ``("none", None)``."""
    group = getattr(scheme, "input_group", 0)
    if group == 1 and channels >= 2:
        return "permutation", None
    blocks = scheme.input_blocks(channels) if group and hasattr(scheme, "input_blocks") else None
    return ("blocks", blocks) if blocks else ("none", None)


def span_estimate(obfuscated: np.ndarray, public: np.ndarray, channels: int,
                  input_blocks: list[tuple[int, int]] | None, group_size: int, permuted: bool = False,
                  iterations: int = SPAN_ITERATIONS) -> np.ndarray | None:
    """The span attack on one layer: ``public`` ``[N, D]`` projected onto each group's span as the
    obfuscated filters ``[M, D]`` reveal it, the input mixing fitted along (``input_blocks``: its public
    blocks of the ``channels`` input channels; ``permuted``: a permutation of them instead; neither: an
    unmixed input). None when the obfuscated filters do not fall into orthogonal blocks that can hold the
    public groups, when the layer's weights are too few to determine the mixing, or when no fit passes the
    attacker's own test."""
    public = np.asarray(public, np.float64)
    obfuscated = np.asarray(obfuscated, np.float64)
    n, d = public.shape
    if d % channels:
        return None
    # Groups of fewer filters than the scheme's min_group hold fakes too: their blocks are larger.
    groups = _split(n, group_size)
    blocks = group_blocks(obfuscated, groups)
    if blocks is None:
        return None
    if not input_blocks and not permuted:
        return _group_fit(obfuscated, public, blocks, groups)  # in the span: never farther than P
    taps = d // channels
    # Fitted along, the mixing needs the layer's weights to determine it, on both sides: each group's
    # output mixing (16 x 16 unknowns) from its filters' D inputs, each input block's (k (k - 1) / 2) from
    # the N filters at every tap. Where either has fewer than 4x the equations (D < 64; N * taps < 4 (k -
    # 1)), a fit can find some other mixing that matches the public weights as well or better than the
    # true one, and an estimate farther from the private weights (ResNet-44's 10 x 64 head: 2.4x the
    # change; a 24-output dense layer on 3072 inputs: 0.57 where the true mixing gives 0.11).
    widest = max(b - a for a, b in groups)
    if d < 4 * widest or (input_blocks and n * taps < 4 * (max(b - a for a, b in input_blocks) - 1)):
        return None
    shape = (-1, taps, channels)
    wp, wo = public.reshape(shape), obfuscated.reshape(shape)
    if permuted:
        def apply(sigma):
            return wo[..., sigma].reshape(len(wo), d)

        def refit(estimate, sigma):
            unmixed = np.empty_like(wp)
            unmixed[..., sigma] = estimate.reshape(shape)
            return _matching(unmixed, wp)

        starts = iter([_permutation_start(public, obfuscated, blocks, groups, taps, channels),
                       np.arange(channels)])
    else:
        def apply(mixing):
            return _mix_inputs(wo, mixing, input_blocks).reshape(len(wo), d)

        def refit(estimate, mixing):
            # The estimate is C W' B: B again from the output mixing it implies, C W' = estimate B^T.
            return _procrustes(_mix_inputs(estimate.reshape(shape), [m.T for m in mixing], input_blocks), wp,
                               input_blocks)

        starts = _starts(public, obfuscated, blocks, groups, input_blocks, taps)
    # The attacker's own test of the fit: the right mixing leaves of the public weights only the change's
    # part outside each span (a change of 10% of the weights: 1% of what a random span of each group's size
    # leaves, 1 - r / D of them, on every layer of the zoo); a wrong one, about that much (a start that
    # stalled on yolov4-tiny's 64 x 64 1x1 convolution: 0.44, an estimate 6x the change away; the next
    # start found 0.008). A fit that left over a quarter of it is taken to have found no span, and the next
    # start is tried (a change of over about half the weights' size is lost so, where the attack learns
    # little anyway).
    accept = 0.25 * _left_by_chance(public, groups)
    best, best_fit = None, np.inf
    for mixing in starts:
        previous = np.inf
        for _ in range(iterations):
            estimate = _group_fit(apply(mixing), public, blocks, groups)
            fit = float(np.linalg.norm(estimate - public))
            if fit < best_fit:
                best, best_fit = estimate, fit
            # Converged (to rounding); a real step up is the greedy pairing changing its mind on a plateau:
            # go on.
            if abs(previous - fit) <= 1e-9 * fit:
                break
            previous = fit
            mixing = refit(estimate, mixing)
        if best_fit ** 2 <= accept:
            return best
    return None


def _matching(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The permutation ``sigma`` of ``x``'s channels (``[N, taps, C]``) that best matches ``y``'s: ``x[...,
    sigma]`` against ``y``, by the largest summed products (``_assign``)."""
    return _assign(np.einsum("nti,ntj->ij", x, y))


def _assign(score: np.ndarray) -> np.ndarray:
    """``sigma[j]``: the row of ``score`` ``[C, C]`` column ``j`` takes, one to one: each column its best
    row where no other column wants it, the rest greedily (the columns of largest best first)."""
    sigma = np.argmax(score, axis=0)
    rows, counts = np.unique(sigma, return_counts=True)
    if len(rows) == len(sigma):
        return sigma
    clash = np.isin(sigma, rows[counts > 1])
    free = np.ones(len(score), bool)
    free[sigma[~clash]] = False
    for j in np.flatnonzero(clash)[np.argsort(-score.max(axis=0)[clash])]:
        i = int(np.argmax(np.where(free, score[:, j], -np.inf)))
        sigma[j] = i
        free[i] = False
    return sigma


def _permutation_start(public: np.ndarray, obfuscated: np.ndarray, blocks: list[tuple[int, int]],
                       groups: list[tuple[int, int]], taps: int, channels: int) -> np.ndarray:
    """A first input permutation from each group's span: its projector's diagonal, summed over the taps,
    gives each input channel a number per group that the output mixing keeps and the permutation moves
    with the channel. Groups are paired with blocks by those numbers, sorted (which the permutation
    keeps); then each public channel with the obfuscated one whose numbers over the paired groups are
    nearest."""
    def diagonals(rows: np.ndarray) -> np.ndarray:
        basis = _span_basis(rows).reshape(taps, channels, -1)
        return np.einsum("tcm,tcm->c", basis, basis)

    ours = np.array([diagonals(public[a:b]) for a, b in groups])
    theirs = np.array([diagonals(obfuscated[a:b]) for a, b in blocks])
    distance = np.linalg.norm(np.sort(ours, axis=1)[:, None, :] - np.sort(theirs, axis=1)[None, :, :], axis=2)
    paired = _pair_greedily(distance)
    a = ours[list(paired)]
    b = theirs[list(paired.values())]
    # score[i, j] = -|b_i - a_j|^2 up to |a_j|^2, which no choice of i changes
    return _assign(2 * b.T @ a - np.sum(b * b, axis=0)[:, None])


def _starts(public: np.ndarray, obfuscated: np.ndarray, blocks: list[tuple[int, int]],
            groups: list[tuple[int, int]], input_blocks: list[tuple[int, int]], taps: int):
    """The span attack's first input mixings, tried in turn until a fit passes: the spans' projectors
    (``_projector_start``), ``B = I`` (enough for most 3x3 convolutions), then the projectors under other
    random combinations."""
    yield _projector_start(public, obfuscated, blocks, groups, input_blocks, taps, np.random.default_rng(0))
    yield [np.eye(b - a) for a, b in input_blocks]
    for seed in range(1, PROJECTOR_STARTS):
        yield _projector_start(public, obfuscated, blocks, groups, input_blocks, taps,
                               np.random.default_rng(seed))


def _left_by_chance(public: np.ndarray, groups: list[tuple[int, int]]) -> float:
    """The energy of ``public`` a random span of each group's size leaves: ``(1 - r / D)`` of each group's."""
    d = public.shape[1]
    return sum(max(0.0, 1 - (b - a) / d) * float(np.sum(public[a:b] ** 2)) for a, b in groups)
