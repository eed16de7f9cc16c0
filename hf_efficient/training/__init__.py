"""Importance-sampled training (Katharopoulos & Fleuret, ICML 2018) as a transformers Trainer."""

from .importance_sampling import (
    ImportanceSamplingCallback,
    ImportanceSamplingConfig,
    ImportanceSamplingState,
    ImportanceSamplingTrainer,
)
from .scores import (
    cross_entropy_gradient_norm,
    default_tau_threshold,
    importance_resample,
    per_sample_losses,
    tau_from_scores,
    weighted_loss,
)

__all__ = [
    "ImportanceSamplingCallback",
    "ImportanceSamplingConfig",
    "ImportanceSamplingState",
    "ImportanceSamplingTrainer",
    "cross_entropy_gradient_norm",
    "default_tau_threshold",
    "importance_resample",
    "per_sample_losses",
    "tau_from_scores",
    "weighted_loss",
]
