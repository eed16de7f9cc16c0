"""Linearise a pretrained model: learn feature maps so each layer's linear attention mimics its softmax.

"Attention transfer" (as in Hedgehog, Zhang et al. 2024): for every patched layer, a learnable
map phi (``hedgehog``: softmax of a per-head projection) is trained so that the linear attention
weights ``phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')`` match the model's own softmax weights
``softmax(q_i . k_j * scale)`` on real text, by cross-entropy between the two rows. Decoders are
fitted on causal rows (key j <= i), encoders (BERT, RoBERTa, ModernBERT: bidirectional attention)
on full rows: each layer is fitted the way it attends. Padding given as an ``attention_mask`` in
the windows is honoured: padded keys are left out of both rows, padded queries out of the loss.

Only the feature maps train; the model's weights stay as they are, so each layer is fitted on the
unchanged model's queries and keys, which are captured once. An optional fine-tune of the patched
model follows: by default only the feature maps train, on distillation from the softmax model's own
output (captured in the same pass as the queries and keys): its output distribution when the model
has ``logits`` (next-token for a causal LM, the masked-LM distribution of every position for an
encoder head), else its ``last_hidden_state`` (mean squared error).

Afterwards a decoder decodes in O(1) per token with a
:class:`~hf_efficient.integrations.cache.LinearAttentionCache`; an encoder runs in O(N).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from ..attention import get_attention_kind
from ..attention.registry import recurrent_kind_names

__all__ = [
    "LinearizeConfig",
    "attention_transfer_loss",
    "capture_queries_keys",
    "distillation_loss",
    "hidden_states_distillation_loss",
    "learnable_feature_maps",
    "linearize",
]

FINETUNE_PARAMS = ("feature_maps", "feature_maps+qk", "lora", "all")


def _param_names(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(get_attention_kind(kind).params_class)}


def linearizable_kinds() -> tuple[str, ...]:
    """The registered kinds a model can be linearised to: those with a decoding form (the registry's
    ``decode``, so a decoder decodes from a constant-size state) and a ``feature_map`` parameter to learn."""
    return tuple(name for name in recurrent_kind_names() if "feature_map" in _param_names(name))


KINDS = linearizable_kinds()  # the package's own kinds, for argparse choices
FINETUNE_LOSSES = ("distill", "distill_layers", "lm")


@dataclass
class LinearizeConfig:
    """Knobs of :func:`linearize`.

    Attributes:
        kind: ``linear`` (every patched layer fully linear) or ``window-linear`` (exact softmax over the
            last ``window`` tokens, linear beyond; still a constant-size decoding state).
        window: the softmax window of ``window-linear``.
        feature_map: a learnable feature map of the registry (``hedgehog``); a fixed map (``elu``,
            ``relu``, ``favor``) has nothing to fit and is refused (use ``patch_model`` for those).
        transfer_steps: optimiser steps per layer for attention transfer.
        transfer_lr: Adam learning rate of the feature maps.
        finetune_steps: fine-tuning steps of the patched model after transfer (0 = none).
        finetune_lr: its learning rate.
        finetune_params: what the fine-tune trains: ``feature_maps`` (only the learnable maps),
            ``feature_maps+qk`` (also the query/key projections of the linearised layers), ``lora``
            (the feature maps plus LoRA adapters on the q/k/v/o projections of the linearised layers,
            through PEFT, merged into the weights afterwards) or ``all``.
        lora_rank, lora_alpha: rank and scaling numerator of the LoRA adapters.
        finetune_loss: ``distill`` (KL divergence from the softmax model's output distribution, or
            the squared error of its last hidden state for a model without logits),
            ``distill_layers`` (the squared error of every layer's hidden state, each relative to the
            softmax model's mean square at that layer: see :func:`hidden_states_distillation_loss`)
            or ``lm`` (next-token cross-entropy on the windows' own tokens).
        keep_softmax_first, keep_softmax_last: layers left softmax (see ``patch_model``).
        chunk_size: chunk length of the causal linear attention.
        seed: seed of the window order.
    """

    kind: str = "linear"
    window: int = 64
    feature_map: str = "hedgehog"
    transfer_steps: int = 60
    transfer_lr: float = 1e-2
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    finetune_params: str = "feature_maps"
    finetune_loss: str = "distill"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    keep_softmax_first: int = 0
    keep_softmax_last: int = 0
    chunk_size: int = 64
    seed: int = 0
    log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from ..attention.feature_maps import FEATURE_MAPS

        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {self.feature_map!r}; accepted: {', '.join(sorted(FEATURE_MAPS))}")
        learnable = learnable_feature_maps()
        if self.feature_map not in learnable:
            raise ValueError(
                f"LinearizeConfig.feature_map={self.feature_map!r} has no learnable parameters, so attention "
                f"transfer would train nothing; accepted (learnable): {', '.join(learnable)}. For a fixed map, "
                "patch the model with patch_model(model, 'linear', feature_map=...) instead"
            )
        if self.kind not in linearizable_kinds():
            raise ValueError(f"LinearizeConfig.kind must be one of {', '.join(linearizable_kinds())}, "
                             f"got {self.kind!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"LinearizeConfig.window must be a positive int, got {self.window!r}")
        for name in ("transfer_steps", "finetune_steps", "keep_softmax_first", "keep_softmax_last", "lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LinearizeConfig.{name} must be a non-negative int, got {value!r}")
        if self.finetune_params not in FINETUNE_PARAMS:
            raise ValueError(f"LinearizeConfig.finetune_params must be one of {', '.join(FINETUNE_PARAMS)}, "
                             f"got {self.finetune_params!r}")
        if self.finetune_loss not in FINETUNE_LOSSES:
            raise ValueError(f"LinearizeConfig.finetune_loss must be one of {', '.join(FINETUNE_LOSSES)}, "
                             f"got {self.finetune_loss!r}")
        for name in ("transfer_lr", "finetune_lr", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinearizeConfig.{name} must be positive, got {getattr(self, name)!r}")


def learnable_feature_maps() -> list[str]:
    """Names of the registry's feature maps that have trainable parameters (what linearize can fit)."""
    from ..attention.feature_maps import FEATURE_MAPS

    return sorted(name for name, factory in FEATURE_MAPS.items()
                  if any(p.requires_grad for p in factory(4, 2).parameters()))


@contextmanager
def capture_queries_keys(model: nn.Module, store: dict):
    """While active, every attention call of ``model`` records ``store[module] = (q, k, scaling)``
    with q ``(batch, heads, n, d)`` and k ``(batch, kv_heads, n, d)`` (after rotary embeddings)."""
    # Causality is the module's (``is_causal``, or the call's ``is_causal`` where the model passes it);
    # see ``_is_causal``.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = model.config._attn_implementation or "sdpa"
    had_local = name in ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = ALL_ATTENTION_FUNCTIONS._local_mapping.get(name)
    inner = ALL_ATTENTION_FUNCTIONS[name]

    def capturing(module, query, key, value, *args, **kwargs):
        store[module] = (query.detach(), key.detach(), kwargs.get("scaling", getattr(module, "scaling", None)))
        return inner(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[name] = capturing  # local override: the global registry is untouched
    try:
        yield store
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS[name] = previous
        else:
            del ALL_ATTENTION_FUNCTIONS[name]


def attention_transfer_loss(
    feature_map: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    scaling: float,
    window: int | None = None,
    *,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the linear (or window-linear) attention weights against the softmax weights.

    Args:
        q: ``(batch, heads, n, d)``; k: ``(batch, heads, n, d)`` (key heads already repeated for GQA).
        scaling: the softmax temperature the model uses (usually ``d ** -0.5``).
        window: None for plain linear attention; w for ``window-linear`` (softmax over the last w keys,
            causal only).
        causal: rows over keys j <= i (decoders) or over every key (encoders).
        key_padding_mask: ``(batch, n)`` bool, True = real token. Padded keys get no weight in either
            row; padded queries are left out of the mean.

    Returns:
        The mean over real query rows (and heads) of ``-sum_j softmax_ij log(linear_ij)``.
    """
    b, _, n, _ = q.shape
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed.expand(b, 1, n, n)
    rows = torch.ones(b, 1, n, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, n):
            raise ValueError(f"key_padding_mask must be (batch, n) = ({b}, {n}), got {tuple(key_padding_mask.shape)}")
        real = key_padding_mask.to(device=q.device, dtype=torch.bool)
        allowed = allowed & real[:, None, None, :]
        rows = real[:, None, :]
    # A real query with no real key (left padding under a causal mask cannot do this; a user mask
    # might) has no softmax row: leave it out rather than learn from NaN.
    rows = rows & allowed.any(-1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    target = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    if window is None:
        scores = (feature_map(q) @ feature_map(k).transpose(-1, -2)).masked_fill(~allowed, 0.0)
        predicted = scores / (scores.sum(-1, keepdim=True) + 1e-6)
    else:
        if not causal:
            raise ValueError("window-linear attention is causal only; encoders are linearised with kind='linear'")
        from ..attention.window_linear import window_linear_weights

        predicted = window_linear_weights(q, k, window=window, feature_map=feature_map, scale=scaling,
                                          key_padding_mask=key_padding_mask)
        # Rows shorter than the window are exact softmax: nothing to learn there, so they are left out.
        rows = rows.clone()
        rows[..., :window] = False
    per_row = -(target * torch.log(predicted + 1e-6)).sum(-1)  # (batch, heads, n)
    weight = rows.to(per_row.dtype).expand_as(per_row)
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def distillation_loss(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (real) positions of KL(teacher || student) of the output distributions.

    Args:
        student_logits: ``(batch, seq, vocab)``; teacher_log_probs: ``(batch, seq, vocab)`` log-softmax.
        mask: ``(batch, seq)`` bool, True = real token; padded positions are left out.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    per_position = (teacher_log_probs.exp() * (teacher_log_probs - student)).sum(-1)
    return _masked_mean(per_position, mask)


def hidden_distillation_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (real) positions of the squared error of hidden states ``(batch, seq, hidden)``,
    averaged over the hidden size (for models without ``logits``, e.g. a bare ``BertModel``)."""
    per_position = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return _masked_mean(per_position, mask)


def hidden_states_distillation_loss(
    student_hidden_states, teacher_hidden_states, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over layers of the relative squared error of each layer's hidden states.

    For layer l: ``sum |s_l - t_l|^2 / sum |t_l|^2`` over (real) positions and the hidden size, so
    every layer weighs the same whatever the scale of its activations (decoders' residual streams
    grow with depth). Fitting every layer's output, not only the last, gives each linearised layer a
    direct signal.

    Args:
        student_hidden_states, teacher_hidden_states: equally long sequences (or stacked tensors) of
            ``(batch, seq, hidden)``, one per layer.
        mask: ``(batch, seq)`` bool, True = real token; padded positions are left out.
    """
    if len(student_hidden_states) != len(teacher_hidden_states) or len(teacher_hidden_states) == 0:
        raise ValueError(f"hidden_states_distillation_loss needs as many student as teacher layers (at least one), "
                         f"got {len(student_hidden_states)} and {len(teacher_hidden_states)}")
    terms = []
    for student, teacher in zip(student_hidden_states, teacher_hidden_states):
        error = _masked_mean((student.float() - teacher.float()).pow(2).sum(-1), mask)
        scale = _masked_mean(teacher.float().pow(2).sum(-1), mask)
        terms.append(error / scale.clamp_min(1e-12))
    return torch.stack(terms).mean()


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.to(values.device, values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


# Query/key projections by the names transformers' models give them (Llama-style, BERT-style,
# DistilBERT-style).
_QK_PROJECTIONS = ("q_proj", "k_proj", "query", "key", "q_lin", "k_lin")


def _finetune_parameters(model: nn.Module, modules: list[nn.Module], which: str) -> list[nn.Parameter]:
    from ..integrations.attention_interface import LAYER_ATTRIBUTE
    from ..integrations.patch import FEATURE_MAP_ATTRIBUTE

    if which == "all":
        return [p for p in model.parameters() if p.requires_grad]
    params: list[nn.Parameter] = []
    for module in modules:
        fmap = getattr(module, FEATURE_MAP_ATTRIBUTE, None)
        if getattr(module, LAYER_ATTRIBUTE).kind is None or fmap is None:
            continue  # a layer kept softmax stays exactly as it was
        params += list(fmap.parameters())
        if which == "feature_maps+qk":
            found = [getattr(module, name) for name in _QK_PROJECTIONS
                     if isinstance(getattr(module, name, None), nn.Module)]
            if not found:  # e.g. a fused qkv projection: training it would also move the values
                raise ValueError(f"finetune_params='feature_maps+qk': the attention module {type(module).__name__} "
                                 f"has no separate query/key projection (looked for {', '.join(_QK_PROJECTIONS)})")
            for projection in found:
                params += list(projection.parameters())
    if not params:
        raise ValueError(f"finetune_params={which!r} selects no parameter of this model")
    return params


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "c_proj")


def _add_lora(model: nn.Module, modules: list[nn.Module], config: LinearizeConfig) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters on the linear projections of the linearised layers."""
    from ..integrations.attention_interface import LAYER_ATTRIBUTE

    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("finetune_params='lora' needs PEFT: pip install peft (or hf-efficient[lora])") from None
    names = {id(m): name for name, m in model.named_modules()}
    targets = []
    for module in modules:
        if getattr(module, LAYER_ATTRIBUTE).kind is None:
            continue  # softmax layers stay as they were
        for child in _PROJECTIONS:
            if isinstance(getattr(module, child, None), nn.Module):
                targets.append(f"{names[id(module)]}.{child}")
    if not targets:
        raise ValueError("finetune_params='lora' found no q/k/v/o projection in the linearised layers")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets)
    return get_peft_model(model, lora)


Window = tuple[torch.Tensor, "torch.Tensor | None"]


def _windows(dataset, vocab_size: int | None) -> list[Window]:
    """``(ids (batch, seq) long, mask (batch, seq) bool or None)`` per window, every value checked."""
    out: list[Window] = []
    for index, item in enumerate(dataset):
        mask = None
        if isinstance(item, Mapping):  # dicts, datasets rows, tokenizers' BatchEncoding
            if "input_ids" not in item:
                raise ValueError(f"linearize: window {index} is a mapping without 'input_ids' (keys: {list(item)})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        ids = torch.as_tensor(ids)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"linearize: window {index} holds token ids of dtype {ids.dtype}; token ids must be "
                            "integers (e.g. torch.long), never rounded from floats")
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise ValueError(f"linearize: window {index} must be non-empty token ids of shape (seq,) or "
                             f"(batch, seq), got shape {tuple(ids.shape)}")
        ids = ids.long().reshape(-1, ids.shape[-1])
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = low if low < 0 else high
            raise ValueError(f"linearize: window {index} holds token id {bad}; the model's vocabulary has "
                             f"{vocab_size} ids (0 ... {vocab_size - 1 if vocab_size else '?'})")
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"linearize: window {index}'s attention_mask has dtype {mask.dtype}; give 0/1 "
                                "integers or booleans")
            if mask.numel() != ids.numel():
                raise ValueError(f"linearize: window {index}'s attention_mask has shape {tuple(mask.shape)}, its "
                                 f"input_ids {tuple(ids.shape)}")
            mask = mask.reshape(ids.shape)
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"linearize: window {index}'s attention_mask must hold only 0 and 1")
            mask = mask.bool()
            if not bool(mask.any(-1).all()):
                raise ValueError(f"linearize: window {index} has a row of padding only (attention_mask all 0)")
            if bool(mask.all()):
                mask = None  # nothing padded: the plain path
        out.append((ids, mask))
    if not out:
        raise ValueError("linearize needs at least one window of token ids")
    return out


def _is_causal(modules: list[nn.Module]) -> bool:
    """Whether the model's attention is causal (decoders) or bidirectional (encoders); a mix is refused."""
    flags = {bool(getattr(m, "is_causal", False)) for m in modules}
    if len(flags) != 1:
        raise ValueError("linearize: this model mixes causal and bidirectional attention layers; it supports "
                         "decoders (every layer causal) and encoders (every layer bidirectional)")
    return flags.pop()


def _vocab_size(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embeddings, "num_embeddings", None) or getattr(model.config, "vocab_size", None)


def _teacher_target(output, layers: bool = False) -> torch.Tensor:
    """What the fine-tune distils: every layer's hidden states ``(layers, batch, seq, hidden)`` (the
    embeddings left out: linearisation does not change them) when ``layers``, else log-probabilities
    of the logits, else the last hidden state."""
    if layers:
        hidden = getattr(output, "hidden_states", None)
        if not hidden:
            raise ValueError("linearize: finetune_loss='distill_layers' needs a model that returns hidden_states "
                             "(output_hidden_states=True)")
        return torch.stack([h.float() for h in hidden[1:]])
    logits = getattr(output, "logits", None)
    if logits is not None:
        return torch.log_softmax(logits.float(), dim=-1)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise ValueError("linearize: finetune_loss='distill' needs a model whose output has logits or "
                         "last_hidden_state")
    return hidden.float()


def _student_loss(output, target: torch.Tensor, mask: torch.Tensor | None, layers: bool = False) -> torch.Tensor:
    if layers:
        return hidden_states_distillation_loss(output.hidden_states[1:], target, mask)
    logits = getattr(output, "logits", None)
    if logits is not None:
        return distillation_loss(logits, target, mask)
    return hidden_distillation_loss(output.last_hidden_state, target, mask)


def linearize(model: nn.Module, dataset: Iterable, config: LinearizeConfig | None = None, **overrides) -> nn.Module:
    """Patch ``model`` with linear attention and train its feature maps by attention transfer.

    Args:
        model: a model ``patch_model`` supports, unpatched: a decoder (Llama, Qwen2, GPT-2, ...: fitted
            on causal rows) or an encoder (BERT, RoBERTa, ModernBERT, ...: fitted on full rows; only
            ``kind="linear"``, and ``finetune_loss="distill"`` or ``"distill_layers"``).
        dataset: windows of integer token ids: tensors ``(seq,)``/``(batch, seq)``, lists, or mappings
            with ``input_ids`` and optionally ``attention_mask`` (e.g. a ``datasets.Dataset`` or a
            tokenizer's output; padding is honoured). Each window is one training example.
        config: :class:`LinearizeConfig`; keyword ``overrides`` replace its fields.

    Returns:
        The same model, patched (``hf_efficient_linear`` attention with trained feature maps),
        in eval mode. ``config.log`` holds the per-layer losses and the time spent.

    Raises:
        TypeError: token ids that are not integers, or an attention mask of floats.
        ValueError: a token id outside the vocabulary, a malformed mask, a patched model, a
            window-linear or ``lm`` fine-tune asked of an encoder.
    """
    from ..integrations.attention_interface import LAYER_ATTRIBUTE
    from ..integrations.patch import FEATURE_MAP_ATTRIBUTE, attention_modules, is_patched, patch_model

    if config is None:
        config = LinearizeConfig(**overrides)
    elif overrides:
        config = LinearizeConfig(**{**config.__dict__, **overrides})
    if is_patched(model):
        raise ValueError("linearize needs the original softmax model: it learns from its attention; unpatch it first")
    modules = [m for _, m in attention_modules(model)]
    causal = _is_causal(modules)
    if not causal and not get_attention_kind(config.kind).supports_bidirectional:
        raise ValueError(f"linearize: kind={config.kind!r} is causal only; this model's attention is "
                         "bidirectional (an encoder), so use kind='linear'")
    if not causal and config.finetune_steps and config.finetune_loss == "lm":
        raise ValueError("linearize: finetune_loss='lm' is next-token cross-entropy, for causal LMs; this model "
                         "is an encoder, so use finetune_loss='distill'")
    if config.finetune_steps and config.finetune_params == "feature_maps+qk":
        for module in modules:  # refused now rather than after the transfer
            if not any(isinstance(getattr(module, name, None), nn.Module) for name in _QK_PROJECTIONS):
                raise ValueError(f"finetune_params='feature_maps+qk': the attention module {type(module).__name__} "
                                 f"has no separate query/key projection (looked for {', '.join(_QK_PROJECTIONS)}); "
                                 "use finetune_params='feature_maps' or 'lora'")
    windows = _windows(dataset, _vocab_size(model))
    device = next(model.parameters()).device
    started = time.process_time()

    # With distill_layers every layer's output is a target (and, in the fine-tune, a prediction).
    layers = config.finetune_steps > 0 and config.finetune_loss == "distill_layers"

    def inputs(ids: torch.Tensor, mask: torch.Tensor | None) -> dict:
        out = {"input_ids": ids.to(device), "use_cache": False} if causal else {"input_ids": ids.to(device)}
        if mask is not None:
            out["attention_mask"] = mask.to(device=device, dtype=torch.long)
        if layers:
            out["output_hidden_states"] = True
        return out

    # 1. The softmax model's queries and keys on every window, per attention module.
    model.eval()
    captured: list[dict] = []
    # The teacher's outputs come from the same pass (kept only if distilling).
    teacher: list[torch.Tensor] = []
    distill = config.finetune_steps > 0 and config.finetune_loss in ("distill", "distill_layers")

    with torch.no_grad():
        for ids, mask in windows:
            store: dict = {}
            with capture_queries_keys(model, store):
                output = model(**inputs(ids, mask))
            captured.append(store)
            if distill:
                teacher.append(_teacher_target(output, layers))
    config.log.append({"capture_cpu_seconds": time.process_time() - started, "causal": causal})

    # 2. Patch, then fit each layer's feature map on its own queries and keys.
    windowed = "window" in _param_names(config.kind)
    extra = {"window": config.window} if windowed else {}
    patch_model(model, config.kind, feature_map=config.feature_map, chunk_size=config.chunk_size,
                keep_softmax_first=config.keep_softmax_first, keep_softmax_last=config.keep_softmax_last, **extra)
    window = config.window if windowed else None
    gen = torch.Generator().manual_seed(config.seed)
    for index, module in enumerate(modules):
        layer = getattr(module, LAYER_ATTRIBUTE)
        fmap = getattr(module, FEATURE_MAP_ATTRIBUTE, None)
        if layer.kind is None or fmap is None:
            continue
        optimizer = torch.optim.Adam(fmap.parameters(), lr=config.transfer_lr)
        losses = []
        for _ in range(config.transfer_steps):
            pick = int(torch.randint(len(windows), (1,), generator=gen))
            q, k, scaling = captured[pick][module]
            if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves a group of query heads
                k = repeat_kv(k, q.shape[1] // k.shape[1])
            loss = attention_transfer_loss(fmap, q, k, scaling if scaling is not None else q.shape[-1] ** -0.5,
                                           window, causal=causal, key_padding_mask=windows[pick][1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        config.log.append({"layer": index, "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None})
    del captured
    config.log.append({"transfer_cpu_seconds": time.process_time() - started})

    # 3. Optional fine-tune of the patched model (by default only its feature maps).
    if config.finetune_steps:
        trainable_before = [p for p in model.parameters() if p.requires_grad]
        student = model
        if config.finetune_params == "lora":
            feature_maps = _finetune_parameters(model, modules, "feature_maps")
            student = _add_lora(model, modules, config)  # freezes every base weight
            for p in feature_maps:
                p.requires_grad_(True)
            params = [p for p in student.parameters() if p.requires_grad]
        else:
            params = _finetune_parameters(model, modules, config.finetune_params)
            trainable = {id(p) for p in params}
            for p in trainable_before:  # no weight gradients for what does not train: faster, less memory
                if id(p) not in trainable:
                    p.requires_grad_(False)
        # Dropout only where whole weights train: fitting feature maps to a frozen model's own output
        # is cleanest without it (the teacher ran without dropout too).
        student.train(config.finetune_params in ("all", "lora"))
        optimizer = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=0.0)
        try:
            for step in range(config.finetune_steps):
                index = step % len(windows)
                ids, mask = windows[index]
                if distill:
                    real = mask.to(device) if mask is not None else None
                    loss = _student_loss(student(**inputs(ids, mask)), teacher[index], real, layers)
                else:
                    labels = ids.to(device)
                    if mask is not None:  # padded positions are not targets
                        labels = labels.masked_fill(~mask.to(device), -100)
                    loss = student(**inputs(ids, mask), labels=labels).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                config.log.append({"finetune_step": step, "loss": loss.item()})
        finally:
            if student is not model:
                student.merge_and_unload()  # LoRA folded into the weights: the model is plain again
            for p in trainable_before:
                p.requires_grad_(True)
    model.eval()
    config.log.append({"cpu_seconds": time.process_time() - started})
    return model
