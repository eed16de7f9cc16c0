"""megaNIST: the synthetic megapixel digit task of the attention-sampling paper, from offline MNIST.

Each image is a black ``canvas_size x canvas_size`` canvas with ``num_digits`` 28x28 MNIST digits
placed without overlap: ``num_target`` of them share the target class (the label), the others
are of different classes. Short random line segments ("scribbles") are drawn as noise so that a
low-resolution view alone cannot tell digits from clutter. The 5,000 offline digits are split once,
by a fixed permutation, into disjoint train and test pools, so a test image never reuses a digit
seen in training whatever the seeds.
"""

from __future__ import annotations

import functools

import numpy as np

DIGIT = 28
_POOL_SEED = 1234  # fixed: the train/test digit pools must not depend on the sample seed


@functools.lru_cache(maxsize=2)
def _digit_pools(test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from ..assets import load_mnist_5k

    data = load_mnist_5k()
    images = np.asarray(data["image"], dtype=np.uint8)
    labels = np.asarray(data["label"], dtype=np.int64)
    order = np.random.default_rng(_POOL_SEED).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


def _draw_lines(canvas: np.ndarray, rng: np.random.Generator, count: int) -> None:
    """Draw ``count`` straight segments (2 px wide, 1 to 3 digits long) of random grey level, in place."""
    size = canvas.shape[0]
    for _ in range(count):
        start = rng.uniform(0, size, 2)
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(DIGIT, 3 * DIGIT)
        steps = np.linspace(0.0, length, int(length * 2) + 1)
        pts = start[None] + steps[:, None] * np.array([np.sin(angle), np.cos(angle)])[None]
        pts = np.concatenate([pts, pts + 1.0])  # 2 px thick
        r = pts[:, 0].astype(int)
        c = pts[:, 1].astype(int)
        keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        value = rng.integers(128, 256)
        canvas[r[keep], c[keep]] = np.maximum(canvas[r[keep], c[keep]], value)


def _place(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int]]:
    """Top-left corners of ``count`` non-overlapping digit boxes (rejection sampling)."""
    corners: list[tuple[int, int]] = []
    for _ in range(10_000):
        r, c = (int(v) for v in rng.integers(0, size - DIGIT + 1, 2))
        if all(abs(r - r2) >= DIGIT or abs(c - c2) >= DIGIT for r2, c2 in corners):
            corners.append((r, c))
            if len(corners) == count:
                return corners
    raise ValueError(f"megaNIST: cannot place {count} non-overlapping digits on a {size}x{size} canvas")


def make_megamnist(
    num_samples: int,
    canvas_size: int = 256,
    split: str = "train",
    seed: int = 0,
    num_digits: int = 5,
    num_target: int = 3,
    num_noise_lines: int | None = None,
    test_fraction: float = 0.2,
):
    """Generate megaNIST as a ``datasets.Dataset``.

    Args:
        num_samples: number of images.
        canvas_size: side of the square canvas in pixels, 256 ... 4096.
        split: ``"train"`` or ``"test"``: which disjoint pool of MNIST digits to draw from.
        seed: seeds the classes, digits, positions and noise (same seed, same dataset).
        num_digits: digits per image; ``num_target`` of them share the label's class.
        num_target: digits of the target class; must be more than ``num_digits - num_target`` so
            that the label is the strict majority class.
        num_noise_lines: scribbles per image; defaults to ``10 * (canvas_size / 256) ** 2`` (a
            constant density).
        test_fraction: share of the 5,000 MNIST digits kept for the test pool.

    Returns:
        ``datasets.Dataset`` with ``image`` (uint8 ``(canvas_size, canvas_size)``), ``label`` (int,
        the target class) and ``digit_boxes`` (``num_digits`` rows of ``[row, col, class]``, top-left
        corners of the 28x28 digits).
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"make_megamnist: split must be 'train' or 'test', got {split!r}")
    if not isinstance(canvas_size, int) or not 256 <= canvas_size <= 4096:
        raise ValueError(f"make_megamnist: canvas_size must be an int in [256, 4096], got {canvas_size!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"make_megamnist: num_samples must be a positive int, got {num_samples!r}")
    for name, value in (("num_digits", num_digits), ("num_target", num_target)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"make_megamnist: {name} must be an int, got {value!r}")
    others = num_digits - num_target
    if num_target < 1 or others < 0 or num_target <= others:
        raise ValueError(
            "make_megamnist: need 1 <= num_target and num_target > num_digits - num_target (the label must "
            f"be the majority class), got num_digits={num_digits}, num_target={num_target}"
        )
    if not isinstance(test_fraction, int | float) or isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"make_megamnist: test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"make_megamnist: seed must be an int >= 0, got {seed!r}")
    if num_noise_lines is None:
        num_noise_lines = int(round(10 * (canvas_size / 256) ** 2))
    if not isinstance(num_noise_lines, int) or isinstance(num_noise_lines, bool) or num_noise_lines < 0:
        raise ValueError(f"make_megamnist: num_noise_lines must be an int >= 0, got {num_noise_lines!r}")

    digits, digit_labels = _digit_pools(test_fraction)[split]
    by_class = [np.flatnonzero(digit_labels == k) for k in range(10)]
    missing = [k for k in range(10) if len(by_class[k]) == 0]
    if missing:
        raise ValueError(
            f"make_megamnist: test_fraction={test_fraction!r} leaves the {split} pool with {len(digit_labels)} of the "
            f"5,000 digits and no digit of class(es) {missing}; use a test_fraction that leaves every class in both "
            "pools (e.g. 0.05 ... 0.95)"
        )
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])

    images = np.zeros((num_samples, canvas_size, canvas_size), dtype=np.uint8)
    labels = np.zeros(num_samples, dtype=np.int64)
    boxes = np.zeros((num_samples, num_digits, 3), dtype=np.int64)
    for i in range(num_samples):
        target = int(rng.integers(10))
        other_classes = rng.choice([k for k in range(10) if k != target], size=others, replace=True)
        classes = [target] * num_target + [int(k) for k in other_classes]
        canvas = images[i]
        _draw_lines(canvas, rng, num_noise_lines)
        for j, ((r, c), k) in enumerate(zip(_place(rng, canvas_size, num_digits), classes, strict=True)):
            digit = digits[rng.choice(by_class[k])]
            canvas[r : r + DIGIT, c : c + DIGIT] = np.maximum(canvas[r : r + DIGIT, c : c + DIGIT], digit)
            boxes[i, j] = (r, c, k)
        labels[i] = target

    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(canvas_size, canvas_size), dtype="uint8"),
            "label": datasets.ClassLabel(num_classes=10),
            "digit_boxes": datasets.Array2D(shape=(num_digits, 3), dtype="int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "digit_boxes": boxes}, features=features
    ).with_format("numpy")
