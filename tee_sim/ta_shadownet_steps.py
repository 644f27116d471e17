"""How the ShadowNet trusted app runs a loaded program: one RUN_STEP at a time, in order; the step program
the secure world's C fast path answers instead (the steps that are kernel calls only); the next
inference's pool entry taken ahead, between inferences, so that its step 0 can run there too; and the
settling of an inference whose last step the fast path ran.

``model`` is the TA's loaded model (``tee_sim.ta_shadownet._Model``): its compiled ``steps``, the shared
``cursor`` (the step expected next), its per-inference material ``online`` and ``fast``, the step programs
made so far, by pool slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tee_sim.errors import TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TRUSTED_APP, TEEError
from tee_sim.secure_world_fast import AHEAD, FINISHED, STOPPED, StepProgram
from tee_sim.ta_shadownet_restore_push import CHECK_FAILED


def run_step(model: Any, step: int) -> None:
    """Step ``step`` of the inference under way (0 starts one: its pool slot, one-time masks and
    projections, unless ``take_ahead`` took them); a failed step ends the inference; the last one tallies
    its checks and spends its entry."""
    if model is None or model.steps is None:
        raise TEEError(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TRUSTED_APP,
                       "no model loaded and bound to shared memory")
    expected = int(model.cursor[0])
    online = model.online
    runs = model.steps[step] if 0 <= step < len(model.steps) else []
    stopped_with = None  # what the call the fast path stopped at answered, when Python runs on from it
    if expected == STOPPED:  # the fast path stopped step cursor[1] at call cursor[2] (not a failed check:
        # settle reported that, whatever the request)
        stopped, place = int(model.cursor[1]), int(model.cursor[2])
        found = resumed_at(runs, online, place) if step == stopped else None
        at = None if found is None else found[0]
        if at is not None:  # run on from that call's instruction: the ones before it ran there
            runs = runs[at:]
            stopped_with = int(model.cursor[3])
            expected = AHEAD if step == 0 else step  # (a step 0 there had its inference's entry taken)
        elif step == 0:
            expected = 0  # a new inference: the stopped one is abandoned, its entry spent
        else:  # the request Python reads is not the one the fast path ran (rewritten in between)
            model.cursor[0] = 0
            if online is not None:
                online.end()
            raise TEEError(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TRUSTED_APP,
                           f"step {step} while step {stopped} was stopped part-way: the inference is ended")
    if step >= len(model.steps) or (step != 0 and step != expected):
        raise TEEError(TEE_ERROR_BAD_STATE, TEEC_ORIGIN_TRUSTED_APP,
                       f"step {step} out of order (expected 0 or {max(expected, 0)})")
    last = step + 1 == len(model.steps)
    try:
        if step == 0 and online is not None and expected != AHEAD:
            online.begin()  # this inference's one-time masks and projections (the last one's are spent)
        for k, run in enumerate(runs):
            if online is not None:  # the instruction the fast path stopped reads it (per_inference_kernels)
                online.stopped_with = stopped_with if k == 0 else None
            run()
    except BaseException:
        model.cursor[0] = 0  # a failed step (e.g. a result that failed verification) ends the inference
        if online is not None:
            online.end()
        raise
    finally:
        if online is not None:
            online.stopped_with = None
    model.cursor[0] = (0 if _settles(model) else AHEAD) if last else step + 1
    if last and online is not None:
        online.tally()
        online.end()


def resumed_at(runs: list[Callable[[], Any]], online: Any, place: int) -> tuple[int, int] | None:
    """The instruction of a step (``runs``) whose C calls, in the current pool slot, include the one at
    ``place`` (counted from the step's first), where the fast path stopped it, and that call's place among
    the instruction's own: the instructions before it ran there, and running them again is not safe (a slot
    one of them read may hold a later one's result now, or a tensor would go out again under the same
    one-time mask); None when ``place`` is not among the step's calls (the inference is then ended)."""
    slot = current_slot(online)
    at = 0
    for i, run in enumerate(runs):
        calls = step_calls([run], slot)
        if calls is None:
            return None
        if 0 <= place - at < len(calls):
            return i, place - at
        at += len(calls)
    return None


def current_slot(online: Any) -> int:
    """The pool slot of the inference under way (-1: none, or no pool)."""
    return online.current.slot if online is not None and online.current is not None else -1


def step_program(model: Any, command: int) -> StepProgram | None:
    """RUN_STEP (``command``) for the secure world's fast path (``tee_sim.secure_world_fast``): the steps
    whose instructions are all kernel calls (``c_call`` / ``c_calls``; or, where they differ per pool slot -
    one-time masks, checks - the current slot's ``slot_calls``; not an exact split's border nor LiteRT ops),
    which it then runs without the app's Python, advancing ``cursor`` as ``run_step`` does (after the last
    step to ``FINISHED``, ``settle``'s, or for a model with no pool straight to ``AHEAD``). Step 0 only from
    ``AHEAD`` (``take_ahead``). One program per slot: the secure world takes it anew after every request
    the app's Python answers, and the slot changes only there (``take_ahead``, or a step 0 run in
    Python)."""
    if model is None or model.steps is None:
        return None
    online = model.online
    slot = current_slot(online)
    programs = model.fast
    if programs is None or any(p.keep is not model.steps for p in programs.values()):
        programs = model.fast = {}
    if slot not in programs:
        calls = [step_calls(step, slot) for step in model.steps]
        programs[slot] = StepProgram(command, model.cursor, calls, keep=model.steps,
                                     finish=FINISHED if _settles(model) else AHEAD)
    return programs[slot]


def take_ahead(model: Any) -> None:
    """Between inferences (after a request that is not a step: a refill, a report, a load or a bind): the
    next inference's pool entry taken now, off its path, so that its step 0 - kernel calls like the others
    - can run on the fast path: cursor ``AHEAD``. Nothing when an inference is under way or unsettled, or
    the pool has no ready entry (step 0 then takes one, in Python, as it did). A step 0 that finds no
    ``AHEAD`` begins anew: an entry an abandoned inference used is spent, never taken again."""
    if model is None or model.steps is None or model.cursor[0] != 0:
        return
    online = model.online
    if _settles(model):
        if online.current is not None or not online.ready:
            return
        online.begin()
    model.cursor[0] = AHEAD


def ahead(model: Any) -> int:
    """1 if the next inference's pool entry is taken (``take_ahead``), else 0: a ready entry all the same."""
    return int(model is not None and model.cursor[0] == AHEAD and model.online is not None
               and model.online.current is not None)


def _settles(model: Any) -> bool:
    """Whether inferences of ``model`` take pool entries (one-time masks, checks) that a finished one's
    settling spends and the next one's step 0 takes."""
    return model.online is not None and model.online.enabled


def settle(model: Any) -> None:
    """What the secure world's fast path left the app, at its next entry, before anything else of the
    session (a refill, the next inference's step 0, a report) runs. An inference whose last step it ran
    (cursor ``FINISHED``): its checks' statistics and its spent pool entry, off that inference's path. A
    step it stopped on a failed check (``STOPPED``, the checked kernel's call answering ``CHECK_FAILED``):
    an ``IntegrityError`` from the figures of the run that failed, whatever the request (a new inference's
    step 0, a bind: the normal world may rewrite the request the fast path stopped), and the inference is
    ended. (Python ran the restore again, reading the results anew: a normal world that put the honest
    ones back in between had its tampering go unreported; a helper's probe.)"""
    if model is None:
        return
    if model.cursor[0] == FINISHED:
        model.cursor[0] = 0
        if model.online is not None:
            model.online.tally()
            model.online.end()
    elif model.cursor[0] == STOPPED:
        report = _failed_check(model)
        if report is not None:
            model.cursor[0] = 0
            model.online.end()
            raise report()


def _failed_check(model: Any) -> Callable[[], TEEError] | None:
    """The report of the check that failed where the fast path stopped (``cursor``: the step, its call, what
    the call answered), when that call is an instruction's checked kernel answering ``CHECK_FAILED``
    (``check_failed``: per pool slot, that call's place among the instruction's and its report); else
    None."""
    online = model.online
    stopped, place, status = int(model.cursor[1]), int(model.cursor[2]), int(model.cursor[3])
    if status != CHECK_FAILED or online is None or online.current is None or model.steps is None \
            or not 0 <= stopped < len(model.steps):
        return None
    halted = model.steps[stopped]
    found = resumed_at(halted, online, place)
    failures = getattr(halted[found[0]], "check_failed", None) if found is not None else None
    if failures is None:
        return None
    kernel, report = failures[online.current.slot]
    return report if found[1] == kernel else None


def step_calls(step: list[Callable[[], Any]], slot: int) -> list[tuple[int, int]] | None:
    """A step's C calls in pool slot ``slot`` (-1: no inference under way), or None if it needs Python."""
    calls: list[tuple[int, int]] = []
    for run in step:
        by_slot = getattr(run, "slot_calls", None)
        if by_slot is not None:
            got = by_slot[slot] if 0 <= slot < len(by_slot) else None
        else:
            got = kernel_calls(run)
        if got is None:
            return None
        calls += got
    return calls


def kernel_calls(run: Callable[[], Any]) -> list[tuple[int, int]] | None:
    """The C calls a compiled instruction is made of (``c_calls``, or its one ``c_call``), or None."""
    calls = getattr(run, "c_calls", None)
    if calls is not None:
        return list(calls)
    c_call = getattr(run, "c_call", None)
    return None if c_call is None else [c_call]
