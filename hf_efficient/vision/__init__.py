"""Vision: attention sampling for megapixel images and the megaNIST generator."""

from .attention_sampling import (
    AttentionSamplingConfig,
    AttentionSamplingForImageClassification,
    AttentionSamplingImageProcessor,
    AttentionSamplingOutput,
)
from .megamnist import make_megamnist

__all__ = [
    "AttentionSamplingConfig",
    "AttentionSamplingForImageClassification",
    "AttentionSamplingImageProcessor",
    "AttentionSamplingOutput",
    "make_megamnist",
]
