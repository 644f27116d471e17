"""The all-in-TEE baseline TA (``tee_sim.ta_all_in_tee``): the whole model in the secure world, its memory
accounted before LiteRT allocates, and a model it cannot run refused with a GlobalPlatform code."""

import numpy as np
import pytest

from tee_sim import (
    TEE_ERROR_BAD_FORMAT,
    TEE_ERROR_BAD_STATE,
    TEE_ERROR_OUT_OF_MEMORY,
    Context,
    MemRef,
    TEEError,
    TempMemRef,
    Value,
)
from tee_sim.bench import conv_model
from tee_sim.ta_all_in_tee import activation_peak
from tee_sim.ta_all_in_tee_commands import KERNELS_BUILTIN, KERNELS_XNNPACK, UUID, Command, io_layout
from tests.converters.driver import litert

SHAPE, CHANNELS = (1, 12, 10, 3), 8  # a 3x3 conv, 3 -> 8 channels, with bias


@pytest.fixture(scope="module")
def model() -> bytes:
    return conv_model(SHAPE[1], SHAPE[2], SHAPE[3], CHANNELS)


@pytest.mark.parametrize("kernels", [KERNELS_XNNPACK, KERNELS_BUILTIN])
def test_runs_the_model_and_accounts_for_it(context, model, kernels):
    x = np.random.default_rng(kernels).uniform(-1, 1, SHAPE).astype(np.float32)
    out_shape = (*SHAPE[:3], CHANNELS)
    offsets, size = io_layout([x.nbytes, int(np.prod(out_shape)) * 4])
    shm = context.register_shared_memory(size)
    with context.open_session(UUID) as session:
        session.invoke_command(Command.LOAD, [TempMemRef(model), Value(a=kernels)])
        session.invoke_command(Command.BIND_SHARED_MEMORY, [MemRef(shm, 0, size, "inout")])
        shm.ndarray(np.float32, SHAPE, offsets[0])[...] = x
        session.invoke_command(Command.RUN)
        got = shm.ndarray(np.float32, out_shape, offsets[1]).copy()
        stats = session.invoke_command(Command.GET_STATS, [Value(direction="out")])[0]
    shm.release()
    (want,) = litert(model, x, builtin=kernels == KERNELS_BUILTIN)  # the same kernels outside the TEE
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    constants, activations = activation_peak(model)
    weights = CHANNELS * 9 * SHAPE[3] * 4 + CHANNELS * 4
    # The model, its input and output live at once, and XNNPACK's packed copy of the weights.
    assert constants == weights and activations == x.nbytes + int(np.prod(out_shape)) * 4
    assert stats.a == len(model) + activations + (constants if kernels == KERNELS_XNNPACK else 0)


def test_a_model_over_the_cap_is_refused_before_it_runs(tmp_path, model):
    need = len(model) + activation_peak(model)[1]
    with Context("inprocess", home=tmp_path / "device", memory_cap=need - 1) as small:
        with small.open_session(UUID) as session:
            with pytest.raises(TEEError) as refused:
                session.invoke_command(Command.LOAD, [TempMemRef(model), Value(a=KERNELS_BUILTIN)])
            assert refused.value.code == TEE_ERROR_OUT_OF_MEMORY
            with pytest.raises(TEEError) as nothing:  # nothing was kept of the refused model
                session.invoke_command(Command.RUN)
            assert nothing.value.code == TEE_ERROR_BAD_STATE


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_bytes_litert_rejects_are_a_bad_format(context, model, damage):
    data = {"garbage": bytes(range(256)) * 8, "truncated": model[:len(model) // 2], "empty": b""}[damage]
    with context.open_session(UUID) as session:
        with pytest.raises(TEEError) as refused:
            session.invoke_command(Command.LOAD, [TempMemRef(data), Value(a=KERNELS_XNNPACK)])
    assert refused.value.code == TEE_ERROR_BAD_FORMAT
