"""Importance-sampled training (Katharopoulos & Fleuret, ICML 2018) as a transformers Trainer.

The names load on first use, so importing this package does not import transformers' Trainer.
"""

from typing import TYPE_CHECKING

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "importance_sampling": [
            "ImportanceSamplingCallback",
            "ImportanceSamplingConfig",
            "ImportanceSamplingState",
            "ImportanceSamplingStateCallback",
            "ImportanceSamplingTrainer",
        ],
        "scores": [
            "cross_entropy_gradient_norm",
            "cross_entropy_losses_tail_accurate",
            "default_tau_threshold",
            "importance_resample",
            "merge_duplicates",
            "per_sample_losses",
            "tau_from_scores",
            "weighted_loss",
        ],
    },
)

if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .importance_sampling import (  # noqa: F401
        ImportanceSamplingCallback,
        ImportanceSamplingConfig,
        ImportanceSamplingState,
        ImportanceSamplingStateCallback,
        ImportanceSamplingTrainer,
    )
    from .scores import (  # noqa: F401
        cross_entropy_gradient_norm,
        cross_entropy_losses_tail_accurate,
        default_tau_threshold,
        importance_resample,
        merge_duplicates,
        per_sample_losses,
        tau_from_scores,
        weighted_loss,
    )
