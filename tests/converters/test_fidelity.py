import math

import numpy as np

from converters.fidelity import relative_error


def test_the_worst_output_over_its_own_largest_value():
    want = [np.array([1.0, -4.0], np.float32), np.array([[0.5, 0.25]], np.float32)]
    got = [np.array([1.0, -3.996], np.float32), np.array([[0.5, 0.2505]], np.float32)]
    # 0.004 / 4 = 1e-3 on the first output, 0.0005 / 0.5 = 1e-3 on the second: each on its own scale
    assert math.isclose(relative_error(got, want), 1e-3, rel_tol=1e-3)
    got[1] = np.array([[0.5, 0.26]], np.float32)
    assert math.isclose(relative_error(got, want), 0.02, rel_tol=1e-3)
    assert relative_error(want, want) == 0.0
    assert relative_error(got[0], want[0]) == relative_error([got[0]], [want[0]])


def test_a_zero_reference_measures_the_absolute_difference():
    assert math.isclose(relative_error(np.array([0.0, 3e-6]), np.zeros(2)), 3e-6)


def test_outputs_that_cannot_be_compared_are_infinitely_wrong():
    want = np.array([1.0, 2.0, np.nan, np.inf, -np.inf])
    assert relative_error(want.copy(), want) == 0.0  # the same NaN and infinities
    for bad in ([1.0, 2.0, 0.0, np.inf, -np.inf], [1.0, 2.0, np.nan, -np.inf, -np.inf],
                [np.nan, 2.0, np.nan, np.inf, -np.inf], [1.0, np.inf, np.nan, np.inf, -np.inf]):
        assert relative_error(np.array(bad), want) == math.inf, bad
    assert relative_error(np.ones(3), np.ones(4)) == math.inf
    assert relative_error([np.ones(3)], [np.ones(3), np.ones(3)]) == math.inf
    assert relative_error(np.full(2, np.nan), np.full(2, np.nan)) == 0.0


def test_integer_and_bool_outputs_are_exact_or_wrong():
    indices = np.array([[3, 0, 7]], np.int64)
    assert relative_error(indices.copy(), indices) == 0.0
    assert relative_error(np.array([[3, 0, 6]], np.int64), indices) == math.inf  # not 1/7: another index
    mask = np.array([True, False])
    assert relative_error(mask.copy(), mask) == 0.0
    assert relative_error(~mask, mask) == math.inf
    assert relative_error(np.array([True]), mask) == math.inf
