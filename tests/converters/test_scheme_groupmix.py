"""The groupmix scheme: its math (exact restore, orthonormal groups, conditioning) and the attack suite on
realistic layers (what it recovers, against the paper's scheme as a control). End to end on models:
test_scheme_groupmix_models.py."""

import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as fb

from converters import linear
from converters.schemes import ActivationStats, LinearLayer, get_scheme
from converters.schemes.groupmix import GroupMixScheme, split_groups
from shadownet import attacks
from tee_sim.ta_shadownet_linears import block_matmuls, restore_blocks


def conv_options(padding=fb.Padding.SAME, stride=(1, 1), dilation=(1, 1)):
    o = fb.Conv2DOptionsT()
    o.padding, (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor) = padding, stride, dilation
    return o


def depthwise_options(multiplier, stride=(1, 1), dilation=(1, 1)):
    o = fb.DepthwiseConv2DOptionsT()
    o.padding, (o.strideH, o.strideW) = fb.Padding.SAME, stride
    o.dilationHFactor, o.dilationWFactor = dilation
    o.depthMultiplier = multiplier
    return o


# -- realistic layers -----------------------------------------------------------------------------------

def he_layer(rng, n, *shape):
    """He-normal filters times a folded batch norm's per-filter factor (norms spread over ~4x)."""
    fan_in = int(np.prod(shape))
    w = rng.standard_normal((n, *shape)) * np.sqrt(2 / fan_in)
    return w * np.exp(rng.normal(0, 0.5, n)).reshape(-1, *[1] * len(shape))


def correlated_layer(rng, n, *shape):
    """Trained-like correlation: every filter shares a common component and one of n/8 cluster
    components (|cos| 0.3-0.8 between filters), plus a few near-duplicates (|cos| ~0.98)."""
    d = int(np.prod(shape))
    common = rng.standard_normal(d)
    clusters = rng.standard_normal((max(1, n // 8), d))
    w = (0.6 * common + 1.0 * clusters[rng.integers(0, len(clusters), n)] + 0.7 * rng.standard_normal((n, d)))
    w[1::16] = w[0::16][: len(w[1::16])] + 0.15 * rng.standard_normal((len(w[1::16]), d))
    return (w * np.sqrt(2 / d) * np.exp(rng.normal(0, 0.5, n))[:, None]).reshape(n, *shape)


LAYERS = {  # name -> (kind, builder)
    "conv3x3": ("CONV_2D", lambda rng: he_layer(rng, 64, 3, 3, 32)),
    "conv1x1_wide": ("CONV_2D", lambda rng: he_layer(rng, 128, 1, 1, 64)),  # more filters than dims
    "first_conv": ("CONV_2D", lambda rng: he_layer(rng, 32, 3, 3, 3)),
    "dense": ("FULLY_CONNECTED", lambda rng: he_layer(rng, 96, 256)),
    "correlated3x3": ("CONV_2D", lambda rng: correlated_layer(rng, 64, 3, 3, 16)),
    "correlated1x1": ("CONV_2D", lambda rng: correlated_layer(rng, 96, 1, 1, 48)),
}


def input_matrix(obf, channels):
    """The input transform as a matrix ``T`` ``[C, C]``: the accelerator's input is ``x' = T x``."""
    return obf.transform_input(np.eye(channels)).T


def rows_as_reference(obf, kind):
    """The obfuscated filters as rows, in the reference's input coordinates: ``W' x' = (W' T) x`` (the
    attacker is handed the secret input transform: the strongest case for the output-side mixing alone)."""
    w = obf.weights.astype(np.float64)
    if kind != "DEPTHWISE_CONV_2D":
        w = w @ input_matrix(obf, w.shape[-1])
    return w.reshape(len(w), -1)


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer_case(request):
    kind, build = LAYERS[request.param]
    rng = np.random.default_rng(sorted(LAYERS).index(request.param))
    w = build(rng)
    layer = LinearLayer(kind, w, input_channels=w.shape[-1])
    return request.param, kind, w, GroupMixScheme().obfuscate(layer, rng)


# -- the registry ---------------------------------------------------------------------------------------

def test_registry_and_parameters():
    s = get_scheme("groupmix:group_size=8,max_cos=0.7,input_group=1,exact_split=none,depthwise=offload,"
                   "mask_floor=input,deep_mask_scale=2.5,modular_masks=false")
    assert isinstance(s, GroupMixScheme) and s.name == "groupmix"
    assert s.public_params() == {"group_size": 8, "min_group": 8, "max_cos": 0.7, "tries": 64,
                                 "input_group": 1, "mask_scale": 10.0, "deep_mask_scale": 2.5,
                                 "static_mask_scale": 0.0,
                                 "center_masks": True, "shaped_masks": True, "exact_split": "none",
                                 "depthwise": "offload", "mask_floor": "input", "modular_masks": False,
                                 "modular_depth": "all"}
    assert not s.in_tee
    default = get_scheme("groupmix")
    assert default.public_params()["exact_split"] == "auto"
    assert default.public_params()["depthwise"] == "tee" and default.in_tee == {"DEPTHWISE_CONV_2D"}
    assert default.public_params()["mask_floor"] == "layers"
    assert default.public_params()["deep_mask_scale"] == 1.0
    assert default.public_params()["modular_masks"] is True
    assert default.public_params()["modular_depth"] == "all"
    assert get_scheme("groupmix:modular_depth=2").public_params()["modular_depth"] == 2
    for bad in ("group_size=1", "min_group=32", "max_cos=0", "tries=0", "input_group=-1", "mask_scale=-1",
                "deep_mask_scale=-1", "static_mask_scale=-1", "exact_split=true", "depthwise=cpu",
                "mask_floor=none", "modular_masks=2", "modular_depth=-1",
                "modular_depth=true", "modular_depth=2.5", "modular_depth=every", "bogus=1"):
        with pytest.raises(ValueError):
            get_scheme(f"groupmix:{bad}")


def test_groups_are_consecutive_and_even():
    assert split_groups(1000, 16) == [(round(i * 1000 / 63), round((i + 1) * 1000 / 63)) for i in range(63)]
    for n in (1, 5, 16, 17, 33, 64, 1000):
        groups = split_groups(n, 16)
        sizes = [b - a for a, b in groups]
        assert groups[0][0] == 0 and groups[-1][1] == n and all(
            b == c for (_, b), (c, _) in zip(groups[:-1], groups[1:], strict=True))
        assert max(sizes) <= 16 and max(sizes) - min(sizes) <= 1


# -- the math ---------------------------------------------------------------------------------------------

def test_restore_gives_the_filters_back_exactly(layer_case):
    name, kind, w, obf = layer_case
    real = w.reshape(len(w), -1)
    # The restore is linear in y': applied to the obfuscated filters it must give the real ones.
    back = obf.restore(rows_as_reference(obf, kind).T).T
    assert np.max(np.abs(back - real)) <= 1e-6 * np.max(np.abs(real)), name
    assert obf.weights.dtype == np.float32 and obf.weights.shape == w.shape  # no fakes at these sizes


def test_groups_are_orthonormal_bases_with_bounded_cosines(layer_case):
    name, kind, w, obf = layer_case
    rows = rows_as_reference(obf, kind)
    real = w.reshape(len(w), -1)
    n = len(real)
    k, _ = obf.restore_index.shape
    blocks = restore_blocks(obf.restore_index, obf.restore_coef, len(rows))
    assert blocks is not None and len(blocks) == len(split_groups(n, 16)) and k <= 16
    norms = np.linalg.norm(rows, axis=1)
    for source, columns, _ in blocks:
        group = rows[source]
        gram = (group / norms[source, None]) @ (group / norms[source, None]).T
        assert np.allclose(gram, np.eye(len(group)), atol=1e-5), name  # orthogonal within a group
        group_norm = np.sqrt(np.mean(np.sum(real[columns] ** 2, axis=1)))
        assert np.all((norms[source] >= group_norm / 2 * 0.999) & (norms[source] <= group_norm * 2 * 1.001))
    # No obfuscated filter points along any real filter of the layer (other groups' included).
    assert attacks.abs_cosines(rows, real).max() <= 0.75 + 1e-6, name


def test_restore_costs_at_most_sqrt_group_size_in_precision(layer_case):
    """``y_j = sum_i c_ji y'_i`` with ``sum_i |c_ji| |W'_i| <= sqrt(m) |w_j|``: the float32 error of the
    accelerator's outputs reaches ``y_j`` amplified by at most sqrt(m) over computing ``w_j . x``."""
    name, kind, w, obf = layer_case
    rows = rows_as_reference(obf, kind)
    real_norms = np.linalg.norm(w.reshape(len(w), -1), axis=1)
    weighted = np.abs(obf.restore_coef.astype(np.float64)) * np.linalg.norm(rows, axis=1)[obf.restore_index]
    m = (obf.restore_coef != 0).sum(axis=0)
    assert np.all(weighted.sum(axis=0) <= np.sqrt(m) * real_norms * (1 + 1e-5)), name


@pytest.mark.parametrize("padding,stride,dilation,input_group", [
    (fb.Padding.SAME, (1, 1), (1, 1), 16), (fb.Padding.VALID, (2, 1), (1, 1), 16),
    (fb.Padding.SAME, (1, 1), (2, 3), 16), (fb.Padding.SAME, (1, 1), (1, 1), 1)])
def test_conv_with_input_transform_and_masks_is_exact(padding, stride, dilation, input_group):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 11, 10, 20))
    w = he_layer(rng, 40, 3, 3, 20)
    options = conv_options(padding, stride, dilation)
    want = linear.conv2d(x, w, options)
    scheme = GroupMixScheme(input_group=input_group, static_mask_scale=10)
    obf = scheme.obfuscate(LinearLayer("CONV_2D", w, input_channels=20), rng)
    stats = ActivationStats(rng.normal(0, 1, 20), 1.0, 1.5)
    r = scheme.push_mask(x.shape, stats.for_input_of(obf), rng).astype(np.float64)
    xp = obf.transform_input(x)
    got = obf.restore(linear.conv2d(xp + r, obf.weights, options))
    pop = obf.restore(linear.conv2d(r, obf.weights, options))
    assert np.max(np.abs(got - pop - want)) <= 1e-5 * np.max(np.abs(want))
    # The masks are centered on the accelerator's input: its per-channel means are the mixed ones.
    assert np.allclose(stats.for_input_of(obf).mean, obf.transform_input(stats.mean))


def test_input_transform_is_orthogonal_blocks_of_consecutive_channels():
    rng = np.random.default_rng(18)
    w = he_layer(rng, 24, 3, 3, 40)
    mixing = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", w, input_channels=40), rng)
    assert mixing.input_permutation is None and mixing.input_index.shape == (14, 40)  # groups 13, 13, 14
    t = input_matrix(mixing, 40)
    assert np.allclose(t @ t.T, np.eye(40), atol=1e-6)  # orthogonal: no precision lost, no scale leaked
    for a, b in split_groups(40, 16):
        assert np.count_nonzero(t[a:b]) == (b - a) ** 2  # dense within a group, nothing outside
    rgb = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", he_layer(rng, 8, 3, 3, 3)), rng)
    assert rgb.input_index is None and rgb.input_permutation is None  # too few channels to mix
    only = GroupMixScheme(input_group=1).obfuscate(LinearLayer("CONV_2D", w, input_channels=40), rng)
    assert only.input_index is None and sorted(only.input_permutation) == list(range(40))
    assert GroupMixScheme(input_group=0).obfuscate(LinearLayer("CONV_2D", w), rng).input_permutation is None


@pytest.mark.parametrize("channels", [16, 40, None])
def test_dense_inputs_are_mixed_per_position_when_their_channels_are_known(channels):
    rng = np.random.default_rng(19)
    x = rng.standard_normal((2, 5, 2, 40)) if channels == 40 else rng.standard_normal((2, 400))
    w = he_layer(rng, 30, 400)
    want = linear.fully_connected(x, w, (2, 30))
    layer = LinearLayer("FULLY_CONNECTED", w, input_channels=x.shape[-1] if channels else None)
    obf = GroupMixScheme().obfuscate(layer, rng)
    assert (obf.input_index is None) == (channels is None)
    got = obf.restore(linear.fully_connected(obf.transform_input(x), obf.weights, (2, len(obf.weights))))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_small_degenerate_and_rank_deficient_layers():
    rng = np.random.default_rng(11)
    scheme = GroupMixScheme()
    cases = {
        "one filter": np.array(rng.standard_normal((1, 20))),  # padded with fake directions to 8
        "more filters than dims": rng.standard_normal((6, 3)),  # a tight frame of R^3
        "duplicates and zeros": np.vstack([np.tile(rng.standard_normal(30), (5, 1)), np.zeros((3, 30)),
                                           rng.standard_normal((10, 30))]),
        "all zero": np.zeros((4, 9)),
    }
    for name, w in cases.items():
        obf = scheme.obfuscate(LinearLayer("FULLY_CONNECTED", w), rng)
        assert obf.input_index is None  # the input's channels are not known: left alone
        assert len(obf.weights) >= len(w) and np.all(np.isfinite(obf.weights)), name
        back = obf.restore(obf.weights.astype(np.float64).T).T
        assert np.max(np.abs(back - w)) <= 1e-6 * max(np.max(np.abs(w)), 1e-30), name
    one = scheme.obfuscate(LinearLayer("FULLY_CONNECTED", cases["one filter"]), rng)
    assert one.weights.shape == (8, 20)
    assert attacks.abs_cosines(one.weights, cases["one filter"]).max() <= 0.75


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_is_scaled(multiplier):
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 9, 9, 6))
    k = rng.standard_normal((1, 3, 3, 6 * multiplier)) * 0.2
    options = depthwise_options(multiplier, dilation=(2, 1))
    want = linear.depthwise_conv2d(x, k, options)
    obf = GroupMixScheme().obfuscate(LinearLayer("DEPTHWISE_CONV_2D", k, multiplier, input_channels=6), rng)
    assert obf.input_permutation is None and obf.input_index is None
    got = obf.restore(linear.depthwise_conv2d(x, obf.weights, options))
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))
    scales = 1 / obf.restore_coef[0]
    assert np.all((scales >= 0.5 * 0.999) & (scales <= 2 * 1.001))  # no tiny scales to divide by


def test_masks_are_centered_at_ten_times_the_rms():
    stats = ActivationStats(np.array([3.0, -1.0, 0.0, 2.0]), 0.5, 2.0)
    one_time = GroupMixScheme().mask_distribution(stats)
    assert one_time.std == 20.0 and np.array_equal(one_time.mean, -stats.mean)
    # Rounds without one-time masks: unmasked by default, else static masks at static_mask_scale.
    assert GroupMixScheme().push_mask((1, 8, 8, 4), stats, np.random.default_rng(13)) is None
    mask = GroupMixScheme(static_mask_scale=10).push_mask((1, 256, 256, 4), stats, np.random.default_rng(13))
    assert mask.dtype == np.float32
    assert np.allclose(mask.reshape(-1, 4).mean(axis=0), -stats.mean, atol=0.3)
    assert abs(np.std(mask - mask.reshape(-1, 4).mean(axis=0)) - 20.0) < 0.2


def test_which_masks_are_modular():
    """A push conv and dense layers alone read, carrying no user input, gets a modular mask at
    ``mask_scale`` (uniform, no mean; its RMS within 2^(+-1/2) of the spread asked); the deeper rounds' small
    masks up to ``modular_depth`` layers from the input (all by default); ``modular_masks=false`` none."""
    stats = ActivationStats(np.array([3.0, -1.0, 0.0, 2.0]), 0.5, 2.0)
    floor = GroupMixScheme().mask_distribution(stats, modular=True)
    assert floor.modular and not floor.mean.any() and 20.0 / 2 ** 0.5 <= floor.std <= 20.0 * 2 ** 0.5
    assert not GroupMixScheme().mask_distribution(stats, modular=False).modular  # read by another kind
    deeper = {"deep": True, "modular": True}
    deep = GroupMixScheme().mask_distribution(stats, depth=99, **deeper)
    assert deep.modular and 2.0 / 2 ** 0.5 <= deep.std <= 2.0 * 2 ** 0.5
    assert GroupMixScheme(modular_depth=2).mask_distribution(stats, depth=2, **deeper).modular
    assert not GroupMixScheme(modular_depth=2).mask_distribution(stats, depth=3, **deeper).modular
    assert not GroupMixScheme(modular_depth=0).mask_distribution(stats, depth=1, **deeper).modular
    assert GroupMixScheme(modular_depth=0).mask_distribution(stats, modular=True, depth=1).modular  # round 2
    assert not GroupMixScheme(modular_masks=False, modular_depth="all").mask_distribution(
        stats, depth=2, **deeper).modular


def test_same_generator_state_same_secrets():
    w = he_layer(np.random.default_rng(14), 20, 3, 3, 4)
    a, b, c = (GroupMixScheme().obfuscate(LinearLayer("CONV_2D", w), np.random.default_rng(seed))
               for seed in (1, 1, 2))
    assert np.array_equal(a.weights, b.weights) and not np.array_equal(a.weights, c.weights)


def test_block_push_matches_the_input_transform():
    rng = np.random.default_rng(20)
    obf = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", he_layer(rng, 8, 1, 1, 70)), rng)
    order, blocks = block_matmuls(obf.input_index, obf.input_coef, 70, gather=True)
    assert order is None  # consecutive channels: the push reads each group in place
    x = rng.standard_normal((30, 70)).astype(np.float32)
    gathered, out = x, np.empty_like(x)
    for source, columns, matrix in blocks:
        assert matrix.shape[0] <= 16
        np.matmul(gathered[:, source], matrix, out=out[:, columns])
    assert np.max(np.abs(out - obf.transform_input(x))) <= 1e-5 * np.max(np.abs(out))


@pytest.mark.parametrize("scheme, kind", [
    (GroupMixScheme(), "CONV_2D"), (GroupMixScheme(), "FULLY_CONNECTED"),
    (GroupMixScheme(input_group=1), "CONV_2D"), (get_scheme("shadownet"), "DEPTHWISE_CONV_2D")])
def test_a_second_reader_of_a_tensor_takes_the_first_ones_input_transform(scheme, kind):
    """``input_of``: a layer reading the tensor an earlier one reads gets that layer's input transform
    (one push serves both) and still computes its own layer on the transformed input."""
    rng = np.random.default_rng(23)
    c = 40
    shapes = {"CONV_2D": [(24, 3, 3, c), (8, 1, 1, c)], "FULLY_CONNECTED": [(24, c), (8, c)],
              "DEPTHWISE_CONV_2D": [(1, 3, 3, c), (1, 3, 3, 2 * c)]}[kind]
    first, second = (rng.standard_normal(shape) * 0.1 for shape in shapes)
    multipliers = [1, 2] if kind == "DEPTHWISE_CONV_2D" else [1, 1]
    a = scheme.obfuscate(LinearLayer(kind, first, multipliers[0], input_channels=c), rng)
    b = scheme.obfuscate(LinearLayer(kind, second, multipliers[1], input_channels=c), rng, input_of=a)
    alone = scheme.obfuscate(LinearLayer(kind, second, multipliers[1], input_channels=c), rng)
    assert a.transforms_input() and b.same_input_as(a) and not alone.same_input_as(a)
    x = rng.standard_normal((1, 6, 6, c) if kind != "FULLY_CONNECTED" else (5, c))
    options = depthwise_options(2) if kind == "DEPTHWISE_CONV_2D" else conv_options()
    n = second.shape[-1] if kind == "DEPTHWISE_CONV_2D" else second.shape[0]
    m = b.weights.shape[-1] if kind == "DEPTHWISE_CONV_2D" else b.weights.shape[0]
    want = linear.apply(kind, x, second.astype(np.float64), options, (*x.shape[:-1], n))
    got = b.restore(linear.apply(kind, a.transform_input(x), b.weights.astype(np.float64), options,
                                 (*x.shape[:-1], m)))
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))


def test_block_matmuls_gather_scattered_sources():
    """The TA's block plan for any transform whose output blocks are contiguous: sources anywhere are
    first gathered side by side (one pass), then one matmul per block."""
    rng = np.random.default_rng(22)
    perm = rng.permutation(40)
    index, coef = np.zeros((16, 40), np.int32), np.zeros((16, 40), np.float32)
    for a, b in split_groups(40, 16):
        index[:, a:b] = perm[a]
        index[:b - a, a:b] = perm[a:b, None]
        coef[:b - a, a:b] = rng.standard_normal((b - a, b - a))
    order, blocks = block_matmuls(index, coef, 40, gather=True)
    x = rng.standard_normal((7, 40)).astype(np.float32)
    gathered, out = x[:, order], np.empty_like(x)
    for source, columns, matrix in blocks:
        np.matmul(gathered[:, source], matrix, out=out[:, columns])
    want = sum(x[:, index[j]] * coef[j] for j in range(16))
    assert np.max(np.abs(out - want)) <= 1e-5 * np.max(np.abs(want))


def test_block_restore_matches_the_restore():
    rng = np.random.default_rng(15)
    w = he_layer(rng, 100, 1, 1, 40)
    obf = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", w), rng)
    y = rng.standard_normal((50, 100)).astype(np.float32)
    out = np.empty((50, 100), np.float32)
    for source, columns, matrix in restore_blocks(obf.restore_index, obf.restore_coef, 100):
        assert matrix.shape[0] <= 16
        np.matmul(y[:, source], matrix, out=out[:, columns])
    assert np.max(np.abs(out - obf.restore(y))) <= 1e-5 * np.max(np.abs(out))


# -- the attacks on realistic layers --------------------------------------------------------------------

def test_attacks_recover_nothing(layer_case):
    name, kind, w, obf = layer_case
    real = w.reshape(len(w), -1)
    figures = attacks.attack_layer(rows_as_reference(obf, kind), real)
    assert figures["recovered"]["any"] <= 0.01 * len(real), (name, figures["recovered"])
    # What output-side mixing does not hide, and the suite reports: the filters' span.
    if real.shape[1] > 2 * len(real):
        assert figures["subspace"]["energy_mean"] > 0.99


def test_attacks_recover_nothing_in_the_accelerators_coordinates_either(layer_case):
    """What ``shadownet audit`` sees: the filters as the accelerator holds them."""
    name, kind, w, obf = layer_case
    real = w.reshape(len(w), -1)
    figures = attacks.attack_layer(obf.weights.reshape(len(obf.weights), -1), real)
    assert figures["recovered"]["any"] <= 0.01 * len(real), (name, figures["recovered"])


def test_the_same_attacks_recover_the_paper_schemes_filters(layer_case):
    """Control: on the same layers the suite recovers >= 90% of what the paper's scheme hides."""
    name, kind, w, _ = layer_case
    obf = get_scheme("shadownet").obfuscate(LinearLayer(kind, w), np.random.default_rng(16))
    real = w.reshape(len(w), -1)
    figures = attacks.attack_layer(obf.weights.reshape(len(obf.weights), -1), real)
    assert figures["recovered"]["any"] >= 0.9 * len(real), (name, figures["recovered"])


def ica_estimates(obf):
    """Blind source separation on each group of obfuscated filters (the attacker finds the groups: their
    filters are mutually orthogonal; here they are handed over), in the accelerator's coordinates."""
    from sklearn.decomposition import FastICA

    rows = obf.weights.reshape(len(obf.weights), -1).astype(np.float64)
    estimates = []
    for source, _, _ in restore_blocks(obf.restore_index, obf.restore_coef, len(rows)):
        ica = FastICA(n_components=source.stop - source.start, whiten="unit-variance", max_iter=1000,
                      random_state=0)
        estimates.append(ica.fit_transform(rows[source].T).T)
    return np.vstack(estimates)


@pytest.mark.parametrize("distribution", ["laplace", "sparse"])
def test_ica_on_heavy_tailed_weights_is_stopped_by_the_input_mixing(distribution):
    """Trained or pruned weights are heavy-tailed or sparse, not Gaussian like He-init ones: ICA then
    undoes any output-side mixing by itself. Mixing the inputs in groups of 16 makes every weight the
    accelerator holds a sum of 16, Gaussian enough that ICA finds not even the filters in the mixed input
    coordinates (``W B^-1``, which would still need ``B``)."""
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(21)
    shape = (64, 3, 3, 32)
    w = rng.laplace(size=shape) if distribution == "laplace" else (
        rng.standard_normal(shape) * (rng.random(shape) < 0.5))
    real = w.reshape(64, -1)
    permuted_only = GroupMixScheme(input_group=1).obfuscate(LinearLayer("CONV_2D", w), rng)
    t = input_matrix(permuted_only, 32)
    found = attacks.best_cosines((ica_estimates(permuted_only).reshape(-1, 9, 32) @ t).reshape(-1, 288), real)
    assert (found >= 0.9).sum() >= 0.8 * 64  # the permutation undone, as an attacker would
    mixed = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", w), rng)
    t = input_matrix(mixed, 32)
    found = attacks.best_cosines(ica_estimates(mixed), (w @ t.T).reshape(64, -1))
    assert (found >= 0.9).sum() <= 0.01 * 64, np.sort(found)[-5:]


def test_groupcovers_random_mixing_would_leak():
    """Why orthonormal bases: random 4x4 mixing (GroupCover's A_g) of the same layer, even well
    conditioned and with no row pointing along a filter, gives pair estimates near real filters (the
    fake-partner attack recovers a share of them)."""
    rng = np.random.default_rng(17)
    real = he_layer(rng, 64, 3, 3, 32).reshape(64, -1)
    mixed = np.empty_like(real)
    for a in range(0, 64, 4):
        units = real[a:a + 4] / np.linalg.norm(real[a:a + 4], axis=1, keepdims=True)
        while True:
            mix = rng.standard_normal((4, 4))
            if np.linalg.cond(mix) < 10 and attacks.abs_cosines(mix @ units, real).max() <= 0.75:
                break
        mixed[a:a + 4] = mix @ units
    figures = attacks.attack_layer(mixed, real)
    assert figures["recovered"]["direction"] == 0
    assert figures["recovered"]["fake_partner_top3"] >= 0.05 * 64, figures["recovered"]


@pytest.mark.parametrize("distribution, least, most", [("gaussian", 0.0, 0.01), ("uniform", 0.9, 1.0),
                                                        ("laplace", 0.9, 1.0), ("sparse", 0.9, 1.0)])
def test_ica_undoes_the_input_mixing_once_the_restore_is_known(distribution, least, most):
    """What the input mixing alone holds once the restore regression (``shadownet.boundary``) has given
    the attacker each filter in the accelerator's input coordinates, ``W T^-1`` (rows handed over in the
    real order, and ICA's sources matched to the real input channels by their columns: order, sign, norm):
    nothing of Gaussian weights (the zoo's He-normal ones), nearly all of uniform ones (Keras's default
    initialiser), heavy-tailed (trained) or sparse (pruned) ones. SECURITY.md."""
    pytest.importorskip("sklearn")
    from sklearn.decomposition import FastICA

    rng = np.random.default_rng(5)
    n = 512  # a MobileNet pointwise layer's (fewer filters, a weaker estimate: at 256, Laplace 14-79%)
    shape = (n, 1, 1, 32)
    w = {"gaussian": lambda: rng.standard_normal(shape), "uniform": lambda: rng.uniform(-1, 1, shape),
         "laplace": lambda: rng.laplace(size=shape),
         "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.3)}[distribution]()
    obf = GroupMixScheme().obfuscate(LinearLayer("CONV_2D", w, input_channels=32), rng)
    real = w.reshape(n, 32)
    seen = real @ np.linalg.inv(input_matrix(obf, 32))  # W x = (W T^-1) x'
    sources = []
    for block in range(0, 32, 16):
        ica = FastICA(n_components=16, whiten="unit-variance", max_iter=2000, random_state=0)
        sources.append(ica.fit_transform(seen[:, block:block + 16]))
    sources = np.hstack(sources)
    corr = np.abs(np.corrcoef(sources.T, real.T)[:32, 32:])
    recovered = np.zeros_like(real)
    for _ in range(32):  # greedy: the best remaining (source, channel) pair each time
        s, c = np.unravel_index(np.argmax(corr), corr.shape)
        column = sources[:, s] / np.linalg.norm(sources[:, s])
        recovered[:, c] = column * np.sign(column @ real[:, c]) * np.linalg.norm(real[:, c])
        corr[s, :], corr[:, c] = -1, -1
    found = attacks.best_cosines(recovered, real)
    assert least * n <= (found >= 0.9).sum() <= most * n, np.median(found)


@pytest.mark.parametrize("depth, modular", [(2, [2, 3]), (0, [2]), ("all", [2, 3, 4])])
def test_the_deeper_rounds_masks_are_modular_up_to_modular_depth(depth, modular):
    """A stem, a ResNet block and a dense layer, every round masked: round 2 (one layer from the input) gets
    its modular mask whatever ``modular_depth``; round 3 (two layers: conv2's input) and round 4 (three:
    the dense layer's input, the block's sum, counted by its deeper path) as ``modular_depth`` says."""
    from converters.calibration import activation_stats, calibration_inputs
    from converters.partition import partition
    from converters.plan import build
    from tests.converters.test_partition import resnet_block

    graph, _ = resnet_block()
    scheme = GroupMixScheme(input_group=4, modular_depth=depth)  # mixes 2 channels and more: none narrow
    part = partition(graph, scheme.in_tee)
    needed = {graph.ops[i].inputs[0] for r in part.rounds for i in r} | set(graph.inputs)
    stats = activation_stats(graph, needed, calibration_inputs(graph, None))
    plan = build(graph, part, scheme, np.random.default_rng(0), stats, [1, 2, 3, 4])
    masks = plan.program["one_time"]["masks"]
    rounds = {int(spec["buffer"].split("/")[0].removeprefix("round_")): bool(spec.get("modular"))
              for spec in masks.values()}
    assert sorted(rounds) == [1, 2, 3, 4] and [r for r, m in sorted(rounds.items()) if m] == modular
