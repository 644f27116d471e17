"""``convert``: a float model in, the protected artifact directory out (the vendor's side, offline).

(This module is not named ``convert``: the package exposes the function ``converters.convert``, which a
submodule of the same name would shadow.)

Steps: read the model (``.tflite``; Keras files and SavedModel directories go through TensorFlow's
converter first), normalize, partition into rounds, estimate each offloaded input's activation scale by
running the ORIGINAL model in LiteRT on calibration inputs, obfuscate and mask with the scheme, lay out
the TEE program, provision it to the target device's ShadowNet trusted app through attestation (so no
secret is ever written in clear), and write ``untrusted.tflite``, ``secrets.sealed`` and
``manifest.json`` atomically.

The original model's reading and checks are in ``converters.original_model``, the output directory's
atomic writing in ``converters.output_directory``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from converters import exact_split
from converters.calibration import activation_stats, calibration_inputs, split_needed
from converters.normalize import normalize_for
from converters.original_model import (
    check_interface,
    check_static,
    io_description,
    one_signature,
    shape_as_litert,
    tflite_bytes,
    why_nothing_offloaded,
)
from converters.output_directory import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SECRETS,
    UNTRUSTED,
    check_output,
    write_artifacts,
)
from converters.partition import input_rounds
from converters.per_inference import (
    DEFAULT_MASK_ROUNDS,
    RoundCost,
    auto_masks_all,
    mask_rounds_form,
    parse_mask_rounds,
    round_costs,
)
from converters.plan import build
from converters.provisioning import device_file, fingerprint_of, manifest_digest, provision, ta_uuid
from converters.schemes import Scheme, always_masked_for, get_scheme, partition_for
from converters.secret_random import SecretRandom
from converters.tflite_reader import read_model
from shadownet.exceptions import UnsupportedOpError
from tee_sim.program import SMALL_MASK, round_of, write_program


def convert(model: Any, out_dir: str | os.PathLike, scheme: str | Scheme | None = None,
            seed: int | None = None,
            calibration: str | os.PathLike | dict[str, np.ndarray] | np.ndarray | None = None,
            device: Any = None,
            force: bool = False, mask_rounds: str | Sequence[int] | None = None,
            device_key: str | None = None, signature: str | None = None) -> dict[str, Any]:
    """Protect ``model`` into ``out_dir``; return the manifest.

    ``model``: a float ``.tflite`` (path or bytes), a Keras model file or a SavedModel directory.
    ``scheme``: a registered name (default ``converters.schemes.DEFAULT_SCHEME``, groupmix),
    ``"name:key=value,..."`` or a ``Scheme``.
    ``seed``: INSECURE, reproducible secrets for tests only (anyone who guesses it regenerates the fakes,
    scales and permutations and gets the weights back); the manifest records ``"seeded": true``.
    ``calibration``: an ``.npz`` (or dict) of representative inputs keyed by input name (tensor or signature
    name; for a single-input model also an ``.npy`` or an array), one sample of the input's shape or several
    stacked on the batch axis; default: random normal inputs.
    ``device``: None (this machine's simulated device), a device identity file written by
    ``shadownet device export`` on the target device (read once, before any work), or a ``tee_sim.Context``
    of the target device.
    ``device_key``: with a device file, the fingerprint its device key must have (``shadownet device export``
    prints it on the device); without, the file's key is trusted as it is, with a warning naming it.
    ``force``: replace a non-empty ``out_dir``.
    ``mask_rounds``: the rounds that get one-time masks when the scheme's masks are not static (``"auto"``,
    ``"first"``, ``"all"``, ``"1,2,5"``; default ``converters.per_inference.DEFAULT_MASK_ROUNDS``; round 1
    always, every round a user input joins later, one layer from it or too narrow to mix:
    ``converters.partition``'s ``always_masked``).
    ``signature``: the key of the signature to protect, in a model that has several (one protected model
    runs one signature); a model of one signature is protected whole.
    Raises ``ModelFormatError``, ``UnsupportedOpError``, ``ArtifactError``, ``SecurityError``.
    """
    if not isinstance(force, bool | np.bool_):  # "no" would be true
        raise TypeError(f"force must be True or False, not {force!r}")
    out = Path(out_dir)
    check_output(out, force, [p for p in (model, calibration, device) if isinstance(p, str | os.PathLike)])
    if device_key is not None:
        fingerprint_of(device_key)
        if device is None or hasattr(device, "open_session"):
            raise ValueError("a device key is pinned for a device file: give the file too (--device FILE)")
    if device is not None and not hasattr(device, "open_session"):
        device = device_file(device, device_key, warn=True)  # read once, before the work
    chosen = get_scheme(scheme)
    static = getattr(chosen, "static_masks", True)
    if mask_rounds is not None:  # before the work: its form, and whether the scheme has one-time masks
        mask_rounds = mask_rounds_form(mask_rounds)
        if static:  # it was warned of and ignored, where bench refused it (a helper's probe)
            raise ValueError(f"mask_rounds={mask_rounds!r}: scheme {chosen.name} uses static masks (one-time "
                             "masks are groupmix's), so it would be ignored")
    unmasked = not static and getattr(chosen, "mask_scale", None) == 0
    _warn_of_a_weak_input_mask(chosen, static)
    original = one_signature(tflite_bytes(model, signature), signature)
    read = read_model(original)
    check_interface(read)
    samples = calibration_inputs(read, calibration)
    shape_as_litert(original, read, samples[0] if calibration is not None else None)
    graph = normalize_for(read, chosen)
    check_static(graph)
    part = partition_for(graph, chosen)
    if not part.rounds:
        raise UnsupportedOpError(why_nothing_offloaded(graph, chosen))
    if part.long_sums:
        names = ", ".join(repr(graph.tensors[graph.ops[i].outputs[0]].name) for i in sorted(part.long_sums))
        warnings.warn(f"{len(part.long_sums)} layer(s) on the user's input run in the TEE, not offloaded "
                      f"({names}): each sums more than {exact_split.MAX_DOT_LENGTH} terms per output, too "
                      "many to take the input's one-time mask as an exact split, and cannot be cut into "
                      "chunks that are few enough (a window of more taps, or too many partial results), "
                      "and unsplit their results would lose precision to it (converters/partition.py, "
                      "long sums)", stacklevel=2)
    rng = secret_rng(seed)
    needed = {graph.ops[i].inputs[0] for r in part.rounds for i in r}
    floats = {t for t in graph.inputs if graph.tensors[t].dtype == np.float32}
    stats = activation_stats(graph, needed | floats, samples)
    carrying = input_rounds(part)  # round 1, and any round a user input joins later: always masked
    # and the rounds one layer from it or too narrow to mix, whose crossings unmasked give layers away
    floor = always_masked_for(part, chosen)
    costs = round_costs(part)
    one_time = [] if static else parse_mask_rounds(mask_rounds, len(part.rounds), floor, costs)
    deeper = [r for r in one_time if r not in floor]  # what the policy adds, at its costs
    _warn_of_deeper_rounds(chosen, deeper, [costs[r - 1] for r in one_time], [costs[r - 1] for r in deeper])
    # Where round 1's exact split is worth its cost (converters.exact_split): measured, for the auto policy.
    needs_split = split_needed(graph, samples, stats, chosen) \
        if one_time and getattr(chosen, "exact_split", None) == "auto" else {}
    plan = build(graph, part, chosen, rng, stats, one_time, needs_split, samples)
    _warn_of_large_refill_layers(plan.program, plan.layer_names)
    masks = plan.program.get("one_time", {}).get("masks", {}).values()
    if not static and len(carrying) > 1:
        unsplit = sorted({r for m in masks if "split" not in m
                          and (r := round_of(m["buffer"], "in")) in carrying[1:]})
        said = ("; their masks add no noise (mask_scale=0)" if unmasked else
                f"; round(s) {unsplit} cross unsplit (converters/exact_split.py), their layers computing at "
                "the mask's magnitude in float32 (a helper's U-Net, a raw image concatenated to deeper "
                "features: outputs up to 2e-3 off; where its readers can take a split - conv layers, dense "
                "layers on the last axis - the default splits such a round if their split weights, 4x "
                f"theirs, fit {exact_split.LATE_SPLIT_BYTES >> 20} MiB of secure memory, and --scheme "
                "groupmix:exact_split=first whatever their size)" if unsplit else
                ", each crossing as an exact split (converters/exact_split.py)")
        warnings.warn(f"round(s) {carrying[1:]} carry a user input that joins after round 1 with no "
                      "offloaded layer between: they get one-time masks as round 1 does, taking secure "
                      f"memory in every pool entry{said}", stacklevel=2)
    # A one-time mask follows its input's spread in the TEE (tee_sim.mask_spread); these do not: static
    # masks, and a one-time mask whose input had no spread on the calibration inputs (all zeros).
    unfollowed = sorted({round_of(m["buffer"], "in") for m in masks if "spread" not in m})
    fixed = ["static masks"] if static or getattr(chosen, "static_mask_scale", 0) > 0 else []
    if unfollowed:
        fixed.append(f"the one-time masks of round(s) {unfollowed}")
    if calibration is None and fixed:
        warnings.warn(f"no calibration inputs: {' and '.join(fixed)} are sized on the activations of random "
                      "N(0, 1) inputs "
                      "(zeros for integer and bool inputs); inputs of a larger spread "
                      "(0-255 pixels, say) are hidden less by them, of a smaller one lose precision to them, "
                      "deep models all of it (a helper's EfficientNetB0 under the paper's scheme, fed [0, 1] "
                      "images: outputs 44-100% off; 1.5e-4 calibrated): give representative inputs "
                      "(--calibration FILE.npz; calibration= in Python)",
                      stacklevel=2)
    if calibration is None and needs_split and not unmasked and any(  # nothing masked: warned of above
            m["buffer"].startswith("round_1/") and "split" not in m for m in masks):
        # The auto policy measured the mask's rounding on random inputs, which can understate it.
        warnings.warn("round 1's masked input crosses unsplit (converters/exact_split.py): the auto policy "
                      "measured the mask's rounding on random N(0, 1) inputs, which can understate it (a "
                      "probe's ResNet50: 3e-6 on them, 6e-5 on its own inputs, its outputs then up to 4e-4 "
                      "from LiteRT's): give --calibration (calibration=), or --scheme (scheme=) "
                      "groupmix:exact_split=first", stacklevel=2)
    plan.program["untrusted_sha256"] = hashlib.sha256(plan.untrusted).hexdigest()
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "scheme": {"name": chosen.name, "params": chosen.public_params()},
        "seeded": seed is not None,
        **io_description(original),
        "rounds": plan.rounds, "buffers": plan.buffers, "shared_memory_size": plan.shared_memory_size,
        "ta_uuid": str(ta_uuid()),
        "summary": plan.summary,
        "created_by": f"shadownet {_version()}",
        "masks": {"one_time_rounds": one_time, "static": static, "input_rounds": carrying,
                  "policy": None if static else _policy_name(mask_rounds)},
    }
    # The manifest's fields the runtime acts on are sealed with the program: the TA refuses, at LOAD_MODEL,
    # a manifest edited or damaged after conversion instead of running with the wrong layout.
    plan.program["manifest_sha256"] = manifest_digest(manifest).hex()
    program = write_program(plan.program, plan.arrays)
    del plan.arrays
    _warn_of_secure_memory(plan.program, len(program))
    sealed = provision(program, device, device_key)
    del program
    manifest["files"] = {UNTRUSTED: {"sha256": hashlib.sha256(plan.untrusted).hexdigest()},
                         SECRETS: {"sha256": hashlib.sha256(sealed).hexdigest()}}
    write_artifacts(out, force, {UNTRUSTED: plan.untrusted, SECRETS: sealed,
                                 MANIFEST: (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()})
    return manifest


def _policy_name(spec: str | list[int] | None) -> str:
    """The mask policy as the manifest records it: the default's name, a policy's in lower case, or the
    rounds a list named (an empty list masks the floor alone, and was recorded as the default, "auto": a
    review)."""
    if spec is None:
        return DEFAULT_MASK_ROUNDS
    if isinstance(spec, str):
        return spec.strip().lower()
    return ",".join(map(str, spec)) or "first"


def _warn_of_deeper_rounds(scheme: Any, deeper: list[int], masked: list[RoundCost],
                           added: list[RoundCost]) -> None:
    """Warn of what one-time masks on the ``deeper`` rounds, past those every policy masks, cost where
    ``"auto"`` would not have taken it on: secure memory past ``auto_masks_all``'s budget (``masked``: the
    costs of every masked round; ``added``: of the deeper ones), and precision where their masks are more
    than a few times their input's spread (``deep_mask_scale``; MiniVGG at 10x, unsplit: 8 of 32 inputs past
    the 1e-4 target, up to 2.4e-4, a review) and no exact split carries them."""
    if not deeper:
        return
    if not auto_masks_all(masked):
        warnings.warn(f"one-time masks on {len(deeper)} round(s) besides those every policy masks (those "
                      "that carry the user's input, read what one layer made of it or are too narrow to "
                      f"mix): they add about {sum(c.entry for c in added) / 2**20:.1f} MiB to every pool "
                      "entry, and the TEE holds their layers' weights for its refills (the largest "
                      f"{max(c.weights for c in added) / 2**20:.1f} MiB) and redoes them on each entry's "
                      "masks, offline (with 'all', MobileNet's entry is 40 MiB and its pool holds one; see "
                      "SECURITY.md)", stacklevel=3)
    scale = getattr(scheme, "deep_mask_scale", 0.0)
    if scale > SMALL_MASK and getattr(scheme, "exact_split", None) != "all":
        warnings.warn(f"one-time masks of {scale:g}x their input's spread on {len(deeper)} round(s) past "
                      "those every policy masks, unsplit: each such layer computes at the mask's magnitude "
                      "in float32 (MiniVGG with every round at 10x: up to 2.4e-4 of its outputs off, against "
                      "the 1e-4 target; groupmix:exact_split=all splits them, at 4x their multiply-adds)",
                      stacklevel=3)


# The simulated secure world's default cap (OP-TEE's default on a HiKey960 is 16 MiB), and half of it.
DEFAULT_CAP = 64 << 20
LARGE_REFILL_LAYER = DEFAULT_CAP // 2


def _warn_of_large_refill_layers(program: dict[str, Any], names: dict[str, str]) -> None:
    """Warn when a layer whose one-time masks' unblinding terms the trusted app makes holds
    LARGE_REFILL_LAYER bytes of obfuscated weights or more: the TA reads the layer's weights from
    ``untrusted.tflite`` into secure memory, whole, at every refill of its pool
    (``tee_sim.obfuscated_weights.Weights``), on top of everything else it holds. The obfuscated weights,
    as the TA reads them: an exactly split layer's are four times the original's (its input and output
    channels doubled; a helper's probe: a 16 MiB dense first layer converted without a warning, then did not
    load under the 64 MiB cap). ``names``: each result buffer's layer, as the model names it (a helper's
    probe: the warning named only the buffer); the warning says how to make the layer smaller."""
    layers = program.get("layers") or {}
    offsets = (program.get("one_time") or {}).get("offsets", {}).values()
    split = {o["layer"] for o in offsets if o.get("split")}
    large, largest, large_split = [], 0, False
    for name in sorted({o["layer"] for o in offsets}):
        nbytes = 4 * math.prod(layers[name]["weights_at"][1])
        if nbytes >= LARGE_REFILL_LAYER:
            large.append(f"{names.get(name, layers[name].get('kind', 'layer'))}, {name}: "
                         f"{nbytes / (1 << 20):.0f} MiB{' as an exact split' if name in split else ''}")
            largest = max(largest, nbytes)
            large_split |= name in split
    if large:
        # A layer of the cap's size or more never fits beside anything (a helper's walkthrough: "may not").
        outcome = "will not load" if largest >= DEFAULT_CAP else "may not load"
        remedy = ("; groupmix:exact_split=none sends split layers unsplit, their weights a quarter the size, "
                  "at the mask's cost in precision (README, 'The exact split')" if large_split else "")
        warnings.warn(f"one-time masks on layers with large obfuscated weights ({'; '.join(large)}): the "
                      "trusted app reads such a layer's weights into secure memory whole at every refill of "
                      "its pool, beside what else it holds; under the secure world's default cap, 64 MiB, "
                      f"the model {outcome}{remedy}",
                      stacklevel=3)


# Where the TA's secure memory at load comes near the secure world's default cap: a second model, or
# the pool's one-time masks and the kernels' scratch on top, then no longer fit.
NEAR_THE_CAP = 56 << 20


def _warn_of_secure_memory(program: dict[str, Any], program_bytes: int) -> None:
    """Warn when what the trusted app holds for certain at load - the decrypted program, the arenas of its
    LiteRT interpreter (one per unit of ops it runs through LiteRT) and the tensors it keeps between steps -
    reaches NEAR_THE_CAP: it may not load under the default cap of 64 MiB (a helper's probe: EfficientNetB0
    and ConvNeXtTiny at 224x224 converted without a word and never loaded, 66.3 and 114.2 MiB (105.5 by stop
    47's converter), LiteRT's arenas 47 and 89 of it; 29.1 and 31.5 since the TA runs their LOGISTICs, GELUs
    and layer norms itself). One-time masks and the kernels' scratch come on top (MobileNet: 5.6 MiB)."""
    arenas, kept = int(program.get("tee_model_arena_bytes", 0)), int(program.get("arena_size", 0))
    total = program_bytes + arenas + kept
    if total < NEAR_THE_CAP:
        return
    mib = 1 << 20
    units = len(program.get("signatures") or {})
    warnings.warn(f"the trusted app needs at least {total / mib:.1f} MiB of secure memory for this model "
                  f"(its program {program_bytes / mib:.1f}, the arenas of the {units} unit(s) of ops it runs "
                  f"through LiteRT {arenas / mib:.1f}, the tensors it keeps between steps {kept / mib:.1f}; "
                  "one-time masks come on top): under the secure world's default cap, 64 MiB, it may not "
                  "load (SecureMemoryError); a smaller input size needs less", stacklevel=3)


def secret_rng(seed: int | None) -> SecretRandom:
    """The generator every secret comes from (``converters.secret_random``): keyed from the OS CSPRNG, or
    (INSECURE, tests only) from ``seed`` with a warning."""
    if seed is None:
        return SecretRandom()
    whole = not isinstance(seed, bool) and isinstance(seed, int | np.integer)
    if not whole or seed < 0:  # TypeError for another type, as Python's own
        raise (ValueError if whole else TypeError)(
            f"seed must be a non-negative integer (or None), not {seed!r}")
    warnings.warn(f"converting with seed={seed}: the secrets are reproducible by anyone who guesses the seed "
                  "(INSECURE, for tests only)", stacklevel=3)
    return SecretRandom.from_seed(int(seed))


def _version() -> str:
    """The installed package's version (``shadownet.__version__``, which converters may not import)."""
    try:
        from importlib.metadata import version

        return version("shadownet")
    except Exception:  # noqa: BLE001 - a source tree that was never installed
        return "(not installed)"


def _warn_of_a_weak_input_mask(chosen: Scheme, static: bool) -> None:
    """A mask of ``mask_scale`` times the input's spread leaves a correlation of about ``1 / sqrt(1 + s^2)``
    between the input and what the accelerator receives. Warned of: none at all; a one-time mask whose
    correlation is above the 0.1 the default (10) keeps; a static mask (the paper's, weak by design) that
    hides nothing. ``mask_scale=1e-30`` sent the input as good as unmasked without a word (a helper's
    probe)."""
    scale = getattr(chosen, "mask_scale", None)
    if scale is None:
        return
    correlation = 1 / math.sqrt(1 + scale**2)
    if scale == 0:
        warnings.warn(f"{chosen.name}:mask_scale=0 sends the user's input to the accelerator unmasked (for "
                      "measurements: the input's protection is gone)", stacklevel=3)
    elif correlation > (0.999 if static else 0.1):
        warnings.warn(f"{chosen.name}:mask_scale={scale:g} hides the user's input from the accelerator only "
                      f"to a correlation of about {correlation:.3f} (1: unmasked; groupmix's default, 10: "
                      "0.0995)", stacklevel=3)
