"""The ``linear-lm`` family: causal LMs with linear attention and O(1)-per-token generation.

Importing this package registers ``model_type="linear-lm"`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (``import hf_efficient`` does it).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_linear_lm import LinearLMConfig
from .modeling_linear_lm import LinearLMForCausalLM, LinearLMModel, LinearLMPreTrainedModel

__all__ = ["LinearLMConfig", "LinearLMForCausalLM", "LinearLMModel", "LinearLMPreTrainedModel"]

AutoConfig.register(LinearLMConfig.model_type, LinearLMConfig, exist_ok=True)
AutoModel.register(LinearLMConfig, LinearLMModel, exist_ok=True)
AutoModelForCausalLM.register(LinearLMConfig, LinearLMForCausalLM, exist_ok=True)
