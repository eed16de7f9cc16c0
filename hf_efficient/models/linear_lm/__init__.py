"""The ``linear-lm`` family: causal LMs with linear attention and O(1)-per-token generation.

``model_type="linear-lm"`` is registered with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``
by :mod:`hf_efficient.registration` (``import hf_efficient`` does it).
"""

import lazy_loader

__getattr__, __dir__, __all__ = lazy_loader.attach(
    __name__,
    submod_attrs={
        "configuration_linear_lm": ["LinearLMConfig"],
        "modeling_linear_lm": ["LinearLMForCausalLM", "LinearLMModel", "LinearLMPreTrainedModel"],
    },
)
