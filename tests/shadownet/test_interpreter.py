"""shadownet.Interpreter is a drop-in for LiteRT's Interpreter: the same app code runs on both."""

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

import shadownet
from converters.fidelity import relative_error
from shadownet.exceptions import ArtifactError

TOLERANCE = 1e-4  # the default scheme's fidelity target
DETAIL_KEYS = ("name", "index", "shape", "shape_signature", "dtype", "quantization")


def litert_app(interpreter_class, model_path, batches):
    """An app written for LiteRT, as its documentation shows; only the class it is given changes."""
    interpreter = interpreter_class(model_path=str(model_path), num_threads=2)
    input_details = interpreter.get_input_details()
    output_details = interpreter.get_output_details()
    interpreter.allocate_tensors()
    results = []
    for inputs in batches:
        for detail, x in zip(input_details, inputs, strict=True):
            assert tuple(detail["shape"]) == x.shape and detail["dtype"] == x.dtype
            interpreter.set_tensor(detail["index"], x)
        interpreter.invoke()
        outputs = [interpreter.get_tensor(d["index"]) for d in output_details]
        outputs[0][...] = outputs[0].copy()  # apps may write to what get_tensor returns
        results.append(outputs)
    runner = interpreter.get_signature_runner()
    names = interpreter.get_signature_list()
    key = next(iter(names))
    by_name = runner(**dict(zip(names[key]["inputs"], batches[0], strict=True)))
    # The runner shares the interpreter's tensors: get_tensor reads what the runner's call computed.
    shared = [interpreter.get_tensor(d["index"]) for d in output_details]
    assert sorted(v.tobytes() for v in shared) == sorted(v.tobytes() for v in by_name.values())
    return results, by_name, names


@pytest.mark.parametrize("fixture", ["small_cnn", "two_by_two", "repeated_outputs", "non_float_io"])
def test_same_app_runs_on_litert_and_shadownet(fixture, request):
    model = request.getfixturevalue(fixture)
    batches = [model.random_inputs(seed) for seed in range(2)]
    want, want_by_name, want_names = litert_app(LiteRTInterpreter, model.original, batches)
    got, got_by_name, got_names = litert_app(shadownet.Interpreter, model.out, batches)
    assert got_names == want_names
    for g_outputs, w_outputs in zip(got, want, strict=True):
        for g, w in zip(g_outputs, w_outputs, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            assert relative_error(g, w) <= TOLERANCE
    assert list(got_by_name) == list(want_by_name)
    for name, w in want_by_name.items():
        assert relative_error(got_by_name[name], w) <= TOLERANCE


@pytest.mark.parametrize("fixture", ["small_cnn", "two_by_two", "repeated_outputs", "non_float_io"])
def test_details_are_the_original_models(fixture, request):
    model = request.getfixturevalue(fixture)
    litert = LiteRTInterpreter(model_path=str(model.original))
    ours = shadownet.Interpreter(model_path=str(model.out))  # before allocate_tensors()
    for got, want in ((ours.get_input_details(), litert.get_input_details()),
                      (ours.get_output_details(), litert.get_output_details())):
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            for key in DETAIL_KEYS:
                assert np.array_equal(g[key], w[key]), key
            assert g["quantization_parameters"].keys() == w["quantization_parameters"].keys()
    runner_details, want_runner = ours.get_signature_runner(), litert.get_signature_runner()
    for g, w in ((runner_details.get_input_details(), want_runner.get_input_details()),
                 (runner_details.get_output_details(), want_runner.get_output_details())):
        assert list(g) == list(w)
        assert [d["index"] for d in g.values()] == [d["index"] for d in w.values()]
    ours.close()


def test_tensor_views_and_errors(small_cnn):
    (x,) = small_cnn.random_inputs()
    (want,) = small_cnn.reference(x)
    with shadownet.Interpreter(model_path=str(small_cnn.out)) as interpreter:
        interpreter.allocate_tensors()
        i = interpreter.get_input_details()[0]["index"]
        o = interpreter.get_output_details()[0]["index"]
        interpreter.tensor(i)()[...] = x  # LiteRT's zero-copy idiom
        interpreter.invoke()
        assert relative_error(interpreter.tensor(o)(), want) <= TOLERANCE
        assert np.array_equal(interpreter.get_tensor(i), x)
        interpreter.resize_tensor_input(i, list(x.shape))  # same shape: fine
        with pytest.raises(ValueError, match="fixed input shapes"):
            interpreter.resize_tensor_input(i, np.array([2, *x.shape[1:]], np.int32))
        with pytest.raises(ValueError, match=r"cannot resize to \[2, 16,"):  # ints, not np.int32(16)
            interpreter.resize_tensor_input(i, np.array([2, *x.shape[1:]], np.int32))
        with pytest.raises(ValueError, match="float64"):
            interpreter.set_tensor(i, x.astype(np.float64))
        with pytest.raises(ValueError, match="dimension mismatch"):
            interpreter.set_tensor(i, x[:, :8])
        with pytest.raises(ValueError, match="not an input or output"):
            interpreter.get_tensor(12345)
        with pytest.raises(ValueError, match="Invalid signature_key"):
            interpreter.get_signature_runner("nope")


def test_a_model_without_signature_has_none_and_a_closed_one_no_tensors(small_cnn, tmp_path):
    import warnings

    from converters.graph import write_model
    from converters.tflite_reader import read_model
    from shadownet.exceptions import ClosedError

    graph = read_model(small_cnn.original.read_bytes())
    graph.signature = None
    bare = tmp_path / "bare.tflite"
    bare.write_bytes(write_model(graph))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shadownet.convert(str(bare), str(tmp_path / "out"), seed=3)
    litert = LiteRTInterpreter(model_path=str(bare))
    ours = shadownet.Interpreter(model_path=str(tmp_path / "out"))
    assert ours.get_signature_list() == litert.get_signature_list() == {}
    for interpreter in (litert, ours):
        with pytest.raises(ValueError, match="0 Signatures"):
            interpreter.get_signature_runner()
        with pytest.raises(ValueError, match='Invalid signature_key provided: "nope"'):
            interpreter.get_signature_runner("nope")
    ours.allocate_tensors()
    i, o = ours.get_input_details()[0]["index"], ours.get_output_details()[0]["index"]
    output = ours.tensor(o)
    ours.close()
    with pytest.raises(ClosedError):  # not the values of before the close
        ours.get_tensor(o)
    with pytest.raises(ClosedError):  # nor a view taken before it (it returned them)
        output()
    with pytest.raises(ClosedError):  # nor written where nothing reads it (it was silently taken)
        ours.set_tensor(i, np.zeros(ours.get_input_details()[0]["shape"], np.float32))


def test_inputs_of_the_other_byte_order_are_taken_as_litert_takes_them(small_cnn):
    """A big-endian float32 array: LiteRT's set_tensor takes it; ours said 'got value of type >f4 but expected
    type float32' (a helper's probe). Now both APIs take it, and say that a batch is not resized."""
    (x,) = small_cnn.random_inputs()
    (want,) = small_cnn.reference(x)
    swapped = x.astype(x.dtype.newbyteorder(">"))
    with shadownet.Interpreter(model_path=str(small_cnn.out)) as interpreter:
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], swapped)
        interpreter.invoke()
        assert relative_error(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), want) \
            <= TOLERANCE
        runner = interpreter.get_signature_runner()
        (name,) = runner.get_input_details()
        with pytest.raises(ValueError, match="runs the batch it was converted at: resizing is not supported"):
            runner(**{name: np.concatenate([x, x])})
    with shadownet.load(small_cnn.out) as model:
        assert relative_error(model(swapped), want) <= TOLERANCE


def test_interpreter_needs_an_artifact_directory(small_cnn):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        shadownet.Interpreter(model_path=str(small_cnn.original))
    with pytest.raises(ArtifactError, match="artifact directory"):
        shadownet.Interpreter(model_content=small_cnn.original.read_bytes())


def test_an_output_repeated_or_passed_through_is_the_same_tensor(repeated_outputs):
    """Model(x, [y, x, y]): LiteRT lists three outputs, two tensors; so do the protected model's details,
    ``model(x)`` (a dict by name: one entry per tensor, the input's value exact) and get_tensor."""
    litert = LiteRTInterpreter(model_path=str(repeated_outputs.original))
    details = litert.get_output_details()
    assert len(details) == 3 and len({d["index"] for d in details}) == 2
    (x,) = repeated_outputs.random_inputs()
    want = repeated_outputs.reference(x)
    image = litert.get_input_details()[0]["name"]
    with shadownet.load(repeated_outputs.out) as model:
        got = model(x)
    assert set(got) == {d["name"] for d in details} and image in got
    for d, w in zip(details, want, strict=True):
        assert np.array_equal(got[d["name"]], x) if d["name"] == image else \
            relative_error(got[d["name"]], w) <= TOLERANCE
    ours = shadownet.Interpreter(model_path=str(repeated_outputs.out))
    indices = [d["index"] for d in ours.get_tensor_details()]  # each tensor once
    assert sorted(indices) == sorted({d["index"] for d in (*litert.get_input_details(), *details)})
    ours.allocate_tensors()
    ours.set_tensor(ours.get_input_details()[0]["index"], x)
    ours.invoke()
    for d, w in zip(ours.get_output_details(), want, strict=True):
        assert np.array_equal(ours.get_tensor(d["index"]), x) if d["name"] == image else \
            relative_error(ours.get_tensor(d["index"]), w) <= TOLERANCE
    ours.close()


def test_signature_names_that_are_the_other_inputs_tensor_names(tmp_path):
    """A signature may call tensor "b" "a" and tensor "a" "b" (legal TFLite): the runner feeds each value to
    the tensor its signature name stands for, as LiteRT's does (it fed them swapped, silently: a helper's
    probe); a mapping of names given to the model takes the tensor names, as ``get_input_details`` says."""
    import warnings

    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, Signature, write_model

    rng = np.random.default_rng(0)
    g = Graph()
    first, second = (g.add_tensor(name, (1, 4, 4, 3), np.float32) for name in ("b", "a"))
    results = []
    for x, scale in ((first, 1.0), (second, 10.0)):
        o = fb.Conv2DOptionsT()
        o.padding, o.strideH, o.strideW, o.dilationHFactor, o.dilationWFactor = fb.Padding.SAME, 1, 1, 1, 1
        weights = rng.standard_normal((4, 3, 3, 3)) * scale
        w = g.add_tensor(f"w{len(results)}", weights.shape, np.float32, weights)
        results.append(g.add_tensor(f"c{len(results)}", (1, 4, 4, 4), np.float32))
        g.add_op("CONV_2D", [x, w, -1], [results[-1]], o)
    y = g.add_tensor("y", (1, 4, 4, 4), np.float32)
    g.add_op("ADD", results, [y], fb.AddOptionsT())
    g.inputs, g.outputs = [first, second], [y]
    g.signature = Signature("serving_default", list(range(len(g.ops))), {"a": first, "b": second}, {"y": y})
    original = tmp_path / "swapped_names.tflite"
    original.write_bytes(write_model(g))
    from converters.calibration import calibration_inputs

    ones, zeros = np.ones((1, 4, 4, 3)), np.zeros((1, 4, 4, 3))
    (sample,) = calibration_inputs(g, {"b": ones, "a": zeros})  # by tensor name, as run takes them
    assert sample[0].min() == 1 and sample[1].max() == 0  # (the signature's names won there: a review)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shadownet.convert(str(original), str(tmp_path / "out"), seed=3)
    a, b = (rng.standard_normal((1, 4, 4, 3)).astype(np.float32) for _ in range(2))
    litert = LiteRTInterpreter(model_path=str(original))
    want = litert.get_signature_runner()(a=a, b=b)["y"]
    with shadownet.Interpreter(model_path=str(tmp_path / "out")) as ours:
        assert relative_error(ours.get_signature_runner()(a=a, b=b)["y"], want) <= TOLERANCE
    with shadownet.load(tmp_path / "out") as model:  # tensor "b" is signature input "a"
        assert relative_error(model({"b": a, "a": b}), want) <= TOLERANCE


def test_wrong_arguments_are_type_errors_as_litert_s(small_cnn, monkeypatch):
    """A tensor index that is not an int, a keyword LiteRT does not have, a delegate list that is a string:
    TypeError (a helper's probe: 0.5 and "0" read tensor 0, a misspelt keyword was taken, a path's
    characters were loaded one by one as delegates); what LiteRT takes as an index is taken (numpy's
    ints, 0-d arrays). An interpreter called from inside its own invoke says so."""
    from ai_edge_litert.interpreter import OpResolverType

    from shadownet.accelerator import AcceleratorWrapper

    with pytest.raises(TypeError, match="bogus"):
        shadownet.Interpreter(model_path=str(small_cnn.out), bogus=1)
    with pytest.raises(TypeError, match="experimental_delegates is a list"):
        shadownet.Interpreter(model_path=str(small_cnn.out), experimental_delegates="/x.so")
    with shadownet.Interpreter(model_path=str(small_cnn.out),
                               experimental_op_resolver_type=OpResolverType.AUTO) as interpreter:
        with pytest.raises(RuntimeError, match="allocate_tensors"):  # as LiteRT (it ran unallocated: a probe)
            interpreter.invoke()
        first = interpreter.get_input_details()[0]
        for use in (lambda: interpreter.get_tensor(first["index"]),
                    lambda: interpreter.tensor(first["index"])(),
                    lambda: interpreter.set_tensor(first["index"], np.zeros(first["shape"], np.float32))):
            with pytest.raises(ValueError, match="allocate_tensors"):  # as LiteRT's
                use()
        interpreter.allocate_tensors()
        index = interpreter.get_input_details()[0]["index"]
        for bad in (float(index), str(index), None):
            with pytest.raises(TypeError, match="a tensor index is an int"):
                interpreter.get_tensor(bad)
        interpreter.set_tensor(np.int64(index), np.zeros(interpreter.get_input_details()[0]["shape"],
                                                         np.float32))
        interpreter.get_tensor(np.array(index))
        interpreter.invoke()
        # One subgraph, as LiteRT says of a model with one (it ignored the index: a probe)
        for bad in (1, -1):
            with pytest.raises(ValueError, match=f"Invalid subgraph index {bad}"):
                interpreter.get_tensor(index, bad)
            with pytest.raises(ValueError, match=f"subgraph_index is out of range: {bad} for the model"):
                interpreter.get_tensor_details(bad)
        with pytest.raises(TypeError, match="a subgraph index is an int"):
            interpreter.get_tensor(index, "0")
        interpreter.get_tensor(index, np.int32(0))
    seen = []

    class CallsBack(AcceleratorWrapper):
        interpreter = None

        def run_round(self, r):
            self.inner.run_round(r)
            if r == 1 and CallsBack.interpreter is not None:
                try:
                    CallsBack.interpreter.invoke()  # waited for its own lock for ever (a review)
                except RuntimeError as exc:
                    seen.append(str(exc))

    import shadownet.interpreter as interpreter_module

    real_load = interpreter_module.load
    monkeypatch.setattr(interpreter_module, "load",
                        lambda *a, **kw: real_load(*a, accelerator=CallsBack, **kw))
    with shadownet.Interpreter(model_path=str(small_cnn.out)) as interpreter:
        interpreter.allocate_tensors()
        CallsBack.interpreter = interpreter
        interpreter.invoke()
        CallsBack.interpreter = None
        interpreter.invoke()
    assert len(seen) == 1 and "from inside a call of its own" in seen[0], seen


def test_an_open_batch_is_shown_fixed_as_the_protected_model_takes_it(keras, tmp_path):
    """A Keras model exported with an open batch: LiteRT's details give shape_signature [-1, ...], which
    the protected model's copied, so an app resized to a batch that resize_tensor_input then refused (a
    helper's probe). The protected model takes batch 1: its details say so."""
    import warnings

    import tensorflow as tf

    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3))
    original = tmp_path / "open.tflite"
    original.write_bytes(tf.lite.TFLiteConverter.from_keras_model(
        keras.Model(x, keras.layers.Conv2D(4, 3)(x))).convert())
    litert = LiteRTInterpreter(model_path=str(original))
    assert list(litert.get_input_details()[0]["shape_signature"]) == [-1, 8, 8, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # seeded
        shadownet.convert(str(original), str(tmp_path / "out"), seed=1)
    interpreter = shadownet.Interpreter(model_path=str(tmp_path / "out"))
    for protected, plain in ((interpreter.get_input_details(), litert.get_input_details()),
                             (interpreter.get_output_details(), litert.get_output_details())):
        assert [list(d["shape_signature"]) for d in protected] == [list(d["shape"]) for d in plain]
        assert [list(d["shape"]) for d in protected] == [list(d["shape"]) for d in plain]
    with pytest.raises(ValueError, match="fixed input shapes"):
        interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [2, 8, 8, 3])


@pytest.mark.parametrize("damaged", ["secrets.sealed", "untrusted.tflite"])
def test_a_tampered_model_is_a_value_error_as_litert_raises_for_a_model_it_cannot_open(small_cnn, tmp_path,
                                                                                         damaged):
    """An app's fallback for a model LiteRT cannot open (``except ValueError``) caught a missing file but not
    a tampered one, a SecurityError (a helper's probe)."""
    import shutil

    from shadownet.exceptions import SecurityError

    out = tmp_path / "out"
    shutil.copytree(small_cnn.out, out)
    data = bytearray((out / damaged).read_bytes())
    data[len(data) // 2] ^= 1
    (out / damaged).write_bytes(bytes(data))
    with pytest.raises(ValueError) as caught:
        shadownet.Interpreter(model_path=str(out))
    assert isinstance(caught.value, SecurityError), caught.value
