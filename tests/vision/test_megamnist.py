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


# ---- megaNIST on disk -------------------------------------------------------------------------------


def _write_small(path, **kwargs):
    from hf_efficient.vision import write_megamnist

    args = {"canvas_size": 300, "num_train": 7, "num_test": 3, "num_noise_patterns": 6, "shard_size": 3, "seed": 4}
    args.update(kwargs)
    return write_megamnist(path, **args)


def test_written_shards_hold_the_digits_the_boxes_name(mnist, tmp_path):
    import pyarrow.parquet as pq

    from hf_efficient.vision import load_megamnist

    folder = _write_small(tmp_path / "mm")
    files = sorted((folder / "data").glob("train-*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [3, 3, 1]  # shard_size rows at most
    assert len(list((folder / "data").glob("test-*.parquet"))) == 1
    train_digits, _ = _digit_pools(0.2)["train"]
    data = load_megamnist(folder, "train")
    assert len(data) == 7
    for row in data:
        image = np.asarray(row["image"])
        assert image.shape == (300, 300) and image.dtype == np.uint8
        boxes = np.asarray(row["digit_boxes"])
        counts = np.bincount(boxes[:, 2], minlength=10)
        assert counts[row["label"]] == 3 and (counts == 3).sum() == 1
        covered = np.zeros_like(image, dtype=bool)
        for r, c, _ in boxes:
            # noise patterns have boxes of their own, so each digit crop is exactly one training-pool digit
            assert (train_digits == image[r : r + 28, c : c + 28]).all(axis=(1, 2)).any()
            covered[r : r + 28, c : c + 28] = True
        assert (image[~covered] > 0).sum() > 6 * 20  # six noise patterns of two strokes each add ink elsewhere
    clean = _write_small(tmp_path / "clean", num_noise_patterns=0)
    for row in load_megamnist(clean, "test"):
        image, covered = np.asarray(row["image"]), np.zeros((300, 300), dtype=bool)
        for r, c, _ in row["digit_boxes"]:
            covered[r : r + 28, c : c + 28] = True
        assert (image[~covered] == 0).all()


def test_written_dataset_is_seeded_streams_and_loads_through_its_card(mnist, tmp_path):
    import datasets

    from hf_efficient.vision import load_megamnist

    a = _write_small(tmp_path / "a")
    b = _write_small(tmp_path / "b")
    c = _write_small(tmp_path / "c", seed=5)
    rows_a, rows_b, rows_c = ([np.asarray(r["image"]) for r in load_megamnist(f, "train")] for f in (a, b, c))
    assert all(np.array_equal(x, y) for x, y in zip(rows_a, rows_b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(rows_a, rows_c, strict=True))
    streamed = [np.asarray(r["image"]) for r in load_megamnist(a, "train", streaming=True)]
    assert len(streamed) == 7 and all(np.array_equal(x, y) for x, y in zip(rows_a, streamed, strict=True))
    by_card = datasets.load_dataset(str(a))  # the README's YAML names the splits and their files
    assert by_card["train"].num_rows == 7 and by_card["test"].num_rows == 3
    assert "megaNIST 300x300" in (a / "README.md").read_text()


def test_generation_holds_one_canvas_at_a_time(mnist, tmp_path, monkeypatch):
    import weakref

    from hf_efficient.vision import megamnist

    alive: list[weakref.ref] = []
    most = [0]
    original = megamnist._new_canvas

    def counting(size):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))  # canvases still alive at a new one
        canvas = original(size)
        alive.append(weakref.ref(canvas))
        return canvas

    monkeypatch.setattr(megamnist, "_new_canvas", counting)
    _write_small(tmp_path / "mm", num_train=10, shard_size=5)
    assert len(alive) == 13 and most[0] == 0  # every canvas was freed before the next was drawn


def test_an_existing_folder_is_never_overwritten(mnist, tmp_path):
    from hf_efficient.vision import write_megamnist

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="never overwritten"):
        _write_small(folder)
    assert (folder / "notes.txt").read_text() == "keep me" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mine.partial")]  # nothing left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_write_small(empty) / "megamnist.json").is_file()
    with pytest.raises(ValueError, match="num_noise_patterns"):
        write_megamnist(tmp_path / "x", num_noise_patterns=-1)
    with pytest.raises(ValueError, match="do not fit"):
        write_megamnist(tmp_path / "y", canvas_size=256, num_noise_patterns=40)
    with pytest.raises(ValueError, match="shard_size"):
        write_megamnist(tmp_path / "z", shard_size=0)


def _outside_digits(row) -> np.ndarray:
    """The image with its digit boxes blanked: what is left is noise."""
    image = np.array(row["image"])
    for r, c, _ in row["digit_boxes"]:
        image[r : r + 28, c : c + 28] = 0
    return image


@pytest.mark.parametrize("patterns", [0, 1, 6])
def test_in_memory_noise_patterns_sit_outside_the_digits(mnist, patterns):
    ds = make_megamnist(4, canvas_size=256, seed=5, num_noise_lines=0, num_noise_patterns=patterns)
    train_digits, _ = _digit_pools(0.2)["train"]
    for row in ds:
        for r, c, _ in row["digit_boxes"]:  # patterns never touch a digit: each crop is one pool digit
            assert (train_digits == row["image"][r : r + 28, c : c + 28]).all(axis=(1, 2)).any()
        ink = _outside_digits(row)
        # each pattern is two full-brightness strokes inside its own 28x28 box
        assert set(np.unique(ink).tolist()) <= {0, 255}
        assert (0 < (ink > 0).sum() <= patterns * 28 * 28) if patterns else not ink.any()


def test_in_memory_noise_patterns_default_off_and_checked(mnist):
    a = make_megamnist(2, canvas_size=256, seed=9)
    b = make_megamnist(2, canvas_size=256, seed=9, num_noise_patterns=0)
    assert np.array_equal(a["image"], b["image"])
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_noise_patterns"):
            make_megamnist(1, canvas_size=256, num_noise_patterns=bad)


def _mass_on_digits_loop(attention, boxes, image_size, valid):
    """Naive reference: visit every valid cell, test its centre against every box."""
    h, w = valid
    cell_h, cell_w = image_size[0] / h, image_size[1] / w
    total = 0.0
    for i in range(attention.shape[0]):
        for j in range(attention.shape[1]):
            cr, cc = (i + 0.5) * cell_h, (j + 0.5) * cell_w
            if any(r <= cr < r + 28 and c <= cc < c + 28 for r, c in boxes):
                total += float(attention[i, j])
    return total


def test_attention_on_digits_matches_a_loop():
    import torch

    from hf_efficient.vision import attention_on_digits

    gen = torch.Generator().manual_seed(0)
    b, h, w = 3, 23, 19
    attention = torch.rand(b, h, w, generator=gen, dtype=torch.float64)
    attention /= attention.sum(dim=(1, 2), keepdim=True)
    boxes = torch.randint(0, 280, (b, 5, 3), generator=gen)
    sizes = torch.tensor([[300, 250], [300, 250], [310, 260]])
    low = torch.tensor([[23, 19], [20, 17], [23, 19]])  # the second map is padded
    got = attention_on_digits(attention, boxes, sizes, low)
    for k in range(b):
        expected = _mass_on_digits_loop(attention[k], boxes[k, :, :2].tolist(), sizes[k].tolist(), low[k].tolist())
        assert got[k].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # a map all on one digit's cell gives 1, a map off every digit gives 0
    one = torch.zeros(1, 10, 10, dtype=torch.float64)
    one[0, 2, 3] = 1.0  # cell centre (25, 35) with 10-pixel cells
    box = torch.tensor([[[20, 30]]])
    assert attention_on_digits(one, box, torch.tensor([[100, 100]])).item() == 1.0
    assert attention_on_digits(one, torch.tensor([[[60, 60]]]), torch.tensor([[100, 100]])).item() == 0.0
