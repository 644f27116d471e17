"""End to end: convert test-built models, run them through the ShadowNet TA (in-process secure world) with a
minimal driver, and compare with LiteRT on the original; what runs where, what the accelerator is given."""

import json

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from converters.fidelity import relative_error
from converters.normalize import normalize
from converters.partition import partition
from converters.schemes import get_scheme, kept_in_tee
from converters.tflite_reader import read_model
from shadownet.exceptions import UnsupportedOpError
from tests.converters.driver import TOLERANCE, TOLERANCES, Driver, inputs_for, litert, protect, runs_as_litert


@pytest.fixture(params=["conv_model", "fp16_model", "misc_model"])
def model(request) -> bytes:
    return request.getfixturevalue(request.param)


def _partition(model: bytes, scheme: str | None):
    """The rounds ``scheme`` (None: the default) makes of ``model``: its offloadable ops but those it keeps
    in the TEE (the default's depthwise layers)."""
    return partition(normalize(read_model(model)), kept_in_tee(get_scheme(scheme)))


@pytest.mark.parametrize("scheme", [None, "shadownet"])

def test_fidelity_and_world_switches(model, scheme, device, tmp_path):
    manifest = protect(model, tmp_path / "out", device, scheme=scheme)
    assert manifest["scheme"]["name"] == (scheme or "groupmix")
    rounds = len(manifest["rounds"])
    assert rounds == len(_partition(model, scheme).rounds) >= 1
    rng = np.random.default_rng(0)
    with Driver(device, tmp_path / "out") as run:
        for _ in range(3):
            xs = inputs_for(model, rng)
            before = run.session.stats()["invocations"]
            got, want = run(*xs), litert(model, *xs)
            assert run.session.stats()["invocations"] - before == rounds + 1
            assert relative_error(got, want) <= TOLERANCES[manifest["scheme"]["name"]]
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and g.dtype == w.dtype
                if w.ndim == 2:
                    assert np.array_equal(np.argmax(g, -1), np.argmax(w, -1))


def test_a_comparisons_mask_stays_inside_one_litert_run(tf, device, tmp_path):
    """SELU (GREATER, then EXP / SUB / MUL the TA runs itself, then SELECT) and tf.where after a conv: the
    bool mask must not cross between the step's units, which pass float32 tensors only; both were refused
    ("(bool) crosses between TEE steps"). Now they convert and run as LiteRT does."""
    import keras
    keras.utils.set_random_seed(8)
    layers = keras.layers
    x = keras.Input((8, 8, 3), batch_size=1)
    h = layers.Activation("selu")(layers.Conv2D(6, 3, padding="same")(x))
    h = layers.Lambda(lambda t: tf.where(t > 0, t, 0.3 * t))(layers.Conv2D(6, 3, padding="same")(h))
    model = tf.lite.TFLiteConverter.from_keras_model(
        keras.Model(x, layers.Dense(4)(layers.Flatten()(h)))).convert()
    kinds = {op.kind for op in read_model(model).ops}
    assert "GREATER" in kinds and kinds & {"SELECT", "SELECT_V2"}, kinds
    for scheme in (None, "shadownet"):
        name = protect(model, tmp_path / str(scheme), device, scheme=scheme)["scheme"]["name"]
        rng = np.random.default_rng(0)
        with Driver(device, tmp_path / str(scheme)) as run:
            for _ in range(3):
                xs = inputs_for(model, rng)
                assert relative_error(run(*xs), litert(model, *xs)) <= TOLERANCES[name]


@pytest.mark.parametrize("scheme", [None, "shadownet"])
def test_a_grouped_convolution_of_narrow_groups_runs_in_the_tee(tf, device, tmp_path, scheme):
    """A grouped CONV_2D whose groups read fewer than 8 input channels each is not offloaded (neither
    scheme, at its defaults, mixes so few) but computed in the TEE, as any other op, and the summary says
    so; it was refused."""
    import keras
    keras.utils.set_random_seed(6)
    x = keras.Input((8, 8, 4), batch_size=1)
    h = keras.layers.Conv2D(8, 3, groups=2, padding="same", activation="relu")(x)
    model = tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, keras.layers.Conv2D(4, 3)(h))).convert()
    summary = protect(model, tmp_path / "out", device, scheme=scheme)["summary"]
    assert summary["offloaded_ops"] == summary["tee_linear_ops"] == 1
    assert summary["tee_linear_kinds"] == ["CONV_2D"]
    graph = read_model(model)
    (grouped,) = [op for op in graph.ops
                  if op.kind == "CONV_2D" and graph.tensors[op.inputs[1]].shape[-1] == 2]  # 4 channels / 2
    untrusted = (tmp_path / "out" / "untrusted.tflite").read_bytes()
    for f in graph.tensors[grouped.inputs[1]].data:
        assert f.tobytes() not in untrusted
    xs = inputs_for(model, np.random.default_rng(1))
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(*xs), litert(model, *xs)) <= TOLERANCES[scheme or "groupmix"]


@pytest.mark.parametrize("scheme", [None, "shadownet"])
def test_a_grouped_convolution_is_offloaded_as_a_convolution_per_group(tf, device, tmp_path, scheme):
    """A grouped CONV_2D of groups of 8 input channels or more (RegNet's, ResNeXt's) ran in the TEE: it is
    now a CONV_2D per group on a SPLIT of its input, each offloaded and obfuscated, their results
    concatenated in the TEE; its weights are nowhere in untrusted.tflite. At batch 2 too, with and without
    a fused activation; the narrower second layer (6 input channels a group) stays in the TEE."""
    import keras
    keras.utils.set_random_seed(13)
    for batch, activation in ((1, "relu"), (2, None)):
        x = keras.Input((9, 9, 32), batch_size=batch)
        h = keras.layers.Conv2D(24, 3, padding="same", groups=4, activation=activation)(x)
        h = keras.layers.Conv2D(24, 3, strides=2, groups=4)(h)
        model = tf.lite.TFLiteConverter.from_keras_model(
            keras.Model(x, keras.layers.Conv2D(4, 1)(h))).convert()
        out = tmp_path / f"batch{batch}"
        summary = protect(model, out, device, scheme=scheme)["summary"]
        assert (summary["offloaded_ops"], summary["tee_linear_ops"]) == (5, 1)
        graph = read_model(model)
        (grouped,) = [op for op in graph.ops if graph.tensors[op.inputs[1]].shape[-1] == 8]
        untrusted = (out / "untrusted.tflite").read_bytes()
        for f in graph.tensors[grouped.inputs[1]].data:
            assert f.tobytes() not in untrusted
        runs_as_litert(device, out, model, np.random.default_rng(batch), 2, TOLERANCES[scheme or "groupmix"])
    if scheme is None:
        # The width is the scheme's: groupmix mixes inputs of input_group / 2 channels or more (none at
        # 0), and a narrower group's input would cross unmixed (a review: 207 restore rows learnt).
        for narrower, kept in (("input_group=32", 2), ("input_group=0", 2), ("input_group=14", 1)):
            summary = protect(model, tmp_path / narrower, device, scheme=f"groupmix:{narrower}")["summary"]
            assert summary["tee_linear_ops"] == kept, narrower


def test_a_grouped_first_layers_groups_are_split_only_where_calibration_says_so(tf, device, tmp_path):
    """A grouped first layer: round 1 pushes each group's channels of the user's input on its own. The
    auto policy's exact split (3x those layers' multiply-adds) is taken where calibration measured that a
    white mask's rounding costs precision; it measured model inputs only, so the groups' pushes were always
    split (a review). Each group's part is now measured as the input is: here the split is not needed. (The
    default's shaped masks are always split.)"""
    import keras

    from converters.calibration import activation_stats, split_needed

    keras.utils.set_random_seed(3)
    x = keras.Input((16, 16, 16), batch_size=1)
    h = keras.layers.Conv2D(16, 3, padding="same", groups=2, activation="relu")(x)
    model = tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, keras.layers.Conv2D(8, 1)(h))).convert()
    graph = normalize(read_model(model))
    (split,) = [op for op in graph.ops if op.kind == "SPLIT"]
    samples = [inputs_for(model, np.random.default_rng(k)) for k in range(4)]
    stats = activation_stats(graph, {*split.outputs, *graph.inputs}, samples)
    white = "groupmix:shaped_masks=false"
    verdicts = split_needed(graph, samples, stats, get_scheme(white))
    assert set(split.outputs) <= set(verdicts) and not any(verdicts[t] for t in split.outputs)
    assert all(split_needed(graph, samples, stats, get_scheme(None)).values())
    protect(model, tmp_path / "out", device, scheme=white)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shapes = [b["shape"] for b in manifest["buffers"] if b["name"].startswith("round_1/in/")]
    assert shapes == [[1, 16, 16, 8]] * 2  # unsplit (a split push carries twice the channels)
    runs_as_litert(device, tmp_path / "out", model, np.random.default_rng(5), 3, TOLERANCE)


def test_a_model_whose_linear_ops_all_stay_in_the_tee_is_refused_saying_why(tf, device, tmp_path):
    """Depthwise layers alone (the default keeps them in the TEE), grouped or 3-D convolutions alone:
    nothing to offload, and the refusal says which ops and why, not that the model has no linear op (helpers'
    probes found it did); the depthwise model converts with the scheme option the message names."""
    import keras

    x = keras.Input((8, 8, 4), batch_size=1)
    depthwise = keras.Model(x, keras.layers.DepthwiseConv2D(3, padding="same")(x))
    grouped = keras.Model(x, keras.layers.Conv2D(8, 3, padding="same", groups=2)(x))
    small = keras.Input((3, 3, 4), batch_size=1)  # taps 7 apart on 3 pixels (tee_sim.program.window_fits)
    dilated = keras.Model(small, keras.layers.Conv2D(8, 3, padding="same", dilation_rate=7)(small))
    for model, why in ((depthwise, r"\(DEPTHWISE_CONV_2D\) all run in the TEE.*scheme groupmix keeps "
                                   r"DEPTHWISE_CONV_2D in the TEE \(--scheme groupmix:depthwise=offload"),
                       (grouped, r"\(CONV_2D\) all run in the TEE.*grouped convolutions of groups "
                                 r"narrower than 8 input channels \(--scheme groupmix:input_group=2K"),
                       (dilated, r"\(CONV_2D\) all run in the TEE.*convolutions dilated so far that their "
                                 r"taps lie more than twice their input apart")):
        data = tf.lite.TFLiteConverter.from_keras_model(model).convert()
        with pytest.raises(UnsupportedOpError, match="nothing to offload: the model's linear ops " + why) \
                as refused:
            protect(data, tmp_path / "out", device)
        assert ("input_group=2K" in str(refused.value)) == (model is grouped)  # where it applies (a review)
        assert not (tmp_path / "out").exists()
    data = tf.lite.TFLiteConverter.from_keras_model(depthwise).convert()
    assert len(protect(data, tmp_path / "out", device, scheme="groupmix:depthwise=offload")["rounds"]) == 1
    data = tf.lite.TFLiteConverter.from_keras_model(grouped).convert()  # groups of 2: input_group=4
    summary = protect(data, tmp_path / "outg", device, scheme="groupmix:input_group=4")["summary"]
    assert summary["offloaded_ops"] == 2  # a CONV_2D per group
    # A 3-D convolution runs in the TEE, weights and all: alone it is refused saying so (it was "no linear
    # op: nothing to protect"), beside a dense layer the conversion counts it among the TEE's linear ops.
    v = keras.Input((4, 6, 6, 3), batch_size=1)
    conv3d = keras.layers.Conv3D(4, 3, activation="relu")(v)
    data = tf.lite.TFLiteConverter.from_keras_model(keras.Model(v, conv3d)).convert()
    with pytest.raises(UnsupportedOpError, match=r"nothing to offload: the model's linear ops "
                                                 r"\(CONV_3D\) all run in the TEE.*3-D convolutions"):
        protect(data, tmp_path / "out3d", device)
    head = keras.layers.Dense(5)(keras.layers.Flatten()(conv3d))
    data = tf.lite.TFLiteConverter.from_keras_model(keras.Model(v, head)).convert()
    summary = protect(data, tmp_path / "out3d", device)["summary"]
    assert summary["offloaded_ops"] == summary["tee_linear_ops"] == 1
    assert summary["tee_linear_kinds"] == ["CONV_3D"]
    runs_as_litert(device, tmp_path / "out3d", data, np.random.default_rng(6), 2, TOLERANCE)


@pytest.mark.parametrize("scheme", [None, "shadownet"])
def test_transposed_convolutions_are_offloaded(tf, device, tmp_path, scheme):
    """A decoder's TRANSPOSE_CONV layers ran in the TEE, and a model of them alone was refused as having
    nothing to protect: each is now a CONV_2D per phase of its stride (converters/transpose_conv.py),
    offloaded and obfuscated, with its weights nowhere in untrusted.tflite. At batch 2 too (the rewrite's
    PAD was fused into a push that cannot write a batch's padded interiors)."""
    import keras
    keras.utils.set_random_seed(10)
    layers = keras.layers

    def decoder(batch: int) -> bytes:
        x = keras.Input((8, 8, 3), batch_size=batch)
        skip = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        h = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(skip)
        h = layers.Conv2DTranspose(8, 4, strides=2, padding="same", activation="relu")(h)
        h = layers.Conv2DTranspose(4, 2, strides=2)(layers.Concatenate()([h, skip]))
        h = layers.Conv2DTranspose(4, 3, strides=2, padding="same")(h)
        return tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, layers.Conv2D(2, 1)(h))).convert()

    y = keras.Input((4, 4, 6), batch_size=1)
    alone = tf.lite.TFLiteConverter.from_keras_model(
        keras.Model(y, layers.Conv2DTranspose(4, 4, strides=2, padding="same")(y))).convert()
    sparse = tf.lite.TFLiteConverter.from_keras_model(  # a kernel smaller than the stride: 3 phases of bias
        keras.Model(y, layers.Conv2DTranspose(4, 1, strides=2, activation="relu")(y))).convert()
    # The decoder: 2 convs; the 4x4 and 2x2 transposed convs one conv each (every phase has every tap),
    # the 3x3 one a conv per phase (4); a 1x1 conv.
    for name, model, offloaded, kept in (("decoder", decoder(1), 9, 0), ("batch2", decoder(2), 9, 0),
                                          ("alone", alone, 1, 0), ("sparse", sparse, 1, 0)):
        graph = read_model(model)
        transposed = [op for op in graph.ops if op.kind == "TRANSPOSE_CONV"]
        assert len(transposed) == (3 if name in ("decoder", "batch2") else 1)
        summary = protect(model, tmp_path / name, device, scheme=scheme)["summary"]
        assert summary["offloaded_ops"] == offloaded and summary["tee_linear_ops"] == kept
        assert summary["tee_linear_kinds"] == (["TRANSPOSE_CONV"] if kept else [])
        untrusted = (tmp_path / name / "untrusted.tflite").read_bytes()
        for op in transposed:
            for f in graph.tensors[op.inputs[1]].data:
                assert f.tobytes() not in untrusted
        rng = np.random.default_rng(2)
        with Driver(device, tmp_path / name) as run:
            for _ in range(2):
                xs = inputs_for(model, rng)
                assert relative_error(run(*xs), litert(model, *xs)) <= TOLERANCES[scheme or "groupmix"]


@pytest.mark.parametrize("scheme, pushes", [(None, 1), ("groupmix:depthwise=offload", 2), ("shadownet", 2)])
def test_the_readers_of_one_tensor_share_its_push(tf, device, tmp_path, scheme, pushes):
    """A tensor read by several offloaded layers of a round (a block's shortcut and first conv) crossed
    once per layer, each copy mixed and masked independently, and a fit over all the copies recovered
    more of it than one (SECURITY.md). Readers whose input transforms can be the same now share one
    push: the two convs under groupmix; a depthwise layer, whose input groupmix does not mix, needs
    its own, as the paper's scheme's convs and depthwise layers do."""
    import keras
    keras.utils.set_random_seed(12)
    layers = keras.layers
    x = keras.Input((8, 8, 3), batch_size=1)
    t = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    y = layers.Add()([layers.Conv2D(32, 3, padding="same")(t), layers.Conv2D(32, 1)(t),
                      layers.DepthwiseConv2D(3, padding="same")(t)])
    model = tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, layers.Conv2D(4, 1)(y))).convert()
    protect(model, tmp_path / "out", device, scheme=scheme,
            mask_rounds=None if scheme == "shadownet" else "all")  # the paper's masks are static
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [len(r["inputs"]) for r in manifest["rounds"]] == [1, pushes, 1]
    runs_as_litert(device, tmp_path / "out", model, np.random.default_rng(3), 2,
                   TOLERANCES[(scheme or "groupmix").split(":")[0]])


def test_a_dense_layer_on_the_raw_input_shares_the_convs_split_push(tf, device, tmp_path):
    """Round 1 under ``exact_split=all``: a conv and a dense layer on the flattened raw input (no RESHAPE
    between: LiteRT's FULLY_CONNECTED flattens its input) read one tensor. The split could not serve the
    dense layer, and sharing one push with it cost the conv its split (a review: 5.3e-6 against 3.6e-7),
    so the dense layer had a push of its own, unsplit; since stop 57 it is planned as the convolution it is
    (``converters.normalize.as_convolutions``), and both cross in one split push."""
    import flatbuffers
    import keras
    from ai_edge_litert import schema_py_generated as fb

    keras.utils.set_random_seed(14)
    x = keras.Input((6, 6, 12), batch_size=1)
    outputs = [keras.layers.Conv2D(8, 3)(x), keras.layers.Dense(10)(keras.layers.Flatten()(x))]
    model = fb.ModelT.InitFromPackedBuf(
        tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, outputs)).convert(), 0)
    graph = model.subgraphs[0]
    codes = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    (reshape,) = [op for op in graph.operators if codes[op.opcodeIndex] == fb.BuiltinOperator.RESHAPE]
    for op in graph.operators:
        op.inputs = [reshape.inputs[0] if t == reshape.outputs[0] else t for t in op.inputs]
    graph.operators.remove(reshape)
    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    data = bytes(builder.Output())
    protect(data, tmp_path / "out", device, scheme="groupmix:exact_split=all")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    shapes = sorted(b["shape"] for b in manifest["buffers"] if b["name"].startswith("round_1/in/"))
    assert shapes == [[1, 6, 6, 24]]  # one split push for both
    runs_as_litert(device, tmp_path / "out", data, np.random.default_rng(4), 2, TOLERANCE)


@pytest.mark.parametrize("scheme", ["groupmix:depthwise=offload", "shadownet"])
@pytest.mark.parametrize("multiplier, strides, dilation", [(1, 1, 1), (2, 2, 1), (3, 1, 2)])
def test_a_depthwise_convolution_written_as_a_grouped_one_is_offloaded(tf, device, tmp_path, scheme,
                                                                        multiplier, strides, dilation):
    """A CONV_2D with as many groups as input channels (ConvNeXt's depthwise layers, Keras
    ``Conv2D(groups=C)``) ran in the TEE as a grouped conv (a probe: 18 of ConvNeXtTiny's layers, 3% of its
    multiply-adds): it is the depthwise convolution it computes, offloaded as one."""
    import keras
    keras.utils.set_random_seed(7)
    x = keras.Input((9, 9, 4), batch_size=1)
    h = keras.layers.Conv2D(4 * multiplier, 3, groups=4, strides=strides, dilation_rate=dilation,
                            padding="same", activation="relu")(x)
    model = tf.lite.TFLiteConverter.from_keras_model(keras.Model(x, keras.layers.Conv2D(4, 1)(h))).convert()
    assert any(op.kind == "CONV_2D" and read_model(model).tensors[op.inputs[1]].shape[-1] == 1
               for op in read_model(model).ops)  # TensorFlow wrote it as a grouped CONV_2D
    summary = protect(model, tmp_path / "out", device, scheme=scheme)["summary"]
    assert summary["offloaded_ops"] == 2 and summary["tee_linear_ops"] == 0
    xs = inputs_for(model, np.random.default_rng(2))
    with Driver(device, tmp_path / "out") as run:
        assert relative_error(run(*xs), litert(model, *xs)) <= TOLERANCES[scheme.partition(":")[0]]


@pytest.mark.parametrize("scheme", [None, "shadownet"])
def test_untrusted_model_holds_no_original_weight_or_bias(model, scheme, device, tmp_path):
    protect(model, tmp_path / "out", device, scheme=scheme)
    untrusted = (tmp_path / "out" / "untrusted.tflite").read_bytes()
    graph = normalize(read_model(model))
    part = _partition(model, scheme)
    public = read_model(untrusted)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    # An exact split's layer holds W' whole, and beside it W' rounded to a coarse grid and the remainder
    # (converters.exact_split): values with few significant bits, which meet a float16 model's by chance.
    # W' is checked; what is derived from it adds nothing to find.
    split = {f"{r['signature']}/w{o['name'][1:]}" for r in manifest["rounds"] for o in r["outputs"]
             if o.get("split")}
    assert not split or scheme is None  # the paper's static masks are not split

    def obfuscated(t):
        if t.name not in split:
            return t.data
        m, c = t.data.shape[0] // 2, t.data.shape[-1] // 2
        return t.data[m:, ..., c:]
    constants = np.concatenate([obfuscated(t).reshape(-1).view(np.uint32) for t in public.tensors
                                if t.data is not None and t.data.dtype == np.float32])
    for i in part.offloaded:
        op = graph.ops[i]
        secrets = [graph.tensors[op.inputs[1]].data]
        if len(op.inputs) > 2 and op.inputs[2] >= 0 and np.any(graph.tensors[op.inputs[2]].data):
            secrets.append(graph.tensors[op.inputs[2]].data)  # an all-zero bias is no secret
        for secret in secrets:
            assert secret.tobytes() not in untrusted
            axis = -1 if op.kind == "DEPTHWISE_CONV_2D" else 0
            for f in np.moveaxis(secret, axis, 0):
                if np.any(f):
                    assert np.ascontiguousarray(f).tobytes() not in untrusted, graph.describe_op(i)
            # No single non-zero value survives (these models are small enough for chance collisions
            # between random float32 bit patterns to be negligible).
            bits = secret.reshape(-1).view(np.uint32)
            assert not np.isin(bits[secret.reshape(-1) != 0], constants).any(), graph.describe_op(i)
    # Only the obfuscated linear ops, without bias or activation, one signature per round.
    interpreter = Interpreter(model_content=untrusted)
    rounds = range(1, len(part.rounds) + 1)
    assert sorted(interpreter.get_signature_list()) == sorted(f"round_{r}" for r in rounds)
    for op in public.ops:
        assert op.kind in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
        assert getattr(op.options, "fusedActivationFunction", 0) == 0
        # LiteRT's float conv kernels insist on a bias: the graph layer writes an all-zero one.
        assert len(op.inputs) < 3 or op.inputs[2] < 0 or not np.any(public.tensors[op.inputs[2]].data)
