"""How the attention maths meets transformers, as a one-way chain of small modules:

* :mod:`.plan`: which attention each layer runs (hybrid models: full layers replaced, sliding kept);
* :mod:`.surgery`: attach a plan to a model's attention modules, and remove it;
* :mod:`.attention_interface`: the attention and mask functions transformers calls;
* :mod:`.cache`: ``LinearAttentionCache``, recurrent states for decoding;
* :mod:`.export`: remote code, model cards and ``push_to_hub``;
* :mod:`.models` / :mod:`.architectures`: the static ``Efficient*`` config and model classes;
* :mod:`.patch` / :mod:`.configs`: ``patch_model``, ``unpatch_model``, ``efficient_config``.

Each module imports only the ones above it. Importing registers nothing; :func:`register` (called
once by ``import hf_efficient``) registers the kinds with transformers' attention and mask
interfaces and the efficient classes with the Auto classes. It is idempotent.
"""

import warnings

from .architectures import ARCHITECTURES, add_architecture, efficient_class, register_auto_classes
from .attention_interface import (
    CACHE_KWARG,
    IMPLEMENTATION_PREFIX,
    efficient_attention_forward,
    efficient_mask,
    implementation_name,
    kind_from_implementation,
    register_with_transformers,
)
from .cache import LinearAttentionCache, LinearStateLayer, WindowLinearStateLayer
from .configs import EfficientClasses, efficient_classes, efficient_config
from .export import push_to_hub, render_model_card, write_remote_code
from .models import EfficientConfigMixin, EfficientModelMixin
from .patch import is_patched, patch_model, unpatch_model
from .plan import LayerAttention, describe_plan, layer_types, plan_from_record, plan_layers, summarize_plan
from .surgery import SELF_ATTENTION_CLASSES, attention_modules


def register() -> None:
    """Register every attention kind with transformers' attention and mask interfaces and every
    efficient class with the Auto classes. Idempotent; call it again after registering a new kind."""
    register_with_transformers()
    register_auto_classes()


def register_all() -> None:
    """Deprecated name of :func:`register`."""
    warnings.warn("hf_efficient.integrations.register_all is deprecated; use register()", DeprecationWarning,
                  stacklevel=2)
    register()


__all__ = [
    "ARCHITECTURES",
    "CACHE_KWARG",
    "IMPLEMENTATION_PREFIX",
    "SELF_ATTENTION_CLASSES",
    "EfficientClasses",
    "EfficientConfigMixin",
    "EfficientModelMixin",
    "LayerAttention",
    "LinearAttentionCache",
    "LinearStateLayer",
    "WindowLinearStateLayer",
    "add_architecture",
    "attention_modules",
    "describe_plan",
    "efficient_attention_forward",
    "efficient_class",
    "efficient_classes",
    "efficient_config",
    "efficient_mask",
    "implementation_name",
    "is_patched",
    "kind_from_implementation",
    "layer_types",
    "patch_model",
    "plan_from_record",
    "plan_layers",
    "push_to_hub",
    "register",
    "register_all",
    "register_auto_classes",
    "register_with_transformers",
    "render_model_card",
    "summarize_plan",
    "unpatch_model",
    "write_remote_code",
]
