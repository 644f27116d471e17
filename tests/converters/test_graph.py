"""The TFLite graph layer against LiteRT running the original model."""

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema_fb
from ai_edge_litert.tools import flatbuffer_utils

from converters.graph import (
    OFFLOADABLE,
    Graph,
    Signature,
    fused_activation,
    is_offloadable,
    tiny_model_bytes,
    write_model,
)
from converters.normalize import chunked, normalize
from converters.tflite_reader import read_model, read_signatures
from shadownet.exceptions import ModelFormatError, UnsupportedOpError
from tests.converters.litert import io_details, random_inputs, run


def _kinds(graph: Graph) -> list[str]:
    return [op.kind for op in graph.ops]


def _versions(model: bytes) -> list[tuple[str, int]]:
    graph = read_model(model)
    return sorted({(op.kind, op.version) for op in graph.ops})


# ------------------------------------------------------------------------------------- round trips


def test_conv_model_round_trips_exactly(conv_model):
    graph = read_model(conv_model)
    fused = {op.kind: fused_activation(op) for op in graph.ops if fused_activation(op)}
    assert fused == {"CONV_2D": "RELU", "DEPTHWISE_CONV_2D": "RELU6", "ADD": "RELU",
                     "FULLY_CONNECTED": "RELU"}

    normalized = normalize(graph)
    assert not any(fused_activation(op) for op in normalized.ops)
    assert _kinds(normalized).count("RELU") == 3 and "RELU6" in _kinds(normalized)
    depthwise = next(op for op in normalized.ops if op.kind == "DEPTHWISE_CONV_2D")
    assert depthwise.options.depthMultiplier == 2
    assert {op.options.dilationWFactor for op in normalized.ops if op.kind == "CONV_2D"} == {1, 2}
    offloadable = [i for i, op in enumerate(normalized.ops) if is_offloadable(normalized, i)]
    assert [normalized.ops[i].kind for i in offloadable] == [
        op.kind for op in normalized.ops if op.kind in OFFLOADABLE]
    assert len(offloadable) == 5

    x = random_inputs(conv_model)
    expected = run(conv_model, x)
    for model in (write_model(graph), write_model(normalized)):
        assert io_details(model) == io_details(conv_model)
        for got, want in zip(run(model, x), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert _versions(write_model(graph)) == _versions(conv_model)


def test_fp16_model_folds_dequantize(fp16_model):
    graph = read_model(fp16_model)
    assert "DEQUANTIZE" in _kinds(graph)
    normalized = normalize(graph)
    kinds = set(_kinds(normalized))
    assert "DEQUANTIZE" not in kinds
    assert {"PAD", "PRELU", "HARD_SWISH", "CONCATENATION", "RESIZE_BILINEAR", "LOGISTIC", "MEAN",
            "FULLY_CONNECTED"} <= kinds
    assert all(t.dtype != np.float16 for t in normalized.tensors)
    assert all(is_offloadable(normalized, i) for i, op in enumerate(normalized.ops) if op.kind in OFFLOADABLE)

    model = write_model(normalized)
    assert io_details(model) == io_details(fp16_model)
    x = random_inputs(fp16_model)
    # float16 -> float32 is exact, so only the kernels' summation order may differ: float32 rounding.
    for got, want in zip(run(model, x), run(fp16_model, x), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for got, want in zip(run(write_model(graph), x), run(fp16_model, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_buffers_after_the_flatbuffer_are_read(offset_model, sparse_model):
    offsets = flatbuffer_utils.convert_bytearray_to_object(offset_model).buffers
    assert any(b.offset > 1 for b in offsets)
    graph = read_model(offset_model)
    weights = graph.tensors[graph.ops[0].inputs[1]]
    assert weights.data.shape == (32, 64)
    np.testing.assert_array_equal(weights.data, normalize(read_model(sparse_model)).tensors[1].data)
    x = random_inputs(offset_model)
    for got, want in zip(run(write_model(graph), x), run(offset_model, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_sparse_weights_are_densified(sparse_model):
    graph = read_model(sparse_model)
    assert _kinds(graph) == ["DENSIFY", "FULLY_CONNECTED"]
    assert graph.ops[1].inputs[2] == -1  # the converter dropped the all-zero bias
    normalized = normalize(graph)
    assert _kinds(normalized) == ["FULLY_CONNECTED"]
    weights = normalized.tensors[normalized.ops[0].inputs[1]]
    assert weights.sparsity is None and weights.data.shape == (32, 64)
    assert 0.7 < np.mean(weights.data == 0) < 0.9
    assert is_offloadable(normalized, 0)

    x = random_inputs(sparse_model)
    for got, want in zip(run(write_model(normalized), x), run(sparse_model, x), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(run(write_model(graph), x), run(sparse_model, x), strict=True):
        np.testing.assert_array_equal(got, want)


def test_tiny_model():
    model = tiny_model_bytes()
    assert model[4:8] == b"TFL3"
    (y,) = run(model, [np.array([[1.5, -2.0]], np.float32)])
    np.testing.assert_array_equal(y, [[3.0, -4.0]])
    assert _kinds(read_model(model)) == ["ADD"]


# ------------------------------------------------------------------------------------- signatures


def _split(graph: Graph, at: int) -> tuple[Signature, Signature]:
    """Two signatures: ops [0, at) and [at, end), the second reading what the first leaves live."""
    first, second = range(at), range(at, len(graph.ops))
    written = {t for i in first for t in graph.ops[i].outputs}
    live = sorted({t for i in second for t in graph.ops[i].inputs if t in written})
    cut = {f"cut_{k}": t for k, t in enumerate(live)}
    return (Signature("first", list(first), {"x": graph.inputs[0]}, cut),
            Signature("second", list(second), cut, {f"y_{k}": t for k, t in enumerate(graph.outputs)}))


def test_two_signatures_chain_to_the_whole_model(conv_model):
    graph = normalize(read_model(conv_model))
    first, second = _split(graph, 4)
    assert len(first.outputs) == 2  # the depthwise and the dilated branch both cross the cut
    model = write_model(graph, [first, second])

    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_content=model)
    assert set(interpreter.get_signature_list()) == {"first", "second"}
    (x,) = random_inputs(conv_model)
    middle = interpreter.get_signature_runner("first")(x=x)
    assert set(middle) == set(first.outputs)
    (y,) = interpreter.get_signature_runner("second")(**middle).values()
    np.testing.assert_array_equal(y, run(conv_model, [x])[0])


def test_constants_shared_by_signatures_are_written_once(conv_model):
    graph = normalize(read_model(conv_model))
    first, _ = _split(graph, 4)
    whole = Signature("whole", list(range(len(graph.ops))), {"x": graph.inputs[0]}, {"y": graph.outputs[0]})
    model = flatbuffer_utils.convert_bytearray_to_object(write_model(graph, [first, whole]))
    constants = sum(t.data is not None for t in graph.tensors)
    assert sum(b.data is not None for b in model.buffers) == constants
    assert len(model.subgraphs) == 2


def test_read_signatures_gives_each_signature_its_subgraph(conv_model):
    graph = normalize(read_model(conv_model))
    first, second = _split(graph, 4)
    model = write_model(graph, [first, second])
    graphs = read_signatures(model)
    assert [g.signature.key for g in graphs] == ["first", "second"]
    for part, sig in zip(graphs, (first, second), strict=True):
        assert [op.kind for op in part.ops] == [graph.ops[i].kind for i in sig.ops]
        assert part.signature.ops == list(range(len(part.ops)))
        for local, names in ((part.signature.inputs, sig.inputs), (part.signature.outputs, sig.outputs)):
            assert {n: part.tensors[t].name for n, t in local.items()} == {
                n: graph.tensors[t].name for n, t in names.items()}
        for op, i in zip(part.ops, sig.ops, strict=True):  # the same constants (a conv may gain a zero bias)
            for t, u in zip(op.inputs, graph.ops[i].inputs, strict=False):
                if u >= 0 and graph.tensors[u].data is not None:
                    np.testing.assert_array_equal(part.tensors[t].data, graph.tensors[u].data)
    assert read_model(model).signature.key == "first"  # subgraph 0
    assert read_signatures(tiny_model_bytes()) == []  # no SignatureDef


def test_read_signatures_checks_the_subgraph_index(conv_model):
    graph = normalize(read_model(conv_model))
    model = flatbuffer_utils.convert_bytearray_to_object(write_model(graph, list(_split(graph, 4))))
    model.signatureDefs[1].subgraphIndex = 7
    with pytest.raises(ModelFormatError, match="signature 'second' refers to subgraph 7 of 2"):
        read_signatures(flatbuffer_utils.convert_object_to_bytearray(model))

def test_signature_must_provide_what_its_ops_read(conv_model):
    graph = normalize(read_model(conv_model))
    _, second = _split(graph, 4)
    broken = Signature("second", second.ops, {}, second.outputs)
    with pytest.raises(ValueError, match="neither an input nor written before"):
        write_model(graph, [broken])


# ------------------------------------------------------------------------------------- the builder


def test_bias_less_convs_built_with_the_builder():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 3, 3, 2)).astype(np.float32)  # OHWI
    scale = rng.normal(size=(1, 1, 1, 4)).astype(np.float32)  # 1x1 depthwise: a per-channel scale
    graph = Graph()
    x = graph.add_tensor("x", (1, 5, 5, 2), np.float32)
    w = graph.add_tensor("w", weights.shape, np.float32, weights)
    s = graph.add_tensor("s", scale.shape, np.float32, scale)
    y = graph.add_tensor("y", (1, 3, 3, 4), np.float32)
    z = graph.add_tensor("z", (1, 3, 3, 4), np.float32)
    options = schema_fb.Conv2DOptionsT(padding=schema_fb.Padding.VALID, strideW=1, strideH=1)
    conv = graph.add_op("CONV_2D", [x, w, -1], [y], options)
    depthwise = schema_fb.DepthwiseConv2DOptionsT(strideW=1, strideH=1, depthMultiplier=1)
    graph.add_op("DEPTHWISE_CONV_2D", [y, s, -1], [z], depthwise)
    graph.inputs, graph.outputs = [x], [y, z]
    assert is_offloadable(graph, conv) and is_offloadable(graph, 1)
    assert graph.producer(y) == conv and graph.consumers(y) == [1] and graph.producer(x) is None
    assert graph.describe_op(conv) == "op 0 CONV_2D (output 'y')"

    image = rng.normal(size=(1, 5, 5, 2)).astype(np.float32)
    model = write_model(graph)
    got_y, got_z = run(model, [image])
    patches = np.stack([image[0, i:i + 3, j:j + 3, :] for i in range(3) for j in range(3)])
    want = np.einsum("phwi,ohwi->po", patches, weights).reshape(1, 3, 3, 4)
    np.testing.assert_allclose(got_y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_z, got_y * scale.reshape(4))
    # LiteRT's float convs insist on a bias: the writer gave each a zero one (one buffer for both).
    back = read_model(model)
    biases = [back.tensors[op.inputs[2]] for op in back.ops]
    assert [b.name for b in biases] == ["y/zero_bias", "z/zero_bias"]
    assert not any(b.data.any() for b in biases)
    assert sum(b.data is not None for b in flatbuffer_utils.convert_bytearray_to_object(model).buffers) == 3


def test_builder_rejects_unknown_kinds_and_tensors():
    graph = Graph()
    x = graph.add_tensor("x", (1, 2), np.float32)
    with pytest.raises(ValueError, match="unknown op kind"):
        graph.add_op("CONV2D", [x], [x])
    with pytest.raises(ValueError, match="out of range"):
        graph.add_op("RELU", [x], [7])


# ------------------------------------------------------------------------------------- bad input


def test_random_bytes_are_not_a_model():
    with pytest.raises(ModelFormatError, match="not a TFLite model"):
        read_model(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelFormatError, match="too short"):
        read_model(b"TFL3")


def test_truncated_model(conv_model):
    for size in (len(conv_model) // 2, len(conv_model) - 100, 64):
        with pytest.raises(ModelFormatError, match="corrupt|truncated"):
            read_model(conv_model[:size])


def test_missing_file(tmp_path):
    with pytest.raises(ModelFormatError, match="cannot read model file"):
        read_model(tmp_path / "absent.tflite")


def test_quantized_model_names_the_tensor(int8_model):
    model = flatbuffer_utils.convert_bytearray_to_object(int8_model)
    first = next(t for t in model.subgraphs[0].tensors if t.type == schema_fb.TensorType.INT8)
    with pytest.raises(ModelFormatError, match="quantized") as error:
        read_model(int8_model)
    assert repr(first.name.decode()) in str(error.value) and "INT8" in str(error.value)


def _with_custom_op(code: str) -> bytes:
    graph = Graph()
    x = graph.add_tensor("x", (1, 2), np.float32)
    h = graph.add_tensor("h", (1, 2), np.float32)
    y = graph.add_tensor("y", (1, 2), np.float32)
    graph.add_op("RELU", [x], [h])
    graph.add_op("CUSTOM", [h], [y], custom_code=code, custom_options=b"\x01")
    graph.inputs, graph.outputs = [x], [y]
    return write_model(graph)


def test_unknown_custom_op_names_op_and_output():
    with pytest.raises(UnsupportedOpError, match=r"op 1 is custom op 'MySecretOp', which LiteRT .*'y'"):
        read_model(_with_custom_op("MySecretOp"))
    with pytest.raises(UnsupportedOpError, match=r"op 1 .*'FlexAddV2', a TensorFlow \(Flex\) op"):
        read_model(_with_custom_op("FlexAddV2"))


def test_an_op_that_keeps_state_in_a_variable_tensor_is_refused_naming_it():
    """TensorFlow's fused UNIDIRECTIONAL_SEQUENCE_LSTM keeps its state in variable tensors, which LiteRT
    carries from one call to the next: refused as such, not as a damaged file (a helper's probe: 'reads
    tensor 2, which is neither an input nor written before', from the writer's own check)."""
    graph = Graph()
    x = graph.add_tensor("x", (1, 2), np.float32)
    state = graph.add_tensor("state", (1, 2), np.float32)
    y = graph.add_tensor("y", (1, 2), np.float32)
    graph.add_op("ADD", [x, state], [y])
    graph.inputs, graph.outputs = [x, state], [y]
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(write_model(graph)))
    model.subgraphs[0].inputs = [x]
    model.subgraphs[0].tensors[state].isVariable = True
    with pytest.raises(UnsupportedOpError, match=r"op 0 ADD keeps state between inferences in variable "
                                                 r"tensor 1 'state'.*\(output 'y'\)"):
        read_model(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def test_a_tensor_of_a_type_numpy_has_not_is_refused_naming_the_op_that_uses_it():
    """A TensorFlow list's VARIANT or a variable's RESOURCE (a Keras LSTM, a model with variables) was
    refused naming the tensor alone (a helper's probe); the op that uses it is what the user recognises."""
    graph = Graph()
    x = graph.add_tensor("x", (1, 2), np.float32)
    h = graph.add_tensor("lstm/list", (1, 2), np.float32)
    y = graph.add_tensor("y", (1, 2), np.float32)
    graph.add_op("RELU", [x], [h])
    graph.add_op("TANH", [h], [y])
    graph.inputs, graph.outputs = [x], [y]
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(write_model(graph)))
    model.subgraphs[0].tensors[h].type = schema_fb.TensorType.VARIANT
    with pytest.raises(UnsupportedOpError, match=r"^op 0 RELU \(output 'lstm/list'\) uses tensor 1 "
                                                 r"'lstm/list' of type VARIANT, which ShadowNet does not"):
        read_model(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    model.subgraphs[0].tensors[h].type = schema_fb.TensorType.FLOAT32
    unused = schema_fb.TensorT()
    unused.name, unused.shape, unused.type, unused.buffer = b"handle", [], schema_fb.TensorType.RESOURCE, 0
    model.subgraphs[0].tensors.append(unused)
    with pytest.raises(ModelFormatError, match=r"tensor 3 'handle' of type RESOURCE, not supported"):
        read_model(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))


def test_custom_op_litert_resolves_is_kept():
    graph = read_model(_with_custom_op("TFLite_Detection_PostProcess"))
    op = graph.ops[1]
    assert (op.kind, op.custom_code, op.custom_options) == ("CUSTOM", "TFLite_Detection_PostProcess", b"\x01")


# ------------------------------------------------------------------------------------- normalize details

_FUSED_CHAIN = ["CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "SUB", "MUL", "DIV", "MAX_POOL_2D", "AVERAGE_POOL_2D",
                "L2_POOL_2D", "FULLY_CONNECTED"]


def _fused_chain(activations: list[str]) -> Graph:
    """x -> each kind of _FUSED_CHAIN in turn, with the given fused activations (cycled)."""
    rng = np.random.default_rng(1)
    graph = Graph()
    shape = (1, 4, 4, 3)
    x = h = graph.add_tensor("x", shape, np.float32)
    for k, kind in enumerate(_FUSED_CHAIN):
        act = getattr(schema_fb.ActivationFunctionType, activations[k % len(activations)])
        out_shape = shape if kind != "FULLY_CONNECTED" else (16, 3)
        out = graph.add_tensor(f"{kind.lower()}_out", out_shape, np.float32)
        const = graph.add_tensor(f"{kind.lower()}_c", shape, np.float32, rng.uniform(0.5, 1.5, shape))
        pool = schema_fb.Pool2DOptionsT(strideW=1, strideH=1, filterWidth=2, filterHeight=2,
                                        fusedActivationFunction=act)
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            wshape = {"CONV_2D": (3, 3, 3, 3), "DEPTHWISE_CONV_2D": (1, 3, 3, 3),
                      "FULLY_CONNECTED": (3, 3)}[kind]
            w = graph.add_tensor(f"{kind.lower()}_w", wshape, np.float32, rng.normal(0, 2, wshape))
            b = graph.add_tensor(f"{kind.lower()}_b", (3,), np.float32, rng.normal(0, 1, 3))
            options = {"CONV_2D": schema_fb.Conv2DOptionsT(strideW=1, strideH=1, fusedActivationFunction=act),
                       "DEPTHWISE_CONV_2D": schema_fb.DepthwiseConv2DOptionsT(
                           strideW=1, strideH=1, depthMultiplier=1, fusedActivationFunction=act),
                       "FULLY_CONNECTED": schema_fb.FullyConnectedOptionsT(fusedActivationFunction=act)}[kind]
            graph.add_op(kind, [h, w, b], [out], options)
        elif kind.endswith("POOL_2D"):
            graph.add_op(kind, [h], [out], pool)
        else:
            options = getattr(schema_fb, kind.capitalize() + "OptionsT")(fusedActivationFunction=act)
            graph.add_op(kind, [h, const], [out], options)
        h = out
    graph.inputs, graph.outputs = [x], [h]
    return graph


@pytest.mark.parametrize("activations", [["RELU", "RELU6", "RELU_N1_TO_1"], ["RELU6", "RELU_N1_TO_1", "RELU"],
                                         ["RELU_N1_TO_1", "RELU", "RELU6"]])
def test_fused_activations_split_exactly(activations):
    graph = _fused_chain(activations)
    normalized = normalize(graph)
    assert _kinds(normalized)[:4] == ["CONV_2D", activations[0], "DEPTHWISE_CONV_2D", activations[1]]
    assert len(normalized.ops) == 2 * len(graph.ops)
    assert not any(fused_activation(op) for op in normalized.ops)
    conv_out = normalized.ops[0].outputs[0]
    assert normalized.tensors[conv_out].name == "conv_2d_out/pre_activation"
    assert normalized.tensors[normalized.ops[1].outputs[0]].name == "conv_2d_out"
    assert fused_activation(graph.ops[0]) == activations[0]  # the input graph is left as it was

    original = write_model(graph)
    x = [np.random.default_rng(2).normal(0, 2, (1, 4, 4, 3)).astype(np.float32)]
    np.testing.assert_array_equal(run(write_model(normalized), x)[0], run(original, x)[0])


def test_fused_tanh_is_refused():
    graph = _fused_chain(["RELU"])
    graph.ops[2].options.fusedActivationFunction = schema_fb.ActivationFunctionType.TANH
    with pytest.raises(UnsupportedOpError, match="op 2 ADD .*'add_out'.*TANH"):
        normalize(graph)


_SPARSE_LAYOUTS = {
    "csr": ([0, 1], [], [], ["dense", "csr"], "int32"),
    "csc": ([1, 0], [], [], ["dense", "csr"], "uint8"),
    "doubly compressed": ([0, 1], [], [], ["csr", "csr"], "uint16"),
    "1x4 blocks": ([0, 1, 2], [1], [4], ["dense", "csr", "dense"], "uint8"),
    "4x2 blocks": ([1, 0, 2, 3], [0, 1], [4, 2], ["csr", "dense", "dense", "dense"], "int32"),
}


@pytest.mark.parametrize("layout", list(_SPARSE_LAYOUTS))
def test_densify_matches_litert(layout):
    """densify() against LiteRT's own DENSIFY kernel, on matrices encoded in each sparse layout."""
    from tests.converters.sparse import encode
    rng = np.random.default_rng(len(layout))
    dense = rng.normal(size=(8, 12)).astype(np.float32)
    dense[rng.random(dense.shape) < 0.7] = 0
    dense[:, 4:8] = 0  # a whole empty column block
    values, sparsity = encode(dense, *_SPARSE_LAYOUTS[layout])
    assert values.size < dense.size or layout == "4x2 blocks"

    graph = Graph()
    w = graph.add_tensor("w_sparse", dense.shape, np.float32, values, sparsity=sparsity)
    d = graph.add_tensor("w", dense.shape, np.float32)
    x = graph.add_tensor("x", dense.shape, np.float32)
    y = graph.add_tensor("y", dense.shape, np.float32)
    graph.add_op("DENSIFY", [w], [d])
    graph.add_op("ADD", [d, x], [y], schema_fb.AddOptionsT())
    graph.inputs, graph.outputs = [x], [y]
    (litert,) = run(write_model(graph), [np.zeros_like(dense)])
    np.testing.assert_array_equal(litert, dense)

    normalized = normalize(read_model(write_model(graph)))
    assert _kinds(normalized) == ["ADD"]
    np.testing.assert_array_equal(normalized.tensors[normalized.ops[0].inputs[0]].data, dense)


def test_inconsistent_sparsity_is_a_format_error():
    from tests.converters.sparse import encode
    dense = np.eye(4, dtype=np.float32)
    values, sparsity = encode(dense, [0, 1], [], [], ["dense", "csr"])
    sparsity.dimMetadata[1].arrayIndices.values = [0, 1, 2, 9]
    graph = Graph()
    w = graph.add_tensor("w_sparse", dense.shape, np.float32, values, sparsity=sparsity)
    d = graph.add_tensor("w", dense.shape, np.float32)
    graph.add_op("DENSIFY", [w], [d])
    graph.inputs, graph.outputs = [], [d]
    with pytest.raises(ModelFormatError, match="index outside"):
        normalize(graph)


def test_model_signature_is_kept(fp16_model):
    graph = read_model(fp16_model)
    assert graph.signature.key == "serving_default" and set(graph.signature.inputs) == {"image"}
    model = write_model(normalize(graph))
    from ai_edge_litert.interpreter import Interpreter
    (x,) = random_inputs(fp16_model)
    want = Interpreter(model_content=fp16_model).get_signature_runner()(image=x)
    got = Interpreter(model_content=model).get_signature_runner("serving_default")(image=x)
    assert set(got) == set(want) == {"output_0", "output_1"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


def test_corrupted_models_fail_cleanly():
    """Changed bytes anywhere: the reader either succeeds or raises one of our two errors, nothing else."""
    model = write_model(_fused_chain(["RELU"]))  # small weights: most bytes are structure
    rng = np.random.default_rng(0)
    outcomes = {"read": 0, "ModelFormatError": 0, "UnsupportedOpError": 0}
    for _ in range(300):
        data = bytearray(model)
        for position in rng.integers(0, len(data), 2):
            data[position] = int(rng.integers(0, 256))
        try:
            read_model(bytes(data))
            outcomes["read"] += 1
        except (ModelFormatError, UnsupportedOpError) as error:
            outcomes[type(error).__name__] += 1
    assert outcomes["ModelFormatError"] > 100, outcomes


@pytest.mark.parametrize("name", ["mobilenet", "resnet44", "resnet404", "minivgg", "yolov4-tiny"])
def test_zoo_round_trip_is_exact(name, exported):
    """read -> normalize -> write reproduces every zoo model's outputs bit for bit (no DEQUANTIZE to fold)."""
    original = exported(name).read_bytes()
    rewritten = write_model(normalize(read_model(original)))
    inputs = random_inputs(original, seed=3)
    for want, got in zip(run(original, inputs), run(rewritten, inputs), strict=True):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------- chunked sums


def _long_sums_graph() -> tuple[Graph, dict[str, int]]:
    """A 3x3 conv on a [1, 6, 6, 10] input (90 terms per output), a dense layer of 6 outputs that keeps its
    input's leading dimensions on it ([60, 10] rows, bias), and a 3x3 conv on 1 channel (9 taps)."""
    rng = np.random.default_rng(4)
    g = Graph()
    x = g.add_tensor("x", (1, 6, 6, 10), np.float32)
    one = g.add_tensor("one", (1, 6, 6, 1), np.float32)
    ops = {}

    def conv(src: int, channels: int, name: str) -> int:
        o = schema_fb.Conv2DOptionsT(padding=schema_fb.Padding.SAME, strideH=1, strideW=1,
                                     dilationHFactor=1, dilationWFactor=1)
        w = g.add_tensor(f"{name}/w", (5, 3, 3, channels), np.float32,
                         rng.standard_normal((5, 3, 3, channels)))
        b = g.add_tensor(f"{name}/b", (5,), np.float32, rng.standard_normal(5))
        y = g.add_tensor(name, (1, 6, 6, 5), np.float32)
        ops[name] = g.add_op("CONV_2D", [src, w, b], [y], o)
        return y

    outputs = [conv(x, 10, "conv"), conv(one, 1, "narrow")]
    w = g.add_tensor("dense/w", (6, 10), np.float32, rng.standard_normal((6, 10)))
    b = g.add_tensor("dense/b", (6,), np.float32, rng.standard_normal(6))
    outputs.append(g.add_tensor("dense", (1, 6, 6, 6), np.float32))
    ops["dense"] = g.add_op("FULLY_CONNECTED", [x, w, b], [outputs[-1]],
                            schema_fb.FullyConnectedOptionsT(keepNumDims=True))
    g.inputs, g.outputs = [x, one], outputs
    return g, ops


@pytest.mark.parametrize("longest", [4, 40])
def test_long_sums_cut_into_chunks_compute_the_same(monkeypatch, longest):
    """``chunked`` with sums of at most ``longest`` terms per chunk: the conv's 10 input channels as chunks
    of 4, 3 and 3 channels (a SPLIT_V; 36 and 27 terms) where 40 are allowed; where 4 are, the dense
    layer's 10 inputs as 4, 3 and 3 and the convs left as they are (a 3x3 window is 9 terms); the results
    LiteRT's on the original, to float32's rounding of the sums in another order."""
    from converters import exact_split

    monkeypatch.setattr(exact_split, "MAX_DOT_LENGTH", longest)
    graph, ops = _long_sums_graph()
    cut = chunked(graph, ops.values(), min_channels=None)
    kinds = _kinds(cut)
    if longest == 40:
        assert kinds.count("CONV_2D") == 1 + 3 and kinds.count("FULLY_CONNECTED") == 1
        conv_chunks = [op for op in cut.ops
                       if op.kind == "CONV_2D" and cut.tensors[op.inputs[1]].shape[-1] != 1]
        assert [cut.tensors[op.inputs[1]].shape for op in conv_chunks] == [(5, 3, 3, 4), (5, 3, 3, 3),
                                                                              (5, 3, 3, 3)]
        assert [op.inputs[2] >= 0 for op in conv_chunks] == [True, False, False]  # the bias once
    else:
        assert kinds.count("CONV_2D") == 2 and kinds.count("FULLY_CONNECTED") == 3
        assert "RESHAPE" in kinds  # the dense layer's [1, 6, 6, 10] input read as [36, 10], its output back
    assert kinds.count("SPLIT_V") == 1 and kinds.count("ADD") == 2
    original, rewritten = write_model(graph), write_model(cut)
    inputs = random_inputs(original, seed=5)
    for want, got in zip(run(original, inputs), run(rewritten, inputs), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_sums_that_cannot_be_cut_are_left_as_they_are(monkeypatch):
    """A window of more taps than a chunk may sum, chunks narrower than the scheme mixes, or more partial
    results than ``CHUNKED_RESULTS``: unchanged."""
    from converters import exact_split
    from converters import normalize as normalize_module

    graph, ops = _long_sums_graph()
    monkeypatch.setattr(exact_split, "MAX_DOT_LENGTH", 8)
    assert chunked(graph, [ops["conv"], ops["narrow"]], min_channels=None) is graph  # windows of 9 taps
    monkeypatch.setattr(exact_split, "MAX_DOT_LENGTH", 40)
    assert chunked(graph, [ops["conv"]], min_channels=4) is graph  # chunks of 3 channels
    monkeypatch.setattr(normalize_module, "CHUNKED_RESULTS", 3 * 6 * 6 * 5 - 1)
    assert chunked(graph, [ops["conv"]], min_channels=None) is graph  # 3 partial results of 180 values
