"""Linearise a pretrained decoder: learn feature maps so each layer's linear attention mimics its softmax.

"Attention transfer" (as in Hedgehog, Zhang et al. 2024): for every patched layer, a learnable
map phi (``hedgehog``: softmax of a per-head projection) is trained so that the linear attention
weights ``phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j')`` (causal) match the model's own
softmax weights ``softmax(q_i . k_j * scale)`` on real text, by cross-entropy between the two rows.
Only the feature maps train; the model's weights stay as they are, so each layer is fitted on the
unchanged model's queries and keys, which are captured once. An optional fine-tune of the patched
model follows: by default only the feature maps train, on distillation from the softmax model's
own next-token distribution (captured in the same pass as the queries and keys), which carries
far more signal per token than the labels when only a few windows are available.

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

__all__ = ["LinearizeConfig", "attention_transfer_loss", "capture_queries_keys", "distillation_loss", "linearize"]

FINETUNE_PARAMS = ("feature_maps", "feature_maps+qk", "lora", "all")
KINDS = ("linear", "window-linear")
FINETUNE_LOSSES = ("distill", "lm")


@dataclass
class LinearizeConfig:
    """Knobs of :func:`linearize`.

    Attributes:
        kind: ``linear`` (every patched layer fully linear) or ``window-linear`` (exact softmax over the
            last ``window`` tokens, linear beyond; still a constant-size decoding state).
        window: the softmax window of ``window-linear``.
        feature_map: a learnable feature map of the registry (``hedgehog``).
        transfer_steps: optimiser steps per layer for attention transfer.
        transfer_lr: Adam learning rate of the feature maps.
        finetune_steps: fine-tuning steps of the patched model after transfer (0 = none).
        finetune_lr: its learning rate.
        finetune_params: what the fine-tune trains: ``feature_maps`` (only the learnable maps),
            ``feature_maps+qk`` (also the query/key projections of the linearised layers), ``lora``
            (the feature maps plus LoRA adapters on the q/k/v/o projections of the linearised layers,
            through PEFT, merged into the weights afterwards) or ``all``.
        lora_rank, lora_alpha: rank and scaling numerator of the LoRA adapters.
        finetune_loss: ``distill`` (KL divergence from the softmax model's next-token distribution)
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
        if self.kind not in KINDS:
            raise ValueError(f"LinearizeConfig.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
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


def attention_transfer_loss(
    feature_map: nn.Module, q: torch.Tensor, k: torch.Tensor, scaling: float, window: int | None = None
) -> torch.Tensor:
    """Cross-entropy of the causal linear (or window-linear) attention weights against the softmax weights.

    Args:
        q: ``(batch, heads, n, d)``; k: ``(batch, heads, n, d)`` (key heads already repeated for GQA).
        scaling: the softmax temperature the model uses (usually ``d ** -0.5``).
        window: None for plain linear attention; w for ``window-linear`` (softmax over the last w keys).
    """
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    logits = (q.float() @ k.float().transpose(-1, -2)) * scaling
    target = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    if window is None:
        scores = (feature_map(q) @ feature_map(k).transpose(-1, -2)).masked_fill(~causal, 0.0)
        predicted = scores / (scores.sum(-1, keepdim=True) + 1e-6)
    else:
        from ..attention.window_linear import window_linear_weights

        predicted = window_linear_weights(q, k, window=window, feature_map=feature_map, scale=scaling)
        # Rows shorter than the window are exact softmax: nothing to learn there, so they are left out.
        target, predicted = target[:, :, window:], predicted[:, :, window:]
    return -(target * torch.log(predicted + 1e-6)).sum(-1).mean()


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) of the next-token distributions.

    Args:
        student_logits: ``(batch, seq, vocab)``; teacher_log_probs: ``(batch, seq, vocab)`` log-softmax.
    """
    student = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log_probs.exp() * (teacher_log_probs - student)).sum(-1).mean()


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
            for name in ("q_proj", "k_proj"):
                if isinstance(getattr(module, name, None), nn.Module):
                    params += list(getattr(module, name).parameters())
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
    # The teacher's next-token log-probabilities come from the same pass (kept only if distilling).
    teacher: list[torch.Tensor] = []
    distill = config.finetune_steps > 0 and config.finetune_loss == "distill"
    with torch.no_grad():
        for ids in windows:
            store: dict = {}
            with capture_queries_keys(model, store):
                logits = model(ids.to(device), use_cache=False).logits
            captured.append(store)
            if distill:
                teacher.append(torch.log_softmax(logits.float(), dim=-1))
    config.log.append({"capture_cpu_seconds": time.process_time() - started})

    # 2. Patch, then fit each layer's feature map on its own queries and keys.
    extra = {"window": config.window} if config.kind == "window-linear" else {}
    patch_model(model, config.kind, feature_map=config.feature_map, chunk_size=config.chunk_size,
                keep_softmax_first=config.keep_softmax_first, keep_softmax_last=config.keep_softmax_last, **extra)
    window = config.window if config.kind == "window-linear" else None
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
            loss = attention_transfer_loss(fmap, q, k, scaling if scaling is not None else q.shape[-1] ** -0.5, window)
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
        student.train()
        optimizer = torch.optim.AdamW(params, lr=config.finetune_lr, weight_decay=0.0)
        try:
            for step in range(config.finetune_steps):
                index = step % len(windows)
                ids = windows[index].to(device)
                if distill:
                    loss = distillation_loss(student(input_ids=ids, use_cache=False).logits, teacher[index])
                else:
                    loss = student(input_ids=ids, labels=ids, use_cache=False).loss
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
