"""Layer choices: which attention each layer of a model runs. The first step of patching.

A plan is one :class:`LayerAttention` per attention layer: the kind that replaces the layer's
softmax attention (with its validated parameters), or None to keep softmax. It depends only on
the model's config, so ``patch_model``, ``efficient_config``, ``LinearAttentionCache`` and
``linearize`` all derive the same plan from the same config.

Hybrid architectures (Gemma 2/3, Cohere2, GPT-OSS, ModernBERT, Mistral's sliding window) mix
layer types: ``"full_attention"`` layers attend to every token, ``"sliding_attention"`` layers to
the last ``sliding_window`` tokens only. Sliding layers are already O(N w) and keep a bounded cache;
the quadratic cost and the growing cache live in the full layers. So by default a plan replaces
the full layers and keeps the sliding ones (softmax, with their window); ``sliding=`` names a kind
that can honour a window (``window-linear``: exact softmax over the window, linear beyond) for
the sliding layers as well. Other layer types (chunked attention) always stay softmax.

The plan is stored in the config under ``config.hf_efficient`` (JSON, see :func:`describe_plan`),
so it saves and loads with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..attention.registry import get_attention_kind

__all__ = [
    "CONFIG_KEY",
    "FULL",
    "SLIDING",
    "LayerAttention",
    "describe_plan",
    "layer_types",
    "plan_from_record",
    "plan_layers",
    "summarize_plan",
    "window_of",
]

logger = logging.getLogger("hf_efficient")

# Name of the config attribute (and config.json key) that records the plan.
CONFIG_KEY = "hf_efficient"
FULL = "full_attention"
SLIDING = "sliding_attention"
# Layer types that attend to every earlier (or every) token: what the kinds replace.
_GLOBAL_TYPES = (FULL, "attention")


@dataclass
class LayerAttention:
    """The attention one layer runs.

    Attributes:
        kind: registry name of the kind, or None for the model's own softmax attention.
        params: the kind's validated parameter dataclass (None for softmax).
        layer_type: the layer's type in the model (``"full_attention"``, ``"sliding_attention"``, ...).
    """

    kind: str | None
    params: Any = None
    layer_type: str = FULL

    @property
    def is_global(self) -> bool:
        return self.layer_type in _GLOBAL_TYPES

    def to_dict(self) -> dict:
        params = dataclasses.asdict(self.params) if self.params is not None else None
        return {"kind": self.kind, "params": params, "layer_type": self.layer_type}

    @staticmethod
    def from_dict(data: Mapping) -> LayerAttention:
        layer_type = data.get("layer_type") or FULL  # records written before hybrid support had none
        kind = data.get("kind")
        if kind is None:
            return LayerAttention(None, None, layer_type)
        return LayerAttention(kind, get_attention_kind(kind).make_params(**(data.get("params") or {})), layer_type)


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise ValueError(f"cannot tell how many attention layers a {config.model_type!r} config has "
                         f"(num_hidden_layers={n!r})")
    return n


def layer_types(config) -> list[str]:
    """The type of each attention layer of a model with this config, as transformers decides it:
    ``config.layer_types`` when the config has one, else every layer ``"sliding_attention"`` when
    ``config.sliding_window`` is set (Mistral, Phi-3), ``"chunked_attention"`` with an attention
    chunk size, and ``"full_attention"`` otherwise."""
    n = _num_layers(config)
    types = getattr(config, "layer_types", None)
    if types:
        types = list(types)
        if len(types) < n:
            raise ValueError(f"config.layer_types lists {len(types)} layers but the config has {n}")
        return types[:n]
    if getattr(config, "sliding_window", None) is not None:
        return [SLIDING] * n
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return [FULL] * n


def window_of(config) -> int | None:
    """The sliding window of the config's sliding layers: a key j is seen by query i when
    ``i - window < j <= i`` (the query's own key included), as in transformers' masks."""
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and not isinstance(window, bool) else None


def _layer_indices(spec: Iterable[int] | None, num_layers: int, what: str) -> set[int]:
    if spec is None:
        return set()
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Iterable):
        raise TypeError(f"{what} must be a list of layer indices, got {spec!r}")
    out = set()
    for i in spec:
        if not isinstance(i, int) or isinstance(i, bool) or not -num_layers <= i < num_layers:
            raise ValueError(f"{what}: layer index {i!r} is not an int in [-{num_layers}, {num_layers})")
        out.add(i % num_layers)
    return out


def _non_negative(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _sliding_kind(sliding: str | None, window: int | None):
    if sliding is None:
        return None
    kind = get_attention_kind(sliding)
    if "window" not in {f.name for f in dataclasses.fields(kind.params_class)}:
        raise ValueError(f"sliding={kind.name!r}: a sliding-window layer can only be replaced by a kind that honours a "
                         "window (a 'window' parameter), such as 'window-linear'")
    if window is None:
        raise ValueError("sliding= needs the model's sliding window (config.sliding_window is not set)")
    return kind


def plan_layers(
    layers_of: int | Sequence[str] | Any,
    kind: str,
    *,
    layers: Iterable[int] | None = None,
    softmax_layers: Iterable[int] | None = None,
    keep_softmax_first: int = 0,
    keep_softmax_last: int = 0,
    layer_params: Mapping[int, Mapping[str, Any]] | None = None,
    sliding: str | None = None,
    sliding_params: Mapping[str, Any] | None = None,
    sliding_window: int | None = None,
    **params: Any,
) -> list[LayerAttention]:
    """The attention of each layer.

    Args:
        layers_of: a model config (layer types and sliding window read from it), a list of layer
            types, or a number of layers (all ``"full_attention"``).
        kind: registry name of the kind that replaces the full-attention layers.
        layers: indices of the layers to replace (default: every full-attention layer, plus every
            sliding layer when ``sliding`` is set); the others stay softmax.
        softmax_layers: indices kept softmax (negative indices count from the end).
        keep_softmax_first, keep_softmax_last: keep this many first/last layers softmax.
        layer_params: per-layer overrides of the parameters, ``{layer_index: {name: value}}``.
        sliding: kind for the sliding-window layers (None keeps them softmax); it must have a
            ``window`` parameter, which defaults to the model's window and may not exceed it.
        sliding_params: parameters of the ``sliding`` kind.
        sliding_window: the model's sliding window when ``layers_of`` is a list of types (read
            from a config otherwise).
        params: parameters of ``kind``.

    Raises ``ValueError`` for a layer that cannot take the requested kind (a sliding layer asked
    for a kind without a window, a chunked layer) and for a model whose every layer is a sliding
    layer when ``sliding`` is not set (nothing would change).
    """
    if isinstance(layers_of, int) and not isinstance(layers_of, bool):
        if layers_of <= 0:
            raise ValueError(f"a model needs at least one attention layer, got {layers_of}")
        types = [FULL] * layers_of
    elif isinstance(layers_of, Sequence) and not isinstance(layers_of, (str, bytes)):
        types = [str(t) for t in layers_of]
    elif hasattr(layers_of, "model_type"):
        types = layer_types(layers_of)
        sliding_window = window_of(layers_of) if sliding_window is None else sliding_window
    else:
        raise TypeError(f"plan_layers needs a config, a list of layer types or a number of layers, got {layers_of!r}")
    n = len(types)
    kind_obj = get_attention_kind(kind)
    kind_obj.make_params(**params)  # validates once, even when every layer stays softmax
    window = sliding_window
    sliding_kind = _sliding_kind(sliding, window)
    sliding_params = dict(sliding_params or {})
    if sliding_kind is not None:
        sliding_params.setdefault("window", window)
        sliding_kind.make_params(**sliding_params)
        if sliding_params["window"] > window:
            raise ValueError(f"sliding_params window={sliding_params['window']} is larger than the model's sliding "
                             f"window ({window}): those layers never attended that far with softmax")
    elif sliding_params:
        raise ValueError("sliding_params needs sliding=<kind> (e.g. sliding='window-linear')")

    explicit = layers is not None
    chosen = _layer_indices(layers, n, "layers") if explicit else set(range(n))
    softmax = _layer_indices(softmax_layers, n, "softmax_layers")
    softmax |= set(range(min(_non_negative("keep_softmax_first", keep_softmax_first), n)))
    softmax |= set(range(max(0, n - _non_negative("keep_softmax_last", keep_softmax_last)), n))
    overrides = {}
    for i, extra in (layer_params or {}).items():
        (index,) = _layer_indices([i], n, "layer_params")
        if not isinstance(extra, Mapping):
            raise TypeError(f"layer_params[{i}] must be a dict of parameters, got {type(extra).__name__}")
        overrides[index] = dict(extra)

    if not explicit and sliding_kind is None and not any(t in _GLOBAL_TYPES for t in types):
        raise ValueError(
            f"every attention layer of this model is a {types[0]!r} layer (window {window}); patching keeps "
            f"sliding-window layers by default, so {kind_obj.name!r} would replace nothing. Pass "
            "sliding='window-linear' to replace them with a kind that honours the window, or set "
            "config.sliding_window = None (before building the model) to make them global layers"
        )
    plan = []
    for i, layer_type in enumerate(types):
        if i not in chosen or i in softmax:
            plan.append(LayerAttention(None, None, layer_type))
            continue
        if layer_type in _GLOBAL_TYPES:
            layer_kind, base = kind_obj, params
        elif layer_type == SLIDING and sliding_kind is not None:
            layer_kind, base = sliding_kind, sliding_params
        elif not explicit:  # kept: sliding without sliding=, chunked, ...
            plan.append(LayerAttention(None, None, layer_type))
            continue
        elif layer_type == SLIDING:
            raise ValueError(f"layer {i} is a sliding-window layer (window {window}); {kind_obj.name!r} cannot honour "
                             "its window. Keep it softmax (leave it out of layers=) or pass sliding='window-linear'")
        else:
            raise ValueError(f"layer {i} is a {layer_type!r} layer, which no hf_efficient kind can honour; keep it "
                             "softmax (leave it out of layers=)")
        plan.append(LayerAttention(layer_kind.name, layer_kind.make_params(**{**base, **overrides.get(i, {})}),
                                   layer_type))
    return plan


def describe_plan(
    kind: str,
    plan: Sequence[LayerAttention],
    base_attn_implementation: str | None,
    *,
    sliding: str | None = None,
    ignore_logit_softcap: bool = False,
) -> dict:
    """The JSON record stored in ``config.hf_efficient``: the main kind, one entry per layer
    (``{"kind", "params", "layer_type"}``; kind None = kept softmax, e.g. a sliding-window layer),
    and the implementation that kept softmax layers run (the model's own, e.g. ``"sdpa"``)."""
    record = {
        "kind": get_attention_kind(kind).name,
        "layers": [layer.to_dict() for layer in plan],
        "base_attn_implementation": base_attn_implementation,
    }
    if sliding is not None:
        record["sliding_kind"] = get_attention_kind(sliding).name
    if ignore_logit_softcap:
        record["ignore_logit_softcap"] = True
    return record


def plan_from_record(record: Mapping) -> list[LayerAttention]:
    """Inverse of :func:`describe_plan` (validates every layer's parameters again)."""
    layers = record.get("layers") if isinstance(record, Mapping) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"config.{CONFIG_KEY} must hold a non-empty 'layers' list, got {record!r}")
    return [LayerAttention.from_dict(layer) for layer in layers]


def _ranges(indices: Sequence[int]) -> str:
    out, start = [], None
    for j, i in enumerate(indices):
        if start is None:
            start = i
        if j + 1 == len(indices) or indices[j + 1] != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(out)


def summarize_plan(plan: Sequence[LayerAttention]) -> str:
    """One line per group of layers, e.g. ``"layers 5, 11 (full_attention): linear"`` and
    ``"layers 0-4, 6-10 (sliding_attention): kept softmax"``."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(plan):
        groups.setdefault((layer.kind, layer.layer_type), []).append(i)
    lines = []
    for (kind, layer_type), indices in groups.items():
        what = kind if kind is not None else "kept softmax"
        lines.append(f"layers {_ranges(indices)} ({layer_type}): {what}")
    return "; ".join(lines)
