"""The wheel ships every package, under names that cannot collide with other distributions."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools.get("package-dir", {})


def test_every_package_folder_is_declared():
    packages, dirs = _declared()
    assert dirs == {"hf_efficient_kernels": "kernels", "hf_efficient_model_cards": "model_cards"}
    found = set()
    for top, folder in [("hf_efficient", "hf_efficient"), *dirs.items()]:
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *parts)))
    assert found == packages, f"pyproject.toml [tool.setuptools] packages must list exactly {sorted(found)}"
    # no generic top-level names such as "kernels" that another distribution may also install
    assert all(name.split(".")[0].startswith("hf_efficient") for name in packages)


def test_installed_names_resolve_to_the_project_folders():
    import hf_efficient_kernels
    import hf_efficient_model_cards
    from hf_efficient import kernels

    assert Path(hf_efficient_kernels.__file__).parent == ROOT / "kernels"
    assert (Path(hf_efficient_model_cards.__file__).parent / "efficient_model_card.md.j2").exists()
    assert kernels.available is hf_efficient_kernels.available
