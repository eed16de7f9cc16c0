"""What every efficient config and model class adds to its transformers base class.

The classes themselves are declared one by one in :mod:`.architectures` (``EfficientLlamaConfig``,
``EfficientLlamaForCausalLM``, ...): each is a two-line subclass of a mixin below and of the
transformers class, so a patched model can be pickled, deep-copied, sent to a spawned process and
found by a reader under the name it reports.

* :class:`~.configurations.EfficientConfigMixin` (in :mod:`.configurations`, which stays free of model
  code): ``model_type = "efficient-<type>"``, so the Auto classes and a saved ``config.json`` route to
  the efficient model classes; ``push_to_hub`` with a model card.
* :class:`EfficientModelMixin`: applies ``config.hf_efficient`` at the end of ``__init__`` (so
  ``from_pretrained`` loads the weights, learnable feature maps included, into patched layers);
  ``generate()`` decodes from a :class:`~.cache.LinearAttentionCache` and refuses caches that would
  give wrong tokens; ``save_pretrained`` writes remote code and refuses to overwrite another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicLayer

from ..attention.feature_maps import FeatureMap
from ..attention.registry import recurrent_kind_names
from .attention_interface import implementation_name, register_with_transformers
from .cache import CacheReuseMixin, LinearAttentionCache
from .export import push_to_hub, write_remote_code
from .plan import CONFIG_KEY, plan_from_record
from .surgery import apply_plan, attention_modules, shares_kwargs_with_cache

__all__ = ["EfficientModelMixin", "reset_feature_map"]


def reset_feature_map(fmap: torch.nn.Module) -> None:
    """Put a learnable feature map back to its initial values (a fresh map of the same shape)."""
    if hasattr(fmap, "reset_parameters"):
        fmap.reset_parameters()
        return
    if all(hasattr(fmap, a) for a in ("num_heads", "head_dim", "half")):  # hedgehog
        fresh = type(fmap)(fmap.num_heads, fmap.head_dim, fmap.half)
        own = dict(fmap.named_parameters())
        with torch.no_grad():
            for name, tensor in fresh.named_parameters():
                own[name].copy_(tensor.to(own[name].device))


def _refuse_other_model(save_directory, model_type: str) -> None:
    config_path = Path(save_directory) / "config.json"
    if not config_path.is_file():
        return
    try:
        existing = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        existing = "unreadable"
    if existing != model_type:
        raise FileExistsError(
            f"{save_directory} already holds another model (config.json has model_type {existing!r}, this model is "
            f"{model_type!r}); saving would overwrite its files. Choose an empty folder or remove them first"
        )


class EfficientModelMixin(CacheReuseMixin):
    """Mixed in front of a transformers model class whose ``config_class`` is efficient."""

    hf_efficient_base_class: type

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.hf_efficient_base_class = next((b for b in cls.__mro__[1:] if issubclass(b, PreTrainedModel)
                                            and not issubclass(b, EfficientModelMixin)), None)

    def __init__(self, config, *args, **kwargs):
        record = getattr(config, CONFIG_KEY, None)
        if not record:
            raise ValueError(f"{type(self).__name__} needs a config made by hf_efficient.efficient_config or "
                             f"patch_model (config.{CONFIG_KEY} is missing)")
        plan = plan_from_record(record)
        own = implementation_name(record["kind"])
        requested = config._attn_implementation
        if requested is not None and requested != own:
            raise ValueError(
                f"this checkpoint's attention is hf_efficient {record['kind']!r} (config.{CONFIG_KEY}); "
                f"attn_implementation={requested!r} would not change it. Load it without attn_implementation (then "
                "hf_efficient.unpatch_model(model) gives softmax back), or load the base checkpoint"
            )
        register_with_transformers()
        config._attn_implementation = own
        super().__init__(config, *args, **kwargs)
        if record.get("base_attn_implementation") is None:  # the model's own default, as transformers picks it
            record["base_attn_implementation"] = "sdpa" if getattr(self, "_supports_sdpa", False) else "eager"
        apply_plan(self, plan, ignore_logit_softcap=bool(record.get("ignore_logit_softcap")))
        self._prepare_decoding(place=False)

    def __setstate__(self, state):
        # an unpickled model (torch.load, a spawned process) is not built through __init__: register the kinds'
        # attention functions with transformers as __init__ does, or its first forward cannot find them
        super().__setstate__(state)
        register_with_transformers()

    def _init_weights(self, module):
        # Learnable feature maps are not known to the base class: give them their own initial values
        # (from_pretrained allocates missing weights uninitialised).
        if isinstance(module, FeatureMap):
            reset_feature_map(module)
            return
        super()._init_weights(module)

    # ------------------------------------------------------------------ generation
    def _prepare_decoding(self, place: bool) -> None:
        """Hook of the package's decoding fast path (compiled blocks and weights on huge pages; see
        ``hf_efficient.integrations.fused_layers``), called when the model is built (``place=False``) and when
        ``generate()`` decodes from a recurrent state (``place=True``). Nothing here: remote code runs the modules."""

    def _decodes_from_state(self, plan) -> bool:
        """Every replaced layer has a recurrent form, and the attention modules can reach a cache layer."""
        replaced = [layer for layer in plan if layer.kind is not None]
        return (bool(replaced) and all(layer.kind in recurrent_kind_names() for layer in replaced)
                and all(shares_kwargs_with_cache(type(m)) for _, m in attention_modules(self)))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        plan = plan_from_record(getattr(self.config, CONFIG_KEY))
        user_cache = model_kwargs.get("cache")
        implementation = generation_config.cache_implementation
        if implementation is not None and implementation == getattr(self.generation_config, "cache_implementation",
                                                                    None):
            # The checkpoint's default (Gemma's "hybrid"), chosen for softmax attention: decoding from the
            # states below gives the same tokens with less memory.
            generation_config.cache_implementation = implementation = None
        if user_cache is not None and not isinstance(user_cache, LinearAttentionCache):
            for i, layer in enumerate(plan):
                held = user_cache.layers[i] if i < len(getattr(user_cache, "layers", ())) else None
                if layer.kind is not None and held is not None and type(held) is not DynamicLayer:
                    raise ValueError(
                        f"layer {i} ({layer.kind}) needs all its past keys or a recurrent state, but the "
                        f"{type(user_cache).__name__} gives it a {type(held).__name__}; pass "
                        "LinearAttentionCache(config=model.config) (or nothing: generate() builds it)"
                    )
        elif user_cache is None and generation_config.use_cache is not False:
            if implementation is None and self._decodes_from_state(plan):
                # Decode from a constant-size state; sliding layers kept softmax get bounded windows.
                model_kwargs["cache"] = LinearAttentionCache(config=self.config)
                self._prepare_decoding(place=True)
                return None
            if implementation not in (None, "dynamic", "offloaded"):
                raise ValueError(
                    f"cache_implementation={implementation!r} is not supported by hf_efficient attention (its layers "
                    "need the past and current keys exactly, or a recurrent state); leave it unset: generate() then "
                    "decodes from a LinearAttentionCache"
                )
            if any(layer.kind is not None and not layer.is_global for layer in plan):
                raise ValueError("sliding-window layers replaced by a windowed kind decode only from a "
                                 "LinearAttentionCache; leave cache_implementation unset")
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def generate(self, *args, **kwargs):
        if not callable(getattr(self.hf_efficient_base_class, "generate", None)):
            raise TypeError(f"{type(self).__name__} cannot generate (it has no generation head)")
        return super().generate(*args, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config as the base class does, plus remote code (see ``export``); refuses
        a folder that holds another model."""
        _refuse_other_model(save_directory, self.config.model_type)
        out = super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(self, save_directory)
        return out

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload weights, config, remote code and an hf_efficient model card (see ``export.push_to_hub``)."""
        return push_to_hub(self, repo_id, **kwargs)
