"""Fidelity of the default scheme and of the paper's on every model of the zoo, against LiteRT on the
original."""

import warnings

import numpy as np
import pytest

import tee_sim
from converters import convert
from converters.fidelity import relative_error
from tests.converters.driver import Driver, litert

NAMES = ("mobilenet", "resnet44", "resnet404", "minivgg", "yolov4-tiny")
BIG = {"resnet404", "yolov4-tiny"}  # one inference is enough
TOLERANCE = {"groupmix": 1e-4, "shadownet": 1e-3}  # the targets
# Where a target is missed, the bound is what was measured, with room: MobileNet and ResNet-404 amplify
# float32 noise (LiteRT's own XNNPACK and builtin kernels differ by 1.4-4.7e-5 and 3.3e-5 - 1.3e-4 on them,
# 3 inputs). Under groupmix, with the first round's one-time mask sent as an exact split
# (converters.exact_split), ResNet-404 measured 1e-5 - 1.6e-4, median 5e-5 (4 conversions x 3 inputs; 3-7e-5
# with no mask at all: the scheme's float32 mixings over 404 layers); under the paper's scheme the fakes'
# cancellation costs ~3e-3.
# The paper's scheme on MobileNet misses 1e-3 in its tail (BENCHMARKS.md: median 8.2e-4, max 1.6e-3 of 32
# inputs, run BR): this test's first input measured 1.58e-3 on an AMD EPYC host (the zoo's export, calibrated
# by TensorFlow on this CPU, differs by machine), under 1e-3 on the hosts before.
TOLERANCES = {("groupmix", "resnet404"): 3e-4, ("shadownet", "resnet404"): 1e-2,
              ("shadownet", "mobilenet"): 2e-3}
MEDIAN_OF = {("groupmix", "mobilenet"): 5}  # inferences per input whose median error is bounded
# Against float64 arithmetic (tests.converters.float64_reference) the default scheme's error is float32 noise
# of the same order as LiteRT's own: measured 0.2-2.6x the larger of its two engines' errors (4 conversions x
# 3 inputs each of MobileNet, ResNet-44 and ResNet-404; the scheme rounds the mixed inputs and the restores on
# top of the layers themselves), one inference's 0.13-4.3x (MobileNet, 300 one-time masks on one
# input): the test takes the median of three. Round 1's mask sent without the exact split
# (groupmix:exact_split=none) gave MobileNet 7-47x and ResNet-404 2.2-5.6x (2 conversions x 3 inputs): the
# bound catches the first always, the second about half of the time.
FLOAT32_NOISE = 4.0
# ResNet-44 under the default since stop 59, every round masked (1x masks past the floor, unsplit): each
# layer computes at up to a few times its input's magnitude, and the protected error from float64 doubled
# (5 inputs x 3 masks, one conversion: per input 0.8-7.9x LiteRT's engines, median 2.2; under
# --mask-rounds first 0.4-2.1x, median 1.2), against LiteRT still 1e-6 - 2e-5, under the 1e-4 target.
FLOAT32_NOISE_OF = {"resnet44": 8.0}
EXACT_REFERENCE = {"mobilenet", "resnet44", "resnet404"}  # the models float64_reference runs


@pytest.fixture(scope="session")
def big_device(tmp_path_factory):
    # yolov4-tiny's masks and LiteRT arenas need more than the default 64 MiB of secure memory.
    context = tee_sim.Context("inprocess", home=tmp_path_factory.mktemp("zoo_device"), memory_cap=256 << 20)
    yield context
    context.close()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["groupmix", "shadownet"])
@pytest.mark.parametrize("name", NAMES)
def test_zoo_fidelity(name, scheme, exported, big_device, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model = exported(name).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = convert(model, tmp_path / "out", scheme=scheme, seed=0, device=big_device)
    details = Interpreter(model_content=model).get_input_details()
    rng = np.random.default_rng(1)
    with Driver(big_device, tmp_path / "out") as run:
        for _ in range(1 if name in BIG else 2):
            xs = [rng.uniform(0, 1, d["shape"]).astype(np.float32) for d in details]
            # MobileNet meets 1e-4 at the median of its one-time masks, not in their tail (0.8% of them are
            # above it: a helper's 2,500 inferences; one mask each failed ~0.8% of runs): the median of 5.
            want = litert(model, *xs)
            outs = [run(*xs) for _ in range(MEDIAN_OF.get((scheme, name), 1))]
            error = float(np.median([relative_error(g, want) for g in outs]))
            got = outs[0]
            bound = TOLERANCES.get((scheme, name), TOLERANCE[scheme])
            assert error <= bound, f"{name} ({scheme}): relative error {error:.2e} (median of {len(outs)})"
            for g, w in zip(got, want, strict=True):
                if w.ndim == 2:
                    assert np.array_equal(np.argmax(g, -1), np.argmax(w, -1))
        if scheme == "groupmix" and name in EXACT_REFERENCE:
            _assert_float32_noise(name, model, details, run, rng)
        used, peak = run.memory()
        print(f"{name} ({scheme}): {len(manifest['rounds'])} rounds, worst relative error {error:.2e}, "
              f"TA secure memory {used / 2**20:.1f} MiB")


def _assert_float32_noise(name, model, details, run, rng, inputs=3, masks=3):
    """The protected outputs are as close to float64 arithmetic as LiteRT's own float32 engines are, within
    ``FLOAT32_NOISE``: what "float32 floor" means where the LiteRT target is missed. Typical errors over a
    few ``inputs`` (medians), each input's protected error the median over ``masks`` inferences (each with
    its own one-time mask): one inference's error moves with its mask (MobileNet on one input, 300 masks:
    0.13-4.3x LiteRT's, median 0.9), and LiteRT's own with the input (MobileNet, 3 inputs on a Zen 5:
    1.6e-6 to 3.2e-5 from float64; 25 masks on the first, whose LiteRT error was the 2.3e-6, 1.7-11.6x it,
    median 5.2; on the others medians of 1.5)."""
    from tests.converters.float64_reference import run as exact_run

    mine, engines = [], []
    for _ in range(inputs):
        xs = [rng.uniform(0, 1, d["shape"]).astype(np.float32) for d in details]
        exact = exact_run(model, *xs)
        engines.append(max(relative_error(litert(model, *xs, builtin=builtin), exact)
                           for builtin in (False, True)))
        mine.append(float(np.median([relative_error(run(*xs), exact) for _ in range(masks)])))
    mine_typical, engines_typical = float(np.median(mine)), float(np.median(engines))
    print(f"{name}: against float64 protected {np.array(mine)}, LiteRT's engines up to {np.array(engines)}")
    assert mine_typical <= FLOAT32_NOISE_OF.get(name, FLOAT32_NOISE) * engines_typical, \
        f"{name}: {mine_typical:.2e} from float64, LiteRT's engines {engines_typical:.2e} (input medians)"
