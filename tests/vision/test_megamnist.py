"""megaNIST generator: labels, digit placement, disjoint pools, seeding, argument errors."""

from __future__ import annotations

import numpy as np
import pytest

from hf_efficient.assets import load_mnist_5k, require_asset
from hf_efficient.vision import make_megamnist
from hf_efficient.vision.megamnist import _digit_pools


@pytest.fixture(scope="module")
def mnist():
    require_asset("mnist_5k")
    return load_mnist_5k()


def test_labels_are_the_majority_class_and_digits_sit_at_their_boxes(mnist):
    ds = make_megamnist(6, canvas_size=256, split="train", seed=3, num_noise_lines=0)
    train_digits, _ = _digit_pools(0.2)["train"]
    for row in ds:
        classes = row["digit_boxes"][:, 2]
        counts = np.bincount(classes, minlength=10)
        assert counts[row["label"]] == 3 and counts.max() == 3 and (counts == 3).sum() == 1
        for r, c, _ in row["digit_boxes"]:
            crop = row["image"][r : r + 28, c : c + 28]
            # without noise and with non-overlapping boxes each crop is exactly one pool digit
            assert (train_digits == crop).all(axis=(1, 2)).any()
        boxes = row["digit_boxes"]
        for i in range(5):
            for j in range(i + 1, 5):
                assert abs(boxes[i, 0] - boxes[j, 0]) >= 28 or abs(boxes[i, 1] - boxes[j, 1]) >= 28


def test_train_and_test_pools_are_disjoint_and_cover_mnist(mnist):
    pools = _digit_pools(0.2)
    train, test = pools["train"][0], pools["test"][0]
    assert len(train) + len(test) == len(mnist)
    train_keys = {d.tobytes() for d in train}
    # MNIST has no exact duplicates in this subset, so disjoint indices mean disjoint images
    assert not any(d.tobytes() in train_keys for d in test)


def test_seeded_and_noise_present(mnist):
    a = make_megamnist(2, canvas_size=256, seed=7)
    b = make_megamnist(2, canvas_size=256, seed=7)
    c = make_megamnist(2, canvas_size=256, seed=8)
    assert np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    clean = make_megamnist(2, canvas_size=256, seed=7, num_noise_lines=0)
    assert (np.asarray(a["image"]) > 0).sum() > (np.asarray(clean["image"]) > 0).sum()  # scribbles add ink


def test_bad_arguments():
    with pytest.raises(ValueError, match="canvas_size"):
        make_megamnist(1, canvas_size=100)
    with pytest.raises(ValueError, match="majority"):
        make_megamnist(1, num_digits=4, num_target=2)
    with pytest.raises(ValueError, match="split"):
        make_megamnist(1, split="valid")
