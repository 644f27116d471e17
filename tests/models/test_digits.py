import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from models import zoo


@pytest.mark.slow
def test_minivgg_trained_on_digits_reaches_95_percent_and_ships_its_test_split(tmp_path):
    path = tmp_path / "digits.tflite"
    zoo.export("minivgg", path, seed=0, train="digits", verbose=False)

    testset = np.load(tmp_path / "digits.testset.npz")
    assert sorted(testset.files) == ["x", "y"]
    x, y = testset["x"], testset["y"]
    assert x.dtype == np.float32 and x.shape == (len(y), 32, 32, 3)
    assert np.issubdtype(y.dtype, np.integer) and set(np.unique(y)) == set(range(10))
    assert len(y) >= 300  # a quarter of scikit-learn's 1797 digits

    interpreter = Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0]["index"], interpreter.get_output_details()[0]["index"]
    predictions = []
    for image in x:
        interpreter.set_tensor(inp, image[None])
        interpreter.invoke()
        predictions.append(int(interpreter.get_tensor(out).argmax()))
    accuracy = np.mean(np.array(predictions) == y)
    assert accuracy >= 0.95, f"test accuracy {accuracy:.1%}"


def test_testset_path_sits_next_to_the_model():
    assert zoo.testset_path("out/m.tflite") == "out/m.testset.npz"
    assert zoo.testset_path("out/model") == "out/model.testset.npz"
