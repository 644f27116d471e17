"""The TA's depthwise convolution (``tee_sim.ta_shadownet_depthwise`` and its C ``sn_depthwise``) on every
build of the kernels this CPU runs, against a float64 reference: zero padding, strides, the clamps of the
activations fused into it, fewer channels than a vector, and a channel slice read and written in place.
Not LiteRT's summation order: within float32 rounding of the exact result."""

import numpy as np
import pytest

from tee_sim import ta_shadownet_depthwise as dw
from tee_sim.ta_shadownet_kernels import runnable

BUILDS = runnable()


@pytest.fixture(autouse=True, params=list(BUILDS))
def kernels(request, monkeypatch):
    monkeypatch.setattr(dw, "LIBRARY", BUILDS[request.param])


def _reference(x, weights, bias, stride, pad, activation=None):
    (sh, sw), ((top, bottom), (left, right)) = stride, pad
    n, h, w, c = x.shape
    kh, kw = weights.shape[1:3]
    padded = np.zeros((n, h + top + bottom, w + left + right, c))
    padded[:, top:top + h, left:left + w] = x
    oh, ow = (padded.shape[1] - kh) // sh + 1, (padded.shape[2] - kw) // sw + 1
    out = np.zeros((n, oh, ow, c)) + bias
    for i in range(kh):
        for j in range(kw):
            out += padded[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] * weights[0, i, j]
    return np.clip(out, *dw.CLAMPS[activation])


CASES = [  # (input shape, kernel, stride, pad, activation)
    ((1, 8, 8, 32), (3, 3), (1, 1), ((1, 1), (1, 1)), "RELU6"),         # MobileNet's, SAME
    ((1, 9, 9, 64), (3, 3), (2, 2), ((0, 1), (0, 1)), "RELU6"),         # stride 2 (padding on one side)
    ((2, 7, 5, 5), (3, 3), (2, 1), ((1, 1), (0, 0)), None),             # fewer channels than a vector
    ((1, 6, 10, 19), (5, 3), (1, 3), ((2, 2), (1, 1)), "RELU"),         # uneven kernel and stride
    ((1, 4, 4, 16), (5, 5), (1, 1), ((2, 2), (2, 2)), "RELU_N1_TO_1"),  # windows mostly in the padding
    ((2, 11, 9, 40), (3, 3), (2, 1), ((1, 0), (0, 2)), "RELU6"),        # 3x3: vectors, a tail, two images
    # rows wide enough for the 3x3 path's blocks of 8 outputs, then single ones, then the border
    ((1, 5, 40, 48), (3, 3), (1, 1), ((1, 1), (1, 1)), "RELU6"),
    ((1, 7, 37, 24), (3, 3), (2, 2), ((0, 1), (0, 1)), "RELU6"),        # stride 2's blocks, a tail
    ((1, 6, 30, 32), (3, 3), (1, 1), ((2, 0), (2, 0)), "RELU"),         # the inside starts 2 outputs in
    ((1, 4, 31, 16), (3, 3), (3, 3), ((1, 1), (1, 1)), None),           # stride 3: no blocks
    # any other window: its blocks of 8 outputs, then single ones, a tail of channels
    ((1, 7, 30, 20), (5, 5), (1, 1), ((2, 2), (2, 2)), "RELU6"),
    ((2, 9, 35, 16), (5, 3), (2, 3), ((1, 2), (2, 1)), None),
    ((1, 8, 40, 33), (7, 7), (1, 1), ((3, 3), (3, 3)), "RELU"),         # ConvNeXt's window
    ((1, 5, 26, 8), (1, 1), (1, 1), ((0, 0), (0, 0)), "RELU_N1_TO_1"),
]


@pytest.mark.parametrize("shape, kernel, stride, pad, activation", CASES)
def test_matches_the_exact_result_within_float32_rounding(shape, kernel, stride, pad, activation):
    rng = np.random.default_rng(sum(shape))
    c = shape[-1]
    x = rng.normal(size=shape).astype(np.float32)
    weights = rng.normal(size=(1, *kernel, c)).astype(np.float32)
    bias = rng.normal(size=c).astype(np.float32)
    want = _reference(x.astype(np.float64), weights.astype(np.float64), bias.astype(np.float64), stride, pad,
                      activation)
    got = np.full(want.shape, 7.0, np.float32)
    instr = {"stride": list(stride), "pad": [list(p) for p in pad], "activation": activation}
    dw.compile_depthwise(instr, x, weights, bias, got)()
    scale = np.abs(x).max() * np.abs(weights).sum(axis=(0, 1, 2)).max() + np.abs(bias).max()
    assert np.abs(got - want).max() <= 1e-6 * scale
    if activation is not None:  # the clamp bites
        lo, hi = dw.CLAMPS[activation]
        assert got.min() >= lo and got.max() <= hi and (got == max(lo, -1.0)).any()


@pytest.mark.parametrize("kernel", [(3, 3), (5, 3)])
def test_the_kernel_needs_its_packed_weights(kernel):
    """The kernel reads a layer's weights in its own layout (``pack_weights``); any other is refused."""
    kh, kw = kernel
    x, dst = np.zeros((1, 4, 4, 20), np.float32), np.zeros((1, 4, 4, 20), np.float32)
    weights, bias = np.ones((1, kh, kw, 20), np.float32), np.zeros(20, np.float32)
    instr = {"stride": [1, 1], "pad": [[kh // 2] * 2, [kw // 2] * 2]}
    packed = dw.pack_weights(weights)
    assert packed.shape == (2, kh * kw, 16) and (packed[1, :, 4:] == 0).all()
    for wrong in (packed[:1], packed.astype(np.float64), np.asfortranarray(packed)):
        with pytest.raises(ValueError, match="packed weights"):
            dw.compile_depthwise(instr, x, weights, bias, dst, wrong)
    dw.compile_depthwise(instr, x + 1, weights, bias, dst, packed)()
    # each output counts the taps of its window inside the input (small integers: exact)
    assert np.array_equal(dst, _reference(x + 1, weights, bias, (1, 1), instr["pad"]))


def test_reads_and_writes_channel_slices_in_place():
    """A concatenation's slot: the layer reads one channel range of it and writes into another's."""
    rng = np.random.default_rng(1)
    slot = rng.normal(size=(1, 6, 6, 40)).astype(np.float32)
    out = np.full((1, 6, 6, 30), 9.0, np.float32)
    weights = rng.normal(size=(1, 3, 3, 17)).astype(np.float32)
    bias = rng.normal(size=17).astype(np.float32)
    instr = {"stride": [1, 1], "pad": [[1, 1], [1, 1]]}
    dw.compile_depthwise(instr, slot[..., 3:20], weights, bias, out[..., 10:27])()
    want = _reference(slot[..., 3:20].astype(np.float64), weights, bias, (1, 1), ((1, 1), (1, 1)))
    assert np.abs(out[..., 10:27] - want).max() <= 1e-5
    assert (out[..., :10] == 9.0).all() and (out[..., 27:] == 9.0).all()  # nothing written outside


@pytest.mark.parametrize("change", ["weights", "bias", "output", "stride", "pad", "activation"])
def test_a_program_that_does_not_fit_is_refused(change):
    x = np.zeros((1, 8, 8, 16), np.float32)
    weights, bias = np.zeros((1, 3, 3, 16), np.float32), np.zeros(16, np.float32)
    out = np.zeros((1, 8, 8, 16), np.float32)
    instr = {"stride": [1, 1], "pad": [[1, 1], [1, 1]]}
    if change == "weights":
        weights = np.zeros((1, 3, 3, 8), np.float32)
    elif change == "bias":
        bias = np.zeros(8, np.float32)
    elif change == "output":
        out = np.zeros((1, 9, 8, 16), np.float32)
    elif change == "stride":
        instr["stride"] = [0, 1]
    elif change == "pad":  # the windows would run past the padding
        instr["pad"] = [[0, 0], [0, 0]]
    else:
        instr["activation"] = "TANH"
    with pytest.raises(ValueError, match="depthwise|stride"):
        dw.compile_depthwise(instr, x, weights, bias, out)


@pytest.mark.parametrize("instr", [{"stride": [1, 1], "pad": [[2 ** 32, 1], [1, 1]]},
                                   {"stride": [2 ** 32 + 1, 1], "pad": [[1, 1], [1, 1]]},
                                   {"stride": None, "pad": [[1, 1], [1, 1]]},
                                   {"stride": [1, 1], "pad": [[1, 1.5], [1, 1]]},
                                   {"stride": [True, 1], "pad": [[1, 1], [1, 1]]}],
                         ids=["pad past int32", "stride past int32", "no stride", "a float pad", "a bool"])
def test_geometry_the_c_structure_cannot_hold_is_refused(instr):
    """ctypes would wrap an int32 field silently: the kernel would run another window than the program's."""
    x, out = np.zeros((1, 8, 8, 16), np.float32), np.zeros((1, 8, 8, 16), np.float32)
    with pytest.raises(ValueError, match="stride|pad"):
        dw.compile_depthwise(instr, x, np.zeros((1, 3, 3, 16), np.float32), np.zeros(16, np.float32), out)


def test_a_read_only_output_is_refused():
    """A program naming a sealed constant as the output: the TA refuses to write into it."""
    x = np.zeros((1, 8, 8, 16), np.float32)
    sealed = np.frombuffer(bytes(x.nbytes), np.float32).reshape(x.shape)
    with pytest.raises(ValueError, match="read-only"):
        dw.compile_depthwise({"stride": [1, 1], "pad": [[1, 1], [1, 1]]}, x,
                             np.zeros((1, 3, 3, 16), np.float32), np.zeros(16, np.float32), sealed)


@pytest.mark.parametrize("instr", [{"op": "copy", "src": "slot:t1", "dst": "const:const/t5"},
                                   {"op": "depthwise", "srcs": ["slot:t1"], "dsts": ["const:const/t5"]}])
def test_no_instruction_may_write_into_the_sealed_constants(instr):
    from tee_sim.ta_shadownet_compile import compile_instruction

    with pytest.raises(ValueError, match="read-only"):
        compile_instruction(None, instr)  # refused before anything is resolved


@pytest.mark.parametrize("weights", ["slot:t2", "shm:round_1/in/x0", 7])
def test_weights_that_are_not_constants_are_refused(weights):
    """The TA packs a layer's weights once, at load: a program whose weights live in a buffer is refused."""
    from tee_sim.ta_shadownet_compile import prepare_depthwise

    steps = [[{"op": "depthwise", "srcs": ["slot:t1", weights, "const:b"], "dsts": ["slot:t3"]}]]
    with pytest.raises(ValueError, match="not a constant"):
        prepare_depthwise(None, steps, {}, lambda nbytes: None)  # refused before anything is resolved


def test_a_stride_and_pad_near_two_to_the_31_read_nothing_before_the_input():
    """The first window wholly inside the input, ``(left + sw - 1) / sw``, was summed in 32 bits: with a
    stride of 2^31 - 1 it wrapped negative, and a 3x3 window that starts in the padding read ``left``
    pixels before the input (a helper's ASan run: the values there came out in the result)."""
    c = 16
    memory = np.zeros(11 * c, np.float32)
    memory[:2 * c] = 1234.5  # what lies before the input
    src = memory[2 * c:].reshape(1, 3, 3, c)
    dst = np.full((1, 1, 1, c), np.nan, np.float32)
    weights = np.zeros((1, 3, 3, c), np.float32)
    weights[0, 0, 0] = 1.0  # the output is the window's top-left tap: in the padding, 0
    instr = {"stride": [1, 2 ** 31 - 1], "pad": [[0, 0], [2, 0]], "activation": None}
    dw.compile_depthwise(instr, src, weights, np.zeros(c, np.float32), dst)()
    np.testing.assert_array_equal(dst, 0.0)
