"""shadownet.load / ProtectedModel against LiteRT on the original model."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import shadownet
from converters.fidelity import relative_error
from shadownet.accelerator import AcceleratorWrapper
from shadownet.exceptions import ClosedError, InputError

TOLERANCE = 1e-4  # the default scheme's fidelity target (the test models are converted with it)
# Two inferences on the same input: one-time masks round each one differently, a few float32 ulps.
SAME = 1e-5


def test_protected_inference_does_not_import_tensorflow(small_cnn, tmp_path):
    """The on-device path (``load``, a call, ``Interpreter``) in a fresh process: TensorFlow is the vendor's
    optional extra, never the device's."""
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import shadownet
        x = np.load({str(tmp_path / "x.npy")!r})
        with shadownet.load({str(small_cnn.out)!r}) as model:
            np.save({str(tmp_path / "y.npy")!r}, model(x))
        interpreter = shadownet.Interpreter(model_path={str(small_cnn.out)!r})
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        interpreter.close()
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras")))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
    assert relative_error(np.load(tmp_path / "y.npy"), small_cnn.reference(x)[0]) <= TOLERANCE


def test_the_api_submodules_are_attributes_of_the_package():
    """``import shadownet`` alone, then ``shadownet.exceptions`` (the docs name it): an AttributeError
    before, unless something else had imported it (a new user's). No other submodule is loaded so."""
    script = ("import shadownet, sys; print(shadownet.exceptions.InputError.__name__, "
              "shadownet.accelerator.Accelerator.__name__, hasattr(shadownet, 'cli'), "
              "'shadownet.cli' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["InputError", "Accelerator", "False", "False"], result.stdout


def test_a_process_that_leaves_models_open_exits(small_cnn, tmp_path):
    """LiteRT apps never close their interpreters. With two default-scheme models left open, a background
    refill frozen in a TEE call as the interpreter finalized kept its context's lock, and the models'
    closing at exit waited for it for ever (a helper's probe: 12 of 12 runs hung; here about 1 in 2).
    The refills are stopped at exit first; five runs must all end."""
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import numpy as np
        import shadownet
        x = np.load({str(tmp_path / "x.npy")!r})
        models = [shadownet.load({str(small_cnn.out)!r}) for _ in range(2)]
        for model in models:
            model(x)
    """)
    for _ in range(5):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_a_child_forked_while_a_refill_waits_exits(small_cnn, tmp_path):
    """The refills stopped at exit are the process's own: a child forked while the parent's refill held its
    wake event's lock (as it does for a few lines of each wait) inherited that lock, held for ever, and
    its exit waited on it (a review's probe). The child forgets its parent's refills."""
    (x,) = small_cnn.random_inputs()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import os, sys, threading, time
        import numpy as np
        import shadownet
        model = shadownet.load({str(small_cnn.out)!r})
        model(np.load({str(tmp_path / "x.npy")!r}))
        held, release = threading.Event(), threading.Event()

        def hold():
            with model._refiller._wake._cond:
                held.set()
                release.wait()

        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        release.set()
        deadline = time.monotonic() + 20
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                sys.exit("the child hung at exit")
            time.sleep(0.05)
        model.close()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_call_matches_litert_on_the_original(small_cnn):
    with shadownet.load(small_cnn.out) as model:
        for seed in range(3):
            (x,) = small_cnn.random_inputs(seed)
            (want,) = small_cnn.reference(x)
            got = model(x)
            assert got.shape == want.shape and got.dtype == want.dtype
            assert relative_error(got, want) <= TOLERANCE
            assert np.argmax(got) == np.argmax(want)
            assert relative_error(model.predict(x), got) <= SAME


def test_integer_and_bool_inputs_and_outputs_are_litert_s(non_float_io):
    """An int32 label comes in, an argmax's int64 indices and a bool mask go out, in their own types,
    identical to LiteRT's."""
    with shadownet.load(non_float_io.out) as model:
        assert sorted(t.dtype.name for t in model.inputs) == ["float32", "int32"]
        assert sorted(t.dtype.name for t in model.outputs) == ["bool", "float32", "int64"]
        for label in (0, 3, 9):
            xs = [np.full(t.shape, label, t.dtype) if t.dtype == np.int32 else x
                  for t, x in zip(model.inputs, non_float_io.random_inputs(label), strict=True)]
            got = model(*xs)
            for spec, want in zip(model.outputs, non_float_io.reference(*xs), strict=True):
                assert got[spec.name].dtype == want.dtype and got[spec.name].shape == want.shape
                if want.dtype == np.float32:
                    assert relative_error(got[spec.name], want) <= TOLERANCE
                else:
                    assert np.array_equal(got[spec.name], want)
                    assert 0 < np.count_nonzero(want) < want.size


def test_returned_outputs_are_the_callers(small_cnn):
    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:
        first = model(x)
        kept = first.copy()
        first[...] = 0  # must not reach the model's buffers
        assert relative_error(model(x), kept) <= SAME


def test_one_tee_entry_per_round_plus_one(small_cnn):
    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:
        model(x)
        stats = model.stats()
        assert stats["rounds"] == model.num_rounds >= 1
        assert stats["world_switches"] == model.num_rounds + 1
        assert stats["bytes_to_tee"] > x.nbytes and stats["bytes_from_tee"] > 0
        assert 0 < stats["accelerator_s"] < stats["total_s"] and 0 < stats["tee_s"] < stats["total_s"]
        assert stats["secure_memory_peak"] >= stats["model_secure_memory"] > 0


def test_several_inputs_and_outputs(two_by_two):
    left, right = two_by_two.random_inputs()
    want = two_by_two.reference(left, right)
    with shadownet.load(two_by_two.out) as model:
        names = [t.name for t in model.outputs]
        for got in (model(left, right),
                    model({t.name: x for t, x in zip(model.inputs, (left, right), strict=True)}),
                    model({"right": right, "left": left})):  # the original signature's names
            assert isinstance(got, dict) and list(got) == names
            for name, w in zip(names, want, strict=True):
                assert got[name].shape == w.shape
                assert relative_error(got[name], w) <= TOLERANCE
        assert model.stats()["world_switches"] == model.num_rounds + 1


@pytest.mark.parametrize("case", ["shape", "dtype", "count", "name", "missing", "twice", "type"])
def test_wrong_inputs_raise_input_error_naming_the_input(two_by_two, case):
    left, right = two_by_two.random_inputs()
    with shadownet.load(two_by_two.out) as model:
        name = model.inputs[0].name
        args, expected = {
            "shape": ((left[:, :4], right), [name, "[1, 8, 8, 3]", "[1, 4, 8, 3]"]),
            "dtype": ((left.astype(np.float64), right), [name, "float32", "float64"]),
            "count": ((left,), ["2 input", "1 given"]),
            "name": (({"left": left, "right": right, "bogus": right},), ["bogus"]),
            # each input under both its names: "...; the model takes '<tensor>' or 'left', ..."
            "missing": (({"left": left},), ["missing", f"'{model.inputs[1].name}' or 'right'"]),
            # under its signature name and its tensor name: was "missing input(s) given twice under ..."
            "twice": (({"left": left, name: left, "right": right},), [f"input(s) ['{name}'] given twice"]),
            "type": ((left.tolist(), right), [name, "numpy array"]),
        }[case]
        with pytest.raises(InputError) as info:
            model(*args)
        for text in expected:
            assert text in str(info.value)
        assert isinstance(info.value, ValueError)
        model(left, right)  # still usable


@pytest.mark.parametrize("mask_pool", [0, 65, True, 2.0])
def test_a_mask_pool_the_trusted_app_cannot_hold_is_refused_before_loading(small_cnn, mask_pool):
    # 65 reached the secure world, which refused it as TEE_ERROR_BAD_PARAMETERS: an ArtifactError
    error = TypeError if isinstance(mask_pool, bool | float) else ValueError  # as Python's own
    with pytest.raises(error, match=f"mask_pool must be an int from 1 to 64, not {mask_pool!r}"):
        shadownet.load(small_cnn.out, mask_pool=mask_pool)
    with shadownet.load(small_cnn.out, mask_pool=64) as model:
        model(*small_cnn.random_inputs())


def test_numpys_integers_and_booleans_are_taken_and_other_flags_refused(small_cnn):
    """``mask_pool`` takes numpy's integers, as ``refill_masks`` does; ``verify`` and ``background_refill``
    are booleans (``verify="no"`` was taken as true; a helper's probe)."""
    with shadownet.load(small_cnn.out, mask_pool=np.int64(2), verify=np.bool_(False),
                        num_threads=np.int32(2)) as model:
        assert model.stats()["pool"]["capacity"] == 2 and not model.verify
        model(*small_cnn.random_inputs())
    for flags in ({"verify": "no"}, {"background_refill": 1}):
        with pytest.raises(TypeError, match=f"{next(iter(flags))} must be True or False"):
            shadownet.load(small_cnn.out, **flags)


def test_wrong_delegates_accelerators_and_artifacts_are_refused_clearly(small_cnn, tmp_path, monkeypatch):
    """A delegate that is not one, an accelerator= that returns no accelerator, a path where read Artifacts
    go, a refill count no TEE Value holds: TypeError / ValueError saying what is wrong, nothing left open (a
    helper's probe: AttributeErrors from inside LiteRT or at the first call, the default accelerator left
    to the GC, an ArtifactError)."""
    from shadownet.accelerator import LiteRTAccelerator
    from shadownet.exceptions import ArtifactError

    for delegate in (5, object(), [None]):
        with pytest.raises(TypeError, match="a delegate is a delegate library's path or a LiteRT Delegate"):
            shadownet.load(small_cnn.out, delegate=delegate)
    with pytest.raises(ArtifactError, match="cannot load the accelerator delegate"):  # a Path is a path
        shadownet.load(small_cnn.out, delegate=tmp_path / "no_such_delegate.so")
    closed = []
    real_close = LiteRTAccelerator.close

    class Half:  # no run_round
        def bind(self, buffers):
            pass

        def close(self):
            pass

    monkeypatch.setattr(LiteRTAccelerator, "close", lambda self: (closed.append(True), real_close(self))[1])
    for returned in (lambda base: object(), lambda base: None, lambda base: Half()):
        with pytest.raises(TypeError, match="an accelerator has bind"):
            shadownet.load(small_cnn.out, accelerator=returned)
    assert len(closed) == 3  # the default accelerator each was given
    with pytest.raises(TypeError, match="ProtectedModel takes read Artifacts"):
        shadownet.ProtectedModel(str(small_cnn.out))
    with shadownet.load(small_cnn.out) as model:
        with pytest.raises(ValueError, match="entries must be"):
            model.refill_masks(1 << 64)
        model(*small_cnn.random_inputs())


_FAILING_DELEGATE = r"""
#include <stdint.h>
#include <stdlib.h>
typedef struct TfLiteDelegate {  /* LiteRT's C struct, as an external delegate library returns it */
  void* data_;
  int (*Prepare)(void* context, struct TfLiteDelegate* delegate);
  int (*CopyFromBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  int (*CopyToBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  void (*FreeBufferHandle)(void*, struct TfLiteDelegate*, int*);
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;
static int prepare(void* context, TfLiteDelegate* delegate) { return 1; }  /* kTfLiteError */
TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n,
                                              void (*report)(const char*)) {
  TfLiteDelegate* d = calloc(1, sizeof *d);
  d->Prepare = prepare;
  return d;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate* d) { free(d); }
"""


def test_a_delegate_that_fails_to_apply_is_a_runtime_error_as_in_litert(small_cnn, tmp_path):
    """LiteRT raises RuntimeError when a delegate's Prepare fails, and apps fall back to the CPU on it; the
    protected model raised an ArtifactError (a ValueError) blaming the artifact (a helper's probe)."""
    import sysconfig

    from ai_edge_litert.interpreter import Interpreter, load_delegate

    from shadownet.exceptions import DelegateError

    (tmp_path / "fail.c").write_text(_FAILING_DELEGATE)
    library = tmp_path / "libfail_delegate.so"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(tmp_path / "fail.c")], check=True)
    with pytest.raises(RuntimeError):  # what an app written for LiteRT expects
        Interpreter(model_path=str(small_cnn.original), experimental_delegates=[load_delegate(str(library))])
    with pytest.raises(DelegateError, match="delegate could not be applied to untrusted.tflite") as caught:
        shadownet.load(small_cnn.out, delegate=str(library))
    assert isinstance(caught.value, RuntimeError)
    with pytest.raises(RuntimeError):
        shadownet.Interpreter(model_path=str(small_cnn.out),
                              experimental_delegates=[load_delegate(str(library))]).allocate_tensors()
    with shadownet.load(small_cnn.out) as model:  # the CPU fallback
        model(*small_cnn.random_inputs())


def test_a_model_called_from_inside_its_own_call_says_so_instead_of_waiting_for_itself(small_cnn):
    """An accelerator whose run_round calls back into its model (stats, a call, close) hung for ever on the
    model's lock (a helper's probe); it is a RuntimeError now, and the model goes on working."""
    from shadownet.accelerator import AcceleratorWrapper

    seen = []

    class CallsBack(AcceleratorWrapper):
        model = None

        def run_round(self, r):
            self.inner.run_round(r)
            model = CallsBack.model
            if r == 1 and model is not None:
                for call in (model.stats, model.refill_masks, model.close, lambda: model(x)):
                    try:
                        call()
                    except RuntimeError as exc:
                        seen.append(str(exc))

    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out, accelerator=CallsBack) as model:
        CallsBack.model = model
        want = model(x).copy()
        CallsBack.model = None
        assert len(seen) == 4 and all("from inside a call of its own" in s for s in seen), seen
        # The refused calls stopped nothing: the refills go on (a refused call counted as waiting for the
        # model stopped them for good: a review).
        assert model._refiller is not None and not model._waiting
        assert np.allclose(model(x), want, rtol=1e-4, atol=1e-6)  # fresh one-time masks: float32 apart


def test_stats_are_of_the_last_call_that_finished(small_cnn):
    """A failed call left stats() pairing its start with the last finished call's end: negative world
    switches (a helper's review)."""
    from shadownet.accelerator import AcceleratorWrapper

    class FailsOnce(AcceleratorWrapper):
        fail = False

        def run_round(self, r):
            if FailsOnce.fail:
                FailsOnce.fail = False
                raise RuntimeError("the accelerator failed")
            self.inner.run_round(r)

    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out, accelerator=FailsOnce) as model:
        model(x)
        model(x)
        finished = model.stats()
        FailsOnce.fail = True
        with pytest.raises(RuntimeError, match="the accelerator failed"):
            model(x)
        after = model.stats()
        assert after["world_switches"] == finished["world_switches"] == model.num_rounds + 1
        assert after["total_s"] == finished["total_s"]


@pytest.mark.parametrize("num_threads", [0, 257, 50000, True, "2"])
def test_thread_counts_out_of_range_are_refused_before_loading(small_cnn, num_threads, tmp_path):
    # 50000 could not start the refill thread beside LiteRT's, and the process died in the teardown
    error = ValueError if isinstance(num_threads, int) and not isinstance(num_threads, bool) else TypeError
    with pytest.raises(error, match=f"num_threads must be an int from 1 to 256, not {num_threads!r}"):
        shadownet.load(small_cnn.out, num_threads=num_threads)
    with pytest.raises(error, match="num_threads must be"):  # before the directory is read
        shadownet.load(tmp_path / "nothing here", num_threads=num_threads)


def test_closed_model_raises_closed_error(small_cnn):
    (x,) = small_cnn.random_inputs()
    model = shadownet.load(small_cnn.out)
    with model:
        model(x)
    assert model.closed
    model.close()  # idempotent
    with pytest.raises(ClosedError):
        model(x)
    with pytest.raises(ClosedError):
        model.stats()


def test_two_models_open_at_once_share_the_secure_world(small_cnn, two_by_two):
    (x,) = small_cnn.random_inputs(1)
    pair = two_by_two.random_inputs(1)
    want_x, want_pair = small_cnn.reference(x), two_by_two.reference(*pair)
    with shadownet.load(small_cnn.out) as one, shadownet.load(two_by_two.out) as two:
        for _ in range(2):
            assert relative_error(one(x), want_x[0]) <= TOLERANCE
            got = two(*pair)
            for value, w in zip(got.values(), want_pair, strict=True):
                assert relative_error(value, w) <= TOLERANCE
    with shadownet.load(small_cnn.out) as again:  # closing one model left the others' world working
        assert relative_error(again(x), want_x[0]) <= TOLERANCE


def test_stats_give_the_devices_secure_memory_as_it_is_now(small_cnn):
    """``secure_memory_used`` is device-wide: another session's load and close show at once in this one's
    stats (they were a call late: the counters of this session's previous TEE entry)."""
    x = small_cnn.random_inputs(0)[0]
    with shadownet.load(small_cnn.out) as a:
        a(x)
        alone = a.stats()["secure_memory_used"]
        with shadownet.load(small_cnn.out) as b:
            b(x)
            both = b.stats()["secure_memory_used"]
            assert both > alone and a.stats()["secure_memory_used"] == both
        assert a.stats()["secure_memory_used"] == alone


def test_threads_calling_one_model_get_their_own_results(small_cnn):
    inputs = [small_cnn.random_inputs(seed)[0] for seed in range(4)]
    wants = [small_cnn.reference(x)[0] for x in inputs]
    errors: list[float] = []
    failures: list[BaseException] = []
    with shadownet.load(small_cnn.out, num_threads=1) as model:
        def work(i: int) -> None:
            try:
                for _ in range(5):
                    errors.append(relative_error(model(inputs[i]), wants[i]))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not failures
    assert len(errors) == 20 and max(errors) <= TOLERANCE


def test_a_model_survives_a_crash_of_the_secure_world(small_cnn):
    import tee_sim

    context = tee_sim.default_context()
    if context.secure_world_pid is None:
        pytest.skip("the secure world runs in this process (inprocess transport)")
    (x,) = small_cnn.random_inputs()
    (want,) = small_cnn.reference(x)
    with shadownet.load(small_cnn.out) as model:
        model(x)
        pid = context.secure_world_pid
        os.kill(pid, signal.SIGKILL)
        from tests.shadownet.test_faults import _wait_gone

        _wait_gone(pid)
        # Found gone before anything of the call ran: it opens a new session in a restarted secure world,
        # loads the model again and runs (a crash during a call fails that call: test_faults.py).
        assert relative_error(model(x), want) <= TOLERANCE
        assert context.secure_world_pid != pid
        assert model.stats()["world_switches"] == model.num_rounds + 1


class AffinityRecorder(AcceleratorWrapper):
    """Records the CPUs the calling thread may use while each round runs."""

    def __init__(self, inner):
        super().__init__(inner)
        self.cpus: list[set[int]] = []

    def run_round(self, r: int) -> None:
        self.cpus.append(os.sched_getaffinity(0))
        super().run_round(r)


def test_inference_runs_on_the_secure_worlds_core(small_cnn):
    """From a session's second inference on, the calling thread runs on the secure world's core while the
    inference lasts (TrustZone's turn-taking; runtime._infer_on_secure_core), and gets its CPUs back."""
    import tee_sim

    core = tee_sim.default_context().secure_core
    allowed = os.sched_getaffinity(0)
    if core is None:
        pytest.skip("no secure core: in-process transport or a single CPU")
    (x,) = small_cnn.random_inputs()
    recorders: list[AffinityRecorder] = []

    def wrap(inner):
        recorders.append(AffinityRecorder(inner))
        return recorders[-1]

    with shadownet.load(small_cnn.out, accelerator=wrap) as model:
        (recorder,) = recorders
        rounds = model.num_rounds
        model(x)  # the first: where the accelerator may still start its threads, not pinned
        assert recorder.cpus == [allowed] * rounds and os.sched_getaffinity(0) == allowed
        for _ in range(2):
            assert relative_error(model(x), small_cnn.reference(x)[0]) <= TOLERANCE
            assert os.sched_getaffinity(0) == allowed
        assert recorder.cpus[rounds:] == [{core}] * (2 * rounds)
        if len(allowed) > 1:  # a thread kept off that core is not moved onto it
            os.sched_setaffinity(0, allowed - {core})
            try:
                model(x)
                assert recorder.cpus[3 * rounds:] == [allowed - {core}] * rounds
            finally:
                os.sched_setaffinity(0, allowed)


def test_stats_have_the_same_keys_under_every_scheme(small_cnn, tmp_path):
    """The paper's scheme loaded without verify has no pool nor checks: its stats() lacked ``verify``,
    ``pool`` and ``one_time_rounds``, so ``stats()['verify']`` was a KeyError (a helper's probe), and then
    their keys (``stats()['pool']['capacity']``: a review). The same keys at every level, nothing counted."""
    import warnings

    paper = tmp_path / "paper"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded
        shadownet.convert(str(small_cnn.original), str(paper), scheme="shadownet", seed=1)
    (x,) = small_cnn.random_inputs()
    keys = []
    for out in (small_cnn.out, paper):
        with shadownet.load(out) as model:
            model(x)
            stats = model.stats()
            keys.append(set(stats))
            keys.append({key: set(stats[key]) for key in ("pool", "verify")})
            if out == paper:
                assert stats["pool"]["capacity"] == 0 and stats["verify"]["checked"] == 0
                assert stats["one_time_rounds"] == [] and stats["per_inference_secure_memory"] == 0
            else:
                assert stats["verify"]["enabled"] is False and stats["pool"]["capacity"] > 0
    assert keys[0] == keys[2] and keys[1] == keys[3], (keys[0] ^ keys[2], keys[1], keys[3])


def test_a_ctrl_c_while_the_rounds_move_leaves_every_later_result_right(small_cnn, monkeypatch):
    """A Ctrl-C in one of a model's first 20 calls, as the trial of its rounds' threads moved them, cut the
    move between the tensors' pages made private again and the accelerator's new plan: every later
    inference wrong, no error (a helper's probe). The move is uninterrupted now: the interrupt is raised
    after it, and every later result is right."""
    from shadownet.accelerator import LiteRTAccelerator
    from tee_sim import shared_pages

    def all_on_one_thread(self):  # every round timed faster on one thread at load: the trial tries both
        if self._single is None:
            self._single = self._load(self._model, 1, ())
        return [1] * len(self.rounds)

    monkeypatch.setattr(LiteRTAccelerator, "_tuned_choice", all_on_one_thread)
    (x,) = small_cnn.random_inputs()
    want = small_cnn.reference(x)[0]
    real, sent = shared_pages.SharedPages.release, []

    def release(self):
        real(self)
        if not sent:  # Python raises at its next instruction: between two pages' releases
            sent.append(self)
            os.kill(os.getpid(), signal.SIGINT)

    with shadownet.load(small_cnn.out, num_threads=2) as model:
        assert model.tuning
        monkeypatch.setattr(shared_pages.SharedPages, "release", release)
        interrupted = 0
        for _ in range(25):
            try:
                got = model(x)
            except KeyboardInterrupt:
                interrupted += 1
                continue
            assert relative_error(got, want) <= 1e-4
        assert sent and interrupted == 1 and not model.tuning


def test_a_ctrl_c_in_the_wait_for_the_model_leaves_its_refills_going(small_cnn):
    """Interrupted while it waited for the model's lock, a call left itself counted as waiting, and the
    background refill, which yields to waiting callers, stopped for good (a helper's probe)."""
    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:
        model._lock.acquire()  # another thread's call, as it were
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                model(x)
        finally:
            timer.join()
            model._lock.release()
        assert not model._waiting
        model.refill_masks()
        ready = model.stats()["pool"]["ready"]
        model(x)
        deadline = time.monotonic() + 30
        while model.stats()["pool"]["ready"] < ready and time.monotonic() < deadline:
            time.sleep(0.05)  # the background refill makes the entry the call took
        assert model.stats()["pool"]["ready"] == ready


def test_a_ctrl_c_while_close_stops_the_refill_leaves_the_model_refilled(small_cnn, monkeypatch):
    """close() stops the background refill (a join) before it takes the model's lock: a Ctrl-C in that
    join left the model open and never refilled again (a review)."""
    from shadownet import refill

    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:
        real = refill.BackgroundRefill.stop

        def interrupted(self):
            real(self)
            raise KeyboardInterrupt

        monkeypatch.setattr(refill.BackgroundRefill, "stop", interrupted)
        with pytest.raises(KeyboardInterrupt):
            model.close()
        monkeypatch.undo()
        assert not model.closed and model._refiller is not None and model._refiller.is_alive()
        model(x)


def test_a_refill_restarted_while_another_close_waits_is_stopped_by_it(small_cnn):
    """A close cut by a Ctrl-C restarts the refill; another thread's close, which took the refill (None)
    before that and waited for the lock, closed the model and left the restarted refill waiting until the
    process exited (a review)."""
    from shadownet.refill import BackgroundRefill

    model = shadownet.load(small_cnn.out)
    first = model._refiller
    model.refill_masks()  # the pool full: its refill idle, not in a chunk waiting for the lock below
    time.sleep(0.2)
    model._lock.acquire()  # an inference in progress
    closer = threading.Thread(target=model.close)
    closer.start()
    deadline = time.monotonic() + 30
    while model._refiller is not None or first.is_alive():  # the closer stopped it, and waits for the lock
        assert time.monotonic() < deadline, "close() did not stop the refill"
        time.sleep(0.01)
    late = model._refiller = BackgroundRefill(model)  # as the cut close restarts it
    late.start()
    model._lock.release()
    closer.join(30)
    assert model.closed and not late.is_alive()


def test_a_signal_handler_that_closes_the_model_mid_call_is_refused_not_a_hang(small_cnn):
    """SIGTERM's handler closing the model (a clean exit) while the main thread was in one of its calls
    waited for the model's lock for ever, and a second SIGTERM re-entered the wait (a helper's probe)."""
    (x,) = small_cnn.random_inputs()
    with shadownet.load(small_cnn.out) as model:
        refused = []

        def close(signum, frame):
            try:
                model.close()
            except RuntimeError as exc:
                refused.append(str(exc))

        previous = signal.signal(signal.SIGTERM, close)
        try:
            with model._locked():  # inside one of its calls, as the handler runs
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)  # the handler runs at the next instruction
        finally:
            signal.signal(signal.SIGTERM, previous)
        assert refused and "a signal handler" in refused[0]
        assert not model.closed
        model(x)
