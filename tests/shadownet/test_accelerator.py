"""The default accelerator (``shadownet.accelerator``) under a protected model: LiteRT on
``untrusted.tflite``, wrappable, its round tensors the shared buffers themselves, each small round on the
number of threads timed faster for it (``shadownet.round_threads``)."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shadownet
from converters.fidelity import relative_error
from shadownet.accelerator import AcceleratorWrapper
from shadownet.exceptions import ClosedError

TOLERANCE = 1e-4  # the default scheme's fidelity target (the test models are converted with it)
# Two inferences on the same input: one-time masks round each one differently, a few float32 ulps.
SAME = 1e-5


class CountingAccelerator(AcceleratorWrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.rounds: list[int] = []

    def run_round(self, r: int) -> None:
        self.rounds.append(r)
        super().run_round(r)


def test_accelerator_can_be_wrapped(small_cnn):
    (x,) = small_cnn.random_inputs()
    wrappers: list[CountingAccelerator] = []

    def wrap(inner):
        wrappers.append(CountingAccelerator(inner))
        return wrappers[-1]

    with shadownet.load(small_cnn.out, accelerator=wrap) as model:
        got = model(x)
        (counting,) = wrappers
        assert counting.rounds == list(range(1, model.num_rounds + 1))
        assert {"input/0", "output/0"} <= set(counting.buffers)
    assert relative_error(got, small_cnn.reference(x)[0]) <= TOLERANCE


def test_the_rounds_on_one_thread_run_beside_the_model_untouched(small_cnn):
    """``LiteRTAccelerator.rounds_on_one_thread`` (the bench's one-core unit) runs every round on an
    interpreter of its own: the model's buffers and results are as before, however often it runs."""
    x = small_cnn.random_inputs(0)[0]
    want = small_cnn.reference(x)[0]
    with shadownet.load(small_cnn.out, num_threads=2) as model:
        before = relative_error(model(x), want)
        run = model.accelerator.rounds_on_one_thread()
        for _ in range(3):
            run()
        assert before <= 1e-4 and relative_error(model(x), want) <= 1e-4
        assert model.accelerator.num_threads == 2


class NoSharing(AcceleratorWrapper):
    """The default accelerator without its page offsets: the manifest's layout, every tensor copied."""

    def page_offsets(self):
        return {}


def test_accelerator_tensors_are_the_shared_buffers(tmp_path):
    """LiteRT's round tensors are the shared buffers themselves: the accelerator copies only the bytes
    around their whole pages, the results are those of the copying path, and close() gives the pages back."""
    import warnings

    from tee_sim.shared_pages import MIN_SHARED_BYTES, PAGE
    from tests.shadownet.small_models import reference, small_cnn

    original = small_cnn(side=48)  # round tensors of 36-72 KiB, all worth sharing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), seed=3)
    x = np.random.default_rng(0).uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
    want = reference(original, x)
    with shadownet.load(tmp_path / "out", accelerator=NoSharing) as copying:
        copied = copying(x)
    with shadownet.load(tmp_path / "out") as model:
        got = model(x)
        accelerator = model.accelerator
        shared = list(accelerator._shared)
        tensors = [t for ins, outs in accelerator._tensors for _, t in ins + outs]
        big = [t for t in tensors if t.nbytes >= MIN_SHARED_BYTES]  # all but the dense layer's
        assert len(shared) == len(big) == len(tensors) - 2
        # Copied per inference: a partial page at each end of the shared ones, the small ones whole.
        moved = sum(dst.nbytes for _, _, ins, outs in accelerator._plan for dst, _ in ins + outs)
        assert moved < 2 * PAGE * len(big) + sum(t.nbytes for t in tensors if t.nbytes < MIN_SHARED_BYTES)
        assert model(x) is not got
    assert all(pages.released for pages in shared)
    assert relative_error(got, want) <= TOLERANCE
    assert relative_error(got, copied) <= SAME


def _tuned(monkeypatch, alone, one, many):
    """``LiteRTAccelerator``'s timings replaced by given ones: ``alone`` (every round on num_threads), then
    ``one`` / ``many`` (the small rounds on one thread / num_threads); returns the thread counts loaded."""
    from shadownet.accelerator import LiteRTAccelerator

    calls = iter([np.array([alone]), np.array([one, many])])
    monkeypatch.setattr(LiteRTAccelerator, "_time_rounds", lambda self, loaded, rounds, repeats: next(calls))
    loaded = []
    load = LiteRTAccelerator._load

    def counting(self, model, num_threads, delegates):
        loaded.append(num_threads)
        return load(self, model, num_threads, delegates)

    monkeypatch.setattr(LiteRTAccelerator, "_load", counting)
    return loaded


def test_small_rounds_run_where_they_were_timed_faster(tmp_path, monkeypatch):
    """With num_threads > 1 each small round runs on the interpreter (one thread or num_threads) whose
    timing at load was smaller (here given, then measured); the results are one thread's."""
    import warnings

    from tests.shadownet.small_models import reference, small_cnn

    original = small_cnn(side=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), seed=6)
    x = np.random.default_rng(0).uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
    with shadownet.load(tmp_path / "out", num_threads=1) as plain:  # one thread: nothing to tune
        rounds = plain.num_rounds
        assert rounds >= 3 and plain.accelerator.round_threads == (1,) * rounds
        assert not plain.tuning  # nothing to try
        want = plain(x)
    with shadownet.load(tmp_path / "out", num_threads=2) as measured:  # the real timing: either per round
        assert set(measured.accelerator.round_threads) <= {1, 2}
        assert relative_error(measured(x), want) <= SAME
    # Every round small; round 1 faster on one thread, round 2 on two, the others tied (one thread).
    rest = [8e-5] * (rounds - 2)
    loaded = _tuned(monkeypatch, [1e-4] * rounds, [5e-5, 5e-5, *rest], [8e-5, 3e-5, *rest])
    with shadownet.load(tmp_path / "out", num_threads=2) as model:
        threads = model.accelerator.round_threads
        assert loaded == [2, 1] and threads == (1, 2, *[1] * (rounds - 2))
        runs = model.accelerator._rounds_run
        assert runs[0][0] is not runs[1][0] and len(model.accelerator._interpreters) == 2
        got = model(x)
    assert relative_error(got, reference(original, x)) <= TOLERANCE
    assert relative_error(got, want) <= SAME
    # Small rounds under a quarter of the time: no second interpreter is even made.
    loaded = _tuned(monkeypatch, [1e-4, *[1e-3] * (rounds - 1)], [], [])
    with shadownet.load(tmp_path / "out", num_threads=2) as model:
        assert loaded == [2] and model.accelerator.round_threads == (2,) * rounds
        assert not model.tuning  # no round on one thread: no trial


@pytest.mark.parametrize("tried_faster", [True, False])
def test_the_one_thread_choice_is_tried_on_real_inferences(tmp_path, monkeypatch, tried_faster):
    """Rounds put on one thread at load run on num_threads for a few inferences after a few as chosen,
    twice over (RoundThreadsTrial); the faster stays, placed again with its pages shared when the rounds
    moved. Every inference on the way gives the original's results; the TA holds no more secure memory."""
    import warnings

    from shadownet.round_threads import RoundThreadsTrial
    from tee_sim.shared_pages import MIN_SHARED_BYTES
    from tests.shadownet.small_models import reference, small_cnn

    original = small_cnn(side=48)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(original, str(tmp_path / "out"), seed=6)
    rng = np.random.default_rng(1)
    record, seen = RoundThreadsTrial.record, []

    def timed(self, accelerator_s):  # given times: all rounds on two threads faster, or not
        seen.append(self.accelerator.round_threads)
        tried = self.calls // (1 + self.RUNS) % 2
        return record(self, (0.5 if tried_faster else 2.0) if tried else 1.0)

    monkeypatch.setattr(RoundThreadsTrial, "record", timed)
    rounds = len(shadownet.artifacts.read_artifacts(tmp_path / "out").rounds)
    _tuned(monkeypatch, [1e-4] * rounds, [5e-5] * rounds, [8e-5] * rounds)  # all on one thread at load
    with shadownet.load(tmp_path / "out", num_threads=2, background_refill=False) as model:
        accelerator = model.accelerator
        assert accelerator.round_threads == (1,) * rounds
        memory = model.stats()["model_secure_memory"]
        phase = 1 + RoundThreadsTrial.RUNS
        for _ in range(RoundThreadsTrial.PHASES * phase + 2):
            assert model.tuning == (len(seen) < RoundThreadsTrial.PHASES * phase)
            x = rng.uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
            assert relative_error(model(x), reference(original, x)) <= TOLERANCE
        assert seen == ([(1,) * rounds] * phase + [(2,) * rounds] * phase) * 2  # then no trial any more
        assert accelerator.round_threads == ((2,) if tried_faster else (1,)) * rounds
        assert (accelerator._single is None) == tried_faster
        tensors = [t for ins, outs in accelerator._tensors for _, t in ins + outs]
        assert len(accelerator._shared) == sum(t.nbytes >= MIN_SHARED_BYTES for t in tensors)
        assert model.stats()["model_secure_memory"] == memory


def test_rounds_of_the_same_shapes_are_timed_through_a_few_and_choose_together(tmp_path, monkeypatch):
    """Six identical 1x1 convolutions: the accelerator times at most TUNE_SAMPLES of them, and all six run
    where most of those ran faster."""
    import warnings

    from converters.graph import Graph, write_model
    from shadownet.accelerator import LiteRTAccelerator
    from tests.shadownet.small_models import reference, relu_conv_chain

    rng = np.random.default_rng(0)
    g = Graph()
    x = g.add_tensor("x", (1, 16, 16, 16), np.float32)
    g.inputs, g.outputs = [0], relu_conv_chain(g, x, 6, (1, 16, 16, 16), 1, 0.25, rng)[-1:]
    original = write_model(g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        # Round 1 split: its input a shape of its own (auto would not split a layer of a sixth of the work).
        # (mask_floor=input: round 2, one layer from the input, masked and split, would not be like the rest)
        shadownet.convert(original, str(tmp_path / "out"), seed=9,
                          scheme="groupmix:exact_split=first,mask_floor=input", mask_rounds="first")
    timed = []

    def timing(self, loaded, rounds, repeats):
        timed.append(list(rounds))
        if len(loaded) == 1:
            return np.full((1, len(rounds)), 1e-4)  # all small
        return np.array([[5e-5] * len(rounds), [8e-5] * len(rounds)])  # one thread faster

    monkeypatch.setattr(LiteRTAccelerator, "_time_rounds", timing)
    with shadownet.load(tmp_path / "out", num_threads=2) as model:
        assert model.num_rounds == 6 and model.accelerator.round_threads == (1,) * 6
        kinds = [r for r in timed[0] if r > 0]  # round 1 takes the raw input: a kind of its own
        assert len(kinds) == LiteRTAccelerator.TUNE_SAMPLES and timed[1] == timed[0]
        z = rng.uniform(0, 1, (1, 16, 16, 16)).astype(np.float32)
        assert relative_error(model(z), reference(original, z)) <= TOLERANCE


def test_close_unmaps_the_models_shared_memory_in_the_secure_world(small_cnn):
    """What a model registers - its buffers, its weights for the pool's refills - is unmapped in the secure
    world when it closes: nothing the TA keeps (its steps, the fast path's step program) holds a view."""
    import tee_sim

    context = tee_sim.default_context()
    if context.transport_name != "process":
        pytest.skip("the secure world's own mappings: process transport only")

    def mapped() -> int:
        with open(f"/proc/{context._transport.proc.pid}/maps") as f:
            return sum("memfd:tee_sim-shm" in line for line in f)

    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:  # once first: the process's reusable bounce buffer stays
        model(x)
    before = mapped()
    with shadownet.load(small_cnn.out, num_threads=2) as model:
        for _ in range(3):
            model(x)
        assert mapped() >= before + 2
    assert mapped() == before


def test_close_completes_when_giving_the_pages_back_fails(tmp_path, monkeypatch):
    """A failed unmapping leaves a tensor's pages shared (still memory); the model still closes, and the
    process goes on converting and running models."""
    import warnings

    from tee_sim.shared_pages import SharedPages
    from tests.shadownet.small_models import reference, small_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(small_cnn(side=48), str(tmp_path / "out"), seed=4)
    model = shadownet.load(tmp_path / "out")
    model(np.zeros((1, 48, 48, 3), np.float32))
    assert model.accelerator._shared

    def fail(self):
        raise OSError(12, "mmap(MAP_FIXED) failed")

    monkeypatch.setattr(SharedPages, "release", fail)
    shm = model._buffers._shm
    model.close()
    assert model.closed and shm.released
    with pytest.raises(ClosedError):
        model(np.zeros((1, 48, 48, 3), np.float32))
    # LiteRT's arenas under those pages are never freed: in malloc's hands, a page that keeps its contents
    # where malloc expects zeros corrupted the heap, and the next conversion aborted in LiteRT.
    monkeypatch.undo()
    del model
    gc.collect()
    original = small_cnn(side=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shadownet.convert(original, str(tmp_path / "next"), seed=5)
    x = np.random.default_rng(0).uniform(0, 1, (1, 40, 40, 3)).astype(np.float32)
    with shadownet.load(tmp_path / "next") as model:
        want = reference(original, x)
        assert np.abs(model(x) - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("case", ["unmapping failed", "open at teardown"])
def test_interpreters_on_shared_pages_stay_allocated_through_the_exit(tmp_path, case):
    """LiteRT's arenas on pages still shared are never handed back to malloc, interpreter exit included
    (malloc's work late in the exit is made here: an object that ``sys`` holds, freed after every
    module). Two ways they were: the interpreters kept for a failed unmapping (``_KEPT``), freed when the
    module's teardown emptied it - after the test above, the test suite's process aborted at exit
    ("corrupted double-linked list") once in ~10-20 runs; and a model left open that is freed only after
    the modules' teardown (here held by ``sys``), when ``SharedPages.release`` no longer finds its module's
    globals. Each aborted every run of a helper's probe."""
    import warnings

    from tests.shadownet.small_models import small_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(small_cnn(side=48), str(tmp_path / "out"), seed=4)
    script = textwrap.dedent(f"""
        import ctypes, functools, sys, weakref
        import numpy as np
        import shadownet
        from tee_sim.shared_pages import SharedPages

        class LateWork:
            def __del__(self):
                blocks = []
                for i in range(20000):
                    blocks.append(bytearray(b"x") * (520 + i * 7919 % 8000))
                    if len(blocks) > 1000:
                        del blocks[i * 31 % len(blocks)]

        sys.late_work = LateWork()
        model = shadownet.load({str(tmp_path / "out")!r}, background_refill=False)
        model(np.zeros((1, 48, 48, 3), np.float32))
        assert model.accelerator._shared
        if {case!r} == "unmapping failed":
            def fail(self):
                raise OSError(12, "mmap(MAP_FIXED) failed")

            said = functools.partial(print, "a kept interpreter was freed", file=sys.__stderr__, flush=True)
            watch = weakref.ref(model.accelerator.interpreter, said)
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(watch))  # the watch outlives the exit's teardown
            real, SharedPages.release = SharedPages.release, fail
            model.close()
            SharedPages.release = real
            del model
        else:  # left open, and freed once every module is torn down, before the late work (sys: "_" first)
            sys._model = model
            del model
    """)
    env = dict(os.environ, MALLOC_CHECK_="3", MALLOC_PERTURB_="165")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]  # -6: glibc's abort
    assert "a kept interpreter was freed" not in result.stderr, result.stderr[-2000:]


def test_pages_are_shared_where_no_buffer_of_the_round_overlaps(tmp_path):
    """A tensor's pages are mapped onto its buffer only where no other buffer of its round overlaps it (in
    the manifest's layout a round's inputs and outputs overlap: the audit's recorder, which offers no page
    offsets, got exploding activations when a buffer's offset happened to match its tensor's place in a
    page). The runtime's placement reuses two regions round after round: every tensor big enough shares
    its pages, and the shared memory is smaller than all the buffers apart."""
    import warnings

    import tee_sim
    from shadownet.accelerator import LiteRTAccelerator
    from shadownet.artifacts import place_buffers, read_artifacts
    from tee_sim.shared_pages import PAGE
    from tests.shadownet.small_models import small_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(small_cnn(side=48), str(tmp_path / "out"), seed=5)
    artifacts = read_artifacts(tmp_path / "out")
    accelerator = LiteRTAccelerator(artifacts.untrusted, artifacts.rounds)
    residues = accelerator.page_offsets()
    chosen = max(residues, key=lambda name: artifacts.buffers[name].nbytes)
    with tee_sim.Context("inprocess", home=tmp_path / "device") as context:
        size, placed = place_buffers(artifacts.buffers, artifacts.rounds, residues, PAGE)
        assert size < place_buffers(artifacts.buffers, (), residues, PAGE)[0]  # () : every buffer apart
        shm = context.register_shared_memory(size + 2 * PAGE)
        # The chosen buffer where its tensor sits in a page; every other buffer inside its pages.
        at = {name: PAGE + residues[chosen] + (64 if name != chosen else 0) for name in artifacts.buffers}
        views = {b.name: shm.ndarray(b.dtype, b.shape, at[b.name]) for b in artifacts.buffers.values()}
        accelerator.bind(views)
        assert accelerator._shared == []  # nothing shared: every copy made whole
        accelerator.bind({b.name: shm.ndarray(b.dtype, b.shape, placed[b.name])
                          for b in artifacts.buffers.values()})
        assert len(accelerator._shared) == len(residues)
        accelerator.close()
        shm.release()


def test_a_verified_model_times_its_rounds_like_a_plain_one(tmp_path, monkeypatch):
    """Verified or not, the small rounds run where the one-against-num_threads timing says (with the secure
    world on a core of its own, a verified model's rounds no longer go to one thread untimed)."""
    import warnings

    from shadownet.accelerator import LiteRTAccelerator
    from tests.shadownet.small_models import small_cnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded: insecure, tests only
        shadownet.convert(small_cnn(side=48), str(tmp_path / "out"), seed=6)
    x = np.random.default_rng(0).uniform(0, 1, (1, 48, 48, 3)).astype(np.float32)
    for one, many, threads in ((8e-5, 5e-5, 2), (5e-5, 8e-5, 1)):
        compared = []

        def timing(self, loaded, rounds, repeats, one=one, many=many, compared=compared):
            if len(loaded) == 1:
                return np.full((1, len(rounds)), 1e-4)  # every round small
            compared.append(list(rounds))
            return np.array([[one] * len(rounds), [many] * len(rounds)])

        monkeypatch.setattr(LiteRTAccelerator, "_time_rounds", timing)
        with shadownet.load(tmp_path / "out", num_threads=2, background_refill=False) as plain:
            assert compared and plain.accelerator.round_threads == (threads,) * plain.num_rounds
            want = plain(x)
        compared.clear()
        with shadownet.load(tmp_path / "out", num_threads=2, verify=True,
                            background_refill=False) as verified:
            assert compared and verified.accelerator.round_threads == (threads,) * verified.num_rounds
            assert relative_error(verified(x), want) <= SAME  # checked, on the interpreter timed faster
