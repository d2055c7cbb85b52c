"""Image-set selection: disjoint, seeded, split 1:2:2, per-class independent, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from rsvc_cli.data.selection import (
    CONCEPT,
    EVALUATION,
    EVALUATION_SOURCE,
    PRIMARY_SOURCE,
    REGRESSION,
    SET_NAMES,
    ImageSelection,
    select_image_sets,
    select_image_sets_with_evaluation_source,
    split_sizes,
)
from rsvc_cli.errors import RsvcError

# Selection frequency of every image over many seeds may deviate from uniform by this many sigmas.
UNIFORMITY_SIGMAS = 5.0


def _labels(counts, seed=0):
    """Shuffled labels with ``counts[c]`` images of class c."""
    labels = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(seed).permutation(labels)


def test_set_names():
    assert SET_NAMES == ("concept", "regression", "evaluation")
    assert (SET_NAMES[CONCEPT], SET_NAMES[REGRESSION], SET_NAMES[EVALUATION]) == SET_NAMES


@pytest.mark.parametrize("split", [(1, 2, 2), (1, 1, 1), (3, 1, 0), (1, 5, 2)])
@pytest.mark.parametrize("n_images", [3, 4, 7, 11, 60, 500, 501])
def test_split_sizes(n_images, split):
    sizes = split_sizes(n_images, split)
    ratios = np.asarray(split, float)
    assert sizes.sum() == n_images
    assert np.all(sizes[ratios > 0] >= 1) and np.all(sizes[ratios == 0] == 0)
    # Largest remainder: each set within one image of its exact share, plus one per set the minimum of 1 lifted.
    exact = n_images * ratios / ratios.sum()
    n_lifted = np.sum((ratios > 0) & (exact < 1))
    assert np.all(np.abs(sizes - exact) < 1 + n_lifted)
    if n_images % ratios.sum() == 0:
        np.testing.assert_array_equal(sizes, exact)


def test_authors_split():
    np.testing.assert_array_equal(split_sizes(500), [100, 200, 200])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sets_are_disjoint_sized_and_sorted(seed):
    labels = _labels([30, 25, 40], seed=seed)
    selection = select_image_sets(labels, images_per_class=20, seed=seed)
    assert selection.image_index.dtype == np.int64 and selection.image_set.dtype == np.int8
    assert len(np.unique(selection.image_index)) == len(selection) == 60
    np.testing.assert_array_equal(labels[selection.image_index], selection.label)
    np.testing.assert_array_equal(selection.counts(), np.tile(split_sizes(20), (3, 1)))
    # Sorted by class, then set, then image index.
    order = np.lexsort((selection.image_index, selection.image_set, selection.label))
    np.testing.assert_array_equal(order, np.arange(len(selection)))


def test_seeded_and_recorded():
    labels = _labels([30, 30])
    first = select_image_sets(labels, 15, seed=4)
    again = select_image_sets(labels, 15, seed=4)
    other = select_image_sets(labels, 15, seed=5)
    for name, values in first.as_arrays().items():
        np.testing.assert_array_equal(values, again.as_arrays()[name])
    assert not np.array_equal(first.image_index, other.image_index)
    restored = ImageSelection.from_arrays(first.as_arrays())
    np.testing.assert_array_equal(restored.image_set, first.image_set)


def test_class_sets_do_not_depend_on_other_classes():
    labels = _labels([20, 20, 20])
    all_classes = select_image_sets(labels, 10, seed=0)
    first_two = select_image_sets(labels, 10, seed=0, n_classes=2)
    for class_index in range(2):
        for image_set in SET_NAMES:
            np.testing.assert_array_equal(all_classes.indices(image_set, class_index),
                                          first_two.indices(image_set, class_index))
    assert set(first_two.label.tolist()) == {0, 1}


def test_draw_is_uniform_over_seeds():
    labels = np.repeat([0], 10)
    n_seeds, per_class = 2000, 5
    sets = np.zeros((10, 3))
    for seed in range(n_seeds):
        selection = select_image_sets(labels, per_class, seed=seed)
        np.add.at(sets, (selection.image_index, selection.image_set), 1)
    expected = n_seeds * split_sizes(per_class) / 10
    sigma = np.sqrt(expected * (1 - split_sizes(per_class) / 10))
    assert np.all(np.abs(sets - expected) < UNIFORMITY_SIGMAS * sigma)


def test_all_images_when_images_per_class_is_none():
    labels = _labels([7, 12])
    selection = select_image_sets(labels, None, seed=0)
    assert sorted(selection.image_index.tolist()) == list(range(19))
    np.testing.assert_array_equal(selection.counts(), [split_sizes(7), split_sizes(12)])


def test_too_few_images_names_class_count_and_fix():
    labels = _labels([30, 8, 30])
    with pytest.raises(RsvcError) as info:
        select_image_sets(labels, 10, seed=0, class_names=["a", "bee", "c"])
    assert "Class 1 ('bee')" in info.value.problem and "8 images" in info.value.problem
    assert "dataset.images_per_class" in info.value.fix and "at most 8" in info.value.fix


@pytest.mark.parametrize("images_per_class", [2, 0, 2.5])
def test_images_per_class_too_small_for_three_sets(images_per_class):
    with pytest.raises(RsvcError):
        select_image_sets(_labels([10]), images_per_class, seed=0)


def test_class_with_no_images_when_n_classes_given():
    with pytest.raises(RsvcError, match="Class 2 has 0 images"):
        select_image_sets(_labels([10, 10]), 5, seed=0, n_classes=3)


def test_labels_outside_range_are_ignored():
    labels = np.array([0] * 6 + [-1] * 4 + [5] * 3)
    selection = select_image_sets(labels, 5, seed=0, n_classes=1)
    assert set(selection.image_index.tolist()) <= set(range(6))


def test_crossval_split_without_evaluation_set():
    selection = select_image_sets(_labels([9]), 9, seed=0, split=(1, 2, 0))
    np.testing.assert_array_equal(selection.counts(), [[3, 6, 0]])


def test_bad_split():
    with pytest.raises(RsvcError, match="split"):
        select_image_sets(_labels([9]), 9, seed=0, split=(1, 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_separate_evaluation_source(seed):
    labels, evaluation_labels = _labels([30, 30], seed), _labels([12, 15], seed + 1)
    selection = select_image_sets_with_evaluation_source(labels, evaluation_labels, 20, seed=seed)
    np.testing.assert_array_equal(selection.counts(), np.tile(split_sizes(20), (2, 1)))
    from_evaluation = selection.source == EVALUATION_SOURCE
    np.testing.assert_array_equal(from_evaluation, selection.image_set == EVALUATION)
    np.testing.assert_array_equal(evaluation_labels[selection.image_index[from_evaluation]],
                                  selection.label[from_evaluation])
    primary = selection.source == PRIMARY_SOURCE
    np.testing.assert_array_equal(labels[selection.image_index[primary]], selection.label[primary])
    assert len(np.unique(selection.image_index[primary])) == primary.sum()
    assert len(np.unique(selection.image_index[from_evaluation])) == from_evaluation.sum()


def test_separate_evaluation_source_all_images_and_errors():
    labels, evaluation_labels = _labels([9, 6]), _labels([4, 5])
    selection = select_image_sets_with_evaluation_source(labels, evaluation_labels, None, seed=0)
    np.testing.assert_array_equal(selection.counts(), [[3, 6, 4], [2, 4, 5]])
    with pytest.raises(RsvcError, match="evaluation source"):
        select_image_sets_with_evaluation_source(labels, evaluation_labels, 15, seed=0)
    with pytest.raises(RsvcError, match="primary source"):
        select_image_sets_with_evaluation_source(_labels([9, 1]), evaluation_labels, None, seed=0)


def test_each_set_its_own_count():
    labels, evaluation_labels = _labels([40, 40]), _labels([50, 50], seed=1)
    counts = {"concept": 10, "regression": 20, "evaluation": 50}
    selection = select_image_sets(labels, None, seed=0, evaluation_labels=evaluation_labels, images_per_set=counts)
    np.testing.assert_array_equal(selection.counts(), [[10, 20, 50], [10, 20, 50]])
    assert not selection.notes
    # A count left out takes its share of images_per_class; the others keep their draws.
    shared = select_image_sets(labels, 25, seed=0, images_per_set={"evaluation": 3})
    np.testing.assert_array_equal(shared.counts(), [[5, 10, 3], [5, 10, 3]])
    with pytest.raises(RsvcError, match="not regression, evaluation"):
        select_image_sets(labels, None, seed=0, images_per_set={"concept": 5})
    with pytest.raises(RsvcError, match="concepts"):
        select_image_sets(labels, 25, seed=0, images_per_set={"concepts": 5})
    with pytest.raises(RsvcError, match="not a number"):
        select_image_sets(labels, 25, seed=0, images_per_set={"concept": -1})


def test_a_short_class_keeps_its_share_above_the_minimum_and_says_so():
    labels = _labels([30, 12])
    selection = select_image_sets(labels, 20, seed=0, class_names=["a", "b"], min_images=2)
    np.testing.assert_array_equal(selection.counts(), [[4, 8, 8], [2, 5, 5]])
    assert selection.notes == ("Class 1 ('b'): 12 images, fewer than the 20 asked: using 2 concept / 5 regression "
                               "/ 5 evaluation",)
    # Below the minimum (or without one, as before) it is an error naming the class and both settings.
    # Each set keeps min_images, or half of what it asked if fewer: 5 images give 1 / 2 / 2 of 4 / 8 / 8.
    assert len(select_image_sets(_labels([30, 5]), 20, seed=0, min_images=1).notes) == 1
    with pytest.raises(RsvcError, match="below the minimum") as error:
        select_image_sets(_labels([30, 5]), 20, seed=0, class_names=["a", "b"], min_images=2)
    assert "dataset.min_images_per_set" in error.value.fix and "Class 1 ('b')" in error.value.problem
    with pytest.raises(RsvcError, match="fewer than dataset.images_per_class=20"):
        select_image_sets(labels, 20, seed=0, class_names=["a", "b"])
    # The evaluation source is short on its own: the primary draw is as asked.
    short = select_image_sets(labels, 20, seed=0, evaluation_labels=_labels([8, 2]), min_images=2)
    np.testing.assert_array_equal(short.counts(), [[4, 8, 8], [4, 8, 2]])
    assert short.notes == ("Class 1 in the evaluation source: 2 images, fewer than the 8 asked: using 2 evaluation",)
