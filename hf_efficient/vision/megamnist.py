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
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

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
    raise ValueError(f"megaNIST: cannot place {count} non-overlapping digit boxes on a {size}x{size} canvas")


def _check_count(caller: str, name: str, value) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{caller}: {name} must be an int >= 0, got {value!r}")


def _check_args(caller: str, canvas_size, num_digits, num_target, test_fraction, seed) -> None:
    """The checks shared by :func:`make_megamnist` and :func:`write_megamnist`."""
    if not isinstance(canvas_size, int) or isinstance(canvas_size, bool) or not 256 <= canvas_size <= 4096:
        raise ValueError(f"{caller}: canvas_size must be an int in [256, 4096], got {canvas_size!r}")
    for name, value in (("num_digits", num_digits), ("num_target", num_target)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{caller}: {name} must be an int, got {value!r}")
    others = num_digits - num_target
    if num_target < 1 or others < 0 or num_target <= others:
        raise ValueError(
            f"{caller}: need 1 <= num_target and num_target > num_digits - num_target (the label must "
            f"be the majority class), got num_digits={num_digits}, num_target={num_target}"
        )
    if not isinstance(test_fraction, int | float) or isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{caller}: test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{caller}: seed must be an int >= 0, got {seed!r}")


def _pool(caller: str, split: str, test_fraction: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The split's digits ``(n, 28, 28)`` uint8 and, per class, the indices of its digits."""
    digits, digit_labels = _digit_pools(test_fraction)[split]
    by_class = [np.flatnonzero(digit_labels == k) for k in range(10)]
    missing = [k for k in range(10) if len(by_class[k]) == 0]
    if missing:
        raise ValueError(
            f"{caller}: test_fraction={test_fraction!r} leaves the {split} pool with {len(digit_labels)} of the "
            f"5,000 digits and no digit of class(es) {missing}; use a test_fraction that leaves every class in both "
            "pools (e.g. 0.05 ... 0.95)"
        )
    return digits, by_class


def _noise_pattern(rng: np.random.Generator) -> np.ndarray:
    """A 28x28 digit-sized pattern of two crossing strokes at random angles, 2 px wide (uint8)."""
    box = np.zeros((DIGIT, DIGIT), dtype=np.uint8)
    for _ in range(2):
        centre = rng.uniform(8, DIGIT - 8, 2)
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(6, 12)
        steps = np.linspace(-half, half, int(4 * half) + 1)
        pts = centre[None] + steps[:, None] * np.array([np.sin(angle), np.cos(angle)])[None]
        pts = np.concatenate([pts, pts + 1.0])  # 2 px thick
        r = np.clip(pts[:, 0].astype(int), 0, DIGIT - 1)
        c = np.clip(pts[:, 1].astype(int), 0, DIGIT - 1)
        box[r, c] = 255
    return box


def _new_canvas(size: int) -> np.ndarray:
    """One blank canvas (a function of its own so a test can count the canvases alive at once)."""
    return np.zeros((size, size), dtype=np.uint8)


def _render(
    canvas: np.ndarray,
    rng: np.random.Generator,
    digits: np.ndarray,
    by_class: list[np.ndarray],
    num_digits: int,
    num_target: int,
    num_noise_lines: int,
    num_noise_patterns: int,
) -> tuple[int, np.ndarray]:
    """Draw one megaNIST image into the blank ``(size, size)`` ``canvas``; return its label and digit boxes.

    Noise patterns get boxes of their own, disjoint from the digits' (placed in one draw with them),
    so a pattern never hides part of a digit; scribbles may cross anything.
    """
    size = canvas.shape[0]
    target = int(rng.integers(10))
    others = num_digits - num_target
    other_classes = rng.choice([k for k in range(10) if k != target], size=others, replace=True)
    classes = [target] * num_target + [int(k) for k in other_classes]
    _draw_lines(canvas, rng, num_noise_lines)
    corners = _place(rng, size, num_digits + num_noise_patterns)
    boxes = np.zeros((num_digits, 3), dtype=np.int64)
    for j, ((r, c), k) in enumerate(zip(corners[:num_digits], classes, strict=True)):
        digit = digits[rng.choice(by_class[k])]
        canvas[r : r + DIGIT, c : c + DIGIT] = np.maximum(canvas[r : r + DIGIT, c : c + DIGIT], digit)
        boxes[j] = (r, c, k)
    for r, c in corners[num_digits:]:
        canvas[r : r + DIGIT, c : c + DIGIT] = np.maximum(canvas[r : r + DIGIT, c : c + DIGIT], _noise_pattern(rng))
    return target, boxes


def make_megamnist(
    num_samples: int,
    canvas_size: int = 256,
    split: str = "train",
    seed: int = 0,
    num_digits: int = 5,
    num_target: int = 3,
    num_noise_lines: int | None = None,
    test_fraction: float = 0.2,
    num_noise_patterns: int = 0,
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
        num_noise_patterns: digit-sized noise patterns (two crossing strokes, as in
            :func:`write_megamnist`) per image, in boxes disjoint from the digits'; 0 by default.

    Returns:
        ``datasets.Dataset`` with ``image`` (uint8 ``(canvas_size, canvas_size)``), ``label`` (int,
        the target class) and ``digit_boxes`` (``num_digits`` rows of ``[row, col, class]``, top-left
        corners of the 28x28 digits).
    """
    import datasets

    _check_args("make_megamnist", canvas_size, num_digits, num_target, test_fraction, seed)
    if split not in ("train", "test"):
        raise ValueError(f"make_megamnist: split must be 'train' or 'test', got {split!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"make_megamnist: num_samples must be a positive int, got {num_samples!r}")
    if num_noise_lines is None:
        num_noise_lines = int(round(10 * (canvas_size / 256) ** 2))
    _check_count("make_megamnist", "num_noise_lines", num_noise_lines)
    _check_count("make_megamnist", "num_noise_patterns", num_noise_patterns)
    digits, by_class = _pool("make_megamnist", split, test_fraction)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])

    images = np.zeros((num_samples, canvas_size, canvas_size), dtype=np.uint8)
    labels = np.zeros(num_samples, dtype=np.int64)
    boxes = np.zeros((num_samples, num_digits, 3), dtype=np.int64)
    for i in range(num_samples):
        labels[i], boxes[i] = _render(
            images[i], rng, digits, by_class, num_digits, num_target, num_noise_lines, num_noise_patterns
        )

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


# the paper's megaNIST: 1500x1500 canvases, 5 digits (3 of the label's class), about 50 digit-like
# noise patterns, 5,000 training and 1,000 test images
PAPER_CONFIG = {"canvas_size": 1500, "num_train": 5000, "num_test": 1000, "num_noise_patterns": 50}
_SPLIT_ID = {"train": 0, "test": 1}


def _shard_rows(
    split: str, shard: int, count: int, canvas_size: int, seed: int, num_digits: int, num_target: int,
    num_noise_lines: int, num_noise_patterns: int, test_fraction: float,
):
    """Yield the ``count`` rows of one shard, one canvas alive at a time, each image as PNG bytes.

    Each shard has its own random stream (``[seed, split, shard]``), so shards can be made in any
    order or in parallel and come out the same.
    """
    from PIL import Image

    digits, by_class = _pool("write_megamnist", split, test_fraction)
    rng = np.random.default_rng([seed, _SPLIT_ID[split], shard])
    for _ in range(count):
        canvas = _new_canvas(canvas_size)
        label, boxes = _render(canvas, rng, digits, by_class, num_digits, num_target, num_noise_lines,
                               num_noise_patterns)
        buffer = io.BytesIO()
        Image.fromarray(canvas, mode="L").save(buffer, format="PNG", compress_level=1)
        del canvas  # only the encoded image travels on
        yield {"image": {"bytes": buffer.getvalue(), "path": None}, "label": label, "digit_boxes": boxes}


def _config_name(params: dict) -> str:
    """The card's one config name, made from the generation parameters: ``datasets.load_dataset(folder)``
    caches a folder under its name and config, so two megaNIST folders of one name but other contents
    must differ here or the second would be read from the first one's cache."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"megamnist-{params['canvas_size']}-{digest}"


def _card(params: dict, shards: dict[str, int]) -> str:
    """The dataset card (README.md): YAML front matter that ``datasets.load_dataset(folder)`` reads, then prose."""
    size = params["canvas_size"]
    total = params["num_train"] + params["num_test"]
    bins = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
    size_category = next((name for bound, name in bins if total < bound), "n>1M")
    return f"""---
pretty_name: megaNIST {size}x{size}
task_categories:
- image-classification
size_categories:
- {size_category}
configs:
- config_name: {_config_name(params)}
  data_files:
  - split: train
    path: data/train-*.parquet
  - split: test
    path: data/test-*.parquet
---

# megaNIST {size}x{size}

A synthetic megapixel classification task made from MNIST digits. Each image is a black
{size}x{size} grey canvas holding {params["num_digits"]} MNIST digits (28x28) at random,
non-overlapping positions: {params["num_target"]} of them share one class, which is the label, and
the others are of other classes. {params["num_noise_patterns"]} noise patterns (two crossing
strokes in a 28x28 box, digit-sized and digit-bright) and {params["num_noise_lines"]} longer
scribbles are added, so that a low-resolution view cannot tell digits from clutter: finding the
label needs the full resolution, but only at a few places.

## Splits and files

| split | images | shards |
|---|---|---|
| train | {params["num_train"]} | {shards["train"]} |
| test | {params["num_test"]} | {shards["test"]} |

Shards are Parquet files under `data/` (at most {params["shard_size"]} images each, images stored
as PNG). The train and test images draw their digits from disjoint pools of the 5,000-digit MNIST
subset (test fraction {params["test_fraction"]}), so no test digit is ever seen in training.

## Fields

- `image`: the canvas, a PIL image of mode `L` (uint8).
- `label`: the majority class, 0 ... 9.
- `digit_boxes`: {params["num_digits"]} rows `[row, col, class]`, the top-left corner of each digit and
  its class (the noise patterns are not listed).

## Loading

```python
import datasets
data = datasets.load_dataset("path/to/this/folder", split="train")                  # or streaming=True
from hf_efficient.vision import load_megamnist
data = load_megamnist("path/to/this/folder", "test", streaming=True)
```

## Generation

Made by `hf_efficient.vision.write_megamnist` with the parameters in `megamnist.json`
({", ".join(f"{k}={v}" for k, v in params.items())}). Each shard has its own random stream, seeded
by `(seed, split, shard index)`, so the same parameters give the same files. The configuration
follows the megaNIST of "Processing Megapixel Images with Deep Attention-Sampling Models"
(Katharopoulos and Fleuret, 2019): 1500x1500 canvases, 5 digits of which 3 share the label, about 50
noise patterns, 5,000 training and 1,000 test images. The digits come from a 5,000-image subset of
MNIST, not the full 60,000.
"""


def write_megamnist(
    path: str | os.PathLike,
    canvas_size: int = PAPER_CONFIG["canvas_size"],
    num_train: int = PAPER_CONFIG["num_train"],
    num_test: int = PAPER_CONFIG["num_test"],
    num_noise_patterns: int | None = None,
    num_noise_lines: int = 0,
    num_digits: int = 5,
    num_target: int = 3,
    shard_size: int = 500,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> Path:
    """Write megaNIST to a new folder as Parquet shards with a dataset card; return the folder.

    Every shard is built by ``datasets.Dataset.from_generator`` from a generator that holds one
    canvas at a time and writes finished rows (PNG-encoded) to disk in batches, so generation memory
    is bounded by one shard whatever ``num_train``, and the shard is written to Parquet before the
    next one starts. The files are written under a temporary name beside ``path`` and moved into
    place at the end: an interrupted run leaves no half-written dataset at ``path``.

    Args:
        path: the folder to create; it must not exist (or be an empty folder). An existing
            non-empty folder is refused, never overwritten.
        canvas_size: side of the square canvas, 256 ... 4096 (the paper: 1500).
        num_train / num_test: images per split (the paper: 5,000 / 1,000).
        num_noise_patterns: digit-sized noise patterns per image; defaults to
            ``round(50 * (canvas_size / 1500) ** 2)`` (the paper's 50 at 1500x1500, same density
            on other canvases).
        num_noise_lines: long scribbles per image (the in-memory :func:`make_megamnist` noise), 0 by default.
        num_digits / num_target: digits per image and how many of them share the label's class.
        shard_size: images per Parquet shard (and the bound on rows held during generation).
        seed: seeds everything; the same arguments give the same files.
        test_fraction: share of the 5,000 MNIST digits kept for the test pool.

    Returns:
        ``pathlib.Path`` of the folder, holding ``README.md`` (the card, which
        ``datasets.load_dataset(folder)`` reads), ``megamnist.json`` (the parameters) and
        ``data/{split}-{k:05d}-of-{n:05d}.parquet``.
    """
    import datasets

    caller = "write_megamnist"
    _check_args(caller, canvas_size, num_digits, num_target, test_fraction, seed)
    for name, value in (("num_train", num_train), ("num_test", num_test), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{caller}: {name} must be an int >= 1, got {value!r}")
    if num_noise_patterns is None:
        num_noise_patterns = int(round(50 * (canvas_size / 1500) ** 2))
    _check_count(caller, "num_noise_patterns", num_noise_patterns)
    _check_count(caller, "num_noise_lines", num_noise_lines)
    # the boxes of digits and patterns must fit without overlap; refuse crowded canvases up front
    if (num_digits + num_noise_patterns) * DIGIT * DIGIT * 4 > canvas_size * canvas_size:
        raise ValueError(
            f"{caller}: {num_digits} digits + {num_noise_patterns} noise patterns do not fit on a "
            f"{canvas_size}x{canvas_size} canvas (their boxes would cover over a quarter of it); use fewer patterns"
        )
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{caller}: path must be a str or os.PathLike, got {type(path).__name__}")
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{caller}: {str(target)!r} already exists and is not an empty folder; it is never overwritten. "
            "Choose a new path or remove it yourself"
        )
    params = {
        "canvas_size": canvas_size, "num_train": num_train, "num_test": num_test,
        "num_noise_patterns": int(num_noise_patterns), "num_noise_lines": int(num_noise_lines),
        "num_digits": num_digits, "num_target": num_target, "shard_size": shard_size, "seed": int(seed),
        "test_fraction": float(test_fraction),
    }
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(num_classes=10),
        "digit_boxes": datasets.Array2D(shape=(num_digits, 3), dtype="int64"),
    })
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    shards = {}
    try:
        (staging / "data").mkdir()
        for split, total in (("train", num_train), ("test", num_test)):
            n_shards = -(-total // shard_size)
            shards[split] = n_shards
            for shard in range(n_shards):
                count = min(shard_size, total - shard * shard_size)
                with tempfile.TemporaryDirectory(dir=staging) as cache:
                    part = datasets.Dataset.from_generator(
                        _shard_rows,
                        features=features,
                        gen_kwargs={
                            "split": split, "shard": shard, "count": count, "canvas_size": canvas_size,
                            "seed": int(seed), "num_digits": num_digits, "num_target": num_target,
                            "num_noise_lines": int(num_noise_lines), "num_noise_patterns": int(num_noise_patterns),
                            "test_fraction": float(test_fraction),
                        },
                        cache_dir=cache,
                        writer_batch_size=min(count, 64),
                        keep_in_memory=False,
                    )
                    part.to_parquet(str(staging / "data" / f"{split}-{shard:05d}-of-{n_shards:05d}.parquet"),
                                    batch_size=64)
                    del part
        (staging / "megamnist.json").write_text(json.dumps(params, indent=2) + "\n")
        (staging / "README.md").write_text(_card(params, shards))
        if target.exists():  # an empty folder (checked above): replace it
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_megamnist(path: str | os.PathLike, split: str = "train", streaming: bool = False):
    """Read a split of a folder written by :func:`write_megamnist`.

    Returns a ``datasets.Dataset`` (memory-mapped, images decoded on access) or, with
    ``streaming=True``, an ``IterableDataset`` that reads the shards in order; rows have ``image``
    (PIL, mode ``L``), ``label`` and ``digit_boxes``.
    """
    import datasets

    if split not in ("train", "test"):
        raise ValueError(f"load_megamnist: split must be 'train' or 'test', got {split!r}")
    folder = Path(path)
    files = sorted((folder / "data").glob(f"{split}-*.parquet"))
    if not (folder / "megamnist.json").is_file() or not files:
        raise ValueError(
            f"load_megamnist: {str(folder)!r} is not a megaNIST folder (expected megamnist.json and "
            f"data/{split}-*.parquet, as written by write_megamnist)"
        )
    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train", streaming=streaming)


def attention_on_digits(
    attention_map: torch.Tensor, digit_boxes: torch.Tensor, image_sizes: torch.Tensor,
    low_res_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of each image's attention mass on cells whose centre lies inside a digit box.

    A diagnostic for training: a uniform map puts about ``num_digits * 28**2 / canvas**2`` of its mass
    on the digits (0.17% at 1500x1500), a map that has found them puts most of it there.

    Args:
        attention_map: ``(batch, h, w)`` attention distributions (``AttentionSamplingOutput.attention_map``).
        digit_boxes: ``(batch, k, 2 or 3)`` top-left ``(row, col[, class])`` of each 28x28 digit.
        image_sizes: ``(batch, 2)`` full-resolution ``(height, width)``.
        low_res_sizes: ``(batch, 2)`` valid part of the map when the view was padded (the processor's
            ``low_res_sizes``, scaled to the map if it is smaller); None: the whole map is valid.

    Returns:
        ``(batch,)`` float mass in ``[0, 1]``.
    """
    import torch

    if attention_map.dim() != 3:
        raise ValueError(f"attention_on_digits: attention_map must be (batch, h, w), got {tuple(attention_map.shape)}")
    b, h, w = attention_map.shape
    if digit_boxes.dim() != 3 or digit_boxes.shape[0] != b or digit_boxes.shape[2] not in (2, 3):
        raise ValueError(
            f"attention_on_digits: digit_boxes must be (batch={b}, k, 2 or 3), got {tuple(digit_boxes.shape)}"
        )
    for name, sizes in (("image_sizes", image_sizes), ("low_res_sizes", low_res_sizes)):
        if sizes is not None and tuple(sizes.shape) != (b, 2):
            raise ValueError(f"attention_on_digits: {name} must be (batch={b}, 2), got {tuple(sizes.shape)}")
    valid = torch.tensor([[h, w]]).expand(b, 2) if low_res_sizes is None else low_res_sizes
    cell = image_sizes.double() / valid.double()  # (batch, 2) full-resolution pixels per cell
    centre_r = (torch.arange(h, dtype=torch.float64)[None] + 0.5) * cell[:, 0, None]  # (batch, h)
    centre_c = (torch.arange(w, dtype=torch.float64)[None] + 0.5) * cell[:, 1, None]  # (batch, w)
    top, left = digit_boxes[..., 0].double(), digit_boxes[..., 1].double()  # (batch, k)
    in_r = (centre_r[:, None, :] >= top[..., None]) & (centre_r[:, None, :] < top[..., None] + DIGIT)  # (b, k, h)
    in_c = (centre_c[:, None, :] >= left[..., None]) & (centre_c[:, None, :] < left[..., None] + DIGIT)  # (b, k, w)
    inside = (in_r[..., :, None] & in_c[..., None, :]).any(dim=1)  # (batch, h, w)
    return (attention_map.double() * inside).sum(dim=(1, 2)).to(attention_map.dtype)
