"""A protected model's session of the ShadowNet trusted app: the trusted app its artifacts were made for
(``shadownet_ta``), the options its LOAD_MODEL takes (``load_options``), the session opened with the model
loaded and its shared memory bound (``open_session``: at load, and again after the secure world was lost),
and what a load the secure world has no memory for says: what the model needs the memory for, and the
other protected models this process holds open on the same device (``add_open_model``).
"""

from __future__ import annotations

import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import tee_sim
from shadownet.accelerator import Accelerator
from shadownet.artifacts import Artifacts
from shadownet.exceptions import ArtifactError, SecureMemoryError, SecurityError
from shadownet.refill import pool_stats
from shadownet.shared_buffers import SharedBuffers, quietly
from shadownet.tee_errors import translated
from tee_sim import ta_shadownet_commands as commands

if TYPE_CHECKING:
    from shadownet.runtime import ProtectedModel

# The protected models this process holds open: a load that runs out of secure memory names them. The lock:
# a set that another thread's load adds to while it is listed would raise.
_open_models: weakref.WeakSet[Any] = weakref.WeakSet()
_open_models_lock = threading.Lock()
os.register_at_fork(after_in_child=_open_models_lock._at_fork_reinit)  # held by a thread the fork left behind


def add_open_model(model: ProtectedModel) -> None:
    """Count ``model`` among the protected models this process holds open (until it is collected)."""
    with _open_models_lock:
        _open_models.add(model)


def shadownet_ta(artifacts: Artifacts) -> uuid.UUID:
    """The UUID of ShadowNet's trusted app; ``ArtifactError`` if ``artifacts`` were made for another."""
    expected_uuid = uuid.UUID(str(commands.UUID))
    if uuid.UUID(artifacts.ta_uuid) != expected_uuid:
        raise ArtifactError(f"{artifacts.directory} was made for trusted app {artifacts.ta_uuid}, not "
                            f"ShadowNet's ({expected_uuid})")
    return expected_uuid


def load_options(verify: bool, mask_pool: int | None, on_exhausted: str,
                 per_inference: bool) -> tuple[int, int]:
    """LOAD_MODEL's options for ``shadownet.load``'s arguments (checked by ``ProtectedModel``): (flags, pool
    entries; 0 for the TA's default). ``per_inference``: the model has one-time masks or is verified."""
    flags = (commands.LOAD_VERIFY if verify else 0) | \
        (commands.LOAD_FAIL_WHEN_EMPTY if on_exhausted == "fail" else 0) | \
        (commands.LOAD_WEIGHTS_OUTSIDE if per_inference else 0)  # from untrusted.tflite in shared memory
    return flags, int(mask_pool or 0)


class WeakChecks(NamedTuple):
    """A verified model's checks that say less than they could (the load warns of them): ``capped`` of its
    ``layers`` cannot count on the bound (``tee_sim.freivalds.LayerCheck.weak``: fewer projections than it
    wants, or results of too few directions, too large for the TEE to compute); ``masked`` rounds
    cross masked without an exact split under masks many times their input (not the ~1x ones of the
    rounds a policy adds past the floor: ``tee_sim.one_time_masks.MaskStream.small``), so their checks
    tolerate the mask's rounding."""

    capped: int = 0
    layers: int = 0
    masked: tuple[int, ...] = ()


class Opened(NamedTuple):
    """What ``open_session`` opened: the session, its TEE context, the accelerator (made the first time),
    the rounds the TA computes whole (verified: not run on the accelerator) and, verified, its weak checks."""

    session: Any
    context: Any
    accelerator: Accelerator
    skipped: frozenset[int]
    weak: WeakChecks


def open_session(model: ProtectedModel, artifacts: Artifacts, ta: uuid.UUID, options: tuple[int, int],
                 buffers: SharedBuffers, accelerator: Accelerator | None,
                 make_accelerator: Callable[[], Accelerator], verify: bool,
                 one_time_rounds: Sequence[int]) -> Opened:
    """Open a session of trusted app ``ta`` for ``model`` (a ``ProtectedModel``, named in what another
    model's failed load says), load ``artifacts`` with LOAD_MODEL's ``options`` (``load_options``), make
    the accelerator (``make_accelerator()``, when ``accelerator`` is None: the first time), bind the shared
    memory (``buffers``)."""
    where = f"loading {artifacts.directory}"
    with translated(where):  # starting the secure world may fail too (a TEEError before)
        context = tee_sim.default_context()
        session = context.open_session(ta)
    made = None  # the accelerator made here: closed here if the open fails after
    try:
        with translated(where):
            # The options, then the manifest's digest: the TA checks that the layout, rounds and
            # tensors this runtime acts on are the ones sealed with the secrets.
            params = [tee_sim.TempMemRef(artifacts.secrets),
                      tee_sim.TempMemRef(artifacts.untrusted), tee_sim.Value(*options),
                      tee_sim.TempMemRef(commands.manifest_digest(artifacts.manifest))]
            session.invoke_command(commands.Command.LOAD_MODEL, params)
            if accelerator is None:
                # Only now: the TA has authenticated the pairing, so a swapped untrusted.tflite is
                # reported as the SecurityError it is, not as a LiteRT or layout error.
                accelerator = made = make_accelerator()
            buffers.ensure_registered(context, accelerator)
            buffers.bind(session)
            if options[0] & commands.LOAD_WEIGHTS_OUTSIDE:
                buffers.bind_weights(context, session)
        # Verified, the rounds the TA computes whole (it restores those results from its own
        # computation, not the accelerator's, and sends them nothing: tee_sim.per_inference) are not
        # run: the TA says which.
        skipped: frozenset[int] = frozenset()
        weak = WeakChecks()
        if verify:
            checks = pool_stats(session)["verify"]
            skipped = frozenset(map(int, checks.get("computed_rounds", ())))
            weak = WeakChecks(int(checks.get("capped", 0)), int(checks.get("layers", 0)),
                              tuple(map(int, checks.get("unsplit_masked_rounds", ()))))
    except BaseException as exc:
        quietly(session.close)
        if made is not None:  # the caller never had it (a review: its threads and pages left to the GC)
            quietly(made.close)
        reasons = _memory_reasons(model, artifacts, context, verify, one_time_rounds) \
            if isinstance(exc, SecureMemoryError) else []
        if reasons:
            raise SecureMemoryError(f"{exc} ({'; '.join(reasons)})") from exc
        if isinstance(exc, SecurityError) and "another device" in str(exc):  # the trusted app's words where
            # the device may be the cause: say which device this is (a mistyped SHADOWNET_HOME makes a new
            # one, and the error blamed the file alone: a helper's probe)
            chosen = "chosen by $SHADOWNET_HOME" if os.environ.get("SHADOWNET_HOME") else \
                "the default; $SHADOWNET_HOME chooses another"
            raise SecurityError(f"{exc} (this device's keys: {context.home}, {chosen})") from exc
        raise
    return Opened(session, context, accelerator, skipped, weak)


def _memory_reasons(model: ProtectedModel, artifacts: Artifacts, context: Any, verify: bool,
                    one_time_rounds: Sequence[int]) -> list[str]:
    """What the user chose that a model which did not fit in secure memory needs the memory for."""
    reasons = []
    if verify:
        reasons.append("verify=True keeps every layer's check, and the layers it computes, in secure "
                       "memory: without it the model needs less")
    carrying = (artifacts.manifest.get("masks") or {}).get("input_rounds") or [1]
    if len(one_time_rounds) > 1:
        chosen = len(one_time_rounds) > len(carrying)
        reasons.append(f"one-time masks on {len(one_time_rounds)} rounds keep a pool of masks "
                       "with their unblinding terms, and what refilling it takes, in secure memory"
                       + (": converted with --mask-rounds first the model needs less" if chosen else
                          f" ({len(carrying)} rounds carry a user input, and take them whatever "
                          "--mask-rounds says)"))
    with _open_models_lock:
        open_now = list(_open_models)
    others = [m for m in open_now if m is not model and m.holds_session_on(context)]
    if others:
        one = len(others) == 1
        named = ", ".join(str(m.artifacts.directory) for m in others[:3]) \
            + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        reasons.append(f"{len(others)} other protected model{'' if one else 's'} open in this "
                       f"process hold{'s' if one else ''} secure memory on the same device "
                       f"({named}): closing {'it' if one else 'them'} frees it")
    return reasons


def warn_of_weak_checks(weak: WeakChecks, scheme: str, stacklevel: int) -> None:
    """The load's warnings of a verified model's weak checks (nothing when none), with advice for its
    ``scheme``; ``stacklevel`` as ``warnings.warn``'s, from this function."""
    if weak.capped:
        warnings.warn(f"verify: {weak.capped} of {weak.layers} checked layers would need more than 16 "
                      "projections for the 2^-20 bound and its margin on the calibration inputs, or are "
                      "layers whose results have too few directions for any number of projections and whose "
                      "weights are too large for the TEE to compute them, alone or beside the other layers "
                      "it computes (their results concentrate in few directions: SECURITY.md); their checks "
                      "may fall short of 2^-20 - stats()['verify']['worst_bound_log2'] is what they achieve",
                      stacklevel=stacklevel)
    if weak.masked:
        its = "its" if len(weak.masked) == 1 else "their"
        said = (f"verify: {unsplit_masked(weak.masked)}, so {its} checks tolerate the rounding of the "
                "masked input, larger than the input's")
        if scheme == "groupmix":
            said += (" (its one-time masks are ~10x the input): with them on every round, changes aimed "
                     "within it moved a MiniVGG's outputs by ~18% (SECURITY.md). Converted with --scheme "
                     "groupmix:exact_split=all, their conv layers and dense layers on the last axis (where "
                     "the split fits) are checked against their unmasked inputs")
        else:  # the exact split is groupmix's; the paper's scheme masks every round (its figures unmeasured)
            said += (": changes aimed within it pass (SECURITY.md, \"Changes within the rounding "
                     f"tolerance\"). Scheme {scheme} has no exact split; the default scheme (groupmix) "
                     "splits round 1's mask (10x its input), masks the rounds past those every policy "
                     "masks at 1x theirs, and its exact_split=all splits every masked round")
        warnings.warn(said, stacklevel=stacklevel)


def unsplit_masked(rounds: Sequence[int]) -> str:
    """``round 2 crosses`` / ``rounds 2, 3 cross`` ``masked without an exact split``: what the load warns of
    and the bench notes (``stats()['verify']['unsplit_masked_rounds']``)."""
    if len(rounds) == 1:
        return f"round {rounds[0]} crosses masked without an exact split"
    return f"rounds {', '.join(map(str, rounds))} cross masked without an exact split"
