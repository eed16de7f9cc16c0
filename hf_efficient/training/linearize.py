"""Linearise a pretrained decoder: learn feature maps so each layer's linear attention mimics its softmax.

"Attention transfer" (as in Hedgehog, Zhang et al. 2024): for every patched layer, a learnable
map phi (``hedgehog``: softmax of a per-head projection) is trained so that the linear attention
weights ``phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')`` (causal) match the model's own
softmax weights ``softmax(q_i . k_j * scale)`` on real text, by cross-entropy between the two rows.
Only the feature maps train; the model's weights stay as they are, so each layer is fitted on the
unchanged model's queries and keys, which are captured once. An optional language-model fine-tune
of the whole patched model follows.

Afterwards the model decodes in O(1) per token with a
:class:`~hf_efficient.integrations.cache.LinearAttentionCache`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LinearizeConfig", "attention_transfer_loss", "capture_queries_keys", "linearize"]


@dataclass
class LinearizeConfig:
    """Knobs of :func:`linearize`.

    Attributes:
        feature_map: a learnable feature map of the registry (``hedgehog``).
        transfer_steps: optimiser steps per layer for attention transfer.
        transfer_lr: Adam learning rate of the feature maps.
        finetune_steps: language-model fine-tuning steps of the whole patched model after transfer (0 = none).
        finetune_lr: its learning rate.
        keep_softmax_first, keep_softmax_last: layers left softmax (see ``patch_model``).
        chunk_size: chunk length of the causal linear attention.
        seed: seed of the window order.
    """

    feature_map: str = "hedgehog"
    transfer_steps: int = 60
    transfer_lr: float = 1e-2
    finetune_steps: int = 0
    finetune_lr: float = 1e-5
    keep_softmax_first: int = 0
    keep_softmax_last: int = 0
    chunk_size: int = 64
    seed: int = 0
    log: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from ..attention.feature_maps import FEATURE_MAPS

        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {self.feature_map!r}; accepted: {', '.join(sorted(FEATURE_MAPS))}")
        for name in ("transfer_steps", "finetune_steps", "keep_softmax_first", "keep_softmax_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"LinearizeConfig.{name} must be a non-negative int, got {value!r}")
        for name in ("transfer_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LinearizeConfig.{name} must be positive, got {getattr(self, name)!r}")


@contextmanager
def capture_queries_keys(model: nn.Module, store: dict):
    """While active, every attention call of ``model`` records ``store[module] = (q, k, scaling)``
    with q ``(batch, heads, n, d)`` and k ``(batch, kv_heads, n, d)`` (after rotary embeddings)."""
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


def attention_transfer_loss(feature_map: nn.Module, q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Cross-entropy of the causal linear attention weights against the softmax weights.

    Args:
        q: ``(batch, heads, n, d)``; k: ``(batch, heads, n, d)`` (key heads already repeated for GQA).
        scaling: the softmax temperature the model uses (usually ``d ** -0.5``).
    """
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    target = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    scores = (feature_map(q) @ feature_map(k).transpose(-1, -2)).masked_fill(~causal, 0.0)
    predicted = scores / (scores.sum(-1, keepdim=True) + 1e-6)
    return -(target * torch.log(predicted + 1e-6)).sum(-1).mean()


def _windows(dataset) -> list[torch.Tensor]:
    out = []
    for item in dataset:
        ids = item["input_ids"] if isinstance(item, dict) else item
        ids = torch.as_tensor(ids, dtype=torch.long)
        out.append(ids[None] if ids.dim() == 1 else ids)
    if not out:
        raise ValueError("linearize needs at least one window of token ids")
    return out


def linearize(model: nn.Module, dataset: Iterable, config: LinearizeConfig | None = None, **overrides) -> nn.Module:
    """Patch ``model`` with linear attention and train its feature maps by attention transfer.

    Args:
        model: a decoder ``patch_model`` supports (Llama, Qwen2, GPT-2, ...), unpatched.
        dataset: windows of token ids: tensors ``(seq,)``/``(batch, seq)``, lists, or dicts with
            ``input_ids`` (e.g. a ``datasets.Dataset``). Each window is one training example.
        config: :class:`LinearizeConfig`; keyword ``overrides`` replace its fields.

    Returns:
        The same model, patched (``hf_efficient_linear`` attention with trained feature maps),
        in eval mode. ``config.log`` holds the per-layer losses and the time spent.
    """
    from ..integrations.attention_interface import LAYER_ATTRIBUTE
    from ..integrations.patch import FEATURE_MAP_ATTRIBUTE, attention_modules, is_patched, patch_model

    if config is None:
        config = LinearizeConfig(**overrides)
    elif overrides:
        config = LinearizeConfig(**{**config.__dict__, **overrides})
    if is_patched(model):
        raise ValueError("linearize needs the original softmax model: it learns from its attention; unpatch it first")
    windows = _windows(dataset)
    device = next(model.parameters()).device
    started = time.process_time()

    # 1. The softmax model's queries and keys on every window, per attention module.
    model.eval()
    modules = [m for _, m in attention_modules(model)]
    captured: list[dict] = []
    with torch.no_grad():
        for ids in windows:
            store: dict = {}
            with capture_queries_keys(model, store):
                model(ids.to(device), use_cache=False)
            captured.append(store)

    # 2. Patch, then fit each layer's feature map on its own queries and keys.
    patch_model(model, "linear", feature_map=config.feature_map, chunk_size=config.chunk_size,
                keep_softmax_first=config.keep_softmax_first, keep_softmax_last=config.keep_softmax_last)
    gen = torch.Generator().manual_seed(config.seed)
    for index, module in enumerate(modules):
        layer = getattr(module, LAYER_ATTRIBUTE)
        fmap = getattr(module, FEATURE_MAP_ATTRIBUTE, None)
        if layer.kind is None or fmap is None:
            continue
        optimizer = torch.optim.Adam(fmap.parameters(), lr=config.transfer_lr)
        losses = []
        for _ in range(config.transfer_steps):
            q, k, scaling = captured[int(torch.randint(len(windows), (1,), generator=gen))][module]
            if k.shape[1] != q.shape[1]:
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            loss = attention_transfer_loss(fmap, q, k, scaling if scaling is not None else q.shape[-1] ** -0.5)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        config.log.append({"layer": index, "first_loss": losses[0] if losses else None,
                           "last_loss": losses[-1] if losses else None})
    del captured

    # 3. Optional language-model fine-tune of the whole patched model.
    if config.finetune_steps:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.finetune_lr)
        for step in range(config.finetune_steps):
            ids = windows[step % len(windows)].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            config.log.append({"finetune_step": step, "loss": loss.item()})
    model.eval()
    config.log.append({"cpu_seconds": time.process_time() - started})
    return model
