"""The span attack (``shadownet.span_attack``): each group's span and the input mixing, from the obfuscated
weights and public ones."""

from __future__ import annotations

import numpy as np

from shadownet import private_change, span_attack
from tests.shadownet.test_private_change import _obfuscated, _public_and_private


def test_a_permutation_of_the_inputs_is_undone_as_well() -> None:
    """``groupmix:input_group=1`` permutes the input channels instead of mixing them: the projectors'
    diagonals place each channel, and the span attack learns as much as under the mixing (a first version
    took the input for unmixed and reported an estimate 10x the change away)."""
    rng = np.random.default_rng(4)
    public, private = _public_and_private(rng, 64, 9, 32, change=0.1)
    scheme, obf = _obfuscated("groupmix", private, 9, 32, rng, input_group=1)
    assert span_attack.input_mixing(scheme, 32) == ("permutation", None)
    row = private_change.layer_change(obf, private, public, 32, scheme)
    assert row["best"] == "span" and row["span"]["ratio"] < 0.4, row["span"]
    assert row["span"]["recovered"] >= 0.9 * 64


def test_a_group_of_fewer_filters_than_min_group_holds_fakes_and_is_still_projected() -> None:
    """7 filters: groupmix tops their span up to min_group (8) with a random direction; the block is then
    larger than the group, and the public filters' projection onto it still holds the private ones."""
    rng = np.random.default_rng(5)
    public, private = _public_and_private(rng, 7, 9, 16, change=0.1)
    scheme, obf = _obfuscated("groupmix", private, 9, 16, rng)
    assert [b - a for a, b in span_attack.output_blocks(obf)] == [8]
    row = private_change.layer_change(obf, private, public, 16, scheme)
    assert row["best"] == "span" and row["span"]["ratio"] < 0.7, row["span"]


def test_a_pruned_filter_leaves_its_group_a_tight_frame_and_the_layer_its_estimate() -> None:
    """A zero private filter: its group spans 15 dimensions with 16 rows, which are then not orthogonal, and
    the orthogonal runs no longer find the groups; every group has 16 filters, so they are cut by size (the
    audit said "nothing learnt" for such a layer: a review's)."""
    rng = np.random.default_rng(7)
    public, private = _public_and_private(rng, 64, 9, 16, change=0.1)
    private[5] = 0.0
    scheme, obf = _obfuscated("groupmix", private, 9, 16, rng)
    groups = span_attack._split(64, 16)
    assert len(span_attack.output_blocks(obf)) != len(groups)
    assert span_attack.group_blocks(obf, groups) == groups
    row = private_change.layer_change(obf, private, public, 16, scheme)
    assert row["best"] == "span" and row["span"]["ratio"] < 0.5, row["span"]
    assert row["span"]["recovered"] >= 0.8 * 64


def test_channels_are_assigned_one_to_one_where_two_want_the_same() -> None:
    score = np.array([[9.0, 8.0, 0.0], [1.0, 0.0, 0.0], [0.0, 7.0, 5.0]])
    # Columns 0 and 1 both want row 0; column 2 keeps row 2, which no other column wants as its best;
    # column 0 (best 9) wins row 0, and column 1 gets the row left, 1.
    assert span_attack._assign(score).tolist() == [0, 1, 2]
    assert span_attack._assign(np.eye(4)[[2, 0, 3, 1]]).tolist() == [1, 3, 0, 2]


def test_the_orthogonal_blocks_are_the_groups_and_a_scheme_without_them_gets_no_span_estimate() -> None:
    rng = np.random.default_rng(3)
    public, private = _public_and_private(rng, 40, 9, 16, change=0.1)
    scheme, obf = _obfuscated("groupmix", private, 9, 16, rng)
    assert sorted(b - a for a, b in span_attack.output_blocks(obf)) == [13, 13, 14]
    paper, obf_paper = _obfuscated("shadownet", private, 9, 16, rng)
    assert span_attack.span_estimate(obf_paper, public, 16, scheme.input_blocks(16), 16) is None
