"""Wrong use of the public API: bad inputs, non-finite inputs, a closed model, the same artifacts loaded twice
at once (threads of one process, two processes), artifacts of a newer format, stale TEE programs."""

import os
import re
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import shadownet
from converters.fidelity import relative_error
from shadownet.exceptions import ArtifactError, ClosedError, InputError
from tee_sim.program import read_program, write_program
from tests.shadownet.hardening import (
    copy_artifacts,
    protect_small,
    read_manifest,
    reseal,
    write_manifest,
)

TOLERANCE = 1e-4  # the default scheme's fidelity target


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return protect_small(tmp_path_factory.mktemp("small"))


@pytest.fixture
def model(small):
    with shadownet.load(small.out) as m:
        yield m


@pytest.mark.parametrize("case", ["shape", "dtype", "count", "name", "type", "scalar"])
def test_wrong_inputs_are_input_errors_and_the_model_stays_usable(small, model, case):
    x = small.input()
    name = model.inputs[0].name
    args = {
        "shape": (x[:, :4],), "dtype": (x.astype(np.float64),), "count": (x, x), "name": ({"nope": x},),
        "type": (x.tolist(),), "scalar": (np.float32(1),),
    }[case]
    with pytest.raises(InputError) as info:
        model(*args)
    assert name in str(info.value) or case in ("count", "name")
    assert relative_error(model(x), small.reference(x)) <= TOLERANCE


def test_run_into_checks_inputs_and_outputs_before_the_tee(small):
    """``run_into`` took a scalar or a (1, 1, 1, 3) input by broadcasting (a wrong answer), cast the logits
    into an int8 buffer (zeros), and failed on a wrong buffer only after the inference had spent its
    one-time mask (a helper's probe of the Python API). Now ``InputError`` before the TEE, and the model
    goes on."""
    from shadownet.accelerator import AcceleratorWrapper

    rounds = []

    class Counting(AcceleratorWrapper):
        def run_round(self, r):
            rounds.append(r)
            super().run_round(r)

    with shadownet.load(small.out, accelerator=Counting) as model:
        _check_run_into(model, small, rounds)


def _check_run_into(model, small, rounds):
    x = small.input()
    (spec,) = model.outputs
    good = [np.empty(spec.shape, spec.dtype)]
    read_only = np.empty(spec.shape, spec.dtype)
    read_only.flags.writeable = False
    for inputs, outputs, said in (
            ([np.float32(0.5)], good, "must be a numpy array"),
            ([x[:, :1, :1, :]], good, "must be"),
            ([x.astype(np.float64)], good, "must be"),
            ([x], [np.empty(spec.shape, np.int8)], "needs a writable array of shape"),
            ([x], [np.empty((2, *spec.shape[1:]), spec.dtype)], "needs a writable array of shape"),
            ([x], [read_only], "read-only"),
            ([x], [], "give a list of as many arrays, not 0 buffer(s)"),
            ([x], good[0], "not ndarray"),
            ([x], None, "not NoneType"),
            (x, good, "inputs is a list of arrays, one per input, or a mapping of names to arrays, not "
                      "ndarray"),
            (None, good, "not NoneType"),
            ((a for a in [x]), good, "not generator"),
            ([x], [good[0].tolist()], "not list")):
        with pytest.raises(InputError, match=re.escape(said)):
            model.run_into(inputs, outputs)
    assert rounds == []  # no inference ran
    model.run_into({model.inputs[0].name: x}, good)  # by name, as the model takes them
    assert rounds and relative_error(good[0], small.reference(x)) <= TOLERANCE


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(small, model, bad):
    """Policy (SECURITY.md): NaN and infinity are refused with InputError instead of propagated. Masks
    turn an infinity into NaN (inf - inf in the restore) and a matrix restore spreads one NaN channel over
    every channel (NaN * 0), so the results would not be LiteRT's; the integrity checks would report
    them as tampering; a non-finite input is a bug upstream."""
    x = small.input()
    x[0, 1, 2, 0] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        model(x)
    clean = small.input(1)
    assert relative_error(model(clean), small.reference(clean)) <= TOLERANCE


def test_inputs_across_float32s_range_and_those_too_large_for_its_masks(small, model):
    """A probe's MiniVGG input at 6e37 came back wrong with no error (round 1's mask, 10-40x the input,
    and the sums overflowed float32), and a verified model's checks overflowed from ~1e19; inputs over 2**40
    are refused, and those up to it, down to blank ones, are LiteRT's, verified or not (a blank input failed
    its checks when round 1's mask could shrink to 2**-80)."""
    x = small.input()
    with shadownet.load(small.out, verify=True) as verified:
        for scale in (0.0, 1e-16, 1e9, float(2 ** 40)):
            scaled = x * np.float32(scale / np.abs(x).max())
            want = small.reference(scaled)
            for protected in (model, verified):
                got = protected(scaled)
                assert np.abs(got - want).max() <= TOLERANCE * max(np.abs(want).max(), 1e-30), scale
        assert verified.stats()["verify"]["worst_bound_log2"] <= -20
    x[0, 1, 2, 0] = -3e12
    with pytest.raises(InputError, match=r"magnitude 3\.000000053e\+12: a protected model takes inputs up "
                                         r"to 2\*\*40 \(1\.099511628e\+12\)"):
        model(x)
    x[0, 1, 2, 0] = np.nextafter(np.float32(2 ** 40), np.float32(np.inf))  # just over: told apart
    with pytest.raises(InputError, match=r"magnitude 1\.099511759e\+12: "):
        model(x)


def test_non_finite_values_written_through_an_interpreter_view_are_refused(small):
    interpreter = shadownet.Interpreter(model_path=str(small.out))
    interpreter.allocate_tensors()
    (detail,) = interpreter.get_input_details()
    interpreter.tensor(detail["index"])()[...] = np.nan  # the view bypasses set_tensor's checks
    with pytest.raises(InputError):
        interpreter.invoke()
    with pytest.raises(InputError):
        interpreter.set_tensor(detail["index"], small.input().astype(np.float64))
    interpreter.set_tensor(detail["index"], small.input())
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert relative_error(out, small.reference(small.input())) <= TOLERANCE


def test_cli_run_with_wrong_input_is_one_line(small, tmp_path):
    np.savez(tmp_path / "x.npz", wrong_name=small.input())
    np.save(tmp_path / "nan.npy", np.full_like(small.input(), np.nan))
    for path in (tmp_path / "x.npz", tmp_path / "nan.npy", tmp_path / "missing.npy"):
        command = [sys.executable, "-m", "shadownet", "run", str(small.out), "--input", str(path)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("shadownet: error:"), \
            result.stderr


def test_a_closed_model_raises_closed_error(small):
    model = shadownet.load(small.out)
    x = small.input()
    model(x)
    model.close()
    model.close()  # idempotent
    assert model.closed
    for call in (lambda: model(x), model.stats, lambda: model.run_into([x], [np.empty((1, 5), np.float32)]),
                 # wrong arguments too: the model is closed, whatever they are
                 lambda: model(x[..., :1]), lambda: model.run_into([x], [np.empty(3, np.float64)])):
        with pytest.raises(ClosedError):
            call()
    interpreter = shadownet.Interpreter(model_path=str(small.out))
    interpreter.allocate_tensors()
    interpreter.close()
    with pytest.raises(ClosedError):
        interpreter.invoke()


def test_one_directory_loaded_twice_in_one_process(small):
    inputs = [small.input(seed) for seed in range(4)]
    wants = [small.reference(x) for x in inputs]
    errors: list[float] = []
    failures: list[BaseException] = []
    with shadownet.load(small.out) as first, shadownet.load(small.out) as second:
        def work(model, offset):
            try:
                for k in range(12):
                    i = (k + offset) % len(inputs)
                    errors.append(relative_error(model(inputs[i]), wants[i]))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(m, i)) for i, m in enumerate((first, second, first))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first.close()
        assert relative_error(second(inputs[0]), wants[0]) <= TOLERANCE  # closing one left the other
    assert not failures
    assert len(errors) == 36 and max(errors) <= TOLERANCE


def test_one_directory_loaded_by_two_processes_at_once(small, tmp_path):
    x = small.input(5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", small.reference(x))
    script = textwrap.dedent(f"""
        import numpy as np, shadownet
        x, want = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'want.npy')!r})
        with shadownet.load({str(small.out)!r}) as model:
            for _ in range(20):
                got = model(x)
                assert np.max(np.abs(got - want)) <= {TOLERANCE} * np.max(np.abs(want)), got
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "ok", err


@pytest.mark.parametrize("version, message", [(2, "upgrade shadownet"), (0, "re-convert"),
                                              ("1", "re-convert")])
def test_artifacts_of_another_format_version(small, tmp_path, version, message):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    manifest = read_manifest(copy)
    manifest["format_version"] = version
    write_manifest(copy, manifest)
    with pytest.raises(ArtifactError, match=message):
        shadownet.load(copy)


def _stale(program: bytes, change) -> bytes:
    header, arrays = read_program(program)
    change(header)
    return write_program(header, arrays)


def _drop_pad(header):
    """What a converter from before the zero-PAD pushes wrote (the TA then failed with KeyError: 'pad')."""
    push = next(i for step in header["steps"] for i in step if "pad" in i)
    del push["pad"]


def _unknown_instruction(header):
    """What a newer converter might write: an instruction this TA does not know."""
    header["steps"][0].insert(0, {"op": "gather_nd", "src": "shm:input/0", "dst": "shm:input/0"})


@pytest.mark.parametrize("change", [_drop_pad, _unknown_instruction])
def test_a_stale_program_says_re_convert(small, tmp_path, change):
    copy = copy_artifacts(small.out, tmp_path / "copy")
    reseal(copy, _stale(small.program, change))
    with pytest.raises(ArtifactError, match="re-convert the model") as info:
        shadownet.load(copy)
    assert "TEE_ERROR_BAD_FORMAT" in str(info.value)



def test_an_op_that_fails_on_the_input_is_litert_s_error_and_harms_no_other_model(non_float_io, small_cnn):
    """An embedding id past its table: LiteRT's invoke raises a RuntimeError naming the GATHER. The TEE-side
    op raised the same inside the trusted app, which panicked: every session of the app was lost (a helper's
    probe: another model's next call failed with TARGET_DEAD) and the error blamed the TEE. It is now an
    ``InvokeError``, a RuntimeError as LiteRT's, and both models go on."""
    from ai_edge_litert.interpreter import Interpreter as LiteRT

    from shadownet.exceptions import InvokeError

    image, label = non_float_io.random_inputs()
    bad = np.full_like(label, 1000)
    litert = LiteRT(model_path=str(non_float_io.original))
    litert.allocate_tensors()
    for detail, value in zip(litert.get_input_details(), (image, bad), strict=True):
        litert.set_tensor(detail["index"], value)
    with pytest.raises(RuntimeError, match="GATHER"):
        litert.invoke()
    (x,) = small_cnn.random_inputs()
    with shadownet.load(non_float_io.out) as model, shadownet.load(small_cnn.out) as other:
        other(x)
        with pytest.raises(InvokeError, match=r"an op of the model \(GATHER\) failed on this") as caught:
            model(image, bad)
        assert isinstance(caught.value, RuntimeError)
        assert "Node number" not in str(caught.value)  # LiteRT's text numbers the sealed TEE model's nodes
        assert relative_error([other(x)], small_cnn.reference(x)) <= 1e-4
        got, want = model(image, label), non_float_io.reference(image, label)
        assert relative_error(list(got.values()), want) <= 1e-4


def test_only_an_inference_step_s_generic_trusted_app_error_is_an_invoke_error():
    """The trusted app's TEE_ERROR_GENERIC means an op failed on the input only in an inference step; the
    same code elsewhere (an invalid output parameter while refilling, say) is no RuntimeError of LiteRT's."""
    import tee_sim
    from shadownet.exceptions import InvokeError
    from shadownet.tee_errors import translate_tee_error

    error = tee_sim.TEEError(tee_sim.TEE_ERROR_GENERIC, tee_sim.TEEC_ORIGIN_TRUSTED_APP, "an op failed")
    assert isinstance(translate_tee_error(error, "inference step 2", step=True), InvokeError)
    assert not isinstance(translate_tee_error(error, "refilling the one-time mask pool"), RuntimeError)
    from_the_os = tee_sim.TEEError(tee_sim.TEE_ERROR_GENERIC, tee_sim.TEEC_ORIGIN_TEE, "internal error")
    assert not isinstance(translate_tee_error(from_the_os, "inference step 2", step=True), RuntimeError)


def test_paths_that_are_no_artifact_directory_say_what_they_are(small, tmp_path):
    """A helper's sweep: load("") read the current directory (". has no manifest.json"), load("/dev/null")
    said it did not exist, a manifest.json that is a FIFO was "has no manifest.json"; and {"image": None}
    was said to miss 'image'."""
    with pytest.raises(ArtifactError, match="the artifact directory's path is empty"):
        shadownet.load("")
    with pytest.raises(ArtifactError, match="/dev/null is not a directory, so not an artifact directory"):
        shadownet.load("/dev/null")
    (tmp_path / "out").mkdir()
    os.mkfifo(tmp_path / "out" / "manifest.json")
    with pytest.raises(ArtifactError, match="manifest.json is not a regular file"):
        shadownet.load(tmp_path / "out")
    with shadownet.load(small.out) as model, pytest.raises(InputError, match="must be a numpy array") as info:
        model({model.inputs[0].name: None})
    assert "missing" not in str(info.value)
