"""How the attention maths meets transformers.

* :mod:`.attention_interface`: every registry kind as an ``attn_implementation`` plus its mask function;
* :mod:`.patch`: ``patch_model`` / ``unpatch_model``;
* :mod:`.configs`: ``efficient_config`` and the ``efficient-<model_type>`` Auto classes;
* :mod:`.export`: remote code, model cards and ``push_to_hub``.

Importing this package registers everything with transformers.
"""

import importlib
import pkgutil

from .attention_interface import (
    IMPLEMENTATION_PREFIX,
    LayerAttention,
    efficient_mask,
    implementation_name,
    kind_from_implementation,
    register_with_transformers,
)
from .configs import REGISTERED_AT_IMPORT, EfficientClasses, efficient_classes, efficient_config, register_auto_classes
from .export import push_to_hub, render_model_card, write_remote_code
from .patch import SELF_ATTENTION_CLASSES, attention_modules, is_patched, patch_model, plan_layers, unpatch_model


def register_all() -> None:
    """Register every attention kind with transformers and the efficient classes of the main architectures.

    Every public module of ``hf_efficient.attention`` is imported first (importing a kind's module
    registers it), so a new kind needs no change here.
    """
    from .. import attention

    for module in pkgutil.iter_modules(attention.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{attention.__name__}.{module.name}")
    register_with_transformers()
    for model_type in REGISTERED_AT_IMPORT:
        register_auto_classes(model_type)


register_all()

__all__ = [
    "IMPLEMENTATION_PREFIX",
    "SELF_ATTENTION_CLASSES",
    "EfficientClasses",
    "LayerAttention",
    "attention_modules",
    "efficient_classes",
    "efficient_config",
    "efficient_mask",
    "implementation_name",
    "is_patched",
    "kind_from_implementation",
    "patch_model",
    "plan_layers",
    "push_to_hub",
    "register_all",
    "register_auto_classes",
    "register_with_transformers",
    "render_model_card",
    "unpatch_model",
    "write_remote_code",
]
