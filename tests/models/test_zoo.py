import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from ai_edge_litert.tools import flatbuffer_utils

from models import zoo
from models.yolo import detect
from shadownet.exceptions import InputError

EXPECTED_OPS = {
    "mobilenet": {"CONV_2D": 15, "DEPTHWISE_CONV_2D": 13, "MEAN": 1, "RESHAPE": 1, "SOFTMAX": 1},
    "resnet44": {"CONV_2D": 45, "ADD": 21, "MEAN": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "resnet404": {"CONV_2D": 405, "ADD": 201, "MEAN": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1},
    "minivgg": {"CONV_2D": 4, "MAX_POOL_2D": 2, "RESHAPE": 1, "FULLY_CONNECTED": 2, "SOFTMAX": 1},
    "yolov4-tiny": {
        "PAD": 2, "CONV_2D": 21, "LEAKY_RELU": 19, "SPLIT": 3, "CONCATENATION": 7, "MAX_POOL_2D": 3,
        "RESIZE_NEAREST_NEIGHBOR": 1,
    },
}
INPUT_SHAPES = {
    "mobilenet": (1, 224, 224, 3), "resnet44": (1, 32, 32, 3), "resnet404": (1, 32, 32, 3),
    "minivgg": (1, 32, 32, 3), "yolov4-tiny": (1, 416, 416, 3),
}
OUTPUT_SHAPES = {
    "mobilenet": [(1, 1000)], "resnet44": [(1, 10)], "resnet404": [(1, 10)], "minivgg": [(1, 10)],
    "yolov4-tiny": [(1, 13, 13, 255), (1, 26, 26, 255)],
}
# The heavy exports (about a minute each on 2 cores) are marked, still part of the default run.
NAMES = [pytest.param(name, marks=pytest.mark.slow) if name == "resnet404" else name for name in zoo.NAMES]
OP_NAMES = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}


def read(path):
    return flatbuffer_utils.read_model_from_bytearray(bytearray(path.read_bytes()))


def op_kinds(model) -> list[str]:
    codes = model.operatorCodes
    return [OP_NAMES[max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode)]
            for op in model.subgraphs[0].operators]


def random_inputs(shape, count=6):
    """Plain random inputs of the kinds other code feeds a model: N(0, 1), U(0, 1), U(-1, 1)."""
    rng = np.random.default_rng(1234)
    makers = (rng.standard_normal, rng.random, lambda s: rng.uniform(-1.0, 1.0, s))
    return [makers[i % 3](shape).astype(np.float32) for i in range(count)]


@pytest.mark.parametrize("name", NAMES)
def test_each_model_runs_in_litert_with_the_papers_shapes(exported, name):
    interpreter = Interpreter(model_path=str(exported(name)), num_threads=2)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    assert tuple(inp["shape"]) == INPUT_SHAPES[name] and inp["dtype"] == np.float32
    interpreter.set_tensor(inp["index"], random_inputs(INPUT_SHAPES[name], 1)[0])
    interpreter.invoke()
    outputs = interpreter.get_output_details()
    assert sorted(tuple(o["shape"]) for o in outputs) == sorted(OUTPUT_SHAPES[name])
    for output in outputs:
        assert output["dtype"] == np.float32
        assert np.all(np.isfinite(interpreter.get_tensor(output["index"])))
    # The signature keeps the Keras output order, whatever the subgraph's output order.
    runner = interpreter.get_signature_runner("serving_default")
    shapes = [tuple(d["shape"]) for d in runner.get_output_details().values()]
    assert shapes == OUTPUT_SHAPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_op_structure_batch_norm_folded_into_the_convolutions(exported, name):
    model = read(exported(name))
    assert Counter(op_kinds(model)) == EXPECTED_OPS[name]
    assert zoo.op_counts(exported(name)) == Counter(EXPECTED_OPS[name])
    tensors = model.subgraphs[0].tensors
    for kind, op in zip(op_kinds(model), model.subgraphs[0].operators, strict=True):
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            # Keras built them without bias (batch norm follows); a constant bias means it was folded.
            assert len(op.inputs) == 3 and op.inputs[2] >= 0
            assert model.buffers[tensors[op.inputs[2]].buffer].data is not None


def test_litert_computes_what_keras_computes_with_batch_norm_folded(exported):
    from models.zoo import build_keras

    model = build_keras("minivgg", seed=0)
    interpreter = Interpreter(model_path=str(exported("minivgg")), num_threads=2)
    interpreter.allocate_tensors()
    for x in random_inputs(INPUT_SHAPES["minivgg"], 3):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        litert = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        np.testing.assert_allclose(litert, np.asarray(model(x, training=False)), rtol=1e-4, atol=1e-6)


def test_mobilenet_fuses_relu6_into_every_linear_op_but_the_classifier(exported):
    model = read(exported("mobilenet"))
    fused = [op.builtinOptions.fusedActivationFunction
             for kind, op in zip(op_kinds(model), model.subgraphs[0].operators, strict=True)
             if kind in ("CONV_2D", "DEPTHWISE_CONV_2D")]
    relu6 = schema.ActivationFunctionType.RELU6
    assert fused[:-1] == [relu6] * 27 and fused[-1] == schema.ActivationFunctionType.NONE


@pytest.mark.parametrize("name", NAMES)
def test_activations_keep_a_healthy_scale_and_outputs_are_far_from_uniform(exported, name):
    # Without XNNPACK every op's output is a tensor of its own that the interpreter can keep.
    interpreter = Interpreter(
        model_path=str(exported(name)), num_threads=2, experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    ops = [op for op in interpreter._get_ops_details() if op["op_name"] != "SOFTMAX"]
    winners, detections = [], []
    for x in random_inputs(INPUT_SHAPES[name]):
        interpreter.set_tensor(index, x)
        interpreter.invoke()
        for op in ops:
            std = float(interpreter.get_tensor(op["outputs"][0]).std())
            assert 0.1 <= std <= 10.0, f"op {op['index']} {op['op_name']}: activation std {std:.3g}"
        outputs = [interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()]
        if name == "yolov4-tiny":
            detections.append(len(detect(outputs)))
            continue
        (probabilities,) = outputs
        classes = probabilities.shape[-1]
        log_probabilities = np.log(probabilities[0])
        assert np.all(np.isfinite(log_probabilities))
        assert 0.1 <= log_probabilities.std() <= 100.0
        assert probabilities.max() >= 2.0 / classes
        winners.append(int(probabilities.argmax()))
    if name == "yolov4-tiny":
        # Calibrated like a trained detector: a few boxes per image, not none and not thousands.
        assert 0 < sum(detections) and max(detections) < 100
    else:
        assert len(set(winners)) >= 2, "the classifier gives every random input the same class"


def test_same_seed_gives_identical_bytes_across_processes_and_the_cli_prints_one_line(exported, tmp_path):
    path = tmp_path / "minivgg.tflite"
    done = subprocess.run(
        [sys.executable, "-m", "shadownet", "zoo", "minivgg", "--seed", "0", "-o", str(path)],
        capture_output=True, text=True, check=False,
        env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [f"wrote {path} (8.7 MB, 10 ops)"]
    assert path.read_bytes() == exported("minivgg").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["minivgg.tflite"]  # no temporary file left


def test_same_seed_in_one_process_is_identical_and_another_seed_changes_every_weight(exported, tmp_path):
    zoo.export("minivgg", tmp_path / "again.tflite", seed=0, verbose=False)
    assert (tmp_path / "again.tflite").read_bytes() == exported("minivgg").read_bytes()
    zoo.export("minivgg", tmp_path / "seed1.tflite", seed=1, verbose=False)

    def weights(path):
        model = read(path)
        tensors = model.subgraphs[0].tensors
        return [model.buffers[tensors[op.inputs[1]].buffer].data
                for kind, op in zip(op_kinds(model), model.subgraphs[0].operators, strict=True)
                if kind in ("CONV_2D", "FULLY_CONNECTED")]

    for w0, w1 in zip(weights(exported("minivgg")), weights(tmp_path / "seed1.tflite"), strict=True):
        assert w0.shape == w1.shape and not np.array_equal(w0, w1)


def test_batch_norm_statistics_are_calibrated_layer_by_layer_and_the_head_centred():
    from models.backend import require_tensorflow
    from models.calibrate import (
        calibrate_head,
        he_initialize,
        random_images,
        randomize_batch_norms,
        set_batch_norm_statistics,
    )

    _, keras = require_tensorflow()
    inputs = keras.Input((16, 16, 3))
    x = inputs
    for i in range(6):
        x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(x))
    rng = np.random.default_rng(7)
    images = random_images(rng, 16, (16, 16, 3))
    he_initialize(model, rng)
    randomize_batch_norms(model, rng)
    set_batch_norm_statistics(model, images)
    calibrate_head(model, "logits", images, scale=3.0, per_channel=False)

    for i in range(6):
        bn = model.get_layer(f"bn{i}")
        assert bn.momentum == 0.99  # restored after the calibration pass
        assert not np.allclose(bn.moving_mean, 0.0) and not np.allclose(bn.moving_variance, 1.0)
        assert not np.allclose(bn.gamma, 1.0) and not np.allclose(bn.beta, 0.0)
        # In inference mode each batch norm's output has mean beta and std gamma on the calibration batch.
        out = np.asarray(keras.Model(model.input, bn.output)(images, training=False)).reshape(-1, 8)
        np.testing.assert_allclose(out.mean(axis=0), np.asarray(bn.beta), atol=2e-3)
        np.testing.assert_allclose(out.std(axis=0), np.asarray(bn.gamma), rtol=2e-3)
    logits = np.asarray(model(images, training=False))
    np.testing.assert_allclose(logits.mean(axis=0), 0.0, atol=1e-4)
    assert logits.std() == pytest.approx(3.0, rel=1e-3)


def test_unknown_names_and_training_sets_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown zoo model 'vgg16'"):
        zoo.export("vgg16", tmp_path / "x.tflite")
    with pytest.raises(InputError, match="only available for minivgg"):
        zoo.export("resnet44", tmp_path / "x.tflite", train="digits")
    with pytest.raises(InputError, match="only available for minivgg"):
        zoo.export("minivgg", tmp_path / "x.tflite", train="cifar10")
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        zoo.export("minivgg", tmp_path / "missing" / "x.tflite")
    (tmp_path / "dir.tflite").mkdir()
    with pytest.raises(IsADirectoryError, match="dir.tflite"):  # it was refused after the build
        zoo.export("minivgg", tmp_path / "dir.tflite")
    (tmp_path / "dir.tflite").rmdir()
    for other in ("m.onnx", "m.H5", "m.keras"):  # TFLite bytes were written under the name
        with pytest.raises(InputError, match=rf"{other} names a \.\w+ file, but the zoo exports TFLite"):
            zoo.export("minivgg", tmp_path / other)
    from shadownet.cli import main

    (tmp_path / "x.npy").write_bytes(b"the user's array")  # named before "exists: --force replaces it"
    assert main(["zoo", "minivgg", "-o", str(tmp_path / "x.npy"), "--force"]) == 1
    assert capsys.readouterr().err.strip().endswith("x.npy names a .npy file, but the zoo exports TFLite: "
                                                    "name it .tflite")
    (tmp_path / "x.npy").unlink()
    for seed in (-1, 2**32, True, 1.0, "1"):  # Keras's errors, or taken (a helper's sweep)
        with pytest.raises(InputError, match=r"seed must be an integer from 0 to 2\*\*32 - 1"):
            zoo.export("minivgg", tmp_path / "x.tflite", seed=seed)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_test_split_destination_is_refused_before_training_and_writes_nothing(tmp_path):
    """``--train digits`` with a directory where the test split goes: the model file was replaced after 25 s
    of training, then the split failed (a helper's probe). Both destinations are checked first."""
    model = tmp_path / "t.tflite"
    model.write_bytes(b"the user's earlier file")
    (tmp_path / "t.testset.npz").mkdir()
    with pytest.raises(IsADirectoryError, match="t.testset.npz"):
        zoo.export("minivgg", model, train="digits")
    assert model.read_bytes() == b"the user's earlier file"


def test_without_tensorflow_the_error_names_the_extra(monkeypatch):
    from models.backend import TensorFlowMissingError, require_tensorflow
    from shadownet.exceptions import ShadowNetError

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # makes `import tensorflow` fail
    with pytest.raises(TensorFlowMissingError, match=r"pip install 'shadownet\[tf\]'") as info:
        require_tensorflow()
    assert isinstance(info.value, ShadowNetError)


def test_importing_the_zoo_and_yolo_helpers_does_not_import_tensorflow():
    code = (
        "import sys, models.zoo, models.yolo\n"
        "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_untrained_export_removes_the_test_split_of_the_model_it_replaces(tmp_path):
    """``zoo minivgg -o m.tflite --force`` over a model trained on digits left the old ``m.testset.npz``
    beside the new, untrained model (a helper's walkthrough), where the demo and users take it for that
    model's: it is removed - not where no model was replaced (a review)."""
    model, split = tmp_path / "m.tflite", tmp_path / "m.testset.npz"
    split.write_bytes(b"the user's file")
    zoo.export("minivgg", model, verbose=False)
    assert split.read_bytes() == b"the user's file" and model.read_bytes()[4:8] == b"TFL3"
    zoo.export("minivgg", model, verbose=False)  # over a model, as --force does
    assert not split.exists() and model.read_bytes()[4:8] == b"TFL3"
