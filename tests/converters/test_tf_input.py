"""Keras and SavedModel input (``converters.tf_input``): the batch dimension Keras and SavedModel signatures
leave open is fixed to 1, so that a Flatten's shape is folded instead of computed at run time; any other
open dimension is refused, naming the input."""

import warnings

import numpy as np
import pytest

import tee_sim
from converters import convert
from converters.fidelity import relative_error
from shadownet.exceptions import ModelFormatError
from tests.converters.driver import Driver


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    context = tee_sim.Context("inprocess", home=tmp_path_factory.mktemp("device"))
    yield context
    context.close()


def _save(tf, model, path, form):
    if form == "keras":
        model.save(path)
    else:
        tf.saved_model.save(model, str(path))


@pytest.mark.parametrize("form", ["keras", "saved_model"])
def test_an_open_batch_is_converted_at_batch_one(tf, device, tmp_path, form):
    import keras

    keras.utils.set_random_seed(3)
    x = keras.Input((8, 8, 3), name="pixels")  # batch None, as Keras leaves it
    h = keras.layers.Conv2D(4, 3, activation="relu")(x)
    model = keras.Model(x, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    path = tmp_path / ("model.keras" if form == "keras" else "saved")
    _save(tf, model, path, form)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning
        manifest = convert(path, tmp_path / "out", seed=1, device=device)
    assert [i["shape"] for i in manifest["inputs"]] == [[1, 8, 8, 3]]
    image = np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(image), [model(image).numpy()]) <= 1e-4


def test_a_saved_sequential_model_is_converted(tf, device, tmp_path):
    """A Sequential model built from ``keras.Input`` and saved: loaded again it has never been called, so
    Keras has no ``model.input`` for it (it said "never been called and thus has no defined input"), only
    ``model.inputs``."""
    import keras

    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning
        manifest = convert(tmp_path / "model.keras", tmp_path / "out", seed=1, device=device)
    assert [i["shape"] for i in manifest["inputs"]] == [[1, 8, 8, 3]]
    image = np.random.default_rng(1).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(image), [model(image).numpy()]) <= 1e-4


@pytest.mark.parametrize("form", ["keras", "saved_model"])
def test_open_dimensions_besides_the_batch_are_refused(tf, device, tmp_path, form):
    import keras

    x = keras.Input((None, None, 3), name="image")
    model = keras.Model(x, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x)))
    path = tmp_path / ("model.keras" if form == "keras" else "saved")
    _save(tf, model, path, form)
    with pytest.raises(ModelFormatError, match="open dimensions besides the batch: give the model a fixed"):
        convert(path, tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()


def test_a_keras_file_with_a_lambda_layer_points_to_a_saved_model(tf, device, tmp_path):
    """Keras refuses a Lambda layer's Python code unless told ``safe_mode=False``, which ``convert`` has no
    way to say (a helper's walkthrough): the error says how to convert the model instead, and that way
    converts it."""
    import keras

    keras.utils.set_random_seed(5)
    x = keras.Input((8, 8, 3))
    h = keras.layers.Lambda(lambda t: t * 2.0)(keras.layers.Conv2D(4, 3)(x))
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    model.save(tmp_path / "model.keras")
    with pytest.raises(ModelFormatError, match=r"model.keras: Keras loads this file only outside its safe "
                                               r"mode \(it holds Python code, as Lambda layers do.* export "
                                               r"the model as a SavedModel"):
        convert(tmp_path / "model.keras", tmp_path / "out", device=device)
    assert not (tmp_path / "out").exists()
    model.export(str(tmp_path / "saved"), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seed's warning
        convert(tmp_path / "saved", tmp_path / "out", seed=1, device=device)
    image = np.random.default_rng(2).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(image), [model(image).numpy()]) <= 1e-4


def test_dict_inputs_are_fed_by_name(tf, device, tmp_path):
    import keras

    keras.utils.set_random_seed(4)
    inputs = {"zeta": keras.Input((8,), name="zeta"), "alpha": keras.Input((8,), name="alpha")}
    joined = keras.layers.Concatenate()([keras.layers.Dense(6)(inputs["zeta"]), inputs["alpha"]])
    model = keras.Model(inputs, keras.layers.Dense(3)(joined))
    model.save(tmp_path / "model.keras")
    manifest = convert(tmp_path / "model.keras", tmp_path / "out", device=device)
    rng = np.random.default_rng(0)
    feeds = {name: rng.uniform(-1, 1, (1, 8)).astype(np.float32) for name in inputs}
    order = [next(k for k in feeds if f"_{k}:" in i["name"]) for i in manifest["inputs"]]
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(*[feeds[k] for k in order]), [model(feeds).numpy()]) <= 1e-4


def test_input_names_tensorflow_would_not_take_keep_their_inputs_apart(tf, device, tmp_path):
    """Keras input names with a space or a colon ("a img", "in:0") are no TensorFlow node names: one became
    "Placeholder", another lost its signature, and the inputs could not be told apart (a helper's probe).
    They are made node names as Keras's own export makes them ("a_img")."""
    import keras

    keras.utils.set_random_seed(6)
    first, second = keras.Input((8,), name="b_img"), keras.Input((8,), name="a img")
    joined = keras.layers.Concatenate()([keras.layers.Dense(6)(first), second])
    model = keras.Model([first, second], keras.layers.Dense(3)(joined))
    model.save(tmp_path / "model.keras")
    manifest = convert(tmp_path / "model.keras", tmp_path / "out", device=device)
    names = [i["name"] for i in manifest["inputs"]]
    rng = np.random.default_rng(0)
    feeds = {"b_img": rng.uniform(-1, 1, (1, 8)).astype(np.float32),
             "a_img": rng.uniform(-1, 1, (1, 8)).astype(np.float32)}
    order = [next(k for k in feeds if f"_{k}:" in name) for name in names]
    assert sorted(order) == ["a_img", "b_img"], names
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(*[feeds[k] for k in order]),
                              [model([feeds["b_img"], feeds["a_img"]]).numpy()]) <= 1e-4


def test_node_names_keep_the_valid_ones_and_are_each_once():
    """A made name took a valid one's first ("a b" -> a_b, then "a_b" -> a_b_1), and feeding the model by
    its own name a_b gave the other input (a review)."""
    from converters.tf_input import _node_names

    assert _node_names(["a b", "a_b"]) == ["a_b_1", "a_b"]
    assert _node_names(["in:0", "x-y", "x y", "_x", "9lives"]) == \
        ["in_0", "x_y", "x_y_1", "input_x", "9lives"]


def test_a_keras_model_whose_tracing_fails_says_why(tf, device, tmp_path):
    """A layer named with a space builds, runs and saves in Keras, and fails in TensorFlow's tracing: the
    refusal said "could not load the Keras model: ValueError: in user code:", nothing to act on (a helper's
    probe). It says that tracing failed, and TensorFlow's reason."""
    import keras

    x = keras.Input((12, 12, 3))
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, activation="relu")(x))
    keras.Model(x, keras.layers.Dense(3, name="dense out")(h)).save(tmp_path / "model.keras")
    with pytest.raises(ModelFormatError, match="could not trace the Keras model: .*dense out") as caught:
        convert(tmp_path / "model.keras", tmp_path / "out", device=device)
    assert "in user code" not in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_tensorflows_diagnostics_stay_off_stderr_unless_debugging(tf, device, tmp_path, capfd, monkeypatch):
    """TensorFlow's converter writes pages of MLIR diagnostics to file descriptor 2 when it fails: the error
    says what failed in one line, and the pages appear only with SHADOWNET_DEBUG."""

    class Svd(tf.Module):  # an op TensorFlow Lite's builtins lack
        @tf.function(input_signature=[tf.TensorSpec([1, 4, 4], tf.float32)])
        def __call__(self, x):
            return tf.linalg.svd(x)[0]

    module = Svd()
    tf.saved_model.save(module, str(tmp_path / "svd"), signatures=module.__call__)
    capfd.readouterr()
    for debug, shown in ((None, False), ("1", True)):
        if debug:
            monkeypatch.setenv("SHADOWNET_DEBUG", debug)
        with pytest.raises(ModelFormatError, match="convert the SavedModel: 'tf.Svd' op is neither a"):
            convert(tmp_path / "svd", tmp_path / "out", device=device)
        err = capfd.readouterr().err
        assert ("tf.Svd" in err) == shown, err[:300]
        if not shown:
            assert err == ""


def test_a_saved_model_with_other_signatures_says_which_it_converts(tf, device, tmp_path):
    """A SavedModel's signatures besides the converted one ("serving_default", else the first) are left out
    of a protected model, as a .tflite with several is refused: the conversion says so, naming them; a
    Keras export's second name for its one function ("serve") is not another signature."""
    import keras

    kernel = tf.constant(np.random.default_rng(5).standard_normal((3, 3, 3, 4)), tf.float32)

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32, name="img")])
        def plain(self, img):
            return {"y": tf.nn.conv2d(img, kernel, 1, "SAME")}

        @tf.function(input_signature=[tf.TensorSpec((1, 8, 8, 3), tf.float32, name="img")])
        def strided(self, img):
            return {"z": tf.nn.relu(tf.nn.conv2d(img, kernel, 2, "SAME"))}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "two"), signatures={"serving_default": module.plain,
                                                                   "strided": module.strided})
    keras.utils.set_random_seed(6)
    x = keras.Input((8, 8, 3), batch_size=1)
    keras.Model(x, keras.layers.Conv2D(4, 3)(x)).export(str(tmp_path / "exported"), verbose=False)
    for name, warned in (("two", ["'serving_default' is converted, not 'strided' (a protected model runs "
                                  "one signature: choose another with --signature KEY)"]), ("exported", [])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            convert(tmp_path / name, tmp_path / f"out_{name}", device=device)
        said = [str(w.message) for w in caught if "the SavedModel's signature" in str(w.message)]
        assert len(said) == len(warned) and all(w in s for w, s in zip(warned, said, strict=True)), said


def test_a_saved_model_signature_is_chosen_by_key_and_keeps_its_names(tf, device, tmp_path):
    """--signature KEY picks a SavedModel's signature (it was ignored, and then refused: the converted file
    had only 'serving_default'); the protected model keeps the key and the signature's output names (they
    became output_0, ... when the function was frozen), as TensorFlow's own conversion of it has them."""
    kernel = tf.constant(np.random.default_rng(7).standard_normal((3, 3, 3, 4)), tf.float32)

    class Two(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32, name="img")])
        def encode(self, img):
            return {"feat": tf.nn.relu(tf.nn.conv2d(img, kernel, 1, "SAME")),
                    "aux": tf.nn.conv2d(img, kernel, 2, "SAME")}

        @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3), tf.float32, name="img")])
        def strided(self, img):
            return {"z": tf.nn.relu(tf.nn.conv2d(img, kernel, 2, "SAME"))}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "two"), signatures={"encode": module.encode,
                                                                   "strided": module.strided})
    x = np.random.default_rng(8).standard_normal((1, 8, 8, 3)).astype(np.float32)
    for key, names in (("strided", ["z"]), ("encode", ["aux", "feat"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            manifest = convert(tmp_path / "two", tmp_path / key, device=device, signature=key)
        assert not [w for w in caught if "the SavedModel's signature" in str(w.message)]
        assert manifest["signature"]["key"] == key and sorted(manifest["signature"]["outputs"]) == names
        want = getattr(module, key)(tf.constant(x))
        by_tensor = {v: k for k, v in manifest["signature"]["outputs"].items()}
        with Driver(device, tmp_path / key) as run:
            got = run(x)
        for spec, value in zip(manifest["outputs"], got, strict=True):
            assert relative_error(value, want[by_tensor[spec["name"]]].numpy()) <= 1e-4
    with pytest.raises(ValueError, match="the SavedModel has no signature 'serving_default' "
                                                 r"\(it has 'encode', 'strided'\)"):
        convert(tmp_path / "two", tmp_path / "none", device=device, signature="serving_default")


def test_a_keras_models_dict_outputs_keep_their_names(tf, device, tmp_path):
    """A .keras model returning a dict: its outputs were named output_0, output_1 (the frozen function drops
    the structure); TensorFlow's converter names them by the dict's keys, and so does ShadowNet's now."""
    import keras

    keras.utils.set_random_seed(9)
    x = keras.Input((8, 8, 3), batch_size=1, name="image")
    h = keras.layers.Conv2D(4, 3, padding="same")(x)
    outputs = {"out": keras.layers.Conv2D(2, 1)(h), "aux": keras.layers.GlobalAveragePooling2D()(h)}
    keras.Model(x, outputs).save(tmp_path / "model.keras")
    manifest = convert(tmp_path / "model.keras", tmp_path / "out", device=device)
    assert sorted(manifest["signature"]["outputs"]) == ["aux", "out"]
