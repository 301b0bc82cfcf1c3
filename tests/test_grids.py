"""Grid identity and res- labels: one rule for both levels, names never shared."""

from __future__ import annotations

import numpy as np
import pytest

from bids_fmristore.grids import Grid, grid_labels, voxel_size_label

A = np.diag([-2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, 90], [0, 0, 0, -126], [0, 0, 0, -72],
                                                [0, 0, 0, 0]])


def flipped(shape, affine):
    """The same world grid with x stored the other way (RAS instead of LAS)."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, shape[0] - 1
    return affine @ flip


def test_grid_equality_tolerates_float_noise_not_flips():
    shape = (10, 12, 9)
    assert Grid.of(shape, A) == Grid.of(shape, A + 1e-6)
    assert Grid.of(shape, A) != Grid.of(shape, flipped(shape, A))
    assert Grid.of(shape, A) != Grid.of((10, 12, 8), A)
    # the flipped affine maps voxel (9, 0, 0) where the original maps (0, 0, 0)
    np.testing.assert_allclose(flipped(shape, A) @ [9, 0, 0, 1], A @ [0, 0, 0, 1])


def test_voxel_size_label():
    assert voxel_size_label([2, 2, 2]) == "2x2x2"
    assert voxel_size_label([2.5, 2.5, 3.0]) == "2p5x2p5x3"
    assert voxel_size_label([1.9999999, 2, 2]) == "2x2x2"


def test_one_grid_keeps_the_bold_res_or_none():
    g = Grid.of((4, 4, 4), A)
    assert grid_labels([g], [["2", "2"]]) == ["2"]
    assert grid_labels([g], [[None]]) == [None]
    assert grid_labels([g], [["2", None]]) == [None]


def test_bold_res_labels_used_when_they_tell_grids_apart():
    g1, g2 = Grid.of((4, 4, 4), A), Grid.of((8, 8, 8), A / 2 + np.diag([0, 0, 0, 0.5]))
    assert grid_labels([g1, g2], [["2"], ["1"]]) == ["2", "1"]


def test_two_grids_under_one_res_label_get_derived_distinct_stable_labels():
    shape = (10, 12, 9)
    g1 = Grid.of(shape, A)
    g2 = Grid.of((14, 12, 9), A)  # another field of view, same voxel size
    g3 = Grid.of(shape, flipped(shape, A))
    labels = grid_labels([g1, g2, g3], [["2"], ["2"], ["2"]])
    assert len(set(labels)) == 3
    assert all(lab.startswith("2x2x2h") and lab.isalnum() for lab in labels)
    # stable: independent of order and of which other grids are present
    again = grid_labels([g3, g1, g2], [["2"], ["2"], ["2"]])
    assert again == [labels[2], labels[0], labels[1]]
    assert grid_labels([g1, g3], [["2"], [None]])[0] == labels[0]


def test_different_voxel_sizes_need_no_digest():
    g1 = Grid.of((4, 4, 4), A)
    g2 = Grid.of((4, 4, 4), np.diag([3.0, 3.0, 3.0, 1.0]))
    assert grid_labels([g1, g2], [[None], [None]]) == ["2x2x2", "3x3x3"]


def test_duplicate_grids_are_a_bug():
    g = Grid.of((4, 4, 4), A)
    with pytest.raises(ValueError):
        grid_labels([g, g], [["2"], ["2"]])
