"""Running a .tflite in LiteRT, the reference every graph-layer test compares against."""

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def run(model: bytes, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` (subgraph 0) for ``inputs``, in the model's input / output order."""
    interpreter = Interpreter(model_content=model, num_threads=1)
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), inputs, strict=True):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()]


def io_details(model: bytes) -> list[tuple]:
    """(name, shape, dtype) of every input, then every output."""
    interpreter = Interpreter(model_content=model)
    details = interpreter.get_input_details() + interpreter.get_output_details()
    return [(d["name"], tuple(d["shape"]), d["dtype"]) for d in details]


def random_inputs(model: bytes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    interpreter = Interpreter(model_content=model)
    return [rng.normal(size=d["shape"]).astype(d["dtype"]) for d in interpreter.get_input_details()]
