"""Image processor for attention sampling: a low-resolution view plus the full-resolution tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor


def _to_chw_tensor(image: Any, index: int) -> torch.Tensor:
    """One image (PIL, numpy or torch; ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``) -> float ``(C, H, W)``."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image, without importing PIL
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError(
            f"AttentionSamplingImageProcessor: image {index} has type {type(image).__name__}; accepted: "
            "PIL.Image, numpy array or torch tensor of shape (H, W), (H, W, C) or (C, H, W)"
        )
    if tensor.dim() == 2:
        tensor = tensor[None]
    elif tensor.dim() == 3:
        # channels-last when the last axis looks like channels and the first does not
        if tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
    else:
        raise ValueError(
            f"AttentionSamplingImageProcessor: image {index} has shape {tuple(tensor.shape)}; accepted: "
            "(H, W), (H, W, C) or (C, H, W)"
        )
    if tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise ValueError(f"AttentionSamplingImageProcessor: image {index} is empty, shape {tuple(tensor.shape)}")
    return tensor.float()


class AttentionSamplingImageProcessor(BaseImageProcessor):
    r"""Prepare images of any size for :class:`AttentionSamplingForImageClassification`.

    For every image it makes the full-resolution tensor (patches are sampled from it) and a
    low-resolution view (the attention network reads it), both rescaled and normalised. Images of
    different sizes are batched by padding at the bottom and right with zeros; the valid sizes are
    returned so that the model gives padding no attention and reads it as zeros.

    Args:
        low_res_scale: the low-resolution view is ``round(scale * H) x round(scale * W)``.
        low_res_size: ``{"height": h, "width": w}``: a fixed low-resolution size instead of a scale
            (the attention cost then does not grow with the image).
        do_rescale: multiply pixel values by ``rescale_factor`` (``1/255`` for uint8 images).
        do_normalize: subtract ``image_mean`` and divide by ``image_std`` (one value per channel, or
            one value for all).

    Returns (``__call__``): a ``BatchFeature`` with
        ``pixel_values`` ``(batch, channels, H_max, W_max)``,
        ``low_res_pixel_values`` ``(batch, channels, h_max, w_max)``,
        ``image_sizes`` ``(batch, 2)`` and ``low_res_sizes`` ``(batch, 2)`` long valid ``(height, width)``.
    """

    model_input_names = ["pixel_values", "low_res_pixel_values", "image_sizes", "low_res_sizes"]

    def __init__(
        self,
        low_res_scale: float = 0.25,
        low_res_size: dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | list[float] = 0.5,
        image_std: float | list[float] = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.low_res_scale = low_res_scale
        self.low_res_size = dict(low_res_size) if low_res_size is not None else None
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = image_mean
        self.image_std = image_std
        self._check(low_res_scale, self.low_res_size)

    @staticmethod
    def _check(scale: float, size: dict[str, int] | None) -> None:
        if size is not None:
            if set(size) != {"height", "width"} or any(not isinstance(v, int) or v < 1 for v in size.values()):
                raise ValueError(
                    "AttentionSamplingImageProcessor: low_res_size must be {'height': int >= 1, 'width': int >= 1}, "
                    f"got {size!r}"
                )
        elif not isinstance(scale, (int, float)) or not 0.0 < scale <= 1.0:
            raise ValueError(f"AttentionSamplingImageProcessor: low_res_scale must be in (0, 1], got {scale!r}")

    def _normalise(self, image: torch.Tensor, do_rescale: bool, do_normalize: bool) -> torch.Tensor:
        if do_rescale:
            image = image * self.rescale_factor
        if do_normalize:
            channels = image.shape[0]
            mean = torch.as_tensor(self.image_mean, dtype=image.dtype).reshape(-1)
            std = torch.as_tensor(self.image_std, dtype=image.dtype).reshape(-1)
            if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
                raise ValueError(
                    f"AttentionSamplingImageProcessor: image_mean/image_std have {mean.numel()}/{std.numel()} "
                    f"values for a {channels}-channel image; give one value or one per channel"
                )
            image = (image - mean[:, None, None]) / std[:, None, None]
        return image

    def preprocess(  # type: ignore[override]
        self,
        images: Any,
        low_res_scale: float | None = None,
        low_res_size: dict[str, int] | None = None,
        do_rescale: bool | None = None,
        do_normalize: bool | None = None,
        return_tensors: str | None = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image or a list of images (see the class docstring for the outputs)."""
        if kwargs:
            raise TypeError(f"AttentionSamplingImageProcessor: unexpected arguments {sorted(kwargs)}")
        if return_tensors not in (None, "pt"):
            raise ValueError(
                f"AttentionSamplingImageProcessor: return_tensors must be 'pt' or None, got {return_tensors!r}"
            )
        scale = self.low_res_scale if low_res_scale is None else low_res_scale
        size = self.low_res_size if low_res_size is None else dict(low_res_size)
        self._check(scale, size)
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        do_normalize = self.do_normalize if do_normalize is None else do_normalize

        is_array = isinstance(images, torch.Tensor | np.ndarray)
        is_single = (is_array and images.ndim <= 3) or hasattr(images, "convert")  # one array or PIL image
        if is_single:
            images = [images]
        elif is_array and images.ndim == 4:  # (batch, ...) array: a batch of same-sized images
            images = list(images)
        elif not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("AttentionSamplingImageProcessor: expected an image or a non-empty list of images")

        full, low = [], []
        for i, raw in enumerate(images):
            image = self._normalise(_to_chw_tensor(raw, i), do_rescale, do_normalize)
            h, w = image.shape[-2:]
            if size is not None:
                low_hw = (size["height"], size["width"])
            else:
                low_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
            # area interpolation averages each block of pixels: an anti-aliased downsample
            low.append(F.interpolate(image[None], size=low_hw, mode="area")[0])
            full.append(image)
        channels = {t.shape[0] for t in full}
        if len(channels) != 1:
            raise ValueError(
                "AttentionSamplingImageProcessor: images in one batch must share a channel count, "
                f"got {sorted(channels)}"
            )
        data = {
            "pixel_values": _pad_stack(full),
            "low_res_pixel_values": _pad_stack(low),
            "image_sizes": torch.tensor([t.shape[-2:] for t in full], dtype=torch.long),
            "low_res_sizes": torch.tensor([t.shape[-2:] for t in low], dtype=torch.long),
        }
        return BatchFeature(data=data, tensor_type=return_tensors)


def _pad_stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack ``(C, H_i, W_i)`` tensors into ``(batch, C, H_max, W_max)``, zero padding bottom/right."""
    h = max(t.shape[-2] for t in images)
    w = max(t.shape[-1] for t in images)
    if all(t.shape[-2:] == (h, w) for t in images):
        return torch.stack(images)
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for i, t in enumerate(images):
        out[i, :, : t.shape[-2], : t.shape[-1]] = t
    return out


# save_pretrained copies this file next to the weights and names it in the config's auto_map
AttentionSamplingImageProcessor.register_for_auto_class("AutoImageProcessor")
