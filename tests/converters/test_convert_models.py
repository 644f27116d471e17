"""The models and tensors the converter takes - integer, bool and scalar tensors, several signatures, ops
that run in the TEE, shapes folded at batch 1 - and those it refuses, saying why."""

import dataclasses
import os
import re
import zipfile

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converters.fidelity import relative_error
from converters.graph import tiny_model_bytes
from converters.tflite_reader import read_model
from shadownet.exceptions import ModelFormatError, UnsupportedOpError
from tests.converters.driver import (
    TOLERANCE,
    TOLERANCES,
    Driver,
    conv_graph,
    conv_weights,
    litert,
    protect,
    runs_as_litert,
)


def test_bad_models(device, tmp_path):
    with pytest.raises(ModelFormatError):
        protect(b"not a model at all", tmp_path / "a", device)
    with pytest.raises(ModelFormatError):
        protect(tmp_path / "missing.tflite", tmp_path / "b", device)
    os.mkfifo(tmp_path / "fifo.tflite")  # read, it hung; /dev/zero filled the memory (a helper's probe)
    for special in (tmp_path / "fifo.tflite", "/dev/zero"):
        with pytest.raises(ModelFormatError, match="is not a regular file"):
            protect(special, tmp_path / "b", device)
    for name in ("junk.keras", "junk.h5"):  # named as a Keras file, not one: said so, TensorFlow untouched
        (tmp_path / name).write_bytes(b"junk")
        with pytest.raises(ModelFormatError, match="is not a Keras model file"):
            protect(tmp_path / name, tmp_path / "d", device)
    np.savez(tmp_path / "data.npz", x=np.zeros(3))  # a zip, as a .keras file is: said so, TF untouched
    with pytest.raises(ModelFormatError, match="zip archive but not a Keras model file"):
        protect(tmp_path / "data.npz", tmp_path / "d", device)
    with zipfile.ZipFile(tmp_path / "whole.keras", "w") as archive:  # cut short: not "no config.json in it"
        archive.writestr("config.json", "{}" * 1000)
    (tmp_path / "cut.keras").write_bytes((tmp_path / "whole.keras").read_bytes()[:-30])
    with pytest.raises(ModelFormatError, match="cut.keras is a damaged or truncated zip archive"):
        protect(tmp_path / "cut.keras", tmp_path / "d", device)
    with pytest.raises(UnsupportedOpError, match="nothing to protect"):
        protect(tiny_model_bytes(), tmp_path / "c", device)
    with pytest.raises(ValueError, match="unknown scheme"):
        protect(tiny_model_bytes(), tmp_path / "d", device, scheme="nope")


def test_inputs_and_outputs_it_cannot_protect_are_refused_first(tf, device, tmp_path):
    """Open dimensions besides the batch (LiteRT's file gives them size 1, which the converter would plan
    with) and complex outputs: refused by name."""
    import keras

    x = keras.Input((None, None, 3), name="image")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, padding="same")(x))
    spatial = keras.Model(x, pooled)
    with pytest.raises(ModelFormatError, match=r"'serving_default_image:0' has open dimensions \(shape "
                                               r"signature \[-1, -1, -1, 3\]\)"):
        protect(tf.lite.TFLiteConverter.from_keras_model(spatial).convert(), tmp_path / "out", device)
    assert not (tmp_path / "out").exists()
    graph = read_model(_complex_output_model(tf))
    assert sorted(graph.tensors[t].dtype.name for t in graph.outputs) == ["complex64", "float32"]
    with pytest.raises(UnsupportedOpError, match="model output '.+' is complex64"):
        protect(_complex_output_model(tf), tmp_path / "out", device)
    assert not (tmp_path / "out").exists()


def labelled_model(tf) -> bytes:
    """An int32 class label (an embedding's index, a factor used after the last conv), a bool mask read
    after a conv, a scalar made before the first round and used after the last, and the label passed
    through as an output."""
    rng = np.random.default_rng(11)
    table = tf.constant(rng.normal(size=(10, 16)).astype(np.float32))
    dense = tf.constant(rng.normal(0, 0.3, (16, 4 * 4 * 8)).astype(np.float32))
    up = tf.constant(rng.normal(0, 0.3, (3, 3, 4, 8)).astype(np.float32))
    w1, w2 = (tf.constant(rng.normal(0, 0.3, s).astype(np.float32)) for s in ((3, 3, 3, 4), (1, 1, 4, 2)))

    @tf.function(input_signature=[tf.TensorSpec((1,), tf.int32, name="label"),
                                  tf.TensorSpec((1, 8, 8, 3), tf.float32, name="image"),
                                  tf.TensorSpec((1, 8, 8, 1), tf.bool, name="keep")])
    def model(label, image, keep):
        h = tf.reshape(tf.nn.relu(tf.matmul(tf.gather(table, label), dense)), (1, 4, 4, 8))
        upsampled = tf.nn.conv2d_transpose(h, up, (1, 8, 8, 4), 2, "SAME")
        scale = tf.reduce_max(image) + 1.0
        mixed = tf.where(keep, tf.nn.conv2d(image, w1, 1, "SAME"), upsampled)
        out = tf.nn.conv2d(mixed, w2, 1, "SAME") * tf.cast(label[0] + 1, tf.float32) * scale
        return {"out": out, "label": label}

    return tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()


def test_integer_and_bool_inputs_and_scalars_cross_between_steps(tf, device, tmp_path):
    """Integer and bool inputs were refused, and a scalar made in one TEE step and read in another came out
    stale (LiteRT's Python API gives no view of a rank-0 tensor); both cross now (converters/non_float.py,
    plan_tee._scalar_io). Calibration feeds such inputs zeros by default, or the values given, which must
    be the input's."""
    model = labelled_model(tf)
    details = Interpreter(model_content=model).get_input_details()
    assert [d["dtype"].__name__ for d in details] == ["int32", "float32", "bool"]
    protect(model, tmp_path / "out", device)
    rng = np.random.default_rng(5)
    with Driver(device, tmp_path / "out") as run:
        for label in (0, 4, 9):
            xs = [np.array([label], np.int32), rng.standard_normal((1, 8, 8, 3)).astype(np.float32),
                  rng.uniform(size=(1, 8, 8, 1)) > 0.5]
            got, want = run(*xs), litert(model, *xs)
            assert [(g.dtype, g.shape) for g in got] == [(w.dtype, w.shape) for w in want]
            assert relative_error(got, want) <= TOLERANCE
    names = [d["name"] for d in details]
    calibration = {names[0]: np.array([[2], [7]]), names[1]: rng.standard_normal((2, 8, 8, 3)),
                   names[2]: np.zeros((2, 8, 8, 1), bool)}
    protect(model, tmp_path / "calibrated", device, calibration=calibration)
    with pytest.raises(ModelFormatError, match=f"calibration '{names[0]}' holds values a int32 input"):
        protect(model, tmp_path / "bad", device,
                calibration={**calibration, names[0]: np.array([[2.5], [7]])})


def _complex_output_model(tf) -> bytes:
    @tf.function(input_signature=[tf.TensorSpec((1, 6, 6, 2), tf.float32)])
    def model(x):
        y = tf.nn.conv2d(x, tf.constant(np.ones((3, 3, 2, 4), np.float32)), 1, "SAME")
        return {"y": y, "spectrum": tf.cast(y, tf.complex64)}

    return tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()


def test_a_model_of_several_signatures_is_protected_one_signature_at_a_time(tf, device, tmp_path):
    """read_model reads subgraph 0 only: a model of several signatures was refused. Now the one named is
    protected (--signature KEY), and runs as LiteRT's signature runner of it on the original does."""
    rng = np.random.default_rng(4)
    w1 = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
    w2 = tf.constant(rng.normal(0, 0.3, (8, 5)).astype(np.float32))

    class TwoSignatures(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32, name="image")])
        def features(self, image):
            return {"features": tf.nn.relu(tf.nn.conv2d(image, w1, 1, "SAME"))}

        @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32, name="image")])
        def classify(self, image):
            pooled = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(image, w1, 1, "SAME")), [1, 2])
            return {"logits": tf.matmul(pooled, w2)}

    module = TwoSignatures()
    model = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.features.get_concrete_function(), module.classify.get_concrete_function()], module).convert()
    original = Interpreter(model_content=model)
    assert sorted(original.get_signature_list()) == ["classify", "features"]
    with pytest.raises(UnsupportedOpError, match=r"2 signatures \('classify', 'features'\).*--signature KEY"):
        protect(model, tmp_path / "out", device)
    with pytest.raises(ValueError, match="no signature 'serving_default' .it has 'classify', 'features'"):
        protect(model, tmp_path / "out", device, signature="serving_default")
    with pytest.raises(ValueError, match="no signature 'classify' .it has none"):
        protect(tiny_model_bytes(), tmp_path / "out", device, signature="classify")
    assert not (tmp_path / "out").exists()
    x = np.random.default_rng(5).standard_normal((1, 8, 8, 3)).astype(np.float32)
    for key, rounds in (("classify", 2), ("features", 1)):
        manifest = protect(model, tmp_path / key, device, signature=key)
        assert manifest["signature"]["key"] == key and len(manifest["rounds"]) == rounds
        (want,) = original.get_signature_runner(key)(image=x).values()
        with Driver(device, tmp_path / key) as run:
            (got,) = run(x)
        assert got.shape == want.shape and relative_error(got, want) <= TOLERANCE


def test_a_scalar_input_and_an_integer_divisor(tf, device, tmp_path):
    """A rank-0 float input (a gain) crashed calibration (IndexError, a traceback); a model that divides by an
    integer input could not be converted at all: LiteRT's first run fed it zeros even when calibration
    inputs were given. Now the first calibration input is that run's; without one the refusal names the
    failure."""
    kernel = tf.constant(np.random.default_rng(13).normal(0, 0.3, (3, 3, 3, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32, name="image"),
                                  tf.TensorSpec((), tf.float32, name="gain"),
                                  tf.TensorSpec((1,), tf.int32, name="divisor")])
    def scaled(image, gain, divisor):
        quotient = tf.cast(tf.math.floordiv(tf.constant([12], tf.int32), divisor), tf.float32)
        return tf.nn.conv2d(image, kernel, 1, "SAME") * gain * quotient

    converter = tf.lite.TFLiteConverter.from_concrete_functions([scaled.get_concrete_function()], scaled)
    model = converter.convert()
    details = Interpreter(model_content=model).get_input_details()
    names, shapes = [d["name"] for d in details], [tuple(d["shape"]) for d in details]
    assert sorted(shapes) == [(), (1,), (1, 8, 8, 3)]
    with pytest.raises(ModelFormatError, match="LiteRT cannot run the model: .*[Dd]ivision by 0"):
        protect(model, tmp_path / "zeros", device)
    rng = np.random.default_rng(7)
    values = {(): np.array([0.5, 2.0], np.float32), (1,): np.array([[3], [4]], np.int32),
              (1, 8, 8, 3): rng.standard_normal((2, 8, 8, 3)).astype(np.float32)}
    # A calibration value the model refuses: the input named, in the first sample or a later one (an internal
    # error, before).
    for divisors, where in (([[0], [4]], "the first calibration input"), ([[3], [0]], "a calibration input")):
        bad = {**values, (1,): np.array(divisors, np.int32)}
        with pytest.raises(ModelFormatError, match=f"LiteRT cannot run the model on {where}: .*ivision by 0"):
            protect(model, tmp_path / "bad", device,
                    calibration={n: bad[s] for n, s in zip(names, shapes, strict=True)})
    protect(model, tmp_path / "out", device,
            calibration={n: values[s] for n, s in zip(names, shapes, strict=True)})
    with Driver(device, tmp_path / "out") as run:
        for gain, divisor in ((1.5, 5), (-0.25, 2)):
            by_shape = {(): np.array(gain, np.float32), (1,): np.array([divisor], np.int32),
                        (1, 8, 8, 3): rng.standard_normal((1, 8, 8, 3)).astype(np.float32)}
            xs = [by_shape[s] for s in shapes]
            assert relative_error(run(*xs), litert(model, *xs)) <= TOLERANCE


def _nms_model(tf, computed_count: bool) -> bytes:
    """Boxes and scores from two convs, then non-maximum suppression of at most 10 boxes (or of as many as
    have a positive score: a count computed from the data)."""
    rng = np.random.default_rng(12)
    w, v = (tf.constant(rng.normal(0, 0.3, s).astype(np.float32)) for s in ((3, 3, 3, 4), (1, 1, 3, 1)))

    @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32)])
    def model(x):
        b = tf.reshape(tf.nn.conv2d(x, w, 1, "SAME"), (64, 4))
        boxes = tf.concat([tf.minimum(b[:, :2], b[:, 2:]), tf.maximum(b[:, :2], b[:, 2:])], 1)
        scores = tf.reshape(tf.reduce_mean(tf.nn.conv2d(x, v, 1, "SAME"), [0, 3]), (64,))
        most = tf.reduce_sum(tf.cast(scores > 0, tf.int32)) if computed_count else 10
        picked, _, count = tf.raw_ops.NonMaxSuppressionV5(
            boxes=boxes, scores=scores, max_output_size=most, iou_threshold=0.5, score_threshold=-100.0,
            soft_nms_sigma=0.0, pad_to_max_output_size=True)
        return {"picked": picked, "count": count, "boxes": tf.gather(boxes, picked)}

    return tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()


def test_non_maximum_suppression_of_a_constant_count_runs_in_the_tee(tf, device, tmp_path):
    """A detection head's NON_MAX_SUPPRESSION was refused as data-shaped; its outputs have max_output_size
    rows (padded), a shape fixed when that count is a constant: then it runs, its int32 indices and scalar
    count as LiteRT's. A computed count is refused, naming the tensor."""
    model = _nms_model(tf, computed_count=False)
    assert any(op.kind == "NON_MAX_SUPPRESSION_V5" for op in read_model(model).ops)
    protect(model, tmp_path / "out", device)
    for want in runs_as_litert(device, tmp_path / "out", model, np.random.default_rng(6), 3, TOLERANCE):
        assert sorted(w.shape for w in want) == [(), (10,), (10, 4)]
    with pytest.raises(UnsupportedOpError, match="NON_MAX_SUPPRESSION_V5 .* its shape from the computed"):
        protect(_nms_model(tf, computed_count=True), tmp_path / "computed", device)


def test_top_k_and_sort_of_an_open_batch_run_in_the_tee(tf, device, tmp_path):
    """TOPK_V2 (``tf.math.top_k``, ``tf.sort``) in a model of open batch converted, then failed at load ("TEE
    program not understood": the batch's -1 left in the TEE program's shape signatures made LiteRT leave
    its outputs unallocated until a run; a helper's probe). The TEE program's shapes are static now."""
    w = tf.constant(np.random.default_rng(2).normal(0, 0.3, (20, 16)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec((None, 20), tf.float32)])
    def model(x):
        h = tf.matmul(x, w)
        values, indices = tf.math.top_k(h, 3)
        return {"values": values, "indices": indices, "sorted": tf.sort(h, direction="DESCENDING")}

    function = model.get_concrete_function()
    original = tf.lite.TFLiteConverter.from_concrete_functions([function], model).convert()
    assert any(op.kind == "TOPK_V2" for op in read_model(original).ops)
    protect(original, tmp_path / "out", device)
    for want in runs_as_litert(device, tmp_path / "out", original, np.random.default_rng(3), 3, TOLERANCE):
        assert sorted(w.shape for w in want) == [(1, 3), (1, 3), (1, 16)]


def non_float_model(tf) -> bytes:
    """A comparison's bool mask read after the next conv, an argmax's indices that pick channels after it,
    and int64, bool and int8 outputs."""
    rng = np.random.default_rng(9)
    w1, w2, w3 = (tf.constant(rng.normal(0, 0.3, s).astype(np.float32))
                  for s in ((3, 3, 3, 8), (3, 3, 8, 8), (3, 3, 3, 4)))

    @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32)])
    def model(image):
        h = tf.nn.conv2d(image, w1, 1, "SAME")
        positive = h > 0
        picks = tf.cast(tf.argmax(h, -1), tf.int32)[0, 0, :3]
        h2 = tf.nn.conv2d(h, w2, 1, "SAME")
        chosen = tf.gather(tf.where(positive, h2, -0.5 * h2), picks, axis=-1)
        y = tf.nn.conv2d(chosen, w3, 1, "SAME")
        return {"y": y, "labels": tf.argmax(y, -1), "positive": positive, "signs": tf.cast(y > 0, tf.int8)}

    return tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model).convert()


@pytest.mark.parametrize("scheme", [None, "shadownet"])
def test_non_float_tensors_cross_between_steps_and_leave_as_outputs(tf, device, tmp_path, scheme):
    """Tensors other than float32 that a later TEE step reads, or that are outputs, cross the TA's float32
    buffers encoded (converters/non_float.py); both were refused ("(bool) crosses between TEE steps",
    "model output ... is int64"). Outputs as LiteRT's: same types, the integers and bools identical."""
    model = non_float_model(tf)
    graph = read_model(model)
    made = {graph.tensors[t].dtype.name for op in graph.ops for t in op.outputs}
    assert {"bool", "int32", "int64", "int8"} <= made
    manifest = protect(model, tmp_path / "out", device, scheme=scheme)
    assert len(manifest["rounds"]) == 3
    want_types = [d["dtype"].__name__ for d in Interpreter(model_content=model).get_output_details()]
    assert [t["dtype"] for t in manifest["outputs"]] == want_types
    assert sorted(want_types) == ["bool", "float32", "int64", "int8"]
    tolerance = TOLERANCES[manifest["scheme"]["name"]]  # (integers and bools: exact)
    for want in runs_as_litert(device, tmp_path / "out", model, np.random.default_rng(3), 4, tolerance):
        assert any(w.dtype == np.bool_ and w.any() and not w.all() for w in want)


def test_calibration_file_and_keras_input(tf, device, tmp_path):
    import keras
    keras.utils.set_random_seed(5)
    x = keras.Input((8, 8, 3), batch_size=1, name="pixels")
    y = keras.layers.Dense(3)(keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(x)))
    path = tmp_path / "model.keras"
    keras.Model(x, y).save(path)
    original = tf.lite.TFLiteConverter.from_keras_model(keras.models.load_model(path)).convert()
    name = Interpreter(model_content=original).get_input_details()[0]["name"]
    np.savez(tmp_path / "cal.npz", **{name: np.random.default_rng(1).uniform(0, 1, (6, 8, 8, 3))})
    manifest = protect(path, tmp_path / "out", device, calibration=tmp_path / "cal.npz")
    assert manifest["inputs"][0]["name"] == name
    xs = [np.random.default_rng(2).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)]
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(*xs), litert(original, *xs)) <= TOLERANCE
    with pytest.raises(ModelFormatError, match="calibration"):
        protect(path, tmp_path / "bad", device, calibration={"other": np.zeros((1, 2))})


def _reshape_to_a_computed_shape(g, x, y):
    """RESHAPE's shape computed at run time (SHAPE of a tensor, as an open batch leaves a Flatten)."""
    from ai_edge_litert import schema_py_generated as fb

    shape = g.add_tensor("new_shape", (4,), np.int32)
    options = fb.ShapeOptionsT()
    options.outType = fb.TensorType.INT32
    g.add_op("SHAPE", [y], [shape], options)
    z = g.add_tensor("z", (1, 6, 6, 4), np.float32)
    g.add_op("RESHAPE", [y, shape], [z], fb.ReshapeOptionsT())
    g.outputs = [z]


def _reshape_to_a_data_dependent_shape(g, x, y):
    """RESHAPE's shape computed from the data: ``[1, 6, 6, 4] + 0 * max(int(x))``, always the same, but not
    from shapes alone (``converters.shape_folding``), so not a constant the TEE program can hold."""
    from ai_edge_litert import schema_py_generated as fb

    def tensor(name, shape, value=None):
        return g.add_tensor(name, shape, np.int32, None if value is None else np.array(value, np.int32))

    as_int, top, zero_top, shape = tensor("x_int", (1, 6, 6, 3)), tensor("x_max", ()), tensor("zero", ()), \
        tensor("new_shape", (4,))
    g.add_op("CAST", [x], [as_int])
    g.add_op("REDUCE_MAX", [as_int, tensor("axes", (4,), [0, 1, 2, 3])], [top], fb.ReducerOptionsT())
    g.add_op("MUL", [top, tensor("nought", (), 0)], [zero_top], fb.MulOptionsT())
    g.add_op("ADD", [tensor("base", (4,), [1, 6, 6, 4]), zero_top], [shape], fb.AddOptionsT())
    z = g.add_tensor("z", (1, 6, 6, 4), np.float32)
    g.add_op("RESHAPE", [y, shape], [z], fb.ReshapeOptionsT())
    g.outputs = [z]


def _divided_by_a_sum_of_its_shape(data_shaped: bool):
    """``y / sum(float(SHAPE(t)))``: with ``t = y`` a float made of a shape alone, folded at batch 1 (a
    review's model, which converted, then failed to load, when only integers were folded); with ``t =
    WHERE(y > 0)``, whose size is data, a value of the data, refused (it converted, then failed to load)."""
    from ai_edge_litert import schema_py_generated as fb

    def extend(g, x, y):
        source = y
        if data_shaped:
            positive = g.add_tensor("positive", (1, 6, 6, 4), np.bool_)
            g.add_op("GREATER", [y, g.add_tensor("nought", (), np.float32, np.float32(0))], [positive])
            source = g.add_tensor("w", (1, 4), np.int64, shape_signature=(-1, 4))
            g.add_op("WHERE", [positive], [source])
        rank = len(g.tensors[source].shape)
        shape, as_float = g.add_tensor("s", (rank,), np.int32), g.add_tensor("f", (rank,), np.float32)
        options = fb.ShapeOptionsT()
        options.outType = fb.TensorType.INT32
        g.add_op("SHAPE", [source], [shape], options)
        g.add_op("CAST", [shape], [as_float])
        total = g.add_tensor("total", (), np.float32)
        g.add_op("SUM", [as_float, g.add_tensor("axis", (1,), np.int32, np.array([0], np.int32))], [total],
                 fb.ReducerOptionsT())
        z = g.add_tensor("z", (1, 6, 6, 4), np.float32)
        g.add_op("DIV", [y, total], [z], fb.DivOptionsT())
        g.outputs = [z]

    return conv_graph(extend=extend)


def _open_batch_reshape() -> bytes:
    """The same with an open batch, as TensorFlow writes a Keras model's: the reshaped tensor's shape in the
    file is a placeholder ([1, 1, 1, 1]), which LiteRT replaces at batch 1."""
    from ai_edge_litert import schema_py_generated as fb

    from converters.graph import Graph, write_model

    g = Graph()
    x = g.add_tensor("x", (1, 6, 6, 3), np.float32, shape_signature=(-1, 6, 6, 3))
    w = conv_weights((0, 0, 0, 0), None)
    b = g.add_tensor("b", (4,), np.float32, np.zeros(4, np.float32))
    y = g.add_tensor("y", (1, 6, 6, 4), np.float32, shape_signature=(-1, 6, 6, 4))
    options = fb.Conv2DOptionsT()
    options.padding, options.strideH, options.strideW = fb.Padding.SAME, 1, 1
    g.add_op("CONV_2D", [x, g.add_tensor("w", w.shape, np.float32, w), b], [y], options)
    g.inputs = [x]
    _reshape_to_a_computed_shape(g, x, y)
    z = g.outputs[0]
    g.tensors[z] = dataclasses.replace(g.tensors[z], shape=(1, 1, 1, 1), shape_signature=(-1, -1, -1, -1))
    return write_model(g)


def _two_signatures() -> bytes:
    """The test conv as two signatures, the second reading its output through a ReLU."""
    from converters.graph import Signature, write_model

    def relu(g, x, y):
        r = g.add_tensor("r", (1, 6, 6, 4), np.float32)
        g.add_op("RELU", [y], [r])
        g.outputs = [y, r]

    g = read_model(conv_graph(extend=relu))
    (x,), (y, r) = g.inputs, g.outputs
    return write_model(g, [Signature("conv", [0], {"x": x}, {"y": y}),
                           Signature("conv_relu", [0, 1], {"x": x}, {"r": r})])


def _named(g, name):
    return [t.name for t in g.tensors].index(name)


@pytest.mark.parametrize("model,error,message", [
    (lambda: conv_graph(extend=_reshape_to_a_data_dependent_shape), UnsupportedOpError,
     "RESHAPE (output 'z') takes its shape from the computed tensor 'new_shape'"),
    (lambda: _divided_by_a_sum_of_its_shape(data_shaped=True), UnsupportedOpError,
     "WHERE (output 'w'): its output's shape depends on the data"),
    (_two_signatures, UnsupportedOpError,  # the second was left out without a word
     "the model has 2 signatures ('conv', 'conv_relu'): a protected model runs one; choose it with "
     "--signature"),
    (lambda: conv_graph(extend=lambda g, x, y: setattr(g, "outputs", [y, _named(g, "b")])),
     UnsupportedOpError, "model output 'b' is a constant"),
    (lambda: conv_graph(extend=lambda g, x, y: setattr(g, "outputs", [x])), UnsupportedOpError,
     "every model output is a model input"),
    (lambda: conv_graph(conv_weights((1, 1, 1, 1), np.nan)), ModelFormatError,
     "CONV_2D (output 'y'): 'w' holds NaN or infinite values"),
    (lambda: conv_graph(conv_weights((2, 0, 0, 0), np.inf)), ModelFormatError,
     "'w' holds NaN or infinite values"),
    (lambda: conv_graph(conv_weights((2, 0, 0, 0), -3e9)), ModelFormatError,
     "'w' holds a value of magnitude 3e+09, beyond any trained model's"),
])
def test_what_the_tee_program_cannot_hold_is_refused_at_conversion(model, error, message, device, tmp_path):
    """Each refusal SECURITY.md lists (found by fuzzing), on a model LiteRT itself runs: one clear error
    naming the op and tensor, nothing written; the same model with sound weights converts."""
    with pytest.raises(error, match=re.escape(message)):
        protect(model(), tmp_path / "out", device)
    assert not (tmp_path / "out").exists()
    assert protect(conv_graph(), tmp_path / "sound", device)["format"]


@pytest.mark.parametrize("model", [lambda: conv_graph(extend=_reshape_to_a_computed_shape),
                                   _open_batch_reshape, lambda: _divided_by_a_sum_of_its_shape(False)])
def test_shapes_computed_from_shapes_are_folded_at_batch_1(model, device, tmp_path):
    """A RESHAPE to ``SHAPE(y)`` - what TensorFlow writes for an open batch - converts: the shape is a
    constant at batch 1 (``converters.shape_folding``); both were refused, the open-batch one as a
    "corrupt TFLite model" (its placeholder shape in the file)."""
    original = model()
    protect(original, tmp_path / "out", device)
    xs = [np.random.default_rng(i).standard_normal((1, 6, 6, 3)).astype(np.float32) for i in range(3)]
    with Driver(device, tmp_path / "out") as run:
        for x in xs:
            assert relative_error(run(x), litert(original, x)) <= TOLERANCE
