"""How the attention maths meets transformers, as a one-way chain of small modules:

* :mod:`.plan`: which attention each layer runs (hybrid models: full layers replaced, sliding kept);
* :mod:`.configurations`: the static ``Efficient*`` config classes (no model code);
* :mod:`.surgery`: attach a plan to a model's attention modules, and remove it;
* :mod:`.attention_interface`: the attention and mask functions transformers calls;
* :mod:`.cache`: ``LinearAttentionCache``, recurrent states for decoding;
* :mod:`.export`: remote code, model cards and ``push_to_hub``;
* :mod:`.models` / :mod:`.architectures`: the static ``Efficient*`` model classes;
* :mod:`.patch` / :mod:`.configs`: ``patch_model``, ``unpatch_model``, ``efficient_config``.

Each module imports only the ones above it, and this package loads them on first use. Importing
registers nothing; :func:`register` registers every kind with transformers' attention and mask
interfaces and every efficient class with the Auto classes at once (idempotent). ``import
hf_efficient`` does the cheap, deferred part of that (see :mod:`hf_efficient.registration`).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "plan": ["LayerAttention", "describe_plan", "layer_types", "plan_from_record", "plan_layers",
                 "summarize_plan"],
        "configurations": ["CONFIG_CLASSES", "MODEL_CLASS_NAMES", "EfficientConfigMixin"],
        "surgery": ["SELF_ATTENTION_CLASSES", "attention_modules"],
        "attention_interface": ["CACHE_KWARG", "IMPLEMENTATION_PREFIX", "efficient_attention_forward",
                                "efficient_mask", "implementation_name", "kind_from_implementation",
                                "register_with_transformers"],
        "cache": ["LinearAttentionCache", "LinearStateLayer", "RecurrentStateLayer"],
        "export": ["push_to_hub", "render_model_card", "write_remote_code"],
        "models": ["EfficientModelMixin"],
        "architectures": ["ARCHITECTURES", "add_architecture", "efficient_class", "register", "register_all",
                          "register_auto_classes"],
        "patch": ["is_patched", "patch_model", "unpatch_model"],
        "configs": ["EfficientClasses", "efficient_classes", "efficient_config"],
    },
)
