"""What an attacker holding *public* weights learns of the *private* ones a vendor made from them.

The suite's worst case (``shadownet.audit``) gives the attacker the protected model itself and counts the
filters it finds; a vendor who fine-tunes public weights ``P`` into private ``W`` asks another question:
how much of the private change ``W - P`` does the normal world learn? ``shadownet audit --public P``
answers it here, per layer, by scoring the attacker's best estimate ``E`` of each filter against ``W``:

- ``ratio``: ``||E - W|| / ||W - P||`` over the layer: 1 when the attacker learnt nothing beyond ``P``
  (``E = P``), 0 when it has ``W`` exactly;
- ``change_cos``: the cosine between the change it estimated, ``E - P``, and the true one;
- ``recovered``: filters whose change it found at the suite's threshold (``cos >= attacks.RECOVERY_COS``).

The estimates, from the public weights and ``untrusted.tflite`` alone (no inference, no secret):

- ``span`` - the **span attack** (stop 44's probe; ``docs/experiments/span_attack/``), for a conv or dense
  layer under a scheme that mixes groups of output channels (``groupmix``): each group of obfuscated filters
  is an orthonormal basis of its real filters' span, in the coordinates of an input mixing ``B`` of public
  blocks (or a permutation of the channels), the same at every tap. Alternating least squares (each public
  group of filters on the obfuscated block whose span holds most of it) and orthogonal Procrustes (each block
  of ``B`` against ``P``; a matching for a permutation) converge to ``P`` projected onto each group's span,
  which holds ``W``: what is left is the change projected onto that span, about ``sqrt(16 / D)`` of it for
  ``D`` inputs per filter (``shadownet.span_attack``, whose own tests say when it has no estimate);
- ``planes`` - for the paper's scheme, each public filter projected onto the plane an obfuscated filter
  spans with its fake partner (``partner_planes``);
- ``weight_attacks`` - the suite's weight attacks (:mod:`shadownet.attacks`) run against ``P``, each public
  filter's estimate of largest ``|cos|`` scaled onto it: the estimate of a depthwise layer, whose kernels
  cross only scaled (and permuted); reported for the others.

``best`` names the estimate the attacker goes by: ``weight_attacks`` for a depthwise layer; else ``span``
where it made one, ``planes`` for a scheme of fake partners, or ``public`` - the public weights themselves,
nothing learnt.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shadownet import attacks
from shadownet.exceptions import ArtifactError
from shadownet.span_attack import input_mixing, span_estimate

# Planes the partner-planes estimate tries per obfuscated filter: its most collinear others (its fake shared
# by ~5 filters, the fake is among them).
PLANE_PARTNERS = 6


def partner_planes(obfuscated: np.ndarray, public: np.ndarray, partners: int = PLANE_PARTNERS) -> np.ndarray:
    """The paper's scheme's counterpart of the span attack: each obfuscated filter ``W' = (W - F) / s``
    and its fake partner ``F`` span a plane that holds ``W``; each public filter projected onto the plane
    that holds most of it: ``[N, D]``. What is left of the change is its part in that plane, ``~1 /
    sqrt(D)`` of it, where the minimum-norm point errs by ``W``'s own part along the fake. The partner is
    not known: a fake is shared by several filters (1.2 N outputs: about 5 each), so a filter's most
    collinear other is often another real filter that shares its fake, whose plane does not hold it (a
    review: MiniVGG's first layer, 27 inputs, 1.94-26 times the change). Each filter is paired with its
    ``partners`` most collinear others, and every such plane is a candidate."""
    obf = np.asarray(obfuscated, np.float64).reshape(len(obfuscated), -1)
    public = np.asarray(public, np.float64)
    if len(obf) < 2:
        return public.copy()
    first = attacks.unit_rows(obf)
    order = np.argsort(-attacks.collinearity(obf), axis=1)[:, :min(partners, len(obf) - 1)]
    rows = np.arange(len(public))
    estimate, held = public.copy(), np.full(len(public), -1.0)
    on_first = public @ first.T  # [N, M]: each public filter along each obfuscated one
    for k in range(order.shape[1]):
        other = obf[order[:, k]]
        second = attacks.unit_rows(other - np.sum(other * first, axis=1, keepdims=True) * first)
        on_second = public @ second.T  # zero where the pair is collinear: a line, not a plane
        energy = on_first ** 2 + on_second ** 2
        best = np.argmax(energy, axis=1)
        better = energy[rows, best] > held
        held[better] = energy[rows, best][better]
        pick = best[better]
        estimate[better] = (on_first[rows[better], pick][:, None] * first[pick]
                            + on_second[rows[better], pick][:, None] * second[pick])
    return estimate


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
        "changed": int(np.count_nonzero(np.any(change != 0, axis=1))),  # filters that changed at all
        "ratio": error / norm,
        "error_norm": error,
        "change_norm": norm,
        "change_cos": float(np.sum(found * change)) / max(float(np.linalg.norm(found)) * norm, 1e-300),
        "recovered": int((per_filter >= threshold).sum()),
        "change": norm / max(float(np.linalg.norm(public)), 1e-300),  # the change's size against P's
    }


def layer_change(obfuscated: np.ndarray, private: np.ndarray, public: np.ndarray, channels: int,
                 scheme: object | None, kind: str = "conv") -> dict:
    """One layer's figures: the weight attacks' estimates (aligned to the public filters); for a conv or
    dense layer, the span attack's where the scheme mixes groups of outputs, else the partner planes'; and
    which the attacker goes by (``best``: for a depthwise layer, whose kernels cross only scaled (and
    permuted, under the paper's scheme), the weight attacks'; else the span attack's where it made one, the
    planes' for a scheme of fake partners, or the public weights themselves, nothing learnt)."""
    private = np.asarray(private, np.float64)
    public = np.asarray(public, np.float64)
    weights = attacks.layer_estimates(obfuscated, public)
    candidates = np.vstack([e for e in weights.values() if len(e)] or [np.zeros((0, public.shape[1]))])
    row = {"filters": len(public), "dim": public.shape[1],
           "weight_attacks": change_figures(aligned_estimates(candidates, public), private, public)}
    if kind == "depthwise":
        return row | {"best": "weight_attacks"}
    group_size = getattr(scheme, "group_size", None)
    if group_size:
        how, blocks = input_mixing(scheme, channels)
        span = span_estimate(obfuscated, public, channels, blocks, group_size, permuted=how == "permutation")
        row["span"] = None if span is None else change_figures(span, private, public)
    else:
        row["planes"] = change_figures(partner_planes(obfuscated, public), private, public)
    best = "span" if row.get("span") else "planes" if "planes" in row else "public"
    if best == "public":  # no estimate to go by: the public weights themselves, nothing learnt
        row["public"] = change_figures(public, private, public)
    return row | {"best": best}


def check_public(public: list, private: list, name: object) -> None:
    """``ArtifactError`` unless the public model's linear layers have the private ones' kinds, kernels and
    shapes, in order: the attack pairs them so."""
    if len(public) != len(private):
        raise ArtifactError(f"public model {name} has {len(public)} linear layer{'s' * (len(public) != 1)} "
                            f"where the protected model has {len(private)}: give public weights of the same "
                            "architecture")
    for p, w in zip(public, private, strict=True):
        if p.kind != w.kind or p.kernel != w.kernel or p.filters.shape != w.filters.shape:
            raise ArtifactError(f"public model {name}: its {p.kind} layer {p.name} has filters "
                                f"{list(p.filters.shape)} (kernel {list(p.kernel)}) where the protected "
                                f"model's {w.kind} layer {w.name} has {list(w.filters.shape)} (kernel "
                                f"{list(w.kernel)}): give public weights of the same architecture")


def public_layers(public: object, manifest: dict, scheme: object | None, private: list,
                  kept: set[str] = frozenset(), planning: Any = None) -> list:
    """The public model's linear layers, read as the audit reads the reference (``audit_layers``, planned
    as the audit found the reference planned: ``planning``) and paired with the protected model's
    ``private`` ones (``check_public``), but those ``kept`` in the TEE (``LinearLayer.where``: the
    converter's long sums): read before any other work, so that a wrong file is refused at once. Its inputs
    may differ (the attack reads only weights)."""
    from shadownet.audit_layers import CURRENT, reference_graph, reference_layers
    from shadownet.audit_reference import protected_signature

    data = protected_signature(public, manifest, what="public model")
    kinds = {layer.kind for layer in private}
    graph = reference_graph(data, scheme, public, what="public model", planning=planning or CURRENT)
    layers = [layer for layer in reference_layers(data, graph=graph)
              if layer.kind in kinds and layer.where not in kept]
    check_public(layers, private, public)
    return layers


def private_change(public: object, layers: list, private: list, obfuscated: list, scheme: object | None,
                   progress=None) -> dict:
    """Every matched layer's figures (``layer_change``) for the public model ``public`` (its name; its
    ``layers``: ``public_layers``) against the protected model's layers ``private`` (the audit's reference
    layers, those the scheme keeps in the TEE left out) and the offloaded ``obfuscated`` ones; and the
    totals (``_totals``)."""
    from shadownet.audit_layers import match_layers

    counterpart = {id(w): p for w, p in zip(private, layers, strict=True)}
    pairs, _, _ = match_layers(private, obfuscated)
    rows = []
    for k, (ref, obf) in enumerate(pairs):
        if progress:
            progress(f"private change: layer {k + 1}/{len(pairs)} {ref.kind} {ref.label}")
        pub = counterpart[id(ref)]
        row = {"name": ref.name, "kind": ref.kind, "obfuscated": obf.name, "round": obf.where}
        if np.array_equal(pub.filters, ref.filters):
            rows.append(row | {"filters": len(ref.filters), "unchanged": True})
            continue
        rows.append(row | layer_change(obf.filters, ref.filters, pub.filters, ref.channels, scheme, ref.kind))
    return {"public": str(public), "layers": rows, "summary": _totals(rows)}


def _totals(rows: list[dict]) -> dict:
    """Over the changed layers, conv and dense ones apart from depthwise ones (as the suite counts them):
    the attacker's estimates' error against the change, as one ratio (root of summed squares), and the
    filters whose change they found."""
    out: dict = {"unchanged_layers": sum(1 for r in rows if r.get("unchanged"))}
    for group, kinds in (("conv_dense", ("conv", "dense")), ("depthwise", ("depthwise",))):
        changed = [r for r in rows if r["kind"] in kinds and not r.get("unchanged")]
        totals: dict = {"layers": len(changed), "filters": sum(r["filters"] for r in changed),
                        "changed_filters": sum(r["weight_attacks"]["changed"] for r in changed)}
        for key in ("weight_attacks", "span", "planes", "best"):  # "public": nothing learnt, in "best" only
            figures = [r[r["best"]] if key == "best" else r.get(key) for r in changed]
            figures = [f for f in figures if f]
            if not figures:
                continue
            change = sum(f["change_norm"] ** 2 for f in figures)
            error = sum(f["error_norm"] ** 2 for f in figures)
            totals[key] = {"layers": len(figures), "recovered": sum(f["recovered"] for f in figures),
                           "ratio": float(np.sqrt(error / change)) if change else None}
        out[group] = totals
    return out
