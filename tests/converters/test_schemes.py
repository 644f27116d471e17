"""The scheme registry and the paper's transformation, checked numerically with numpy convolutions."""

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb
from ai_edge_litert.interpreter import Interpreter

from converters import linear
from converters.graph import Graph, write_model
from converters.schemes import DEFAULT_SCHEME, SCHEMES, ActivationStats, LinearLayer, get_scheme
from converters.schemes.groupmix import GroupMixScheme
from converters.schemes.shadownet import ShadowNetScheme


def conv_options(padding=fb.Padding.SAME, stride=(1, 1), dilation=(1, 1)):
    o = fb.Conv2DOptionsT()
    o.padding, (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor) = padding, stride, dilation
    return o


def depthwise_options(multiplier, padding=fb.Padding.SAME, stride=(1, 1), dilation=(1, 1)):
    o = fb.DepthwiseConv2DOptionsT()
    o.padding, (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor) = padding, stride, dilation
    o.depthMultiplier = multiplier
    return o


def masked_restore(kind, scheme, weights, x, options, out_shape, rng, multiplier=1):
    """restore(op(x' + r', W')) - pop, with pop = restore(op(r', W')) computed as the converter does."""
    obf = scheme.obfuscate(LinearLayer(kind, weights, multiplier), rng)
    stats = ActivationStats(rng.uniform(0, 1, x.shape[-1]), 1.0, 1.2)
    r = scheme.push_mask(x.shape, stats.permuted(None), rng).astype(np.float64)
    perm = obf.input_permutation
    xp, rp = (x[..., perm], r[..., perm]) if perm is not None else (x, r)
    m = obf.weights.shape[-1] if kind == "DEPTHWISE_CONV_2D" else obf.weights.shape[0]
    obf_shape = (*out_shape[:-1], m)
    y_obf = linear.apply(kind, xp + rp, obf.weights, options, obf_shape)
    pop = obf.restore(linear.apply(kind, rp, obf.weights, options, obf_shape))
    return obf, obf.restore(y_obf) - pop


def test_registry_default_and_parsing():
    assert DEFAULT_SCHEME == "groupmix" and "shadownet" in SCHEMES
    assert isinstance(get_scheme(), GroupMixScheme) and isinstance(get_scheme("shadownet"), ShadowNetScheme)
    s = get_scheme("shadownet:obf_ratio=1.5,mask_scale=0.5")
    assert s.public_params() == {"obf_ratio": 1.5, "fake_std": 1.0, "mask_scale": 0.5, "center_masks": True}
    assert get_scheme(s) is s
    with pytest.raises(ValueError, match="unknown scheme"):
        get_scheme("nope")
    with pytest.raises(ValueError, match="'shadownet' has no parameter 'bogus'; its parameters: obf_ratio, "):
        get_scheme("shadownet:bogus=1")
    with pytest.raises(ValueError):
        get_scheme("shadownet:obf_ratio=1.0")


@pytest.mark.parametrize("spec, message", [
    # bool("no") is True: the user turned the feature on by asking to turn it off (a helper's probe)
    ("groupmix:shaped_masks=no", "shaped_masks must be true or false, not 'no'"),
    ("groupmix:center_masks=off", "center_masks must be true or false"),
    ("shadownet:center_masks=0", "center_masks must be true or false, not 0"),
    # infinite or absurd sizes converted, then ran to NaN, garbage or an internal error
    ("groupmix:mask_scale=inf", r"mask_scale must be a number in \[0, 10000\], not inf"),
    ("groupmix:mask_scale=1e30", "mask_scale must be a number"),
    ("groupmix:static_mask_scale=inf", "static_mask_scale must be a number"),
    ("groupmix:max_cos=nan", r"max_cos must be a number in \(0, 1\]"),
    ("shadownet:mask_scale=inf", "mask_scale must be a number"),
    ("shadownet:fake_std=inf", "fake_std must be a number"),
    ("shadownet:obf_ratio=inf", r"obf_ratio must be a number in \(1, 10\]"),
    ("shadownet:obf_ratio=1e9", "obf_ratio must be a number"),
    ("shadownet:obf_ratio=true", "obf_ratio must be a number"),
    # the last of two values was silently taken
    ("groupmix:depthwise=offload,depthwise=tee", "scheme parameter 'depthwise' given twice"),
    # true was taken for 1 (a helper's sweep); a billion draws per group ran for ever
    ("groupmix:min_group=true", r"min_group must be an integer in \[1, 16\], not True"),
    ("groupmix:tries=true", "tries must be an integer"),
    ("groupmix:tries=1000000000", r"tries must be an integer in \[1, 10000\]"),
    ("groupmix:group_size=1", r"group_size must be an integer in \[2, 65536\], not 1"),
    ("groupmix:input_group=-1", "input_group must be an integer"),
    ("groupmix:min_group=2.0", "min_group must be an integer"),
])
def test_scheme_parameters_of_the_wrong_kind_or_size_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        get_scheme(spec)


def test_scheme_parameters_take_what_they_say():
    off = get_scheme("groupmix:shaped_masks=false,center_masks=False").public_params()
    assert off["shaped_masks"] is off["center_masks"] is False
    assert get_scheme("shadownet:obf_ratio=10,fake_std=0.1,mask_scale=0").public_params() == {
        "obf_ratio": 10.0, "fake_std": 0.1, "mask_scale": 0.0, "center_masks": True}
    assert get_scheme("groupmix", mask_scale=np.float32(2), center_masks=np.bool_(False)).mask_scale == 2.0
    with pytest.raises(TypeError, match="a scheme is a name or a scheme object, not int"):
        get_scheme(123)


@pytest.mark.parametrize("padding,stride,dilation", [
    (fb.Padding.SAME, (1, 1), (1, 1)), (fb.Padding.VALID, (2, 1), (1, 1)),
    (fb.Padding.SAME, (2, 2), (1, 1)), (fb.Padding.SAME, (1, 1), (2, 3)),
])
def test_conv_restore_with_masks_is_exact(padding, stride, dilation):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 11, 10, 6))
    w = rng.standard_normal((20, 3, 3, 6)) * 0.05
    options = conv_options(padding, stride, dilation)
    want = linear.conv2d(x, w, options)
    obf, got = masked_restore("CONV_2D", get_scheme("shadownet"), w, x, options, want.shape, rng)
    assert obf.weights.shape == (24, 3, 3, 6)  # M = int(20 * 1.2)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_conv_transformation_is_the_papers():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((10, 3, 3, 16)) * 0.1
    obf = get_scheme("shadownet").obfuscate(LinearLayer("CONV_2D", w), rng)
    m0, m1 = obf.restore_index
    s, ones = obf.restore_coef
    assert obf.weights.shape[0] == 12 and obf.input_permutation is None
    assert np.all(ones == 1) and np.all((s > 0) & (s <= 1))
    assert len(set(m0)) == 10 and set(m1) <= set(range(12)) - set(m0)  # partners are the 2 fakes
    fakes = obf.weights[sorted(set(range(12)) - set(m0))]
    assert abs(np.std(fakes) - 1) < 0.15  # N(0, 1), ~10-100x the real weights
    # W'_i = (W_i - F_j(i)) / s_i, so s_i * W'_i + F_j(i) = W_i.
    back = s[:, None, None, None] * obf.weights[m0] + obf.weights[m1]
    assert np.allclose(back, w, atol=1e-6)
    assert not np.any(np.isclose(obf.weights[m0], w, rtol=1e-3, atol=0))


def test_dense_as_1x1_conv():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 33))
    w = rng.standard_normal((7, 33)) * 0.1
    want = linear.fully_connected(x, w, (1, 7))
    obf, got = masked_restore("FULLY_CONNECTED", get_scheme("shadownet"), w, x, None, (1, 7), rng)
    assert obf.weights.shape == (8, 33)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


@pytest.mark.parametrize("multiplier,stride,dilation", [(1, (1, 1), (1, 1)), (2, (2, 1), (1, 1)),
                                                        (2, (1, 1), (2, 2)), (3, (1, 1), (1, 3))])
def test_depthwise_permutation_and_scale(multiplier, stride, dilation):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 9, 9, 5))
    k = rng.standard_normal((1, 3, 3, 5 * multiplier)) * 0.2
    options = depthwise_options(multiplier, stride=stride, dilation=dilation)
    want = linear.depthwise_conv2d(x, k, options)
    obf, got = masked_restore("DEPTHWISE_CONV_2D", get_scheme("shadownet"), k, x, options, want.shape, rng,
                              multiplier)
    assert obf.weights.shape == k.shape and sorted(obf.input_permutation) == list(range(5))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    # K'_c = K_pi(c) * s: every obfuscated kernel is a scaled original one, in another channel.
    ratio = obf.weights / k[..., obf.restore_index[0].argsort()]
    assert np.allclose(ratio, ratio[:, :1, :1, :], rtol=1e-4)


def test_few_filters_still_get_a_fake():
    scheme = get_scheme("shadownet")
    assert scheme.fake_count(1) == 1 and scheme.fake_count(4) == 1 and scheme.fake_count(10) == 2
    rng = np.random.default_rng(4)
    w = rng.standard_normal((1, 3, 3, 2))
    obf = scheme.obfuscate(LinearLayer("CONV_2D", w), rng)
    assert obf.weights.shape[0] == 2


def test_same_generator_state_same_secrets():
    w = np.random.default_rng(5).standard_normal((6, 3, 3, 2))
    a = get_scheme("shadownet").obfuscate(LinearLayer("CONV_2D", w), np.random.default_rng(9))
    b = get_scheme("shadownet").obfuscate(LinearLayer("CONV_2D", w), np.random.default_rng(9))
    c = get_scheme("shadownet").obfuscate(LinearLayer("CONV_2D", w), np.random.default_rng(10))
    assert np.array_equal(a.weights, b.weights) and not np.array_equal(a.weights, c.weights)


def test_masks_follow_the_activations():
    mean = np.arange(8.0)
    stats = ActivationStats(mean, 3.0, 5.0)
    mask = get_scheme("shadownet:mask_scale=2").push_mask((1, 64, 64, 8), stats, np.random.default_rng(6))
    assert mask.dtype == np.float32 and abs(np.std(mask - mask.mean(axis=(0, 1, 2))) - 6.0) < 0.1
    assert np.allclose(mask.mean(axis=(0, 1, 2)), -mean, atol=0.2)  # centered: x + r hides the mean too
    plain = get_scheme("shadownet:center_masks=false").push_mask((1, 64, 64, 8), stats,
                                                                  np.random.default_rng(6))
    assert np.allclose(plain.mean(axis=(0, 1, 2)), 0, atol=0.1)
    assert np.array_equal(stats.permuted(np.array([1, 0, 2, 3, 4, 5, 6, 7])).mean[:2], [1.0, 0.0])


# numpy's linear ops must be LiteRT's: the pop masks depend on it.
def _litert_linear(kind, x, weights, options, out_shape):
    g = Graph()
    xi = g.add_tensor("x", x.shape, np.float32)
    wi = g.add_tensor("w", weights.shape, np.float32, weights)
    yi = g.add_tensor("y", out_shape, np.float32)
    g.add_op(kind, [xi, wi, -1], [yi], options if options is not None else fb.FullyConnectedOptionsT(),
             version=2)
    g.inputs, g.outputs = [xi], [yi]
    interpreter = Interpreter(model_content=write_model(g))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x.astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.mark.parametrize("kind,wshape,options,out_shape", [
    ("CONV_2D", (4, 3, 3, 3), conv_options(fb.Padding.SAME, (2, 2)), (1, 5, 5, 4)),
    ("CONV_2D", (4, 3, 2, 3), conv_options(fb.Padding.VALID, (1, 2)), (1, 7, 4, 4)),
    ("CONV_2D", (4, 3, 3, 3), conv_options(fb.Padding.SAME, (1, 1), (2, 2)), (1, 9, 9, 4)),
    ("DEPTHWISE_CONV_2D", (1, 3, 3, 6), depthwise_options(2, fb.Padding.SAME, (2, 1)), (1, 5, 9, 6)),
    ("DEPTHWISE_CONV_2D", (1, 3, 3, 3), depthwise_options(1, fb.Padding.VALID, (1, 1), (2, 2)), (1, 5, 5, 3)),
    ("FULLY_CONNECTED", (5, 243), None, (1, 5)),
])
def test_numpy_linear_ops_match_litert(kind, wshape, options, out_shape):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 9, 9, 3)).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    want = _litert_linear(kind, x, w, options, out_shape)
    got = linear.apply(kind, x, w, options, out_shape)
    assert got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
