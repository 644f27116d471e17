"""What an attacker holding *public* weights learns of the *private* ones a vendor made from them.

The suite's worst case (``shadownet.audit``) gives the attacker the protected model itself and counts the
filters it finds; a vendor who fine-tunes public weights ``P`` into private ``W`` asks another question:
how much of the private change ``W - P`` does the normal world learn? ``shadownet audit --public P.tflite``
answers it here, per layer, by scoring the attacker's best estimate ``E`` of each filter against ``W``:

- ``ratio``: ``||E - W|| / ||W - P||`` over the layer: 1 when the attacker learnt nothing beyond ``P``
  (``E = P``), 0 when it has ``W`` exactly;
- ``change_cos``: the cosine between the change it estimated, ``E - P``, and the true one;
- ``recovered``: filters whose change it found at the suite's threshold (``cos >= attacks.RECOVERY_COS``).

The estimates, from the public weights and ``untrusted.tflite`` alone (no inference, no secret):

- ``span`` - the **span attack** (stop 44's probe; ``docs/experiments/span_attack/``), for a scheme that
  mixes groups of output channels (``groupmix``): each group of obfuscated filters is an orthonormal basis of
  its real filters' span, in the coordinates of an input mixing ``B`` of public blocks, the same at every
  tap. Alternating least squares (each public group of filters on the obfuscated block whose span holds most
  of it) and orthogonal Procrustes (each block of ``B`` against ``P``) converge to ``P`` projected onto each
  group's span, which holds ``W``: what is left is the change projected onto that span, about
  ``sqrt(16 / D)`` of it for ``D`` inputs per filter. Started from ``B = I`` and from the spans' projectors
  (``_projector_start``); the attacker's own tests say when it found nothing (``span_estimate``);
- ``planes`` - for the paper's scheme, each public filter projected onto the plane an obfuscated filter
  spans with its fake partner (``partner_planes``);
- ``weight_attacks`` - the suite's weight attacks (:mod:`shadownet.attacks`) run against ``P``, each public
  filter's estimate of largest ``|cos|`` scaled onto it: reported, not the attacker's choice (the two above
  do better under their schemes).

``best`` names the estimate the attacker goes by: ``span`` where it ran, ``planes`` for a scheme of fake
partners, else ``public`` - the public weights themselves, nothing learnt.
"""

from __future__ import annotations

import numpy as np

from shadownet import attacks
from shadownet.exceptions import ArtifactError

# Alternations of the span attack's least squares and Procrustes: the probe's fits converged in 7-30.
SPAN_ITERATIONS = 60
# Random combinations the span attack's projector start tries (``_starts``) before it gives up on a layer.
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
    bases = [np.linalg.qr(z[c:d].T)[0] for c, d in blocks]
    coords = public @ np.hstack(bases)  # every public filter in every block's basis
    ends = np.cumsum([0] + [q.shape[1] for q in bases])
    kept = np.add.reduceat(coords ** 2, ends[:-1], axis=1)  # [N, blocks]: energy each block holds
    held = np.add.reduceat(kept, [a for a, _ in groups], axis=0)  # [groups, blocks]
    estimate = np.zeros_like(public)
    free_groups, free_blocks = set(range(len(groups))), set(range(len(blocks)))
    # Greedily, the pairs that hold the most first: a group's own block holds nearly all of it.
    for flat in np.argsort(-held, axis=None):
        g, k = divmod(int(flat), len(blocks))
        fits = blocks[k][1] - blocks[k][0] >= groups[g][1] - groups[g][0]
        if g in free_groups and k in free_blocks and fits:
            free_groups.discard(g)
            free_blocks.discard(k)
            (a, b), q = groups[g], bases[k]
            estimate[a:b] = coords[a:b, ends[k]:ends[k + 1]] @ q.T
    return estimate


def _diagonal_blocks(rows: np.ndarray, taps: int, input_blocks: list[tuple[int, int]]) -> list[np.ndarray]:
    """The projector onto ``rows``' span, its diagonal block of each input block summed over the taps:
    ``[k, k]`` each. An input mixing ``B`` of those blocks turns each into ``B_h^T A_h B_h``."""
    basis = np.linalg.qr(rows.T)[0].reshape(taps, -1, len(rows))
    return [np.einsum("tim,tjm->ij", basis[:, a:b], basis[:, a:b]) for a, b in input_blocks]


def _projector_start(public: np.ndarray, obfuscated: np.ndarray, blocks: list[tuple[int, int]],
                     groups: list[tuple[int, int]], input_blocks: list[tuple[int, int]], taps: int,
                     rng: np.random.Generator) -> list[np.ndarray]:
    """A first input mixing from each group's span, what the output mixing keeps: per input block ``h``
    the span's projector restricted to ``h`` is the public group's ``A_h`` in the obfuscated block's
    coordinates, ``B_h^T A_h B_h``. Groups are paired with blocks by those blocks' spectra (which ``B``
    keeps); then per ``h`` the eigenvectors of a random combination over the groups, on both sides, give
    ``B_h`` up to the signs of its columns, which the single groups' blocks settle."""
    ours = [_diagonal_blocks(public[a:b], taps, input_blocks) for a, b in groups]
    theirs = [_diagonal_blocks(obfuscated[a:b], taps, input_blocks) for a, b in blocks]
    spectra = [np.concatenate([np.linalg.eigvalsh(x) for x in side]) for side in ours]
    seen_spectra = [np.concatenate([np.linalg.eigvalsh(x) for x in side]) for side in theirs]
    distance = np.array([[np.linalg.norm(g - k) for k in seen_spectra] for g in spectra])
    pair, free = {}, set(range(len(blocks)))
    for flat in np.argsort(distance, axis=None):
        g, k = divmod(int(flat), len(blocks))
        if g not in pair and k in free and groups[g][1] - groups[g][0] == blocks[k][1] - blocks[k][0]:
            pair[g] = k
            free.discard(k)
    weights = rng.standard_normal(len(groups))
    mixing = []
    for h, (a, b) in enumerate(input_blocks):
        if not pair:
            mixing.append(np.eye(b - a))
            continue
        u = np.linalg.eigh(sum(weights[g] * ours[g][h] for g in pair))[1]
        v = np.linalg.eigh(sum(weights[g] * theirs[k][h] for g, k in pair.items()))[1]
        agree = sum((u.T @ ours[g][h] @ u) * (v.T @ theirs[k][h] @ v) for g, k in pair.items())
        signs = np.sign(np.linalg.eigh(agree)[1][:, -1])
        signs[signs == 0] = 1.0
        mixing.append(v @ np.diag(signs) @ u.T)
    return mixing


def span_estimate(obfuscated: np.ndarray, public: np.ndarray, channels: int,
                  input_blocks: list[tuple[int, int]] | None, group_size: int,
                  iterations: int = SPAN_ITERATIONS) -> np.ndarray | None:
    """The span attack on one layer: ``public`` ``[N, D]`` projected onto each group's span as the
    obfuscated filters ``[M, D]`` reveal it, the input mixing fitted along (``input_blocks``: its public
    blocks of the ``channels`` input channels, None for an unmixed input). None when the obfuscated filters
    do not fall into as many orthogonal blocks as the public ones make groups."""
    public = np.asarray(public, np.float64)
    obfuscated = np.asarray(obfuscated, np.float64)
    n, d = public.shape
    if d % channels:
        return None
    groups, blocks = _split(n, group_size), output_blocks(obfuscated)
    if len(blocks) != len(groups) or sorted(b - a for a, b in blocks) != sorted(b - a for a, b in groups):
        return None
    shape = (-1, d // channels, channels)
    if not input_blocks:
        return _group_fit(obfuscated, public, blocks, groups)
    # Fitted along, the mixing needs the layer's weights to determine it: where they hold fewer than twice
    # as many numbers as the output and input mixings have unknowns (a 1x1 convolution of more filters
    # than inputs, a small head), a fit can find some other mixing that matches the public weights as well,
    # and an estimate farther from the private ones than they are (ResNet-44's head: 2.4x the change).
    unknowns = (sum((b - a) ** 2 for a, b in groups)
                + sum((b - a) * (b - a - 1) // 2 for a, b in input_blocks))
    if n * d < 2 * unknowns:
        return None
    wp, wo = public.reshape(shape), obfuscated.reshape(shape)
    # The attacker's own test of the fit: the right mixing leaves of the public weights only the change's
    # part outside each span (a change of 10% of the weights: 1% of what a random span of each group's size
    # leaves, 1 - r / D of them, on every layer of the zoo); a wrong one, that much or, where the mixing
    # has many unknowns for the weights, less (a start that stalled on yolov4-tiny's 64 x 64 1x1
    # convolution: 0.44, an estimate 6x the change away; the next start found 0.008). A fit that left over
    # a quarter of it is taken to have found no span, and the next start is tried (a change of over about
    # half the weights' size is lost so, where the attack learns little anyway).
    accept = 0.25 * _left_by_chance(public, groups)
    best, best_fit = None, np.inf
    for mixing in _starts(public, obfuscated, blocks, groups, input_blocks, d // channels):
        previous = np.inf
        for _ in range(iterations):
            z = _mix_inputs(wo, mixing, input_blocks).reshape(len(wo), d)
            estimate = _group_fit(z, public, blocks, groups)
            fit = float(np.linalg.norm(estimate - public))
            if fit < best_fit:
                best, best_fit = estimate, fit
            # Converged; a step up is the greedy pairing changing its mind on a plateau: go on.
            if 0 <= previous - fit <= 1e-10 * fit:
                break
            previous = fit
            # The estimate is C W' B: B again from the output mixing it implies, C W' = estimate B^T.
            unmixed = _mix_inputs(estimate.reshape(shape), [m.T for m in mixing], input_blocks)
            mixing = _procrustes(unmixed, wp, input_blocks)
        if best_fit ** 2 <= accept:
            return best
    return None


def _starts(public: np.ndarray, obfuscated: np.ndarray, blocks: list[tuple[int, int]],
            groups: list[tuple[int, int]], input_blocks: list[tuple[int, int]], taps: int):
    """The span attack's first input mixings, tried in turn until a fit passes: the spans' projectors under
    a random combination (``_projector_start``), ``B = I`` (enough for most 3x3 convolutions), then other
    combinations (one that left MobileNet's 4th or 9th pointwise layer stalled, another did not)."""
    yield _projector_start(public, obfuscated, blocks, groups, input_blocks, taps, np.random.default_rng(0))
    yield [np.eye(b - a) for a, b in input_blocks]
    for seed in range(1, PROJECTOR_STARTS):
        yield _projector_start(public, obfuscated, blocks, groups, input_blocks, taps,
                               np.random.default_rng(seed))


def _left_by_chance(public: np.ndarray, groups: list[tuple[int, int]]) -> float:
    """The energy of ``public`` a random span of each group's size leaves: ``(1 - r / D)`` of each group's."""
    d = public.shape[1]
    return sum(max(0.0, 1 - (b - a) / d) * float(np.sum(public[a:b] ** 2)) for a, b in groups)


def partner_planes(obfuscated: np.ndarray, public: np.ndarray) -> np.ndarray:
    """The paper's scheme's counterpart of the span attack: each obfuscated filter ``W' = (W - F) / s``
    and its most collinear other (its fake partner ``F``, as ``attacks.fake_partner_recovery`` pairs them)
    span a plane that holds ``W``; each public filter projected onto the plane that holds most of it:
    ``[N, D]``. What is left of the change is its part in that plane, ``~1 / sqrt(D)`` of it, where the
    minimum-norm point errs by ``W``'s own part along the fake."""
    obf = np.asarray(obfuscated, np.float64).reshape(len(obfuscated), -1)
    public = np.asarray(public, np.float64)
    if len(obf) < 2:
        return public.copy()
    partner = np.argmax(attacks.collinearity(obf), axis=1)
    first = attacks.unit_rows(obf)
    second = obf[partner] - np.sum(obf[partner] * first, axis=1, keepdims=True) * first
    second = attacks.unit_rows(second)  # zero where the pair is collinear: a line, not a plane
    a, b = public @ first.T, public @ second.T  # [N, M]: each public filter in each plane's basis
    best = np.argmax(a * a + b * b, axis=1)
    rows = np.arange(len(public))
    return a[rows, best][:, None] * first[best] + b[rows, best][:, None] * second[best]


def aligned_estimates(candidates: np.ndarray, public: np.ndarray) -> np.ndarray:
    """For each public filter, the candidate of largest ``|cos|`` with it, scaled onto it by least squares
    (what an attacker who trusts the public weights picks): ``[N, D]``."""
    candidates = np.asarray(candidates, np.float64).reshape(len(candidates), -1)
    public = np.asarray(public, np.float64)
    if not len(candidates):
        return public.copy()
    picked = candidates[np.argmax(attacks.abs_cosines(candidates, public), axis=0)]
    norms = np.sum(picked * picked, axis=1)
    scale = np.divide(np.sum(picked * public, axis=1), norms, out=np.zeros(len(public)), where=norms > 0)
    return picked * scale[:, None]


def change_figures(estimate: np.ndarray, private: np.ndarray, public: np.ndarray,
                   threshold: float = attacks.RECOVERY_COS) -> dict:
    """How much of the private change ``private - public`` the ``estimate`` holds (module docstring)."""
    change, found = private - public, estimate - public
    norm = float(np.linalg.norm(change))
    per_filter = np.sum(found * change, axis=1) / np.maximum(
        np.linalg.norm(found, axis=1) * np.linalg.norm(change, axis=1), 1e-300)
    error = float(np.linalg.norm(estimate - private))
    return {
        "ratio": error / norm,
        "error_norm": error,
        "change_norm": norm,
        "change_cos": float(np.sum(found * change)) / max(float(np.linalg.norm(found)) * norm, 1e-300),
        "recovered": int((per_filter >= threshold).sum()),
        "change": norm / max(float(np.linalg.norm(public)), 1e-300),  # the change's size against P's
    }


def layer_change(obfuscated: np.ndarray, private: np.ndarray, public: np.ndarray, channels: int,
                 scheme: object | None) -> dict:
    """One layer's figures: the weight attacks' estimates (aligned to the public filters), the span
    attack's where the scheme mixes groups of outputs, else the partner planes', and which the attacker goes
    by (``best``: the span attack's where it ran, the planes' for a scheme of fake partners, else the public
    weights themselves: the weight attacks' land near nothing under a mixing scheme)."""
    private = np.asarray(private, np.float64)
    public = np.asarray(public, np.float64)
    weights = attacks.layer_estimates(obfuscated, public)
    candidates = np.vstack([e for e in weights.values() if len(e)] or [np.zeros((0, public.shape[1]))])
    row = {"filters": len(public), "dim": public.shape[1],
           "weight_attacks": change_figures(aligned_estimates(candidates, public), private, public)}
    group_size = getattr(scheme, "group_size", None)
    if group_size:
        blocks = scheme.input_blocks(channels) if hasattr(scheme, "input_blocks") else None
        span = span_estimate(obfuscated, public, channels, blocks, group_size)
        row["span"] = None if span is None else change_figures(span, private, public)
    else:
        row["planes"] = change_figures(partner_planes(obfuscated, public), private, public)
    best = "span" if row.get("span") else "planes" if "planes" in row else "public"
    if best == "public":  # no estimate to go by: the public weights themselves, nothing learnt
        row["public"] = change_figures(public, private, public)
    return row | {"best": best}


def check_public(public: list, private: list, name: object) -> None:
    """``ArtifactError`` unless the public model's linear layers have the private ones' kinds and shapes,
    in order: the attack pairs them so."""
    if len(public) != len(private):
        raise ArtifactError(f"public model {name} has {len(public)} linear layer{'s' * (len(public) != 1)} "
                            f"where the protected model has {len(private)}: give public weights of the same "
                            "architecture")
    for p, w in zip(public, private, strict=True):
        if p.kind != w.kind or p.filters.shape != w.filters.shape:
            raise ArtifactError(f"public model {name}: its {p.kind} layer {p.name} has filters "
                                f"{list(p.filters.shape)} where the protected model's {w.kind} layer "
                                f"{w.name} has {list(w.filters.shape)}: give public weights of the same "
                                "architecture")


def private_change(public: object, manifest: dict, scheme: object | None, private: list,
                   obfuscated: list, progress=None) -> dict:
    """Every matched layer's figures (``layer_change``) for the public model ``public`` (a path or bytes)
    against the protected model's layers ``private`` (the audit's reference layers, those the scheme keeps
    in the TEE left out) and the offloaded ``obfuscated`` ones; and the totals over conv and dense layers."""
    from shadownet.audit_layers import match_layers, reference_graph, reference_layers
    from shadownet.audit_reference import protected_signature

    data = protected_signature(public, manifest)
    kinds = {layer.kind for layer in private}
    layers = [layer for layer in reference_layers(data, manifest, graph=reference_graph(data, scheme, public))
              if layer.kind in kinds]
    check_public(layers, private, public)
    counterpart = {id(w): p for w, p in zip(private, layers, strict=True)}
    pairs, _, _ = match_layers(private, obfuscated)
    rows = []
    for k, (ref, obf) in enumerate(pairs):
        if progress:
            progress(f"private change: layer {k + 1}/{len(pairs)} {ref.kind} {ref.name}")
        pub = counterpart[id(ref)]
        row = {"name": ref.name, "kind": ref.kind, "obfuscated": obf.name, "round": obf.where}
        if np.array_equal(pub.filters, ref.filters):
            rows.append(row | {"filters": len(ref.filters), "unchanged": True})
            continue
        rows.append(row | layer_change(obf.filters, ref.filters, pub.filters, ref.channels, scheme))
    return {"public": str(public), "layers": rows, "summary": _totals(rows)}


def _totals(rows: list[dict]) -> dict:
    """Over the changed conv and dense layers: the attacker's estimates' error against the change, as one
    ratio (root of summed squares), and the filters whose change they found."""
    changed = [r for r in rows if r["kind"] in ("conv", "dense") and not r.get("unchanged")]
    out: dict = {"layers": len(changed), "filters": sum(r["filters"] for r in changed),
                 "unchanged_layers": sum(1 for r in rows if r.get("unchanged"))}
    for key in ("weight_attacks", "span", "planes", "best"):  # "public": nothing learnt, in "best" only
        figures = [r[r["best"]] if key == "best" else r.get(key) for r in changed]
        figures = [f for f in figures if f]
        if not figures:
            continue
        change = sum(f["change_norm"] ** 2 for f in figures)
        error = sum(f["error_norm"] ** 2 for f in figures)
        out[key] = {"layers": len(figures),
                    "ratio": float(np.sqrt(error / change)) if change else None,
                    "recovered": sum(f["recovered"] for f in figures)}
    return out
