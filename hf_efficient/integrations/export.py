"""Self-contained checkpoints: remote code, model cards and ``push_to_hub``.

``save_pretrained`` of an efficient model (patched or built from an efficient config) calls
:func:`write_remote_code`, which copies the attention maths and this integration next to the
weights (relative imports only), writes ``configuration_hf_efficient.py`` /
``modeling_hf_efficient.py`` and an ``auto_map`` for every Auto head of the architecture. A
process without hf_efficient then loads the folder with ``trust_remote_code=True``.

:func:`push_to_hub` saves to a temporary folder (safetensors + JSON + remote code + README.md model
card) and uploads that folder with ``huggingface_hub.HfApi.upload_folder``.
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["MODEL_CARD_TEMPLATE", "push_to_hub", "render_model_card", "write_remote_code"]

CONFIG_MODULE = "configuration_hf_efficient"
MODELING_MODULE = "modeling_hf_efficient"
_INTEGRATION_FILES = ("attention_interface.py", "patch.py", "configs.py", "export.py", "cache.py")
# Optional compiled kernels are not shipped as remote code: the copies call the PyTorch path that
# the kernel dispatcher itself falls back to. "hf_efficient_kernels.<module>.<name>" -> name in the same file.
_KERNEL_FALLBACKS = {
    "hf_efficient_kernels.dispatch.causal_linear": "causal_linear_chunked",
    "hf_efficient_kernels.dispatch.causal_linear_normalized": "causal_linear_normalized_reference",
}
_KERNEL_IMPORT = re.compile(
    r"^(\s*)from\s+hf_efficient_kernels\.(\w+)\s+import\s+(\w+)(?:\s+as\s+(\w+))?\s*$", re.MULTILINE
)


def _without_kernels(name: str, text: str) -> str:
    def replace(match: re.Match) -> str:
        indent, module, symbol, alias = match.groups()
        fallback = _KERNEL_FALLBACKS.get(f"hf_efficient_kernels.{module}.{symbol}")
        if fallback is None:
            raise RuntimeError(f"{name} imports hf_efficient_kernels.{module}.{symbol}, which has no PyTorch "
                               "fallback for remote code")
        return f"{indent}{alias or symbol} = {fallback}  # remote code runs the PyTorch path"

    text = _KERNEL_IMPORT.sub(replace, text)
    if re.search(r"^\s*(from|import)\s+(kernels|hf_efficient|hf_efficient_kernels)\b", text, flags=re.MULTILINE):
        raise RuntimeError(f"{name} imports the hf_efficient package or its kernels; it cannot be remote code")
    return text


_HERE = Path(__file__).resolve().parent


def _source_files() -> dict[str, str]:
    """file name -> text of every python file the remote code needs, with flat relative imports."""
    if (_HERE / "registry.py").exists():  # already a flat remote-code folder
        attention_dir, integration_dir = _HERE, _HERE
    else:
        attention_dir, integration_dir = _HERE.parent / "attention", _HERE
    files = {}
    for path in sorted(attention_dir.glob("*.py")):
        if path.name != "__init__.py" and not path.name.startswith(("configuration_", "modeling_")):
            files[path.name] = path.read_text(encoding="utf-8")
    for name in _INTEGRATION_FILES:
        files[name] = (integration_dir / name).read_text(encoding="utf-8")
    for name, text in files.items():
        # ``from ..attention.registry import x`` -> ``from .registry import x``: one flat folder.
        text = re.sub(r"^(\s*from\s+)\.\.attention\.", r"\1.", text, flags=re.MULTILINE)
        if re.search(r"^\s*from\s+\.\.", text, flags=re.MULTILINE):
            raise RuntimeError(f"{name} imports outside its package; it cannot be shipped as remote code")
        files[name] = _without_kernels(name, text)
    return files


def write_remote_code(model, save_directory: str | Path) -> dict[str, str]:
    """Write the remote-code files and the full ``auto_map`` into a saved efficient checkpoint.

    Returns the ``auto_map`` written to ``config.json``.
    """
    from .configs import efficient_classes

    folder = Path(save_directory)
    config = model.config
    base_type = getattr(config, "base_model_type", None) or config.model_type
    classes = efficient_classes(base_type)
    files = _source_files()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")

    kind_modules = sorted(n[:-3] for n in files if n not in _INTEGRATION_FILES)
    config_name = classes.config_class.__name__
    (folder / f"{CONFIG_MODULE}.py").write_text(
        '"""Configuration of an hf_efficient checkpoint (efficient attention in a transformers model)."""\n\n'
        "from .configs import efficient_classes\n\n"
        f"{config_name} = efficient_classes({base_type!r}).config_class\n",
        encoding="utf-8",
    )
    heads = dict(classes.models)
    own = type(model)
    if own not in heads.values() and getattr(own, "hf_efficient_base_class", None) is not None:
        heads[f"_{own.__name__}"] = own
    lines = [
        '"""Models of an hf_efficient checkpoint: transformers classes that patch their attention on init."""',
        "",
        "# Importing each attention module registers its kind.",
        *[f"from .{m} import __name__ as _{m}_module  # noqa: F401" for m in kind_modules],
        "import transformers",
        "",
        "from .attention_interface import register_with_transformers",
        "from .configs import efficient_classes",
        "",
        "register_with_transformers()",
        f"_classes = efficient_classes({base_type!r})",
    ]
    for cls in heads.values():
        base_name = cls.hf_efficient_base_class.__name__
        lines.append(f"{cls.__name__} = _classes.model_class_for(transformers.{base_name})")
    (folder / f"{MODELING_MODULE}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")

    auto_map = {"AutoConfig": f"{CONFIG_MODULE}.{config_name}"}
    for key, cls in heads.items():
        if not key.startswith("_"):
            auto_map[key] = f"{MODELING_MODULE}.{cls.__name__}"
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["auto_map"] = auto_map
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return auto_map


# --------------------------------------------------------------------------- model card
MODEL_CARD_TEMPLATE = "efficient_model_card.md.j2"

_FALLBACK_CARD = """---
library_name: transformers
tags:
- hf_efficient
- efficient-attention
---

# {{ model_name }}

{{ base_model_type }} with `{{ kind }}` attention from hf_efficient.
"""


def _template_text(template: str | Path | None) -> str:
    if template is not None and Path(template).exists():
        return Path(template).read_text(encoding="utf-8")
    name = str(template) if template is not None else MODEL_CARD_TEMPLATE
    roots = [_HERE.parent.parent / "model_cards", _HERE / "model_cards"]  # source checkout, flat remote code
    try:  # installed: the model_cards folder is the package hf_efficient_model_cards
        roots.insert(0, Path(importlib.import_module("hf_efficient_model_cards").__file__).parent)
    except ImportError:
        pass
    for root in roots:
        if (root / name).exists():
            return (root / name).read_text(encoding="utf-8")
    return _FALLBACK_CARD


def render_model_card(
    model_or_config,
    *,
    model_name: str,
    base_model: str | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    template: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Render the model card (README.md) of an efficient model or config.

    Args:
        model_or_config: an efficient/patched model or an efficient config.
        model_name: the repository name shown in the card and in ``model-index``.
        base_model: id of the checkpoint the weights come from.
        results: evaluation results for ``model-index``, each a dict with ``task`` (e.g.
            ``"text-classification"``), ``dataset`` (name), ``metric`` (type, e.g. ``"accuracy"``),
            ``value`` (float) and optionally ``dataset_type``, ``split``, ``metric_name``.
        template: a template file or the name of one under ``model_cards/``.
        extra: more variables for the template.
    """
    try:  # optional: only model cards need it
        import jinja2
    except ImportError as err:
        raise ImportError("rendering model cards needs jinja2: pip install jinja2") from err

    config = getattr(model_or_config, "config", model_or_config)
    record = getattr(config, "hf_efficient", None)
    if not record:
        raise ValueError("render_model_card needs a patched model or an efficient config (config.hf_efficient)")
    rows = []
    for r in results or []:
        missing = {"task", "dataset", "metric", "value"} - set(r)
        if missing:
            raise ValueError(f"each result needs task, dataset, metric and value; missing {sorted(missing)} in {r}")
        rows.append(
            {
                "task": r["task"],
                "dataset": r["dataset"],
                "dataset_type": r.get("dataset_type", r["dataset"]),
                "split": r.get("split", "test"),
                "metric": r["metric"],
                "metric_name": r.get("metric_name", r["metric"]),
                "value": float(r["value"]),
            }
        )
    layers = record["layers"]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["tojson"] = lambda value: json.dumps(value)
    return env.from_string(_template_text(template)).render(
        model_name=model_name,
        base_model=base_model,
        base_model_type=getattr(config, "base_model_type", None) or config.model_type,
        model_type=config.model_type,
        kind=record["kind"],
        layers=layers,
        efficient_layers=[i for i, layer in enumerate(layers) if layer["kind"] is not None],
        softmax_layers=[i for i, layer in enumerate(layers) if layer["kind"] is None],
        params=next((layer["params"] for layer in layers if layer["kind"] is not None), {}),
        results=rows,
        **dict(extra or {}),
    )


def push_to_hub(
    model_or_config,
    repo_id: str,
    *,
    results: Sequence[Mapping[str, Any]] | None = None,
    base_model: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload efficient-attention model",
    template: str | Path | None = None,
    api=None,
) -> Any:
    """Save a patched model or an efficient config with its model card and upload it.

    Writes safetensors weights, JSON configs, the remote code and ``README.md`` into a temporary
    folder, then calls ``api.create_repo`` and ``api.upload_folder`` (``api`` defaults to
    ``huggingface_hub.HfApi(token=token)``). Returns what ``upload_folder`` returns.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    config = getattr(model_or_config, "config", model_or_config)
    if not getattr(config, "hf_efficient", None):
        raise ValueError(
            "push_to_hub needs a model patched with patch_model, an efficient model, or an efficient config"
        )
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(model_or_config, "save_pretrained") and hasattr(model_or_config, "state_dict"):
            model_or_config.save_pretrained(tmp, safe_serialization=True)
        else:
            config.save_pretrained(tmp)
        card = render_model_card(model_or_config, model_name=repo_id.split("/")[-1], base_model=base_model,
                                 results=results, template=template)
        Path(tmp, "README.md").write_text(card, encoding="utf-8")
        for path in Path(tmp).rglob("*"):
            if path.is_file() and path.suffix not in (".safetensors", ".json", ".py", ".md", ".txt", ".model"):
                raise RuntimeError(f"refusing to upload {path.name}: only safetensors, JSON, code and text are written")
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
