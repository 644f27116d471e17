"""The untrusted accelerator: the ``Accelerator`` interface ``ProtectedModel`` drives, its default
``LiteRTAccelerator`` (LiteRT on ``untrusted.tflite``, one signature runner per round) and
``AcceleratorWrapper``, the base for wrapping it (``shadownet.load(OUT, accelerator=...)``).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

import tee_sim
from shadownet.artifacts import RoundSpec
from shadownet.exceptions import ArtifactError, DelegateError
from tee_sim.shared_pages import MIN_SHARED_BYTES, PAGE, SharedPages, page_span
from tee_sim.uninterrupted import uninterrupted


class Accelerator(Protocol):
    """The untrusted accelerator, as ``ProtectedModel`` drives it: a public, pluggable interface.

    ``shadownet.load(OUT, accelerator=f)`` calls ``f(default)`` once with the default accelerator (a
    ``LiteRTAccelerator`` on ``OUT/untrusted.tflite``) and uses what it returns: a wrapper that observes or
    changes the default's work (subclass ``AcceleratorWrapper``), or a replacement that runs the rounds
    elsewhere (another runtime, a remote device, an NPU SDK). Three methods:

    - ``bind(buffers)``: the zero-copy float32 views of every shared-memory buffer of the manifest, by name
      (``input/i``, ``output/i``, ``round_r/in/<name>``, ``round_r/out/<name>``; shapes as in
      ``manifest.json``). Called once at load, and again whenever the memory is registered anew (the secure
      world restarted; with ``num_threads`` > 1, the thread trial of the first 20 inferences moving rounds
      between thread counts); later calls use the new views. Rounds reuse the memory, so a round's buffers
      hold its values only while it runs (copy what you keep): in the manifest's layout a round's inputs and
      outputs share memory too (two banks, by round parity), so read a round's inputs before writing its
      outputs. An accelerator may also offer ``page_offsets()`` (see ``LiteRTAccelerator``): the runtime then
      places the buffers where their pages can be the accelerator's own tensors, every round's inputs in one
      region and its outputs in another (``shadownet.artifacts.place_buffers``).
    - ``run_round(r)`` (1 <= r <= R, in order, once per inference; on a verified model not for the
      rounds in ``ProtectedModel.skipped_rounds``, whose results the TEE computes itself): run signature
      ``round_r`` of ``untrusted.tflite`` - the obfuscated linear ops, no bias, no activation - on the buffers
      ``round_r/in/*`` and write its results into ``round_r/out/*``. Exceptions propagate to the caller
      of the inference, which the TEE then abandons (the next call starts afresh).
    - ``close()``: free what it holds; called once, when the model closes.

    The accelerator sees only masked inputs and obfuscated weights, and is not trusted with the results:
    with ``verify=True`` the TEE checks every result it returns (``tee_sim.freivalds``: a wrong one raises
    ``IntegrityError``), so results must be float32-exact up to rounding (a float16 GPU path is not).
    """

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None: ...

    def run_round(self, r: int) -> None: ...

    def close(self) -> None: ...


_Copy = tuple[np.ndarray, np.ndarray]  # (destination, source)

# LiteRT interpreters whose tensors' pages could not be given back to private memory (a failed unmapping):
# kept for the process's lifetime. Freed, their arenas would hand pages of the shared memory to malloc,
# which takes memory the kernel gives back (madvise) as zeroed - a shared page keeps its contents - and
# whatever it allocates there next is corrupt (an abort in LiteRT's next model, seen in the tests).
_KEPT: list[Any] = []


def _keep_forever(entry: Any, _kept: list[Any] = _KEPT, _incref: Any = ctypes.pythonapi.Py_IncRef,
                  _object: Any = ctypes.py_object) -> None:
    """Keep ``entry`` (LiteRT's interpreters and their tensors) for the process's lifetime, interpreter exit
    included: listed in ``_KEPT`` and given a reference nobody drops. The module's teardown at exit empties
    ``_KEPT``, and the interpreters it held were freed then, their arenas still on pages of the shared
    memory (several rounds' tensors map the same pages, so those arenas overlap one another), and malloc's
    work later in the exit aborted the process ("corrupted double-linked list" after a passing test suite,
    ~1 in 10-20 runs; a helper's probe: every run, with allocations made late in the exit). Everything it
    uses is bound here, at import: it also runs while modules are torn down."""
    _kept.append(entry)
    _incref(_object(entry))


class LiteRTAccelerator:
    """The default accelerator: LiteRT on ``untrusted.tflite``, one signature runner per round.

    XNNPACK is LiteRT's default CPU path; ``delegates`` are ``load_delegate`` objects (e.g. a GPU or NPU
    delegate). Per round it invokes that round's subgraph on LiteRT's own tensors, which are the shared
    buffers: ``bind`` shares each round tensor's whole pages with the shared memory
    (``tee_sim.shared_pages``; the TA reads and writes them in place, as OP-TEE does with an accelerator
    driver's buffers on a device) and ``run_round`` copies only the bytes around them, and whole tensors
    under ``MIN_SHARED_BYTES`` or that cannot be shared. Against copying every tensor in and out
    (interleaved, same conversion, 60 inferences each): MobileNet 35.0 -> 34.4 ms, ResNet-44 7.2 -> 5.7 ms,
    yolov4-tiny 96 -> 86 ms; the accelerator's time falls by 2-10 ms, and MobileNet's TEE takes back 2.7 ms
    of it, its pushes now writing into memory last touched an inference ago instead of a bank reused a
    round ago. (Copying beat ``SignatureRunner.__call__``, which re-allocates and returns fresh arrays
    every call, and ``SetTensor``/``GetTensor``.)

    Threads per round: with ``num_threads`` > 1 on the CPU (no delegate), a round whose time is small can
    run on a second interpreter with one thread (``tune_threads``; ``round_threads`` says which). LiteRT's
    XNNPACK delegate makes every runtime with ``XNN_FLAG_YIELD_WORKERS``: after each invoke its thread
    pool's workers go to sleep, and a round that starts after a TEE step pays for waking them, more than a
    small round gains from them. ResNet-44's 44 rounds on 2 threads: 1.55 ms back to back, 2.30 ms after
    5 us pauses, 3.3 ms after 40 us; on one thread 2.8 and 3.2 ms (protected, alternated: 5.8 -> 5.1 ms;
    ResNet-404 55 -> 47 ms). At load the rounds are timed on ``num_threads`` threads, each call after
    a ``TUNE_PAUSE_S`` busy pause as the caller's while the TEE works; when the rounds under
    ``SMALL_ROUND_S`` take ``SMALL_SHARE`` of the total or more, those are timed on one thread too,
    ``TUNE_REPEATS`` times each, alternated, and run where their median was smaller (one thread on a tie).
    A verified model's small rounds ran on one thread untimed until the secure world got a core of its own
    (``shadownet.secure_core``): its TEE steps also check each result and prepare the next check, and
    with the caller, the secure world and the pool's second thread on two cores at random, waking the
    pool cost more than a small round gained. Since, timed like the others (alternated, medians of 25-40
    calls): ResNet-404 52.2 / 52.2 -> 45.9 / 45.7 ms, ResNet-44 5.7 / 5.8 -> 5.2 / 5.2 ms, MiniVGG 2.1 /
    1.8 -> 1.8 / 1.8 ms. (With the secure world on its core the timing puts 0-3 of ResNet's rounds on one
    thread, where all on two measured the same.) MobileNet's and yolov4-tiny's small rounds are under
    ``SMALL_SHARE``: not timed.
    Rounds of the same shapes are timed through a few of them and choose together: ResNet-404's load and
    first inference take 2.1 s (1.9 s untimed; 3.7 s when each of its 404 rounds was timed).
    MobileNet (its small rounds ~10% of its time; 8 of its 28 rounds on one thread gave 20.0 against
    19.9 ms) and yolov4-tiny keep one interpreter. With both, the weights are packed twice in normal-world
    memory. When the rounds are timed, one that LiteRT cannot run fails here, at load, as an
    ``ArtifactError``.
    """

    TUNE_PAUSE_S = 50e-6
    TUNE_REPEATS = 5
    TUNE_SAMPLES = 3
    SMALL_ROUND_S = 200e-6
    SMALL_SHARE = 0.25

    def __init__(self, model: bytes, rounds: Sequence[RoundSpec], num_threads: int | None = None,
                 delegates: Sequence[Any] = (), tune_threads: bool = True) -> None:
        self.rounds = tuple(rounds)
        self._model, self.num_threads = model, num_threads
        self._main = self._load(model, num_threads, delegates)
        self._single: tuple[Any, ...] | None = None  # the one-thread interpreter, once a timing needs it
        self._plan: list[tuple[Any, int, list[_Copy], list[_Copy]]] = []
        self._shared: list[SharedPages] = []
        self.tunable = bool(tune_threads and not delegates and num_threads is not None and num_threads > 1
                            and self.rounds)
        if self.tunable:
            self._fill_inputs(self._main)
            self._apply(self._tuned_choice())
            self.release_unused()  # timed, and no round faster there
        else:
            self._apply([num_threads] * len(self.rounds))

    def use(self, choice: Sequence[int | None]) -> None:
        """Run round ``r + 1`` on ``choice[r]`` threads (1 or ``num_threads``; ``shadownet.round_threads``).
        Unbound until the next ``bind``; the tensors of a round that moved are another interpreter's, whose
        pages the buffers' placement may not match (copied then, until the buffers are placed again). The
        one-thread interpreter stays loaded, for rounds that may move back to it, until ``release_unused``
        (a reload cost ResNet-404 42-71 ms)."""
        if not self.tunable or len(choice) != len(self.rounds) or not set(choice) <= {1, self.num_threads}:
            raise ValueError(f"threads per round {tuple(choice)}: 1 or {self.num_threads} for each of "
                             f"{len(self.rounds)} rounds")
        if 1 in choice and self._single is None:
            self._single = self._load(self._model, 1, ())
        self._apply(choice)

    def _apply(self, choice: Sequence[int | None]) -> None:
        """Run round ``r`` on the interpreter with ``choice[r]`` threads (unbound until ``bind``)."""
        with uninterrupted():  # as bind (below)
            self._plan = []
            self._unshare()  # the pages of the tensors the rounds ran on so far: they may move
            self.round_threads: tuple[int | None, ...] = tuple(choice)
            kept = {self.num_threads: self._main}
            if 1 in choice and self.num_threads != 1:
                assert self._single is not None
                kept[1] = self._single
            self.interpreter = self._main[0]  # the one with the most threads
            self._interpreters = [entry[0] for entry in kept.values()]
            self._rounds_run: list[tuple[Any, int]] = []  # per round: (wrapper, subgraph)
            self._tensors: list[tuple[list[tuple[str, np.ndarray]], list[tuple[str, np.ndarray]]]] = []
            for r, n in enumerate(choice):
                _, wrapper, subgraphs, tensors = kept[n]
                self._rounds_run.append((wrapper, subgraphs[r]))
                self._tensors.append(tensors[r])

    def rounds_on_one_thread(self) -> Callable[[], None]:
        """A call that runs every round once, one after the other, on a one-thread interpreter of its own
        (XNNPACK, no delegate) on defined inputs: the accelerator's work on one core, which ``shadownet
        bench`` times as the break-even k's unit (one TEE core's). XNNPACK's set-up is done here, untimed."""
        _, wrapper, subgraphs, _ = loaded = self._load(self._model, 1, ())
        self._fill_inputs(loaded)

        def run(keep: tuple[Any, ...] = loaded) -> None:
            for subgraph in subgraphs:
                wrapper.Invoke(subgraph)

        run()
        return run

    def release_unused(self) -> None:
        """Let go of the one-thread interpreter (and its thread pool's memory) when no round runs on it."""
        if 1 not in self.round_threads and self.num_threads != 1:
            self._single = None

    def _tuned_choice(self) -> list[int | None]:
        """Each round's threads: one for the small rounds timed faster there, ``num_threads`` for the others
        (class docstring). Rounds of the same computation (the same tensor shapes: ResNet-404's 404 rounds
        are a handful of kinds) are timed through up to ``TUNE_SAMPLES`` of them and choose together, as
        most of those (one thread on a tie)."""
        main = self._main
        choice: list[int | None] = [self.num_threads] * len(self.rounds)
        subgraphs = main[2]
        kinds: dict[tuple, list[int]] = {}
        for r, subgraph in enumerate(subgraphs):
            details = main[0].get_tensor_details(subgraph_index=subgraph)
            kinds.setdefault(tuple(sorted(tuple(d["shape"]) for d in details)), []).append(r)
        groups = list(kinds.values())
        timed = [r for group in groups for r in group[:self.TUNE_SAMPLES]]
        (times,) = self._time_rounds([main], timed, 3)
        at = dict(zip(timed, times, strict=True))
        alone = np.empty(len(subgraphs))
        for group in groups:
            alone[group] = np.median([at[r] for r in group[:self.TUNE_SAMPLES]])
        small = [group for group in groups if alone[group[0]] < self.SMALL_ROUND_S]
        if sum(alone[group].sum() for group in small) < self.SMALL_SHARE * alone.sum():
            return choice
        self._single = self._load(self._model, 1, ())
        self._fill_inputs(self._single)
        timed = [r for group in small for r in group[:self.TUNE_SAMPLES]]
        one, many = self._time_rounds([self._single, main], timed, self.TUNE_REPEATS)
        faster = dict(zip(timed, one <= many, strict=True))
        for group in small:
            if np.count_nonzero([faster[r] for r in group[:self.TUNE_SAMPLES]]) * 2 >= min(
                    len(group), self.TUNE_SAMPLES):
                for r in group:
                    choice[r] = 1
        return choice

    def _load(self, model: bytes, num_threads: int | None, delegates: Sequence[Any]) -> tuple[Any, ...]:
        """An interpreter with every round's subgraph allocated: (interpreter, its wrapper, the subgraph
        index per round, per round the (buffer name, tensor) inputs and outputs)."""
        try:
            interpreter = LiteRTInterpreter(model_content=model, num_threads=num_threads,
                                            experimental_delegates=list(delegates) or None)
        except RuntimeError as exc:
            if delegates:  # the file passed its hash check and loads without them: the delegate failed
                raise DelegateError(f"the accelerator delegate could not be applied to untrusted.tflite: "
                                    f"{exc}") from None
            raise ArtifactError(f"LiteRT cannot load untrusted.tflite: {exc}") from None
        except ValueError as exc:
            raise ArtifactError(f"LiteRT cannot load untrusted.tflite: {exc}") from None
        # The wrapper gives subgraph-indexed tensor views (the public tensor() only reaches subgraph 0);
        # they stay valid because nothing is ever resized after the one allocation below.
        wrapper = interpreter._interpreter
        signatures = interpreter._get_full_signature_list()
        subgraphs, tensors = [], []
        for r in self.rounds:
            sig = signatures.get(r.signature)
            if sig is None or {n for n, _ in r.inputs} != set(sig["inputs"]) \
                    or {n for n, _ in r.outputs} != set(sig["outputs"]):
                raise ArtifactError(f"untrusted.tflite has no signature {r.signature!r} with the manifest's "
                                    "inputs and outputs")
            subgraph = wrapper.GetSubgraphIndexFromSignature(r.signature)
            wrapper.AllocateTensors(subgraph)
            subgraphs.append(subgraph)
            view = wrapper.tensor
            tensors.append((
                [(buf, view(wrapper, sig["inputs"][n], subgraph)) for n, buf in r.inputs],
                [(buf, view(wrapper, sig["outputs"][n], subgraph)) for n, buf in r.outputs],
            ))
        return interpreter, wrapper, subgraphs, tensors

    @staticmethod
    def _fill_inputs(loaded: tuple[Any, ...]) -> None:
        """Defined inputs for the timing: no NaN or denormal slow paths."""
        rng = np.random.default_rng(0)
        for ins, _ in loaded[3]:
            for _, t in ins:
                t[...] = rng.standard_normal(t.shape).astype(t.dtype)

    def _time_rounds(self, loaded: Sequence[tuple[Any, ...]], rounds: Sequence[int], repeats: int
                     ) -> np.ndarray:
        """Median seconds of each of ``rounds`` on each interpreter ``[len(loaded), len(rounds)]``, each
        call after a busy pause (class docstring), the interpreters' order alternating; one untimed call
        of each first (XNNPACK sets a subgraph up on its first call)."""
        clock = time.perf_counter
        for _, wrapper, subgraphs, _ in loaded:
            for r in rounds:
                try:
                    wrapper.Invoke(subgraphs[r])
                except RuntimeError as exc:
                    raise ArtifactError(f"LiteRT cannot run round {r + 1} of untrusted.tflite: "
                                        f"{exc}") from None
        times = np.empty((len(loaded), repeats, len(rounds)))
        for rep in range(repeats):
            for i, r in enumerate(rounds):
                order = range(len(loaded)) if (rep + i) % 2 == 0 else reversed(range(len(loaded)))
                for c in order:
                    _, wrapper, subgraphs, _ = loaded[c]
                    end = clock() + self.TUNE_PAUSE_S
                    while clock() < end:
                        pass
                    start = clock()
                    wrapper.Invoke(subgraphs[r])
                    times[c, rep, i] = clock() - start
        return np.median(times, axis=1)

    def page_offsets(self) -> dict[str, int]:
        """Where in a page each round tensor big enough to share starts (its address modulo the page
        size), by buffer name: the runtime places those buffers at the same offsets in the shared memory,
        so that ``bind`` can share their pages instead of copying them."""
        return {name: tensor.ctypes.data % PAGE for ins, outs in self._tensors for name, tensor in ins + outs
                if tensor.nbytes >= MIN_SHARED_BYTES}

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None:
        # Uninterrupted, and unbound first: a Ctrl-C between the pages' release and the new plan left the
        # old one, which copies only around pages it takes for shared - every later inference wrong, no
        # error (a helper's probe) - or pages shared that no plan noted, for ever (tee_sim.uninterrupted).
        with uninterrupted():
            self._plan = []
            self._unshare()
            for ins, outs in self._tensors:
                for name, tensor in ins + outs:
                    buf = buffers[name]
                    if buf.shape != tensor.shape or buf.dtype != tensor.dtype:
                        raise ArtifactError(f"buffer {name!r} is {buf.shape} {buf.dtype} but "
                                            f"untrusted.tflite's tensor is {tensor.shape} {tensor.dtype}")
            where = {name: tee_sim.shared_memory_of(view) for name, view in buffers.items()}
            crowded = _crowded(where, buffers,
                               [[n for n, _ in ins + outs] for ins, outs in self._tensors])
            aliased = _aliased([t for ins, outs in self._tensors for _, t in ins + outs])

            def copies(pairs: list[tuple[str, np.ndarray]], to_tensor: bool) -> list[_Copy]:
                return [c for n, t in pairs
                        for c in self._copies(t, buffers[n], None if n in crowded else where[n], aliased,
                                              to_tensor)]

            self._plan = [(wrapper, subgraph, copies(ins, True), copies(outs, False))
                          for (wrapper, subgraph), (ins, outs)
                          in zip(self._rounds_run, self._tensors, strict=True)]

    def _copies(self, tensor: np.ndarray, buf: np.ndarray, found: tuple[Any, int] | None,
                aliased: set[int], to_tensor: bool) -> list[_Copy]:
        """What ``run_round`` copies between ``tensor`` and its buffer (``found``: its shared memory and
        offset there, None where it may not be shared): nothing but the few bytes around its whole pages
        when those are shared with the buffer (``tee_sim.shared_pages``), else all of it. Pages are shared
        only where the buffer overlaps no other buffer of its round (in the manifest's layout a round's
        inputs and outputs overlap: the runtime once copied the inputs in first) and the tensor is alone
        in LiteRT's memory. Buffers of different rounds may overlap (the runtime's placement reuses
        memory round after round): the same pages are then mapped under several rounds' tensors, which
        are never live at once."""
        pages = None
        start = tensor.ctypes.data
        if found is not None and tensor.nbytes >= MIN_SHARED_BYTES and id(tensor) not in aliased \
                and (found[1] - start) % PAGE == 0:
            shm, offset = found
            if page_span(start, tensor.nbytes)[1]:
                try:
                    pages = shm.share_pages(offset, tensor)
                except tee_sim.TEEError:
                    pages = None  # e.g. shared memory with no file behind it: copy
        if pages is None:
            return [(tensor, buf) if to_tensor else (buf, tensor)]
        self._shared.append(pages)
        flat_tensor, flat_buf = tensor.reshape(-1), buf.reshape(-1)
        edges = [slice(0, pages.head), slice(pages.stop, tensor.size)]
        return [(flat_tensor[e], flat_buf[e]) if to_tensor else (flat_buf[e], flat_tensor[e])
                for e in edges if e.stop > e.start]

    def run_round(self, r: int) -> None:
        wrapper, subgraph, copy_in, copy_out = self._plan[r - 1]
        for dst, src in copy_in:
            np.copyto(dst, src)
        wrapper.Invoke(subgraph)
        for dst, src in copy_out:
            np.copyto(dst, src)

    def _unshare(self, _keep: Callable[[Any], None] = _keep_forever) -> None:
        """The tensors' pages private memory again, before LiteRT may free them. Where one may stay the
        shared memory's - a failed unmapping, an interrupt, or at interpreter exit a module torn down
        under ``SharedPages.release`` - the interpreters are never freed (``_keep_forever``)."""
        shared, self._shared = self._shared, []
        failed = False
        try:
            for pages in shared:
                try:
                    pages.release()
                except OSError:  # the pages stay the shared memory's: still memory, and closing goes on
                    failed = True
        except BaseException:
            failed = True
            raise
        finally:
            if failed:  # never freed: their arenas hold pages of the shared memory (_KEPT)
                _keep((list(self._interpreters), self.interpreter, self._main, self._single))

    def forget_after_fork(self) -> None:
        """In a forked child: the tensors' pages made the child's own (private, with their contents), so that
        nothing the child frees or allocates lands in the parent's shared memory, and LiteRT's interpreters
        kept, never freed (their thread pools' threads are the parent's). A child that let go of the model
        freed the arenas into its malloc while their pages were still the parent's live tensors: heap
        corruption in the child, wrong results in the parent (a helper's probe)."""
        self._plan = []
        self._unshare()  # this process's mappings only: the parent's stay as they are
        _keep_forever((list(self._interpreters), self.interpreter, self._main, self._single))
        self._tensors, self._rounds_run, self._interpreters = [], [], []
        self.interpreter = self._main = self._single = None

    def __del__(self) -> None:
        # Collected unclosed (a close interrupted half-way): the pages made private before LiteRT frees
        # the tensors on them, which would otherwise hand the shared memory to malloc (_KEPT; where that
        # fails, at interpreter exit too, _unshare keeps the interpreters for ever).
        try:
            self._unshare()
        except Exception:  # noqa: BLE001 - at interpreter exit modules may already be torn down
            pass

    def close(self) -> None:
        self._plan = []
        self._unshare()  # before LiteRT frees the tensors: their pages become private memory again
        self._tensors = []
        self._rounds_run = []
        self._interpreters = []
        self.interpreter = self._main = self._single = None  # LiteRT's interpreters, and their threads, go


def wrapped(base: Accelerator, wrap: Callable[[Accelerator], Any]) -> Accelerator:
    """``wrap(base)`` (``shadownet.load``'s ``accelerator=``), checked to be an accelerator: ``TypeError``
    when it has no ``bind``, ``run_round`` or ``close`` (not an ``AttributeError`` at the first call: a
    helper's probe); ``base`` is closed when it fails."""
    try:
        made = wrap(base)
        missing = [m for m in ("bind", "run_round", "close") if not callable(getattr(made, m, None))]
        if missing:
            raise TypeError(f"accelerator= returned {made!r}, which has no {', '.join(missing)}: an "
                            "accelerator has bind(buffers), run_round(r) and close()")
        return made
    except BaseException:
        base.close()
        raise


def _crowded(where: Mapping[str, tuple[Any, int] | None], buffers: Mapping[str, np.ndarray],
             rounds: Sequence[Sequence[str]]) -> set[str]:
    """The buffers (by name) that overlap another buffer of the same round in the shared memory."""
    out: set[str] = set()
    for names in rounds:
        located = [(n, id(where[n][0]), where[n][1]) for n in names if where[n] is not None]
        out |= _overlapping(((shm, at), (shm, at + buffers[n].nbytes), n) for n, shm, at in located)
    return out


def _aliased(tensors: Sequence[np.ndarray]) -> set[int]:
    """The tensors (by id) whose memory LiteRT gave to another round tensor too: pages have one owner,
    so those are copied."""
    return _overlapping((t.ctypes.data, t.ctypes.data + t.nbytes, id(t)) for t in tensors)


def _overlapping(spans: Iterable[tuple[Any, Any, Any]]) -> set[Any]:
    """The keys of the spans ``(start, end, key)`` that overlap another (bounds of any ordered type)."""
    ordered = sorted(s for s in spans if s[0] < s[1])
    out: set[Any] = set()
    for i, (_, end, a) in enumerate(ordered):
        for start, _, b in ordered[i + 1:]:
            if start >= end:
                break
            out.update((a, b))
    return out


class AcceleratorWrapper:
    """Base for an accelerator that wraps another (to observe, tamper with or check its results).

    Subclass and override ``run_round``; ``self.inner`` is the wrapped accelerator and ``self.buffers``
    the shared-memory views by name. Pass ``accelerator=MyWrapper`` to ``shadownet.load``. For example,
    a driver that records what the accelerator is given::

        class Recorder(AcceleratorWrapper):
            def run_round(self, r):
                self.seen = {n: v.copy() for n, v in self.buffers.items() if n.startswith(f"round_{r}/in/")}
                self.inner.run_round(r)
    """

    def __init__(self, inner: Accelerator) -> None:
        self.inner = inner
        self.buffers: Mapping[str, np.ndarray] = {}

    def page_offsets(self) -> dict[str, int]:
        """The wrapped accelerator's (``LiteRTAccelerator.page_offsets``), if it has them."""
        offsets = getattr(self.inner, "page_offsets", None)
        return offsets() if offsets is not None else {}

    def bind(self, buffers: Mapping[str, np.ndarray]) -> None:
        self.buffers = buffers
        self.inner.bind(buffers)

    def run_round(self, r: int) -> None:
        self.inner.run_round(r)

    def close(self) -> None:
        self.buffers = {}  # views of the shared memory: the mapping goes when the last one does
        self.inner.close()
