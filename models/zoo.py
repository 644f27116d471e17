"""The paper's five models: Keras builders and their export to float32 ``.tflite``.

Importing this module does not import TensorFlow; building or exporting a model does (the ``tf``
extra). Exported models have batch size 1, float32 input ``input`` and go through TensorFlow's own
converter, so batch norm is folded into the convolutions and ReLU/ReLU6 fused into them, as in the
models real users hand us.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from shadownet.exceptions import InputError
from shadownet.files import check_destination, write_atomically

if TYPE_CHECKING:
    import keras

NAMES: tuple[str, ...] = ("mobilenet", "resnet44", "resnet404", "minivgg", "yolov4-tiny")
TRAIN_SETS: tuple[str, ...] = ("digits",)
# a file named after another format got TFLite bytes under that name (a walkthrough's `-o m.onnx`)
OTHER_FORMATS: tuple[str, ...] = (".onnx", ".h5", ".hdf5", ".keras", ".pb", ".pt", ".pth", ".npy", ".npz",
                                   ".json", ".sealed")


def _builders() -> dict[str, Callable[[int], keras.Model]]:
    from models import minivgg, mobilenet, resnet, yolov4_tiny

    return {
        "mobilenet": mobilenet.build_random,
        "resnet44": lambda seed: resnet.build_random(44, seed),
        "resnet404": lambda seed: resnet.build_random(404, seed),
        "minivgg": minivgg.build_random,
        "yolov4-tiny": yolov4_tiny.build_random,
    }


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise InputError(f"unknown zoo model {name!r}; choose one of {', '.join(NAMES)}")


def build_keras(name: str, seed: int = 0) -> keras.Model:
    """The Keras model ``name`` with random weights fixed by ``seed`` that behave like trained ones.

    He-normal kernels, batch norms with random gamma/beta and moving statistics calibrated on random
    images, and a calibrated head (see ``models.calibrate``). The batch dimension is left free;
    ``export`` fixes it to 1.
    """
    _check_name(name)
    from models.backend import require_tensorflow

    _, keras_module = require_tensorflow()
    keras_module.utils.set_random_seed(seed)
    return _builders()[name](seed)


def to_tflite(model: keras.Model) -> bytes:
    """Convert ``model`` with TensorFlow's TFLite converter: float32, batch size 1, signature
    ``serving_default`` with input ``input``.

    The serving function is frozen first (variables become constants): handing the converter the
    live Keras variables would leave VAR_HANDLE/READ_VARIABLE ops in the model. The converter is
    given an empty ``tf.Module`` to save alongside it (which gives the file its SignatureDef): the
    Keras model itself would work too, byte for byte, but saving it costs 7x the conversion time.
    """
    from models.backend import quiet, require_tensorflow

    tf, _ = require_tensorflow()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((1, *model.input.shape[1:]), tf.float32, name="input")

    @tf.function(input_signature=[spec])
    def serve(x):
        return model(x, training=False)

    with quiet():
        frozen = convert_variables_to_constants_v2(serve.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module())
        return bytes(converter.convert())


def check_output_name(path: str | os.PathLike) -> None:
    """Raise ``InputError`` when ``path`` ends in another format's suffix (``.onnx``, ``.h5``, ...): the zoo
    writes TFLite, and wrote it under such a name."""
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix.lower() in OTHER_FORMATS:
        raise InputError(f"{os.fspath(path)} names a {suffix} file, but the zoo exports TFLite: "
                         "name it .tflite")


def testset_path(path: str | os.PathLike) -> str:
    """Where ``export(..., train=...)`` stores the held-out test split: ``FILE.testset.npz`` for
    ``FILE.tflite``."""
    path = os.fspath(path)
    stem = path[: -len(".tflite")] if path.endswith(".tflite") else path
    return f"{stem}.testset.npz"


def export(name: str, path: str | os.PathLike, seed: int = 0, train: str | None = None, *,
           verbose: bool = True) -> None:
    """Write the zoo model ``name`` to ``path`` as a float32 ``.tflite`` (batch size 1).

    ``seed`` fixes every weight: the same seed gives a byte-identical file. ``train="digits"``
    (``minivgg`` only) trains the model on scikit-learn's handwritten digits instead of using
    calibrated random weights, and writes the held-out test split to ``testset_path(path)`` (see
    ``models.digits.save_testset`` for its format; an untrained export removes a test split left there
    by the model it replaces). ``verbose`` prints one line per file written.
    Raises ``InputError`` (a ``ValueError``) for an unknown name or training set and
    ``TensorFlowMissingError`` without TensorFlow (both ``shadownet.exceptions``).
    """
    _check_name(name)
    # Keras's own refusals named neither export nor the argument, took True, and refused numpy's integers
    # (a helper's sweep)
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < 2**32):
        raise InputError(f"seed must be an integer from 0 to 2**32 - 1, not {seed!r}")
    seed = int(seed)
    if train is not None and (train not in TRAIN_SETS or name != "minivgg"):
        raise InputError(f"training on {train!r} is only available for minivgg "
                         f"(data sets: {', '.join(TRAIN_SETS)})")
    path = os.fspath(path)
    check_output_name(path)
    check_destination(path)  # before minutes of building and training, not after
    if train is not None:  # the test split's file too: a bad one failed after the model was written
        check_destination(testset_path(path))
    if train == "digits":
        from models.backend import require_tensorflow
        from models.digits import save_testset, tflite_accuracy, train_minivgg

        require_tensorflow()[1].utils.set_random_seed(seed)
        result = train_minivgg(seed)
        data = to_tflite(result.model)
        accuracy = tflite_accuracy(data, result.x_test, result.y_test)
        write_atomically(path, data)
        save_testset(testset_path(path), result.x_test, result.y_test)
        if verbose:
            print(f"trained minivgg on digits: {accuracy:.1%} accuracy (LiteRT) on the "
                  f"{len(result.y_test)} held-out images stored in {testset_path(path)}")
    else:
        data = to_tflite(build_keras(name, seed))
        replaced = os.path.isfile(path)
        write_atomically(path, data)
        if replaced and os.path.isfile(testset_path(path)):  # the replaced model's test split, not this one's
            with contextlib.suppress(FileNotFoundError):
                os.remove(testset_path(path))
    if verbose:
        ops = sum(op_counts(data).values())
        print(f"wrote {path} ({len(data) / 1e6:.1f} MB, {ops} ops)")


def op_counts(model: bytes | str | os.PathLike) -> Counter[str]:
    """How many operators of each kind (``"CONV_2D"``, ...) subgraph 0 of a ``.tflite`` has."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    data = model if isinstance(model, bytes | bytearray) else open(model, "rb").read()
    parsed = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = parsed.operatorCodes
    # Old files keep the code in the int8 deprecated field; new ones in both (or only the new field).
    kinds = [names[max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode)]
             for op in parsed.subgraphs[0].operators]
    return Counter(kinds)
