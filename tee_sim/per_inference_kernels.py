"""The push and restore kernels of a model with per-inference material (``tee_sim.per_inference``).

Each push or restore the TA compiles (``tee_sim.ta_shadownet_compile``) is wrapped with what the pool slot
in use gives it: the check of the accelerator's result it reads, the one-time mask or offset it uses, the
secure copy of the round input it writes and the preparation of that input's checks. Between instructions
they share secure memory: a computed layer's result buffer, the staging of what a followed mask's push
sends, the user's input read once.
"""

from __future__ import annotations

import ctypes
import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from tee_sim.errors import TEE_ERROR_MAC_INVALID, TEEC_ORIGIN_TRUSTED_APP, TEEError
from tee_sim.freivalds import POPPED
from tee_sim.program import round_of
from tee_sim.ta_shadownet_restore_push import SN_RUN, SPREAD_OUTSIDE
from tee_sim.ta_shadownet_small_ops import compile_copy
from tee_sim.ta_shadownet_steps import kernel_calls

if TYPE_CHECKING:
    from tee_sim.per_inference import Entry, PerInference

# A restore's fused push moves its mask once for results of a new spread (read again, the same results stay in
# its band); a second move is allowed for a measure at a band's edge, a third means the results changed
# between the TEE's reads of the accelerator's buffer.
MAX_MASK_MOVES = 2


def integrity_error(message: str) -> TEEError:
    return TEEError(TEE_ERROR_MAC_INVALID, TEEC_ORIGIN_TRUSTED_APP, message)


def _place(calls: list[tuple[int, int]] | None, call: tuple[int, int]) -> int:
    """Where ``call`` is among ``calls`` (-1: not there, or no C calls)."""
    return calls.index(call) if calls is not None and call in calls else -1


class PerInferenceKernels:
    """The wrapped instructions of one loaded model (``online``) and the secure memory they share."""

    def __init__(self, online: PerInference, shm_shapes: dict[str, tuple[int, ...]],
                 masks: dict[str, dict[str, Any]]) -> None:
        # Weakly: the model's PerInference holds these kernels, and a cycle kept its secure-world state (the
        # pool's arrays, a view of the shared untrusted.tflite) after CLOSE_SESSION until the garbage
        # collector ran: 12 stale mappings of closed sessions, the secure world's memory 170-420 MB for a
        # verified MiniVGG loaded and closed in a loop (a helper's probe). What ``wrap`` compiles holds it.
        self._online = weakref.ref(online)
        # The verified model's secure copy of a round's input (what the push sends, checked against).
        self._x = (online.account(max(math.prod(shm_shapes[i]) for i in online.by_input), np.float32)
                   if online.by_input else None)
        # A computed layer's result, from the push that computes it to the restore that reads it: buffers
        # handed out in program order and taken back at the restore (wrap), so a layer whose restore comes
        # before the next computed layer's push shares its buffer (MobileNet's 13 share one).
        self._results: dict[str, np.ndarray] = {}
        self._spare: list[np.ndarray] = []
        # What a restore makes for a followed mask's push, kept in secure memory until its spread is known
        # to fit the mask (wrap), where the mask's own buffer cannot hold it (an exact split's, which sends
        # twice the channels): one buffer for them all, made when first needed.
        self._staging: np.ndarray | None = None
        # Secure memory for what a followed mask's push sends, made there first (a restore's result), and
        # for a user's input, read there once (``wrap``); one instruction's at a time, each made when needed.
        self._staging_size = max((math.prod(shm_shapes[s["buffer"]]) for s in masks.values()
                                  if s.get("spread") and s.get("split")), default=0)  # the others: in place
        self._input_size = max((math.prod(shape) for name, shape in shm_shapes.items()
                                if name.startswith("input/")), default=0)
        # An exact split push's input itself, for its popped checks' prepares, which read it right after the
        # push (wrap): a padded one's in a buffer of its own, zero on the border the push never writes; the
        # others' in one shared buffer, which each writes whole (MobileNet split everywhere: 8.3 -> 2.2 MB).
        self._plain: dict[str, np.ndarray] = {}
        self._plain_size = max((math.prod(shm_shapes[s["buffer"]]) // 2 for s in masks.values()
                                if s.get("split")), default=0)
        # A modular mask's wraps (tee_sim.modular_masks): the periods its push takes off each element, which
        # the unwraps read in the same call. They share one buffer with the user's input read once (a push of
        # a user input has no modular mask), and it is shared with the other sessions: yolov4-tiny's 1.4 MB in
        # each pool entry, then a buffer of its own, put its two frames in flight past the 64 MiB cap.
        self._wraps_size = max((online.streams[name].size for name in masks if online.streams[name].modular),
                               default=0)
        self._transient: np.ndarray | None = None

    @property
    def online(self) -> PerInference:
        online = self._online()
        if online is None:
            raise RuntimeError("the per-inference kernels outlived their model's material")
        return online

    def wrap(self, instr: dict[str, Any], src: np.ndarray, dst: np.ndarray,
             compile_: Callable[..., Callable[[], Any]]) -> Callable[[], Any]:
        """A push or restore (or both fused) with what this model adds to it: the check of the
        accelerator's result it reads, the fresh mask / offset it uses, the secure copy of the round input
        it writes and the preparation of that input's checks. ``compile_(src, dst, **verified)`` compiles
        the instruction itself (``tee_sim.ta_shadownet_restore_push``: the kernel makes the check and the
        secure copy in its own pass); one variant per pool slot where it uses the slot's material."""
        online = self.online
        prepares: list[list[Any]] = []  # per pool slot: the checks prepared from what it sends
        verified: dict[str, Any] = {}
        secure_x = None
        source, target = instr.get("src", ""), instr.get("dst", "")
        result = source.removeprefix("shm:") if instr["op"] == "restore" and source.startswith("shm:") else ""
        checked, popped = result in online.checks, result + POPPED in online.checks
        if online.by_input and target.startswith("shm:") and target[4:] in online.by_input:
            secure_x = self._x[:dst.size].reshape(dst.shape)
            if round_of(target[4:], "in") in online.computed_rounds:
                dst = secure_x  # a round the accelerator does not run: what it would be sent stays here
            else:
                verified["secure_dst"] = secure_x
            outs = online.by_input[target[4:]]
            computing = [self._computing(out, secure_x) for out in outs if out in online.computed]
            checks = [out for out in outs if out in online.checks]
            stream = online.streams.get(instr.get("mask") or "")
            masked = instr.get("mask") and (stream is None or not stream.noiseless)  # (mask_scale=0: a probe)
            # Checked against the mask's rounding: weak where the mask is many times its input (round 1's,
            # 10x); a deeper round's of ~1x (groupmix's deep_mask_scale) widens the tolerance 1.4-4x only.
            if checks and masked and not instr.get("split") and not (stream and stream.small):
                online.unsplit_masked.add(round_of(target[4:], "in"))
            # An exact split's popped check is prepared from the input itself, which the push copies here.
            plain = None
            if any(online.checks[out].popped for out in checks):
                plain = self._plain_for(target, (*dst.shape[:-1], dst.shape[-1] // 2), instr.get("pad"))
                verified["plain"] = plain
            prepares = [[*computing, *(self._prepared(entry, out, secure_x, plain) for out in checks)]
                        for entry in online.entries]
        if result in online.computed:  # restored from the TEE's own result: the accelerator's is not read
            if result not in self._results:
                raise ValueError(f"restore of {result} before the push that computes it")
            buffer = self._results.pop(result)
            src = buffer[:src.size].reshape(src.shape)
            self._spare.append(buffer)
        mask = instr.get("mask")
        offset = instr.get("pop") or instr.get("offset")  # a split restore's pop mask, else its offset
        followed = online.spread.follows(instr)
        # A followed plain push checks its input's spread first; a restore's fused push has its kernel
        # measure what it restores, and says when the mask must move (``tee_sim.mask_spread``).
        measured = followed is not None and instr["op"] == "restore"
        # The measure comes after the pass: what the restore makes is staged in secure memory (the verified
        # model's secure copy, else the mask's own buffer or a staging buffer) and sent once it fits the
        # mask. Written straight to shared memory, an input too large for its mask was sent under it, and
        # then again under the same mask scaled: two writes that give the input back exactly (a review).
        # Made in the mask's own buffer (``in_place``: a one-time mask shaped as what is sent, not split), the
        # pass consumes the mask, which the inference needs no more once it is sent; a mask that must move
        # is drawn anew, from a fresh key, with its pop masks (``PerInference.redraw``): yolov4-tiny's
        # 5.3 MiB staging buffer saved.
        sent, in_place = None, False
        sends: list[tuple[Any, np.ndarray]] = []  # per pool slot: the copy that sends what it made, and where
        if measured and dst is not secure_x:
            sent, dst = dst, verified.pop("secure_dst", None)
            stream = online.streams.get(mask or "")
            in_place = (dst is None and stream is not None and not stream.split and not instr.get("split")
                        and tuple(stream.shape) == tuple(sent.shape))
            if dst is None and not in_place:
                dst = self._staged(sent)
        # A followed plain push of shared memory (the user's input) reads it once, into secure memory, and
        # measures and pushes that copy. Measured there and pushed from there again, a normal world that
        # showed the measure zeros and the push its input had it sent under the smallest mask: a mixed
        # input's secret mixing came back exact from one inference (a review).
        fetched, fetch = None, None
        user_input = source.startswith("shm:input/") and src.dtype == np.float32
        if followed is not None and not measured and user_input:
            fetched, src = src, self._read_once(src)
            fetch = compile_copy(fetched, src)  # None: numpy copies it
        spreads: list[Any] = []  # per slot, a plain push's spread check (None: numpy's, in follow)
        reports: list[Callable[[], TEEError]] = []  # per slot, a checked restore's failed check's error
        # A modular mask's push (tee_sim.modular_masks) keeps the periods it takes off, and its readers'
        # offsets are unwrapped once it is sent: per slot, those C calls.
        modular = mask in online.streams and online.streams[mask].modular
        unwraps: list[list[Any]] = [[] for _ in online.entries]
        if mask in online.streams or offset in online.pops or checked:
            variants = []
            for entry in online.entries:
                wrapped_mod = {}
                if modular:
                    stream = online.streams[mask]
                    wraps = self._transient_buffer()[:stream.size].view(np.int8).reshape(stream.shape)
                    wrapped_mod = {"wraps": wraps, "period": entry.periods[mask]}
                    unwraps[entry.slot] = [
                        u.compile(wraps, entry.periods[mask], entry.offsets[o], instr.get("pad"))
                        for o, u in online.unwraps.get(mask, {}).items()]
                if mask in online.streams:
                    online.arrays[mask] = entry.masks[mask]
                if offset in online.pops:
                    online.arrays[offset] = entry.offsets[offset]
                if checked:
                    made = [(out, online.checks[out].fused(entry.projections[out][0]))
                            for out in (result, result + POPPED) if out in online.checks]
                    online.fused[entry.slot].update(made)
                    verified.update(check=made[0][1], on_fail=lambda made=made: self._failed(made))
                    if popped:
                        verified["popped"] = made[1][1]
                    reports.append(lambda made=made: self._failure(made))
                measure = online.spread.measure(online.account, followed) if measured else None
                made_in = entry.masks[mask] if in_place else dst
                spread = {"spread": measure} if measured else {}
                variants.append(compile_(src, made_in, **verified, **spread, **wrapped_mod))
                if sent is not None:
                    sends.append((compile_copy(made_in, sent), made_in))  # None: numpy copies it
                if followed:
                    spreads.append(online.spread.bind(entry, followed, variants[-1], src, measure))

            def run() -> None:
                if fetched is not None:
                    fetch() if fetch is not None else np.copyto(src, fetched)
                if followed and not measured:
                    online.spread.follow(online.current, followed, src, online.remake)
                # A pass the fast path ran (stopped before its send) is kept where the mask need not move; a
                # modular mask's wraps, in memory the sessions share, may be another's by now (``stale``).
                stale = False
                if in_place and online.stopped_with == SPREAD_OUTSIDE:
                    # The fast path ran this pass, which consumed the mask and measured: not again on it
                    answer, stale = SPREAD_OUTSIDE, modular
                else:
                    answer = variants[online.current.slot]()
                for moves in range(MAX_MASK_MOVES + 1):
                    if answer != SPREAD_OUTSIDE or not measured:
                        break
                    # Again, with the mask where it now belongs. The pass reads the accelerator's results
                    # afresh, so what it makes is measured again: sent only once it fits its mask, or the
                    # mask is at the end of its range. Results that keep moving the mask changed between
                    # the reads (one move is what the same results take).
                    before = online.current.exponents.get(followed, 0)
                    online.spread.follow_measured(online.current, followed, online.remake,
                                                  online.redraw if in_place else None)
                    if online.current.exponents.get(followed, 0) == before:
                        if stale:  # drawn anew where it is, and the pass run again on it, once
                            online.redraw(online.current, followed)
                            variants[online.current.slot]()
                        break
                    if moves == MAX_MASK_MOVES:
                        raise integrity_error(f"the accelerator's results {result or source!r} changed while "
                                              "the TEE read them")
                    answer = variants[online.current.slot]()
                if sent is not None:
                    send, made = sends[online.current.slot]
                    send() if send is not None else np.copyto(sent, made)
                for unwrap in unwraps[online.current.slot]:
                    unwrap()
        else:
            run = compile_(src, dst, **verified)
            if not prepares:
                return run  # nothing per slot: the kernel itself (with its c_call, if it is one)
            variants = [run] * len(online.entries)
        prepares = prepares or [[] for _ in online.entries]

        def wrapped() -> None:
            run()
            for prepare in prepares[online.current.slot]:
                prepare()
        # Per pool slot, the C calls the secure world's fast path may make instead (ShadowNetTA.step_program):
        # the slot's kernels, then its prepares; None where the kernel needs Python (an exact split's border).
        # A followed plain push's spread check comes first: outside its slot's band it sends the step to
        # Python, where ``follow`` moves the mask; a restore's fused push's kernel answers SPREAD_OUTSIDE
        # after its pass, which sends the step to Python too.
        first = [[] if not followed or measured else None if spreads[slot] is None else [spreads[slot].c_call]
                 for slot in range(len(variants))]
        sending = [[] if sent is None else None if sends[slot][0] is None else [sends[slot][0].c_call]
                   for slot in range(len(variants))]
        fetching = [] if fetched is None else None if fetch is None else [fetch.c_call]
        prepare_calls = [[getattr(p, "c_call", None) for p in slot] for slot in prepares]  # None: numpy's
        wrapped.slot_calls = [  # type: ignore[attr-defined]
            None if kernel_calls(v) is None or first[slot] is None or sending[slot] is None
            or fetching is None or None in prepare_calls[slot]
            else [*fetching, *first[slot], *kernel_calls(v), *sending[slot],
                  *(u.c_call for u in unwraps[slot]), *prepare_calls[slot]]
            for slot, v in enumerate(variants)]
        if reports:
            # Per slot, where among those calls the checked kernel is, and its report: a check that failed
            # on the fast path is reported from that run (``ta_shadownet_steps.settle``), not run again.
            wrapped.check_failed = [  # type: ignore[attr-defined]
                (_place(calls, (SN_RUN, ctypes.addressof(v.step))), report)
                for calls, v, report in zip(wrapped.slot_calls, variants, reports, strict=True)]
        return wrapped

    def _plain_for(self, target: str, shape: tuple[int, ...], pad: Any) -> np.ndarray:
        """Secure memory of ``shape`` for a split push's input itself (``__init__``), made once per buffer:
        a session may bind its shared memory again."""
        key = target if pad is not None and any(any(p) for p in pad) else ""
        if key not in self._plain:
            size = math.prod(shape) if key else self._plain_size
            self._plain[key] = self.online.account((size,), np.float32)
        if math.prod(shape) > self._plain[key].size:
            raise ValueError(f"a split push of {shape} into a buffer its mask does not name")
        return self._plain[key][:math.prod(shape)].reshape(shape)

    def _read_once(self, given: np.ndarray) -> np.ndarray:
        """Secure memory shaped as ``given``, a user's input in shared memory, for a push to read it into once
        (the default policy's only staging: MobileNet 0.6 MiB, where a restore's would take 1.2)."""
        if given.size > self._input_size:
            raise ValueError(f"a push of {given.shape} from an input its program does not name")
        return self._transient_buffer()[:4 * given.size].view(np.float32).reshape(given.shape)

    def _transient_buffer(self) -> np.ndarray:
        """The secure bytes a push uses within its call for the user's input read once (``_read_once``) or
        for a modular mask's wraps (``__init__``): made when first needed, as large as either wants."""
        if self._transient is None:
            self._transient = self.online.scratch("a user input's secure copy, or a modular mask's wraps",
                                                  (max(4 * self._input_size, self._wraps_size),), np.uint8)
        return self._transient

    def _staged(self, sent: np.ndarray) -> np.ndarray:
        """Secure memory shaped as ``sent``, a followed mask's push buffer, for a restore to make it in."""
        if self._staging is None:
            self._staging = self.online.scratch("a fused push's staging", (self._staging_size,), np.float32)
        if sent.size > self._staging.size:
            raise ValueError(f"a push of {sent.shape} into a buffer its mask does not name")
        return self._staging[:sent.size].reshape(sent.shape)

    def _computing(self, out: str, x: np.ndarray) -> Callable[[], None]:
        """Layer ``out`` computed from ``x`` into a result buffer, a spare one when one is large enough."""
        check = self.online.computed[out]
        size = check.rows_out * check.m_out
        fits = [i for i, b in enumerate(self._spare) if b.size >= size]
        if fits:
            buffer = self._spare.pop(min(fits, key=lambda i: self._spare[i].size))
        else:
            buffer = self.online.account((size,), np.float32)
        self._results[out] = buffer
        return check.computing(x, buffer[:size])

    def _prepared(self, entry: Entry, out: str, x: np.ndarray,
                  plain: np.ndarray | None) -> Callable[[], None]:
        """Layer ``out``'s prepare from ``x`` (a popped check's: from ``plain``, the input itself, and
        ``x``) with ``entry``'s projections (its C struct kept for tally)."""
        check = self.online.checks[out]
        call = check.prepared(plain, *entry.projections[out], sent=x) if check.popped else \
            check.prepared(x, *entry.projections[out])
        self.online.prepared_structs[entry.slot][out] = call.made
        return call

    def _failure(self, made: list[tuple[str, Any]]) -> TEEError:
        """The error of a restore's check that failed, from the figures (``made``: ``(out, fused)`` of its
        checks, the result's and, for an exact split, its popped one)."""
        worst, out = max((self.online.checks[out].outcome(fused)[0], out) for out, fused in made)
        what = f"{out.removesuffix(POPPED)} once its mask was popped" if out.endswith(POPPED) else out
        return integrity_error(f"the accelerator's result {what} failed verification (off by {worst:.3g} "
                               "times the float32 tolerance)")

    def _failed(self, made: list[tuple[str, Any]]) -> None:
        raise self._failure(made)
