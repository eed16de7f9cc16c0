"""Attention sampling for megapixel images (Katharopoulos & Fleuret, ICML 2019), as a transformers model.

Read top to bottom: the two default networks, the output dataclass, then the classifier, whose
``forward`` is the whole method: attention on the low-resolution view -> distribution over the map
-> ``num_patches`` draws -> patches gathered from the full-resolution image -> features -> the
unbiased expectation estimator of :mod:`.sampling` -> linear classifier. With ``config.region_size``
set, :meth:`~AttentionSamplingForImageClassification._nested_patches` inserts a middle level: the
first draws pick regions, a second attention network on each region's pooled view picks the patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_attention_sampling import AttentionSamplingConfig
from .sampling import (
    attention_distribution,
    expectation,
    expectation_weights,
    extract_patches,
    negative_entropy,
    nested_expectation_weights,
    patch_top_left,
    sample_with_replacement,
    sample_without_replacement,
)


def build_attention_cnn(num_channels: int, channels: list[int]) -> nn.Sequential:
    """Small stride-1 CNN: ``(batch, C, h, w)`` -> one score per position ``(batch, 1, h, w)``."""
    layers: list[nn.Module] = []
    c_in = num_channels
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.Tanh()]
        c_in = c
    layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
    return nn.Sequential(*layers)


def build_feature_cnn(num_channels: int, channels: list[int], batch_norm: bool = True) -> nn.Sequential:
    """Small CNN: ``(N, C, H, W)`` -> ``(N, channels[-1])``.

    Each stage is 3x3 conv, (batch norm), ReLU, 2x2 max-pool; a global max-pool ends it. Batch norm
    over the ``batch * num_patches`` patches makes training from scratch much faster.
    """
    layers: list[nn.Module] = []
    c_in = num_channels
    for c in channels:
        layers.append(nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        c_in = c
    layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


# the layers build_attention_cnn and build_feature_cnn use: none of them depends on the memory layout of its input
_LAYOUT_FREE = (nn.Conv2d, nn.Tanh, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


def run_cnn(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``network(x)`` for ``x`` ``(N, C, H, W)``; on the CPU, a network made only of the layers of the two builders
    above gets ``x`` laid out channels-last: the CPU convolutions of these few-channel networks run 2-3x faster
    (forward and backward) on that layout, to float32 rounding. Not with batch norm in training mode, whose batch
    statistics this torch computes far less precisely on that layout (on sparse patches 4-7e-4 against 6e-7
    relative to float64; ``scripts/bench_attention_sampling.py --layouts``).
    The weights keep their layout (checkpoints are as before). Any other network (a replaced one, a transformers
    backbone) gets ``x`` as it is, since it may view its activations in the default layout."""
    if (x.device.type == "cpu" and x.dim() == 4 and type(network) is nn.Sequential
            and all(type(layer) in _LAYOUT_FREE and not (type(layer) is nn.BatchNorm2d and layer.training)
                    for layer in network)):
        # .to, not .contiguous: a one-channel tensor counts as channels-last already, and only a copy with the
        # channel stride of 1 makes the convolutions pick that layout
        x = x.to(memory_format=torch.channels_last)
    return network(x)


class _BackboneFeatures(nn.Module):
    """Wrap a transformers vision model so that it maps ``(N, C, ph, pw)`` to ``(N, dim)``."""

    def __init__(self, config_dict: dict) -> None:
        super().__init__()
        config_dict = dict(config_dict)
        self.backbone = AutoModel.from_config(AutoConfig.for_model(**config_dict))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        out = self.backbone(pixel_values=patches)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            # (N, C, h, w) feature maps or (N, tokens, dim) sequences
            pooled = hidden.mean(dim=(-2, -1)) if hidden.dim() == 4 else hidden.mean(dim=1)
        return pooled.flatten(1)


def _backbone_dim(config: AttentionSamplingConfig) -> int:
    if config.feature_dim is not None:
        return config.feature_dim
    sub = config.feature_network_config or {}
    if sub.get("hidden_sizes"):
        return int(sub["hidden_sizes"][-1])
    if sub.get("hidden_size"):
        return int(sub["hidden_size"])
    raise ValueError(
        "AttentionSamplingConfig: cannot read the feature size of feature_network_config "
        "(no hidden_sizes or hidden_size); set feature_dim"
    )


@dataclass
class AttentionSamplingOutput(ModelOutput):
    """Output of :class:`AttentionSamplingForImageClassification`.

    Attributes:
        loss: cross-entropy plus ``entropy_regularizer * sum a log a`` (when ``labels`` are given).
        logits: ``(batch, num_labels)``.
        attention_map: ``(batch, h, w)`` attention distribution over the low-resolution map (zero in
            padding; each map sums to one), for plots.
        sampled_positions: ``(batch, num_patches)`` flat indices into the map, in draw order.
        patch_top_left: ``(batch, num_patches, 2)`` ``(row, col)`` of each patch in the full image.
        sample_weights: ``(batch, num_patches)`` estimator weights (values; they sum to one).
        patches: ``(batch, num_patches, channels, ph, pw)`` when ``return_patches=True``.
        entropy_penalty: ``sum a log a`` averaged over the batch (multi-scale: plus the same for the
            middle-view maps of the drawn regions).

    Multi-scale models (``config.region_size`` set) use ``R = num_regions`` and ``n = num_patches``:
    ``sampled_positions`` are the ``(batch, R)`` drawn cells of ``attention_map`` (one per region),
    and ``patch_top_left``, ``sample_weights`` and ``patches`` have ``R * n`` rows, region-major. They
    also return:

    Attributes:
        region_top_left: ``(batch, R, 2)`` ``(row, col)`` of each region in the full image.
        region_attention_maps: ``(batch, R, mh, mw)`` attention over each region's middle view (zero
            on cells outside the image).
        region_sampled_positions: ``(batch, R, n)`` flat indices into each region's map, in draw order.
        region_weights: ``(batch, R)`` first-level estimator weights (values).
        region_pixel_values: ``(batch, R, channels, mh', mw')`` middle views when ``return_patches=True``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    attention_map: torch.Tensor | None = None
    sampled_positions: torch.Tensor | None = None
    patch_top_left: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    patches: torch.Tensor | None = None
    entropy_penalty: torch.Tensor | None = None
    region_top_left: torch.Tensor | None = None
    region_attention_maps: torch.Tensor | None = None
    region_sampled_positions: torch.Tensor | None = None
    region_weights: torch.Tensor | None = None
    region_pixel_values: torch.Tensor | None = None


class AttentionSamplingPreTrainedModel(PreTrainedModel):
    config_class = AttentionSamplingConfig
    base_model_prefix = "attention_sampling"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        # convolutions trained from scratch need fan-in scaled weights, not the N(0, 0.02) default
        if isinstance(module, nn.Conv2d | nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        else:
            super()._init_weights(module)


class AttentionSamplingForImageClassification(AttentionSamplingPreTrainedModel):
    """Attention-sampling image classifier (see the module docstring).

    Inputs are the outputs of :class:`AttentionSamplingImageProcessor`:
    ``pixel_values`` ``(batch, C, H, W)``, ``low_res_pixel_values`` ``(batch, C, h, w)``, and for
    batches of differently sized images ``image_sizes`` / ``low_res_sizes`` ``(batch, 2)``; raw
    (integer) ``pixel_values`` come with ``pixel_scale`` / ``pixel_offset`` ``(batch, C)``.
    Sampling draws from torch's global generator: seed it (``torch.manual_seed``) for repeatable outputs.
    """

    def __init__(self, config: AttentionSamplingConfig) -> None:
        super().__init__(config)
        self.attention_network = build_attention_cnn(config.num_channels, config.attention_channels)
        if config.feature_network_config is not None:
            self.feature_network: nn.Module = _BackboneFeatures(config.feature_network_config)
            dim = _backbone_dim(config)
        else:
            self.feature_network = build_feature_cnn(
                config.num_channels, config.feature_channels, config.feature_batch_norm
            )
            dim = config.feature_channels[-1]
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(dim, config.num_labels)
        # created last and only when used, so that one-level models initialise exactly as before
        self.region_attention_network: nn.Sequential | None = None
        if config.multiscale:
            channels = config.region_attention_channels or config.attention_channels
            self.region_attention_network = build_attention_cnn(config.num_channels, channels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        last = [net[-1] for net in (self.attention_network, self.region_attention_network) if net is not None]
        if any(module is layer for layer in last) and self.config.zero_init_attention:
            # uniform map at the start: every position is sampled until the classifier has a signal
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def _check_inputs(
        self,
        pixel_values: torch.Tensor,
        low_res_pixel_values: torch.Tensor | None,
        image_sizes: torch.Tensor,
        low_res_sizes: torch.Tensor,
        pixel_scale: torch.Tensor | None,
        pixel_offset: torch.Tensor | None,
    ) -> None:
        name = type(self).__name__
        if low_res_pixel_values is None:
            raise ValueError(
                f"{name}: low_res_pixel_values is required; make the inputs with AttentionSamplingImageProcessor"
            )
        if (pixel_scale is None) != (pixel_offset is None):
            raise ValueError(f"{name}: pass pixel_scale and pixel_offset together (both from the image processor)")
        if pixel_scale is None and not pixel_values.is_floating_point():
            raise ValueError(
                f"{name}: pixel_values of dtype {pixel_values.dtype} are raw pixels and need pixel_scale and "
                "pixel_offset (the processor returns them); float pixel_values without them are read as normalised"
            )
        b, c = pixel_values.shape[0], self.config.num_channels
        for label, t in (("pixel_scale", pixel_scale), ("pixel_offset", pixel_offset)):
            if t is not None and (tuple(t.shape) != (b, c) or not bool(torch.isfinite(t).all())):
                raise ValueError(f"{name}: {label} must be finite, of shape ({b}, {c}); got shape {tuple(t.shape)}")
        if not low_res_pixel_values.is_floating_point():
            raise ValueError(
                f"{name}: low_res_pixel_values must be floating point (normalised), got {low_res_pixel_values.dtype}"
            )
        bad = ~torch.isfinite(low_res_pixel_values).flatten(1).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"{name}: low_res_pixel_values of image {int(bad.nonzero()[0, 0])} hold NaN or inf; accepted: "
                "finite pixel values"
            )
        for label, t in (("pixel_values", pixel_values), ("low_res_pixel_values", low_res_pixel_values)):
            if t.dim() != 4 or t.shape[1] != self.config.num_channels:
                raise ValueError(
                    f"{name}: {label} must be (batch, {self.config.num_channels}, height, width), "
                    f"got shape {tuple(t.shape)}"
                )
        if pixel_values.shape[0] != low_res_pixel_values.shape[0]:
            raise ValueError(f"{name}: pixel_values and low_res_pixel_values have different batch sizes")
        ph, pw = self.config.patch_size
        small = (image_sizes[:, 0] < ph) | (image_sizes[:, 1] < pw)
        if bool(small.any()):
            i = int(small.nonzero()[0, 0])
            raise ValueError(
                f"{name}: image {i} has size {tuple(image_sizes[i].tolist())}, smaller than a patch "
                f"({ph}, {pw}); use images at least as large as config.patch_size or a smaller patch_size"
            )
        if self.config.multiscale:
            rh, rw = self.config.region_size
            small = (image_sizes[:, 0] < rh) | (image_sizes[:, 1] < rw)
            if bool(small.any()):
                i = int(small.nonzero()[0, 0])
                raise ValueError(
                    f"{name}: image {i} has size {tuple(image_sizes[i].tolist())}, smaller than a region "
                    f"({rh}, {rw}); use larger images or a smaller config.region_size"
                )

    def _check_finite(self, patches: torch.Tensor, what: str) -> None:
        """Refuse a sampled ``(batch, n, C, ph, pw)`` read holding NaN or inf (only the sampled pixels are read)."""
        bad = ~torch.isfinite(patches.detach()).flatten(1).all(dim=1)
        if bool(bad.any()):
            raise ValueError(
                f"{type(self).__name__}: a sampled {what} of image {int(bad.nonzero()[0, 0])} holds NaN or inf pixel "
                "values; accepted: finite pixel values"
            )

    def _draw(self, attention: torch.Tensor, n: int) -> torch.Tensor:
        if self.config.sampling == "with_replacement":
            return sample_with_replacement(attention, n)
        return sample_without_replacement(attention, n)

    def _nested_patches(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        regions: torch.Tensor,
        region_top_left: torch.Tensor,
        affine: dict,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Second level: attention inside each drawn region, then its patches.

        Args:
            pixel_values: ``(batch, C, H, W)`` full-resolution images.
            image_sizes: ``(batch, 2)`` valid sizes.
            regions: ``(batch, R, C, rh, rw)`` the drawn full-resolution regions (zeros outside the image).
            region_top_left: ``(batch, R, 2)`` their positions in the full image.
            affine: ``pixel_scale`` / ``pixel_offset`` ``(batch, C)`` and ``pixel_readers``, each possibly
                None (see :func:`extract_patches`).

        Returns:
            ``patch_top_left`` ``(batch, R * n, 2)``, ``patches`` ``(batch, R * n, C, ph, pw)``,
            ``position_weights`` ``(batch, R, n)`` (attached to the second attention), and the
            region outputs for :class:`AttentionSamplingOutput`.
        """
        cfg = self.config
        b, r = region_top_left.shape[:2]
        n = cfg.num_patches
        rh, rw = cfg.region_size
        # the middle view of a region: average pooling of its full-resolution pixels; only the drawn
        # regions are pooled, so memory does not grow with the image
        middle = F.avg_pool2d(regions.flatten(0, 1), cfg.region_downsample)  # (b*R, C, rh/d, rw/d)
        scores = run_cnn(self.region_attention_network, middle)[:, 0]  # (b*R, mh, mw)
        mh, mw = scores.shape[-2:]
        cell_h, cell_w = rh / mh, rw / mw
        # a cell is valid when it overlaps the image's valid area (the region may cross its border)
        rows = region_top_left[..., 0, None] + torch.arange(mh, device=scores.device) * cell_h  # (b, R, mh)
        cols = region_top_left[..., 1, None] + torch.arange(mw, device=scores.device) * cell_w  # (b, R, mw)
        valid_r = (rows < image_sizes[:, None, None, 0]) & (rows + cell_h > 0)
        valid_c = (cols < image_sizes[:, None, None, 1]) & (cols + cell_w > 0)
        valid = (valid_r[..., :, None] & valid_c[..., None, :]).flatten(0, 1).flatten(1)  # (b*R, mh*mw)
        attention = attention_distribution(scores.flatten(1), valid, cfg.attention_smoothing)
        positions = self._draw(attention, n)  # (b*R, n)
        cell = torch.tensor([[cell_h, cell_w]], device=scores.device).expand(b * r, 2)
        local = patch_top_left(positions, mw, cell, (cfg.patch_size[0], cfg.patch_size[1]))  # (b*R, n, 2)
        top_left = (local.view(b, r, n, 2) + region_top_left[:, :, None, :]).view(b, r * n, 2)
        patches = extract_patches(pixel_values, top_left, tuple(cfg.patch_size), image_sizes, **affine)
        weights = expectation_weights(attention.gather(1, positions), cfg.sampling).view(b, r, n)
        extra = {
            "region_attention_maps": attention.view(b, r, mh, mw),
            "region_sampled_positions": positions.view(b, r, n),
            "region_pixel_values": middle.view(b, r, *middle.shape[1:]),
        }
        return top_left, patches, weights, extra

    def forward(
        self,
        pixel_values: torch.Tensor,
        low_res_pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        low_res_sizes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_patches: bool = False,
        pixel_scale: torch.Tensor | None = None,
        pixel_offset: torch.Tensor | None = None,
        pixel_readers: list | None = None,
        **kwargs,
    ) -> AttentionSamplingOutput:
        """Classify a batch (see the class docstring for the inputs).

        ``pixel_values`` may be raw (uint8/uint16/float, as the processor returns them) with
        ``pixel_scale`` and ``pixel_offset`` ``(batch, C)``: only the sampled patches are rescaled and
        normalised (``pixel_scale * x + pixel_offset``). Float ``pixel_values`` without them are read
        as already normalised. With ``pixel_readers`` (one per image, from the processor for tiled
        TIFF files), patches are read through them and ``pixel_values`` only gives shape and dtype.
        """
        b = pixel_values.shape[0]
        device = pixel_values.device
        if image_sizes is None:
            image_sizes = torch.tensor([pixel_values.shape[-2:]], device=device).expand(b, 2)
        if low_res_sizes is None and low_res_pixel_values is not None:
            low_res_sizes = torch.tensor([low_res_pixel_values.shape[-2:]], device=device).expand(b, 2)
        self._check_inputs(pixel_values, low_res_pixel_values, image_sizes, low_res_sizes, pixel_scale, pixel_offset)
        cfg = self.config
        if pixel_readers is not None and len(pixel_readers) != b:
            raise ValueError(f"{type(self).__name__}: pixel_readers has {len(pixel_readers)} entries for {b} images")
        affine = {"pixel_scale": pixel_scale, "pixel_offset": pixel_offset, "pixel_readers": pixel_readers}

        # 1. attention over the positions of the low-resolution map
        scores = run_cnn(self.attention_network, low_res_pixel_values)[:, 0]  # (b, h, w)
        h, w = scores.shape[-2:]
        low_h, low_w = low_res_pixel_values.shape[-2:]
        # valid part of the map: the map may be smaller than the low-res view if the network strides
        valid_h = torch.ceil(low_res_sizes[:, 0] * h / low_h).long()
        valid_w = torch.ceil(low_res_sizes[:, 1] * w / low_w).long()
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        valid = (rows[None, :, None] < valid_h[:, None, None]) & (cols[None, None, :] < valid_w[:, None, None])
        attention = attention_distribution(scores.flatten(1), valid.flatten(1), cfg.attention_smoothing)

        # 2. draw positions; 3. gather the high-resolution patches centred on them. Multi-scale: the
        # draws pick regions instead, and a second attention inside each region picks the patches.
        positions = self._draw(attention, cfg.num_regions if cfg.multiscale else cfg.num_patches)
        cell = torch.stack([image_sizes[:, 0] / valid_h, image_sizes[:, 1] / valid_w], dim=-1).float()
        first_weights = expectation_weights(attention.gather(1, positions), cfg.sampling)
        extra: dict[str, torch.Tensor] = {}
        if cfg.multiscale:
            region_size = (cfg.region_size[0], cfg.region_size[1])
            region_top_left = patch_top_left(positions, w, cell, region_size)
            regions = extract_patches(pixel_values, region_top_left, region_size, image_sizes, **affine)
            self._check_finite(regions, "region")
            top_left, patches, position_weights, extra = self._nested_patches(
                pixel_values, image_sizes, regions, region_top_left, affine
            )
            weights = nested_expectation_weights(first_weights, position_weights)
            extra.update(region_top_left=region_top_left, region_weights=first_weights.detach())
            if not return_patches:
                extra.pop("region_pixel_values")
        else:
            top_left = patch_top_left(positions, w, cell, (cfg.patch_size[0], cfg.patch_size[1]))
            patches = extract_patches(pixel_values, top_left, tuple(cfg.patch_size), image_sizes, **affine)
            weights = first_weights
        self._check_finite(patches, "patch")

        # 4. features and the unbiased expectation (gradients reach the attention through the weights)
        n = patches.shape[1]
        features = run_cnn(self.feature_network, patches.flatten(0, 1)).reshape(b, n, -1)
        if cfg.normalize_features:
            features = F.normalize(features, dim=-1, eps=1e-6)
        pooled = expectation(features, weights)
        logits = self.classifier(self.dropout(pooled))

        penalty = negative_entropy(attention).mean()
        if cfg.multiscale:
            penalty = penalty + negative_entropy(extra["region_attention_maps"].flatten(2)).mean()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long()) + cfg.entropy_regularizer * penalty
        return AttentionSamplingOutput(
            loss=loss,
            logits=logits,
            attention_map=attention.view(b, h, w),
            sampled_positions=positions,
            patch_top_left=top_left,
            sample_weights=weights.detach(),
            patches=patches if return_patches else None,
            entropy_penalty=penalty,
            **extra,
        )


# save_pretrained copies this file next to the weights and names it in the config's auto_map
AttentionSamplingForImageClassification.register_for_auto_class("AutoModelForImageClassification")
