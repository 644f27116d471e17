"""Protected inference in the normal world: ``load`` -> ``ProtectedModel``, which drives an accelerator
(``shadownet.accelerator``) and the TEE (its session opened in ``.ta_session``; its errors become
``shadownet.exceptions``: ``.tee_errors``).

One inference with R rounds (the layout is the manifest's, see ``shadownet.artifacts``)::

    inputs -> shm input/i -> TEE step 0 -> for r in 1..R: accelerator round r, TEE step r -> shm output/i

Every array the hot path touches is made once at load: zero-copy numpy views of the registered shared
memory and of LiteRT's input/output tensors of each round's signature, and the TEE parameter lists of
each step. A call then costs: one copy of each model input into shared memory, per round one copy of its
inputs into LiteRT and one of its outputs back, one TEE entry per step, and the copies it returns.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

import tee_sim
from shadownet import after_fork
from shadownet.accelerator import Accelerator, LiteRTAccelerator, wrapped
from shadownet.artifacts import Artifacts, TensorSpec, read_artifacts
from shadownet.delegates import load_delegates
from shadownet.exceptions import ClosedError, ShadowNetError
from shadownet.load_arguments import check_load_arguments, whole
from shadownet.model_io import check_input_values, check_inputs, check_run_into
from shadownet.refill import BackgroundRefill, pool_stats, refill_pool, secure_world_stats
from shadownet.round_threads import RoundThreadsTrial
from shadownet.secure_core import on_secure_core
from shadownet.shared_buffers import SharedBuffers, quietly
from shadownet.ta_session import (
    WeakChecks,
    add_open_model,
    load_options,
    open_session,
    shadownet_ta,
    warn_of_weak_checks,
)
from shadownet.tee_errors import LOST_SESSION, translate_tee_error
from tee_sim import TEEError
from tee_sim import ta_shadownet_commands as commands
from tee_sim.uninterrupted import uninterrupted


class _NotStarted(Exception):
    """An inference whose step 0 found the secure world gone: its session lost before the call (the client
    sends nothing then), or the world dead when it was sent. Step 0 writes nothing but round 1's inputs to
    shared memory, so the caller runs it again once, on a new session (``_infer``'s ``retry``)."""


class ProtectedModel:
    """A protected model loaded on this device: call it like a function.

    ``model(x)`` / ``model(x1, x2)`` / ``model({"name": x})`` / ``model.predict(...)`` returns the output
    array (a copy), or a dict keyed by output name when the model has several. Inputs must have exactly
    the original model's shapes and dtypes (``InputError`` otherwise), and floating-point inputs must be
    finite and at most 2**40 in magnitude (``shadownet.model_io.check_input_values``; SECURITY.md).
    ``stats()`` describes the last call. Calls are serialised by a per-model lock; several
    models may be open at once. ``close()`` (or leaving a ``with`` block) ends the TEE session; later calls
    raise ``ClosedError``.

    Per-inference material (``load``'s ``verify``, ``mask_pool``, ``on_exhausted``, ``background_refill``):
    when the model has one-time masks (``manifest.json``'s ``masks``) or is verified, each inference
    consumes one entry of a pool the TEE makes offline; a low-priority thread asks the TEE to refill it
    while the model is idle, a few milliseconds of work at a time (``refill_masks()`` does it at once).
    Verified, the rounds made only of layers the TEE computes itself rather than checks (depthwise, depth
    multiplier 1: ``tee_sim.per_inference``) are not run on the accelerator: ``skipped_rounds``.

    The default accelerator's choice of one thread for small rounds (made at load) is tried on the
    session's first inferences against all rounds on ``num_threads`` (``shadownet.round_threads``): ``tuning``
    until it is settled.
    """

    def __init__(self, artifacts: Artifacts, num_threads: int | None = None, delegate: Any = None,
                 accelerator: Callable[[Accelerator], Accelerator] | None = None, verify: bool = False,
                 mask_pool: int | None = None, on_exhausted: str = "refill",
                 background_refill: bool = True) -> None:
        if not isinstance(artifacts, Artifacts):
            raise TypeError(f"ProtectedModel takes read Artifacts (shadownet.load takes a directory), not "
                            f"{artifacts!r}")
        check_load_arguments(num_threads, verify, mask_pool, on_exhausted, background_refill)
        num_threads = None if num_threads is None else int(num_threads)  # numpy's too, as LiteRT takes them
        self.artifacts = artifacts
        self.verify = bool(verify)
        masks = artifacts.manifest.get("masks") or {}
        self.one_time_rounds: tuple[int, ...] = tuple(masks.get("one_time_rounds") or ())
        per_inference = self.verify or bool(self.one_time_rounds)
        self._load_options = load_options(self.verify, mask_pool, on_exhausted, per_inference)
        self._refiller: BackgroundRefill | None = None
        # The threads waiting for the lock, whom the background refill yields to: a set, as a thread's own
        # entry is added and discarded idempotently (a count that a Ctrl-C in the wait did not take back
        # stopped the refills for good: a helper's probe)
        self._waiting: set[int] = set()
        self.inputs: tuple[TensorSpec, ...] = artifacts.inputs
        self.outputs: tuple[TensorSpec, ...] = artifacts.outputs
        self.num_rounds = len(artifacts.rounds)
        self._lock = threading.Lock()
        self._holder = 0  # the thread that holds the lock (_locked, _not_reentered)
        self._closed = False
        self._forked_from = 0  # in a forked child: the parent's pid (shadownet.after_fork)
        self._session: Any = None
        self._context: Any = None  # the TEE context the session is on (_open)
        self._buffers = SharedBuffers(artifacts)
        self._uuid = shadownet_ta(artifacts)
        self._run_step = int(commands.Command.RUN_STEP)
        self._steps: list[Callable[..., None]] = []  # RUN_STEP 0..R, prepared once per session
        self._input_names = artifacts.input_positions()
        self._bytes_to_tee, self._bytes_from_tee = artifacts.crossing_bytes()
        self._accelerator_args = (num_threads, delegate, accelerator)
        self.accelerator: Accelerator | None = None
        self._last: dict[str, float] = {}
        self._session_before: dict[str, Any] = {}
        self._session_after: dict[str, Any] = {}
        self._secure_core: int | None = None
        self._trial: RoundThreadsTrial | None = None  # until the accelerator's thread choice is tried
        self._weak_checks = WeakChecks()  # verified: what its checks say less than they could
        try:
            self._open()
        except BaseException:
            if self.accelerator is not None:
                self.accelerator.close()
            self._buffers.release()
            raise
        after_fork.track(self)
        add_open_model(self)
        # Said once (a session opened again is the same), at the user's line: load()'s caller, or this one's.
        warn_of_weak_checks(self._weak_checks, self.artifacts.scheme,
                            4 if sys._getframe(1).f_code is load.__code__ else 3)
        if background_refill and (self.verify or self.one_time_rounds):
            self._refiller = BackgroundRefill(self)
            self._refiller.start()

    def _not_reentered(self) -> None:
        """``RuntimeError`` when this thread holds this model's lock already: an accelerator whose run_round
        called back into its own model, or a signal handler that closes it (SIGTERM's, for a clean exit)
        run while the thread was in one of its calls, waited for the lock for ever (helpers' probes)."""
        if self._holder == threading.get_ident():
            raise RuntimeError("a protected model was called from inside a call of its own (its "
                               "accelerator's run_round, or a signal handler?): it would wait for itself")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The model's lock, noting its holder (``_not_reentered``)."""
        self._not_reentered()
        with self._lock:
            try:
                self._holder = threading.get_ident()
                yield
            finally:
                self._holder = 0

    def holds_session_on(self, context: Any) -> bool:
        """Whether this model holds a session, and so secure memory, on the TEE of ``context``."""
        return not self._closed and self._session is not None and self._context is context

    def _make_accelerator(self) -> Accelerator:
        num_threads, delegate, wrap = self._accelerator_args
        base = LiteRTAccelerator(self.artifacts.untrusted, self.artifacts.rounds, num_threads,
                                 load_delegates(delegate))
        if base.tunable and 1 in base.round_threads:
            self._trial = RoundThreadsTrial(base)
        return base if wrap is None else wrapped(base, wrap)

    # --- session life cycle -------------------------------------------------------------------------------
    def _open(self) -> None:
        """Open a ShadowNet TA session, load the model, bind the shared memory (again after a crash):
        ``shadownet.ta_session``."""
        opened = open_session(self, self.artifacts, self._uuid, self._load_options, self._buffers,
                              self.accelerator, self._make_accelerator, self.verify, self.one_time_rounds)
        session, self._context, self.accelerator = opened.session, opened.context, opened.accelerator
        self.skipped_rounds, self._weak_checks = opened.skipped, opened.weak
        # Prepared once: an inference calls these and nothing is marshalled on its path. The client's own
        # time per TEE entry fell from 8.3-8.9 to 3.9-4.1 us (ResNet-404: 405 entries per inference).
        try:
            self._steps = [session.prepare_command(self._run_step, [tee_sim.Value(a=s)])
                           for s in range(self.num_rounds + 1)]
        except BaseException:  # a Ctrl-C here: the session is not this model's yet, so closed here
            quietly(session.close)
            raise
        self._session = session
        self._secure_core = None  # until this session's first inference (_infer_on_secure_core)

    def _try_threads(self) -> None:
        """After an inference: the next step of the trial of the accelerator's thread choice (class
        docstring), and the buffers placed again when the rounds moved. Lock held."""
        trial = self._trial
        assert trial is not None
        # Uninterrupted: a Ctrl-C between the rounds' move and the buffers' placement for it left the
        # accelerator's tensors and the shared memory at odds, every later inference wrong (a helper's probe)
        with uninterrupted():
            moved = trial.record(self._last.get("accelerator_s"))
            if trial.done:
                self._trial = None
            if moved:  # the buffers placed for the tensors of the rounds that moved, and bound
                try:
                    self._buffers.register(self._buffers.context, self.accelerator)
                    self._buffers.bind(self._session)
                except BaseException as exc:
                    # Until it is bound to buffers placed for them, the accelerator has no plan for the
                    # rounds that moved: released, the next call's session registers and binds them (kept,
                    # a secure world lost right here left every later call an IndexError: a probe).
                    self._buffers.release()
                    self._drop_session()
                    if not isinstance(exc, TEEError):
                        raise

    @property
    def tuning(self) -> bool:
        """True while the accelerator's choice of threads per round is being tried on this model's
        inferences (its first 20; class docstring): a benchmark's warm-up should outlast it."""
        return self._trial is not None

    def _drop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            quietly(session.close)

    def close(self) -> None:
        """End the TEE session, release the shared memory and the accelerator. Idempotent."""
        self._not_reentered()  # before the refills stop
        refiller, self._refiller = self._refiller, None
        try:
            if refiller is not None:
                refiller.stop()  # joins: a Ctrl-C there left the model open and never refilled (a review)
            with self._locked():
                if self._closed:
                    return
                self._closed = True
                # Each step whatever interrupts the one before (a Ctrl-C while a hung secure world is waited
                # for left the accelerator open and the memory registered, and a second close did nothing).
                try:
                    self._drop_session()
                finally:
                    try:
                        self._buffers.forget_views()
                        # The accelerator first: it holds views of the shared memory, which then unmaps at
                        # once (with views alive, the mapping and its descriptor stay until collected).
                        if self.accelerator is not None:
                            self.accelerator.close()
                    finally:
                        self._buffers.release()
        except BaseException:  # before it closed (a Ctrl-C in a wait): still open, and refilled as before
            if refiller is not None and not self._closed:
                self._refiller = BackgroundRefill(self)
                self._refiller.start()
            raise
        finally:
            # Closed (here or by another thread): a refill that a close cut by a Ctrl-C restarted meanwhile
            # is stopped too, not left waiting until the process exits (a review)
            if self._closed:
                late, self._refiller = self._refiller, None
                if late is not None:
                    late.stop()

    def _forget_after_fork(self, parent: int) -> None:
        """In a forked child (``shadownet.after_fork``): closed, without touching the parent's session,
        shared memory, accelerator threads or refill, nor the locks their threads may have held."""
        self._lock._at_fork_reinit()  # as the standard library's own locks are (threading, logging)
        self._holder = 0
        self._waiting, self._refiller = set(), None
        if not self._closed:
            self._closed, self._forked_from = True, parent
            accelerator = self.accelerator  # LiteRT's, perhaps under wrappers (AcceleratorWrapper.inner)
            while accelerator is not None and not hasattr(accelerator, "forget_after_fork"):
                accelerator = getattr(accelerator, "inner", None)
            if accelerator is not None:
                accelerator.forget_after_fork()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> ProtectedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        lock = getattr(getattr(getattr(self, "_buffers", None), "context", None), "_lock", None)
        if lock is not None and lock._is_owned():
            # Collected in the middle of a TEE call of this thread (the cyclic GC runs at any allocation,
            # the wait for an answer included): a close now would send its request on the channel that
            # call waits on, which then never saw its answer. Closed from another thread, after that call.
            threading.Thread(target=quietly, args=(self.close,), name="shadownet-close", daemon=True).start()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter exit modules may already be torn down
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.num_rounds} rounds"
        return f"ProtectedModel({str(self.artifacts.directory)!r}, scheme={self.artifacts.scheme!r}, {state})"

    # --- inference -----------------------------------------------------------------------------------------
    def __call__(self, *inputs: Any) -> np.ndarray | dict[str, np.ndarray]:
        """One inference: the output array, or a dict by output name when the model has several outputs
        (one entry per tensor: an output listed twice, or an input passed through, has one name)."""
        self.check_not_closed()  # a closed model says so before it judges the arguments
        arrays = self.check_inputs(inputs)
        outputs = [np.empty(t.shape, t.dtype) for t in self.outputs]
        self._infer_into(arrays, outputs)
        if len(outputs) == 1:
            return outputs[0]
        return {t.name: o for t, o in zip(self.outputs, outputs, strict=True)}

    predict = __call__

    def run_into(self, inputs: Sequence[Any] | Mapping[str, Any], outputs: Sequence[np.ndarray]) -> None:
        """One inference into preallocated ``outputs`` (model order, each a writable array of its output's
        exact shape and dtype); ``inputs`` as ``__call__`` takes them. Both are checked before the TEE is
        entered (``InputError``; ``ClosedError`` first on a closed model)."""
        self.check_not_closed()
        arrays = check_run_into(inputs, outputs, self.inputs, self._input_names, self.outputs)
        self._infer_into(arrays, outputs)

    def _infer_into(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """``run_into`` for arrays already checked: the allocation-free path under ``__call__`` and
        ``Interpreter``."""
        self._not_reentered()  # before it counts as waiting (the background refill yields to that)
        me = threading.get_ident()
        try:
            self._waiting.add(me)
            with self._locked():
                self._waiting.discard(me)
                self._ensure_open()
                for view, x in zip(self._buffers.input_views, inputs, strict=True):
                    np.copyto(view, x)
                self._check_finite()
                try:
                    self._infer_on_secure_core(retry=True)
                    started = True
                except _NotStarted:
                    started = False
                if not started:
                    # The secure world was found gone at step 0 (killed while the models sat idle: each
                    # open model's first call failed, all but one with "session lost ... open a new
                    # session", a probe): once more, on a session of its own - outside the handler, so
                    # that what it raises is not chained to the first attempt.
                    self._ensure_open()
                    self._infer_on_secure_core(retry=False)
                for out, view in zip(outputs, self._buffers.output_views, strict=True):
                    np.copyto(out, view, casting="unsafe")  # bool / 8- and 16-bit outputs sit as float32
                if self._trial is not None:
                    self._try_threads()
        finally:
            self._waiting.discard(me)
            if self._refiller is not None:
                self._refiller.wake()

    def refill_masks(self, entries: int | None = None) -> int:
        """Fill the pool of one-time masks (and, with ``verify``, of check projections) now: until it is
        full (``entries`` None or 0), or until ``entries`` more are ready. Returns the number of ready
        entries (0: no pool). ``TypeError`` for ``entries`` that is not an integer, ``ValueError`` for a
        negative one."""
        if entries is not None and (not whole(entries) or not 0 <= entries < 1 << 32):  # a TEE Value's
            raise (ValueError if whole(entries) else TypeError)(
                f"entries must be a non-negative integer (or None), not {entries!r}")
        with self._locked():
            self._ensure_open()
            return self._refill(0, entries or 0)[0]

    def _refill(self, budget_us: int, entries: int = 0) -> tuple[int, int]:
        """One REFILL_POOL call (lock held): (ready entries, capacity)."""
        with self._losing_session():
            return refill_pool(self._session, budget_us, entries)

    @contextlib.contextmanager
    def _losing_session(self) -> Iterator[None]:
        """A TEE call outside inference (lock held): if it finds the secure world lost (crashed, hung and
        stopped), the session goes, so that the next call opens a new one, as an inference does; else
        ``refill_masks()`` and ``stats()`` failed on the dead session for ever."""
        try:
            yield
        except ShadowNetError as exc:
            cause = exc.__cause__
            if isinstance(cause, TEEError) and cause.code in LOST_SESSION:
                self._drop_session()
            raise

    def check_inputs(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """The inputs as arrays in the model's order; InputError on a wrong count, name, shape or dtype."""
        return check_inputs(self.inputs, self._input_names, inputs)

    def _check_finite(self) -> None:
        """``check_input_values`` where the TEE reads the inputs (the shared memory): whatever path wrote
        them (``__call__``, ``Interpreter.set_tensor`` or its ``tensor()`` views)."""
        check_input_values(self.inputs, self._buffers.input_views)

    def _ensure_open(self) -> None:
        self.check_not_closed()
        if self._session is not None and self._session.lost:
            # Lost while this model was idle (found by another model's call): a session of its own before
            # its call fails for it (each open model's next call failed once, "open a new session").
            self._drop_session()
        if self._session is None:  # the secure world was lost during an earlier call: start again
            self._open()

    def check_not_closed(self) -> None:
        """ClosedError if the model was closed, or loaded by a process that forked this one."""
        if self._forked_from:
            raise ClosedError(f"this protected model was loaded by process {self._forked_from}, which forked "
                              "this one: its TEE session and accelerator stay there; load it again here")
        if self._closed:
            raise ClosedError("this protected model was closed")

    def _infer_on_secure_core(self, retry: bool = False) -> None:
        """``_infer``, with this thread on the secure world's core (``shadownet.secure_core``) from the
        session's second inference on: an accelerator that starts its threads on its first call must not
        start them pinned."""
        if self._secure_core is None:
            self._infer(retry)
            context = self._buffers.context
            self._secure_core = context.secure_core if context is not None else None
            return
        with on_secure_core(self._secure_core, self._buffers.context):
            self._infer(retry)

    def _infer(self, retry: bool = False) -> None:
        """Steps 0..R on the inputs already in shared memory; outputs end in the output views. Lock held.
        ``retry``: ``_NotStarted`` when step 0 finds the secure world gone and the caller may run it again
        (not when an empty pool must fail: a new session's pool is empty, and the crash would read as
        that)."""
        session = self._session
        steps = self._steps
        accelerator = self.accelerator
        skipped = self.skipped_rounds
        before = session.stats()
        clock = time.perf_counter
        accelerator_s = tee_s = 0.0
        start = t = clock()
        step = 0
        try:
            steps[0]()
            for r in range(1, self.num_rounds + 1):
                t1 = clock()
                tee_s += t1 - t
                if r not in skipped:
                    accelerator.run_round(r)
                t = clock()
                accelerator_s += t - t1
                step = r
                steps[r]()
        except TEEError as exc:
            if exc.code in LOST_SESSION:
                self._drop_session()
            # (No local names the error raised: a frame of its traceback would keep it, and with it this
            # frame's views of the shared memory, alive until a garbage collection: a memfd left open.)
            gone = exc.code == tee_sim.TEE_ERROR_TARGET_DEAD and exc.origin == tee_sim.TEEC_ORIGIN_COMMS
            if retry and step == 0 and gone and not self._load_options[0] & commands.LOAD_FAIL_WHEN_EMPTY:
                raise _NotStarted from None
            raise translate_tee_error(exc, f"inference step {step}", step=True) from exc
        end = clock()
        tee_s += end - t
        # stats() is of the last call that finished: a failed call's counts would pair its start with the
        # last finished call's end (negative world switches).
        self._session_before, self._session_after = before, session.stats()
        self._last = {"total_s": end - start, "accelerator_s": accelerator_s, "tee_s": tee_s}

    def stats(self) -> dict[str, Any]:
        """Costs of the last call that finished: ``world_switches`` (TEE entries), ``rounds``, ``scheme``,
        ``bytes_to_tee`` / ``bytes_from_tee`` (tensors that crossed the boundary through shared memory),
        ``total_s``, ``accelerator_s``, ``tee_s`` (wall time in TEE calls, crossing included), ``ta_s``
        (inside the trusted app) and ``transport_s`` (the rest of ``tee_s``); the secure world's memory in
        bytes: ``secure_memory_used`` / ``secure_memory_peak`` / ``secure_memory_cap`` for the whole device
        (the peak is the device's since its secure world started, other models' included) and
        ``model_secure_memory``, what the ShadowNet trusted app holds (this model's, and that of any other
        protected model open on the device; asked with one extra TEE entry, outside any inference).
        ``one_time_rounds`` and ``pool`` (one more TEE entry): ``capacity``
        / ``ready`` entries, ``entry_bytes`` and ``pool_bytes`` of secure memory, ``made`` entries in
        ``offline_s`` seconds (``offline_s_per_inference``), ``synchronous`` ones made on an inference's path,
        ``rescaled`` masks moved to another power of two on it and ``mask_exponents`` (round 1's masks follow
        the input's spread: the power of two of the last input's, per mask); ``verify``: ``enabled``,
        ``layers``, ``popped`` (split layers' second checks, in neither ``layers`` nor ``checked``),
        ``computed``, ``computed_rounds``, ``capped`` (checked layers whose bound cannot be counted on:
        SECURITY.md), ``projections`` (popped checks' too), ``checked``
        results, ``unsplit_masked_rounds``, ``worst_ratio`` (the largest rounding seen on passing results, as
        a fraction of the tolerance) and ``worst_bound_log2`` (the weakest detection bound achieved: log2 of
        the probability that a change of 1e-3 of a result's norm goes unnoticed);
        ``per_inference_secure_memory``: what both hold in the TEE. Without one-time masks nor ``verify``
        (``--scheme shadownet`` loaded without it) the same keys, nothing counted: capacity 0, ``enabled``
        False."""
        with self._locked():
            self.check_not_closed()
            before, after = self._session_before, self._session_after
            result: dict[str, Any] = {"rounds": self.num_rounds, "scheme": self.artifacts.scheme}
            if after:
                ta_s = after["ta_time_s"] - before["ta_time_s"]
                result.update(
                    world_switches=after["invocations"] - before["invocations"],
                    bytes_to_tee=self._bytes_to_tee, bytes_from_tee=self._bytes_from_tee,
                    **self._last, ta_s=ta_s, transport_s=self._last["tee_s"] - ta_s,
                )
            if self._session is not None:
                with self._losing_session():
                    result.update(secure_world_stats(self._session))
                    # (also without either: the same keys, nothing counted - stats()['verify'] was a
                    # KeyError under the paper's scheme, a probe)
                    result.update(one_time_rounds=list(self.one_time_rounds), **pool_stats(self._session))
            return result


def load(out_dir: Any, num_threads: int | None = None, delegate: Any = None,
         accelerator: Callable[[Accelerator], Accelerator] | None = None, verify: bool = False,
         mask_pool: int | None = None, on_exhausted: str = "refill",
         background_refill: bool = True) -> ProtectedModel:
    """Load a protected-artifact directory: check it, load its secrets into the TEE, its untrusted part
    on the accelerator (LiteRT; ``num_threads``; ``delegate``: a delegate library path or a LiteRT
    ``Delegate``), and return a ``ProtectedModel``. ``accelerator``: optional ``f(default) -> Accelerator``
    to wrap or replace the default (see ``shadownet.accelerator``: ``Accelerator``, ``AcceleratorWrapper``).

    ``verify``: the TEE checks every accelerator result before using it (Freivalds' check with secret
    projections drawn per inference, ``tee_sim.freivalds``); a result off by more than its float32
    tolerance raises ``IntegrityError`` (what passes below it: SECURITY.md).
    ``mask_pool``: entries of the pool of one-time masks / check projections, 1 to 64 (default: those that
    fit in 4 MiB of secure memory, 1 to 8). ``on_exhausted``: what an inference does when the pool is
    empty: ``"refill"`` (the TEE makes its masks then, on the inference's path) or ``"fail"``
    (``MaskPoolExhaustedError``; the pool starts empty, so without the background refill call
    ``refill_masks()`` first); a mask is never reused either way. ``background_refill``: refill the pool
    from a low-priority thread while the model is idle (else only ``refill_masks()`` and the policy do)."""
    check_load_arguments(num_threads, verify, mask_pool, on_exhausted, background_refill)  # before reading
    return ProtectedModel(read_artifacts(out_dir), num_threads=num_threads, delegate=delegate,
                          accelerator=accelerator, verify=verify, mask_pool=mask_pool,
                          on_exhausted=on_exhausted, background_refill=background_refill)
