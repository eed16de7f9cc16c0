"""Configuration of attention-sampling image classifiers."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

SAMPLING_MODES = ("with_replacement", "without_replacement")


class AttentionSamplingConfig(PreTrainedConfig):
    r"""Configuration of :class:`AttentionSamplingForImageClassification`.

    An attention network reads a low-resolution view and gives a distribution over the positions of
    its output map; ``num_patches`` high-resolution patches are drawn from it, embedded by a feature
    network and averaged with the unbiased expectation estimator; a linear layer classifies.

    Args:
        num_channels: image channels (1 for megaNIST, 3 for RGB).
        patch_size: high-resolution patch side, an int or ``[height, width]``.
        num_patches: patches sampled per image.
        sampling: ``"without_replacement"`` (Gumbel top-k) or ``"with_replacement"``.
        attention_channels: hidden channels of the default attention CNN (3x3 convs, tanh, stride 1),
            followed by a 3x3 conv to one score per position.
        attention_smoothing: ``eps`` of ``a = (1 - eps) softmax + eps / K``, in ``[0, 1)``.
        entropy_regularizer: ``lambda`` of the loss term ``lambda * sum_i a_i log a_i`` (mean over the
            batch); positive values spread the attention, negative values sharpen it.
        feature_channels: channels of the default feature CNN (3x3 conv + ReLU + 2x2 max-pool each),
            followed by a global max-pool; the feature size is the last entry.
        feature_batch_norm: batch norm after each conv of the default feature CNN.
        feature_network_config: optional ``dict`` of a transformers vision model config (with
            ``model_type``, e.g. a small ``resnet``) used instead of the default feature CNN; its
            ``pooler_output`` (or the mean of ``last_hidden_state``) is the feature.
        feature_dim: feature size of ``feature_network_config``'s model when it cannot be read from
            its config (``hidden_sizes[-1]`` or ``hidden_size``).
        classifier_dropout: dropout on the expected feature before the linear classifier.
        normalize_features: L2-normalise each patch feature before the expectation, so that patches
            full of ink do not dominate the average by their magnitude alone (the estimator stays
            unbiased: it averages the normalised features).
        zero_init_attention: start the last layer of the attention network at zero, i.e. a uniform
            attention map, so that early training samples everywhere instead of wherever a random
            initialisation points.
        region_size: turns on multi-scale (nested) sampling when set: an int or ``[height, width]`` in
            full-resolution pixels. The attention network on the low-resolution view then draws
            ``num_regions`` regions of this size (centred on the drawn cells); each region is
            average-pooled by ``region_downsample`` into a middle-resolution view, on which a second
            attention network draws ``num_patches`` patches inside that region
            (``num_regions * num_patches`` patches per image). Both levels use ``sampling`` and the
            nested estimator (the weights of the two levels multiply). ``None`` (the default): one level.
        num_regions: regions drawn per image in multi-scale mode.
        region_downsample: integer pooling factor from a full-resolution region to its middle view;
            must divide both sides of ``region_size``.
        region_attention_channels: hidden channels of the second (middle-view) attention CNN;
            defaults to ``attention_channels``.
    """

    model_type = "attention_sampling"

    def __init__(
        self,
        num_channels: int = 1,
        patch_size: int | list[int] = 32,
        num_patches: int = 10,
        sampling: str = "without_replacement",
        attention_channels: list[int] | tuple[int, ...] = (8, 8),
        attention_smoothing: float = 1e-5,
        entropy_regularizer: float = 1e-4,
        feature_channels: list[int] | tuple[int, ...] = (32, 32, 64),
        feature_batch_norm: bool = True,
        feature_network_config: dict[str, Any] | None = None,
        feature_dim: int | None = None,
        classifier_dropout: float = 0.0,
        normalize_features: bool = False,
        zero_init_attention: bool = False,
        region_size: int | list[int] | None = None,
        num_regions: int = 1,
        region_downsample: int = 4,
        region_attention_channels: list[int] | tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_channels = num_channels
        self.patch_size = [patch_size, patch_size] if isinstance(patch_size, int) else list(patch_size)
        self.num_patches = num_patches
        self.sampling = sampling
        self.attention_channels = list(attention_channels)
        self.attention_smoothing = attention_smoothing
        self.entropy_regularizer = entropy_regularizer
        self.feature_channels = list(feature_channels)
        self.feature_batch_norm = bool(feature_batch_norm)
        self.feature_network_config = feature_network_config
        self.feature_dim = feature_dim
        self.classifier_dropout = classifier_dropout
        self.normalize_features = bool(normalize_features)
        self.zero_init_attention = bool(zero_init_attention)
        self.region_size = [region_size, region_size] if isinstance(region_size, int) else region_size
        if isinstance(self.region_size, tuple):
            self.region_size = list(self.region_size)
        self.num_regions = num_regions
        self.region_downsample = region_downsample
        self.region_attention_channels = (
            list(region_attention_channels) if region_attention_channels is not None else None
        )
        if "num_labels" not in kwargs and "id2label" not in kwargs:
            kwargs["num_labels"] = 10  # the ten digit classes of megaNIST
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
        def positive_int(name: str, value: Any) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AttentionSamplingConfig: {name} must be a positive int, got {value!r}")

        positive_int("num_channels", self.num_channels)
        positive_int("num_patches", self.num_patches)
        if len(self.patch_size) != 2:
            raise ValueError(
                f"AttentionSamplingConfig: patch_size must be an int or [height, width], got {self.patch_size!r}"
            )
        for side in self.patch_size:
            positive_int("patch_size", side)
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(
                f"AttentionSamplingConfig: sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}"
            )
        for c in self.attention_channels:
            positive_int("attention_channels entries", c)
        if not self.feature_channels and self.feature_network_config is None:
            raise ValueError("AttentionSamplingConfig: feature_channels must not be empty")
        for c in self.feature_channels:
            positive_int("feature_channels entries", c)
        if not isinstance(self.attention_smoothing, (int, float)) or not 0.0 <= self.attention_smoothing < 1.0:
            raise ValueError(
                f"AttentionSamplingConfig: attention_smoothing must be in [0, 1), got {self.attention_smoothing!r}"
            )
        if not isinstance(self.entropy_regularizer, (int, float)):
            raise ValueError(
                f"AttentionSamplingConfig: entropy_regularizer must be a float, got {self.entropy_regularizer!r}"
            )
        if not isinstance(self.classifier_dropout, (int, float)) or not 0.0 <= self.classifier_dropout < 1.0:
            raise ValueError(
                f"AttentionSamplingConfig: classifier_dropout must be in [0, 1), got {self.classifier_dropout!r}"
            )
        if self.feature_network_config is not None:
            if not isinstance(self.feature_network_config, dict) or "model_type" not in self.feature_network_config:
                raise ValueError(
                    "AttentionSamplingConfig: feature_network_config must be a dict with a 'model_type' key "
                    "(e.g. ResNetConfig(...).to_dict()), got "
                    f"{type(self.feature_network_config).__name__}"
                )
        if self.feature_dim is not None:
            positive_int("feature_dim", self.feature_dim)
        if self.num_labels < 1:
            raise ValueError(f"AttentionSamplingConfig: num_labels must be >= 1, got {self.num_labels}")
        if self.region_size is not None:
            self._check_multiscale(positive_int)

    @property
    def multiscale(self) -> bool:
        """True when nested sampling is on (``region_size`` is set)."""
        return self.region_size is not None

    @property
    def region_map_size(self) -> list[int] | None:
        """``[height, width]`` of a region's middle-resolution view, or None with one level."""
        if self.region_size is None:
            return None
        return [side // self.region_downsample for side in self.region_size]

    def _check_multiscale(self, positive_int) -> None:
        if not isinstance(self.region_size, list) or len(self.region_size) != 2:
            raise ValueError(
                f"AttentionSamplingConfig: region_size must be an int or [height, width], got {self.region_size!r}"
            )
        for side in self.region_size:
            positive_int("region_size", side)
        positive_int("num_regions", self.num_regions)
        positive_int("region_downsample", self.region_downsample)
        for c in self.region_attention_channels or []:
            positive_int("region_attention_channels entries", c)
        if any(r < p for r, p in zip(self.region_size, self.patch_size, strict=True)):
            raise ValueError(
                f"AttentionSamplingConfig: region_size {self.region_size} is smaller than patch_size "
                f"{self.patch_size}; a region must hold at least one patch"
            )
        if any(side % self.region_downsample for side in self.region_size):
            raise ValueError(
                f"AttentionSamplingConfig: region_downsample {self.region_downsample} must divide both sides of "
                f"region_size {self.region_size}"
            )
        positions = self.region_map_size[0] * self.region_map_size[1]
        if self.sampling == "without_replacement" and self.num_patches > positions:
            raise ValueError(
                f"AttentionSamplingConfig: cannot draw num_patches={self.num_patches} distinct positions from a "
                f"region's {self.region_map_size[0]}x{self.region_map_size[1]} middle view; lower num_patches or "
                "region_downsample, enlarge region_size, or sample with replacement"
            )


# save_pretrained copies this file next to the weights and names it in the config's auto_map
AttentionSamplingConfig.register_for_auto_class("AutoConfig")
