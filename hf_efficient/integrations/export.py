"""Self-contained checkpoints: remote code, model cards and ``push_to_hub``.

``save_pretrained`` of an efficient model calls :func:`write_remote_code`, which puts next to the
weights everything a process without hf_efficient needs to load the folder with
``trust_remote_code=True``: the attention maths and this integration as one flat folder of
modules, ``configuration_hf_efficient.py`` / ``modeling_hf_efficient.py`` holding the same static
classes the package defines for the architecture, and an ``auto_map`` for every Auto head.

The package spans two folders (``attention/`` and ``integrations/``) while remote code must be
one folder that imports only siblings, which is why the files are copied here rather than by
transformers' ``custom_object_save`` (it copies one module and its same-folder imports). The
copies differ from the sources in two ways only: ``from ..attention.x`` becomes ``from .x``, and
the import of the optional kernels' dispatcher becomes ``dispatch = None``, which makes each module
run its PyTorch path. transformers' own ``get_relative_import_files`` then checks that the folder is
complete.

:func:`render_model_card` fills ``huggingface_hub.ModelCard`` from ``ModelCardData`` (library,
base model, pipeline tag, license, datasets, evaluation results as ``model-index``) and a Jinja
template from ``model_cards/``; :func:`push_to_hub` saves to a temporary folder (safetensors +
JSON + remote code + README.md) and uploads it with ``huggingface_hub.HfApi.upload_folder``.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.models.auto import modeling_auto

from .plan import CONFIG_KEY

__all__ = [
    "AUTO_HEADS",
    "MODEL_CARD_TEMPLATE",
    "PIPELINE_TAGS",
    "auto_class_name",
    "push_to_hub",
    "render_model_card",
    "write_remote_code",
]

# Auto class name -> transformers' mapping of model_type -> class name.
AUTO_HEADS: dict[str, Mapping[str, Any]] = {
    "AutoModel": modeling_auto.MODEL_MAPPING_NAMES,
    "AutoModelForSequenceClassification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForMaskedLM": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    "AutoModelForTokenClassification": modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForCausalLM": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "AutoModelForImageClassification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    "AutoModelForQuestionAnswering": modeling_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    "AutoModelForMultipleChoice": modeling_auto.MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES,
}
# Auto class name -> Hub pipeline tag of the model card (AutoModel depends on the modality).
PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForQuestionAnswering": "question-answering",
}

CONFIG_MODULE = "configuration_hf_efficient"
MODELING_MODULE = "modeling_hf_efficient"
# The integration modules remote code needs (not patch/configs/architectures: a loaded checkpoint
# already knows its classes).
_INTEGRATION_FILES = ("plan.py", "configurations.py", "surgery.py", "attention_interface.py", "cache.py", "export.py",
                      "models.py")
# Optional compiled kernels are not shipped as remote code: a module that imports the kernels' dispatcher
# gets None instead, and then runs its own PyTorch path. "hf_efficient_kernels.<module>" -> replacement.
_KERNEL_FALLBACKS = {"hf_efficient_kernels.dispatch": "None"}
_KERNEL_IMPORT = re.compile(r"^(\s*)from\s+hf_efficient_kernels\s+import\s+(\w+)(?:\s+as\s+(\w+))?\s*$", re.MULTILINE)
_HERE = Path(__file__).resolve().parent


def auto_class_name(model_class: type) -> str | None:
    """The Auto class that loads a model class (its efficient base's), e.g. ``"AutoModelForCausalLM"``."""
    base = getattr(model_class, "hf_efficient_base_class", model_class)
    model_type = getattr(getattr(base, "config_class", None), "model_type", None)
    for auto_name, mapping in AUTO_HEADS.items():
        if mapping.get(model_type) == base.__name__:
            return auto_name
    return None


# --------------------------------------------------------------------------- remote code
def _without_kernels(name: str, text: str) -> str:
    def replace(match: re.Match) -> str:
        indent, module, alias = match.groups()
        fallback = _KERNEL_FALLBACKS.get(f"hf_efficient_kernels.{module}")
        if fallback is None:
            raise RuntimeError(f"{name} imports hf_efficient_kernels.{module}, which has no PyTorch fallback "
                               "for remote code")
        return f"{indent}{alias or module} = {fallback}  # remote code runs the PyTorch path"

    text = _KERNEL_IMPORT.sub(replace, text)
    if re.search(r"^\s*(from|import)\s+(kernels|hf_efficient|hf_efficient_kernels)\b", text, flags=re.MULTILINE):
        raise RuntimeError(f"{name} imports the hf_efficient package or its kernels; it cannot be remote code")
    return text


def _source_files() -> dict[str, str]:
    """file name -> text of every python file the remote code needs, with flat relative imports."""
    if (_HERE / "registry.py").exists():  # already a flat remote-code folder
        attention_dir, integration_dir = _HERE, _HERE
    else:
        attention_dir, integration_dir = _HERE.parent / "attention", _HERE
    files = {}
    for path in sorted(attention_dir.glob("*.py")):
        if path.name != "__init__.py" and path.name not in _INTEGRATION_FILES and not path.name.startswith(
                ("configuration_", "modeling_")):
            files[path.name] = path.read_text(encoding="utf-8")
    for name in _INTEGRATION_FILES:
        files[name] = (integration_dir / name).read_text(encoding="utf-8")
    for name, text in files.items():
        text = re.sub(r"^(\s*from\s+)\.\.attention\.", r"\1.", text, flags=re.MULTILINE)
        if re.search(r"^\s*from\s+\.\.", text, flags=re.MULTILINE):
            raise RuntimeError(f"{name} imports outside its package; it cannot be shipped as remote code")
        files[name] = _without_kernels(name, text)
    return files


def _heads(model) -> list[type]:
    """The efficient model classes of the model's architecture: every class beside the model's own
    (in the package's table, or in a loaded checkpoint's remote code) with the same config class."""
    config_class = type(model.config)
    module = sys.modules.get(type(model).__module__)
    heads = [
        obj for obj in vars(module).values()
        if isinstance(obj, type) and getattr(obj, "hf_efficient_base_class", None) is not None
        and obj.__dict__.get("config_class") is config_class
    ] if module is not None else []
    if type(model) not in heads:
        heads.append(type(model))
    return heads


def _import_line(classes: Sequence[type]) -> list[str]:
    by_module: dict[str, list[str]] = {}
    for cls in classes:
        by_module.setdefault(cls.__module__, []).append(cls.__name__)
    return [f"from {module} import {', '.join(sorted(set(names)))}" for module, names in sorted(by_module.items())]


def write_remote_code(model, save_directory: str | Path) -> dict[str, str]:
    """Write the remote-code files and the ``auto_map`` of every Auto head into a saved efficient
    checkpoint. Returns the ``auto_map`` written to ``config.json``."""
    config_class = type(model.config)
    base_config = getattr(config_class, "hf_efficient_base_class", None)
    if base_config is None or not getattr(model.config, CONFIG_KEY, None):
        raise ValueError("write_remote_code needs an efficient model (patch_model or an efficient config)")
    folder = Path(save_directory)
    files = _source_files()
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")

    config_name = config_class.__name__
    (folder / f"{CONFIG_MODULE}.py").write_text("\n".join([
        '"""Configuration of an hf_efficient checkpoint (efficient attention in a transformers model)."""',
        "",
        *_import_line([base_config]),
        "",
        "from .configurations import EfficientConfigMixin",
        "",
        "",
        f"class {config_name}(EfficientConfigMixin, {base_config.__name__}):",
        f"    model_type = {config_class.model_type!r}",
        "",
    ]), encoding="utf-8")

    heads = _heads(model)
    kind_modules = sorted(n[:-3] for n in files if n not in _INTEGRATION_FILES)
    lines = [
        '"""Models of an hf_efficient checkpoint: transformers classes that apply config.hf_efficient on init."""',
        "",
        *_import_line([cls.hf_efficient_base_class for cls in heads]),
        "",
        "# Importing each attention module registers its kind.",
        *[f"from .{m} import __name__ as _{m}_module  # noqa: F401" for m in kind_modules],
        "from .attention_interface import register_with_transformers",
        f"from .{CONFIG_MODULE} import {config_name}",
        "from .models import EfficientModelMixin",
        "",
        "register_with_transformers()",
    ]
    auto_map = {"AutoConfig": f"{CONFIG_MODULE}.{config_name}"}
    for cls in heads:
        lines += ["", "", f"class {cls.__name__}(EfficientModelMixin, {cls.hf_efficient_base_class.__name__}):",
                  f"    config_class = {config_name}"]
        auto_name = auto_class_name(cls)
        if auto_name is not None and auto_name not in auto_map:
            auto_map[auto_name] = f"{MODELING_MODULE}.{cls.__name__}"
    (folder / f"{MODELING_MODULE}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")

    missing = [p for p in get_relative_import_files(str(folder / f"{MODELING_MODULE}.py")) if not Path(p).exists()]
    if missing:  # pragma: no cover - a file list above out of date with the imports
        raise RuntimeError(f"remote code is incomplete: {missing}")
    config_path = folder / "config.json"
    data = json.loads(config_path.read_text(encoding="utf-8"))
    data["auto_map"] = auto_map
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return auto_map


# --------------------------------------------------------------------------- model card
MODEL_CARD_TEMPLATE = "efficient_model_card.md.j2"

_FALLBACK_CARD = """---
{{ card_data }}
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
    if template is not None:
        raise FileNotFoundError(f"model card template {template!r} not found (a file, or a name under model_cards/)")
    return _FALLBACK_CARD


def _pipeline_tag(model_or_config) -> str | None:
    if not hasattr(model_or_config, "config"):
        return None
    auto_name = auto_class_name(type(model_or_config))
    if auto_name == "AutoModel":
        return "image-feature-extraction" if hasattr(model_or_config.config, "image_size") else "feature-extraction"
    return PIPELINE_TAGS.get(auto_name)


def _eval_results(results: Sequence[Mapping[str, Any]] | None) -> tuple[list, list[dict]]:
    evals, rows = [], []
    for r in results or []:
        if not isinstance(r, Mapping):
            raise TypeError(f"each result must be a dict, got {type(r).__name__}")
        missing = {"task", "dataset", "metric", "value"} - set(r)
        if missing:
            raise ValueError(f"each result needs task, dataset, metric and value; missing {sorted(missing)} in {r}")
        row = {"task": r["task"], "dataset": r["dataset"], "dataset_type": r.get("dataset_type", r["dataset"]),
               "split": r.get("split", "test"), "metric": r["metric"], "metric_name": r.get("metric_name", r["metric"]),
               "value": float(r["value"])}
        rows.append(row)
        evals.append(EvalResult(task_type=row["task"], dataset_type=row["dataset_type"], dataset_name=row["dataset"],
                                dataset_split=row["split"], metric_type=row["metric"], metric_name=row["metric_name"],
                                metric_value=row["value"]))
    return evals, rows


def render_model_card(
    model_or_config,
    *,
    model_name: str,
    base_model: str | None = None,
    results: Sequence[Mapping[str, Any]] | None = None,
    template: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    pipeline_tag: str | None = None,
) -> str:
    """Render the model card (README.md) of an efficient model or config.

    Args:
        model_or_config: an efficient/patched model or an efficient config.
        model_name: the repository name shown in the card and in ``model-index``.
        base_model: Hub id of the checkpoint the weights come from.
        results: evaluation results for ``model-index``, each a dict with ``task`` (e.g.
            ``"text-classification"``), ``dataset`` (name), ``metric`` (type, e.g. ``"accuracy"``),
            ``value`` (float) and optionally ``dataset_type`` (Hub id), ``split``, ``metric_name``.
        template: a template file or the name of one under ``model_cards/``.
        extra: more variables for the template.
        license: license id for the metadata (e.g. ``"apache-2.0"``, that of the base model).
        datasets: Hub ids of the datasets the model was trained or evaluated on.
        pipeline_tag: defaults to the one of the model's head (``text-classification`` for a
            sequence classifier, ``text-generation`` for a causal LM, ...).
    """
    try:  # optional: only model cards need it
        import jinja2  # noqa: F401
    except ImportError as err:
        raise ImportError("rendering model cards needs jinja2: pip install jinja2") from err

    config = getattr(model_or_config, "config", model_or_config)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError("render_model_card needs a patched model or an efficient config (config.hf_efficient)")
    evals, rows = _eval_results(results)
    layers = record["layers"]
    base_model_type = getattr(config, "base_model_type", None) or config.model_type
    card_data = ModelCardData(
        library_name="transformers",
        base_model=base_model,
        license=license,
        pipeline_tag=pipeline_tag or _pipeline_tag(model_or_config),
        datasets=list(datasets) if datasets else None,
        tags=["hf_efficient", "efficient-attention", f"{record['kind']}-attention"],
        model_name=model_name if evals else None,
        eval_results=evals or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_template_text(template),
        model_name=model_name,
        base_model=base_model,
        base_model_type=base_model_type,
        model_type=config.model_type,
        kind=record["kind"],
        layers=layers,
        efficient_layers=[i for i, layer in enumerate(layers) if layer["kind"] is not None],
        softmax_layers=[i for i, layer in enumerate(layers) if layer["kind"] is None],
        kept_layer_types=sorted({layer.get("layer_type", "full_attention") for layer in layers
                                 if layer["kind"] is None}),
        params=next((layer["params"] for layer in layers if layer["kind"] is not None), {}),
        results=rows,
        **dict(extra or {}),
    )
    return str(card)


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
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    api=None,
) -> Any:
    """Save a patched model or an efficient config with its model card and upload it.

    Writes safetensors weights, JSON configs, the remote code and ``README.md`` into a temporary
    folder, then calls ``api.create_repo`` and ``api.upload_folder`` (``api`` defaults to
    ``huggingface_hub.HfApi(token=token)``). Returns what ``upload_folder`` returns.
    """
    validate_repo_id(repo_id)  # ValueError naming what a repo id may contain
    config = getattr(model_or_config, "config", model_or_config)
    if not getattr(config, CONFIG_KEY, None):
        raise ValueError(
            "push_to_hub needs a model patched with patch_model, an efficient model, or an efficient config"
        )
    if api is None:
        api = huggingface_hub.HfApi(token=token)  # looked up at call time (tests stand in for it)
    with tempfile.TemporaryDirectory() as tmp:
        if hasattr(model_or_config, "save_pretrained") and hasattr(model_or_config, "state_dict"):
            model_or_config.save_pretrained(tmp, safe_serialization=True)
        else:
            config.save_pretrained(tmp)
        card = render_model_card(model_or_config, model_name=repo_id.split("/")[-1], base_model=base_model,
                                 results=results, template=template, license=license, datasets=datasets)
        Path(tmp, "README.md").write_text(card, encoding="utf-8")
        for path in Path(tmp).rglob("*"):
            if path.is_file() and path.suffix not in (".safetensors", ".json", ".py", ".md", ".txt", ".model"):
                raise RuntimeError(f"refusing to upload {path.name}: only safetensors, JSON, code and text are written")
        api.create_repo(repo_id=repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
