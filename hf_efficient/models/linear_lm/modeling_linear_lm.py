"""The ``linear-lm`` causal LM: a Llama-like decoder whose attention is causal linear attention.

Blocks are pre-norm: ``x + attn(rms(x))`` then ``x + mlp(rms(x))`` with a SwiGLU MLP. Attention
maps q and k through a feature map phi (``config.feature_map``) after optional rotary position
embeddings, and mixes tokens with the chunked causal form in training and prefill and the
recurrent form when decoding. ``generate()`` builds a :class:`LinearAttentionCache` by itself, so
every generated token costs the same whatever the context length.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN, SiLUActivation
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from hf_efficient_kernels import dispatch
from hf_efficient_kernels.dispatch import DECODE_MAX_ROWS

from ...attention.feature_maps import FEATURE_MAPS
from ...attention.linear import LinearAttentionState, linear_attention
from ...decoding import (
    BlockStep,
    DecodeLinear,
    hooked,
    kernels_turned_off,
    norm_arguments,
    place_for_decoding,
    placed_for_decoding,
    rms_norm_step,
    run_block_steps,
)
from ...integrations.cache import CacheReuseMixin, LinearAttentionCache, LinearStateLayer
from .configuration_linear_lm import LinearLMConfig

__all__ = ["DecodeLinear", "LinearLMForCausalLM", "LinearLMModel", "LinearLMPreTrainedModel"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on ``(batch, heads, seq, d)`` with cos/sin ``(batch, 1, seq, d)``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LinearLMAttention(nn.Module):
    """Multi-head causal linear attention; q, k, v ``(batch, heads, seq, head_dim)`` inside."""

    def __init__(self, config: LinearLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.eps = config.attention_eps
        self.chunk_size = config.chunk_size
        h = config.hidden_size
        self.q_proj = DecodeLinear(h, h, bias=False)
        self.k_proj = DecodeLinear(h, h, bias=False)
        self.v_proj = DecodeLinear(h, h, bias=False)
        self.o_proj = DecodeLinear(h, h, bias=False)
        fmap = FEATURE_MAPS[config.feature_map](self.head_dim, self.num_heads)
        # Learnable maps (hedgehog) are submodules so they train and save; fixed ones stay a name.
        self.feature_map = fmap if any(True for _ in fmap.parameters()) else None
        self.feature_map_name = config.feature_map

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        padding_mask: torch.Tensor | None,
        cache_layer: LinearStateLayer | None,
    ) -> torch.Tensor:
        b, n, _ = hidden_states.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        fmap = self.feature_map if self.feature_map is not None else self.feature_map_name
        if cache_layer is not None:
            out = cache_layer.attend(q, k, v, feature_map=fmap, key_padding_mask=padding_mask, eps=self.eps,
                                     chunk_size=self.chunk_size)
        else:
            out = linear_attention(q, k, v, causal=True, feature_map=fmap, key_padding_mask=padding_mask,
                                   eps=self.eps, chunk_size=self.chunk_size)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class LinearLMMLP(nn.Module):
    def __init__(self, config: LinearLMConfig) -> None:
        super().__init__()
        self.gate_proj = DecodeLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = DecodeLinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = DecodeLinear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.hidden_act = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_NO_BIASES = (None,) * 7  # the block's seven projections have none


def _rms_eps(norm: nn.RMSNorm) -> float:
    """The eps an ``nn.RMSNorm`` adds on a compiled decoding step (float32): its own, else float32's."""
    return norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps


class LinearLMDecoderLayer(nn.Module):
    def __init__(self, config: LinearLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LinearLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LinearLMMLP(config)

    def forward(self, x, rotary, padding_mask, cache_layer):
        if cache_layer is not None and x.shape[1] == 1 and padding_mask is None:
            out = self._fused_step(x, rotary, cache_layer)
            if out is not None:
                return out
        x = x + self.self_attn(self.input_layernorm(x), rotary, padding_mask, cache_layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused_step(self, x: torch.Tensor, rotary, cache_layer: LinearStateLayer,
                    implementation: str | None = None) -> torch.Tensor | None:
        """One decoding token through the whole block in one compiled call (``decoder_block_step_kernel``): a step
        is bound by reading the weights, and the block's two dozen small PyTorch ops cost about as much again. The
        same computation as :meth:`forward`; None (then :meth:`forward`'s modules run) where :meth:`_block_step`
        gives None."""
        step = self._block_step(x, rotary, cache_layer, implementation)
        return None if step is None else step.run()

    def _block_step(self, x: torch.Tensor, rotary, cache_layer: LinearStateLayer,
                    implementation: str | None = None) -> BlockStep | None:
        """What :meth:`_fused_step` checks, without running anything: the block's compiled step for an input of x's
        shape, dtype and device, or None for learnable feature maps, another activation than silu, no state yet,
        hooks, or tensors the kernel does not take. ``implementation``: the kernels' setting read once for the
        model step (None: read here)."""
        # submodules and parameters through _modules/_parameters: nn.Module.__getattr__ is the slow path, and this
        # runs every token in every layer
        sub = self._modules
        attn, mlp = sub["self_attn"], sub["mlp"]
        state = cache_layer.state
        # the state must continue in float32 with this batch (the kernel checks the shapes against x); anything
        # else takes the modules, which name the mismatch
        if (attn.feature_map is not None or mlp.hidden_act != "silu" or not cache_layer.continues_in_float32()
                or not isinstance(state, LinearAttentionState) or state.key_shift is not None
                or state.k_sum.dim() != 3 or state.k_sum.shape[0] != x.shape[0]):
            return None
        a, m = attn._modules, mlp._modules
        norms = (sub["input_layernorm"], sub["post_attention_layernorm"])
        projections = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"])
        # Only the block as built: an adapter wrapped around a projection (LoRA), a bias or a hook would be
        # skipped by the compiled block, so any of them sends the token through the modules.
        for p in projections:  # a weight set as a plain tensor (not a parameter) takes the modules
            if type(p) is not DecodeLinear or p._parameters.get("bias", 0) is not None or "weight" not in p._parameters:
                return None
        for n in norms:
            if type(n) is not nn.RMSNorm or n._parameters.get("weight") is None:
                return None
        act = m.get("act_fn")  # the activation the block computes is SiLU's: another module set there runs as itself
        if (norms[1].eps != norms[0].eps or type(act) not in (SiLUActivation, nn.SiLU)
                or hooked((self, attn, mlp, act, *norms, *projections))):
            return None
        rms_eps = _rms_eps(norms[0])
        w = [p._parameters["weight"] for p in projections]
        weights = (norms[0]._parameters["weight"], *w[:4], norms[1]._parameters["weight"], *w[4:])
        heads = attn.num_heads
        kernel = dispatch.decoder_block_step_kernel(
            x, weights, _NO_BIASES, rotary, {"kv": state.kv, "k_sum": state.k_sum}, heads, heads, attn.head_dim,
            attn.feature_map_name, 0, 1.0, attn.eps, rms_eps, implementation=implementation)
        if kernel is None:
            return None
        return BlockStep(kernel, lambda state: cache_layer.commit_token(LinearAttentionState(*state)))


class LinearLMPreTrainedModel(PreTrainedModel):
    config_class = LinearLMConfig
    config: LinearLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LinearLMDecoderLayer"]
    # Attention is linear by construction; it does not dispatch through attn_implementation.
    _supports_attention_backend = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class LinearLMModel(LinearLMPreTrainedModel):
    """The decoder stack without the LM head."""

    def __init__(self, config: LinearLMConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([LinearLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        # Computed per call rather than kept as a buffer: it is a few numbers, and a buffer would be
        # left uninitialised by from_pretrained's meta-device loading.
        # (not kept between calls either: a tensor kept from a torch.export trace would be a fake one)
        d = self.config.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.float32, device=position_ids.device) / d
        inv_freq = 1.0 / (self.config.rope_theta**exponents)
        freqs = position_ids[..., None].to(torch.float32) * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (batch or 1, 1, seq, d)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids ``(batch, seq)``; attention_mask ``(batch, past + seq)`` with 1 = real token;
        returns hidden states ``(batch, seq, hidden)`` and the cache."""
        hidden, cache, _ = self._run(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs)
        return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)

    def _run(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs: dict,
             head: nn.Module | None = None) -> tuple[torch.Tensor, LinearAttentionCache | None, bool]:
        """:meth:`forward`'s last hidden state and cache (None unless ``use_cache``), without the output object;
        with ``head`` (the causal LM's head) on a compiled decoding step, the head runs in the blocks' one call
        where it is a plain linear layer without hooks. The third value says whether the head ran."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("LinearLMModel: pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("linear-lm models never form attention weights: output_attentions=True is not supported")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, n = hidden.shape[:2]
        if n == 0:
            raise ValueError(f"linear-lm models need at least one token per row, got an input of shape "
                             f"{tuple(hidden.shape[:2])} (batch, seq)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, LinearAttentionCache):
            raise TypeError(
                f"linear-lm models keep a recurrent state, not keys/values: pass a LinearAttentionCache (or nothing, "
                f"generate() builds one), got {type(cache).__name__}"
            )
        if use_cache and cache is None and not self.training:  # a training step has no use for the state
            cache = LinearAttentionCache(self.config.num_hidden_layers)
        past = cache.get_seq_length() if cache is not None else 0

        padding = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < n:
                raise ValueError(
                    f"attention_mask must be 2-D (batch, past + seq) = ({b}, {past + n}) with 1 for real tokens, "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            padding = attention_mask[:, -n:]
            if bool(padding.all()):
                padding = None

        # a decoding step the compiled blocks may take (one token per row, float32 on the CPU, no padding, no
        # gradient, the kernels not turned off): the kernels' setting is read once for the whole step
        implementation = None
        if (n == 1 and cache is not None and padding is None and hidden.dtype == torch.float32 and hidden.is_cpu
                and not torch.is_grad_enabled()):
            implementation = dispatch._requested(None)
        step = implementation is not None and implementation != "reference"

        rotary = None
        if self.config.position_embedding == "rope":
            if step and position_ids is None:  # the same float32 table as _rotary's, in one compiled call
                kernel = dispatch.rope_cos_sin_kernel(self.config.head_dim, self.config.rope_theta, past,
                                                      implementation=implementation)
                rotary = tuple(kernel()) if kernel is not None else None
            if rotary is None:
                if position_ids is None:
                    position_ids = torch.arange(past, past + n, device=hidden.device)[None]
                rotary = self._rotary(position_ids, hidden.dtype)

        layers = cache.layers if cache is not None else None
        blocks = list(self._modules["layers"]._modules.values())
        if layers is not None and len(layers) < len(blocks):
            if cache.layer_class_to_replicate is None:
                raise ValueError(f"this LinearAttentionCache has {len(layers)} layers but the model has {len(blocks)}; "
                                 f"build it for the model with LinearAttentionCache(config=model.config)")
            while len(layers) < len(blocks):  # a cache built without a layer count adds its layers as they are used
                layers.append(cache.layer_class_to_replicate())
        # every block's compiled step checked before any runs (each checks its hooks, the layer's own included); a
        # layer of another class (a wrapper, a subclass) always runs through its call
        built = ([layer._block_step(hidden, rotary, layers[i], implementation)
                  if type(layer) is LinearLMDecoderLayer else None for i, layer in enumerate(blocks)]
                 if step else [None] * len(blocks))
        headed = False
        if built and all(block is not None for block in built):  # all of them, the final norm and head in one call
            norm = self._modules["norm"]
            norm_args = (norm_arguments(norm, norm._parameters.get("weight"), _rms_eps(norm))
                         if type(norm) is nn.RMSNorm else None)
            hidden, headed = run_block_steps(hidden, built, norm_args, lambda h: self._final_norm(h, implementation),
                                             head, implementation)
        else:
            for i, (layer, block) in enumerate(zip(blocks, built)):
                hidden = (block.run(hidden) if block is not None  # compiled by itself, its neighbours as modules
                          else layer(hidden, rotary, padding, layers[i] if layers is not None else None))
            hidden = self._final_norm(hidden, implementation) if step else self.norm(hidden)
        return hidden, cache if use_cache else None, headed

    def _final_norm(self, hidden: torch.Tensor, implementation: str) -> torch.Tensor:
        """``self.norm(hidden)`` of a decoding step (:func:`~hf_efficient.decoding.rms_norm_step` for the plain
        module)."""
        norm = self._modules["norm"]
        if type(norm) is not nn.RMSNorm:
            return norm(hidden)
        return rms_norm_step(norm, hidden, norm._parameters.get("weight"), _rms_eps(norm), implementation)


class LinearLMForCausalLM(CacheReuseMixin, LinearLMPreTrainedModel, GenerationMixin):
    """Causal LM head on :class:`LinearLMModel`; ``generate()`` decodes with a recurrent cache (and refuses
    to continue one with a prompt it has not seen, see :class:`CacheReuseMixin`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LinearLMConfig) -> None:
        super().__init__(config)
        self.model = LinearLMModel(config)
        self.lm_head = DecodeLinear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits ``(batch, seq, vocab)`` (the last ``logits_to_keep`` positions if > 0); with
        ``labels`` ``(batch, seq)`` also the next-token loss (-100 = ignored)."""
        if "past_key_values" in kwargs:  # the pre-5.x name of `cache`
            cache = kwargs.pop("past_key_values") if cache is None else cache
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        if cache is not None and not torch.is_grad_enabled() and self._decoding_on_cpu(input_ids, inputs_embeds):
            # a decoding step reads every weight once: keep them back to back on huge pages (hf_efficient.decoding)
            place_for_decoding(self)
        model = self._modules["model"]
        if (labels is None and cache is not None and not torch.is_grad_enabled() and type(model) is LinearLMModel
                and not hooked((model,))):
            # the model without its module call (which would run nothing more), so that a decoding step runs the
            # head in the blocks' call; one position per row, which any non-negative int logits_to_keep keeps
            head = self._modules["lm_head"] if type(logits_to_keep) is int and logits_to_keep >= 0 else None
            hidden, cache, headed = model._run(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                                               use_cache, kwargs, head)
            if headed:
                return CausalLMOutputWithPast(logits=hidden, cache=cache)
        else:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
            hidden, cache = outputs.last_hidden_state, outputs.cache
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            # transformers' causal-LM loss: shifts labels, ignores -100, honours num_items_in_batch.
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def _decoding_on_cpu(self, input_ids, inputs_embeds) -> bool:
        """Whether this call is a compiled decoding step whose weights are not yet placed for it: one new token per
        row, float32 CPU weights, the kernels not turned off; checked on two weights (the head and the last
        layer's down projection: a load or assignment since the placement moves them)."""
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None or tokens.dim() < 2 or tokens.shape[1] != 1 or tokens.shape[0] > DECODE_MAX_ROWS:
            return False
        # attribute access, not _parameters: an adapter (LoRA) or a parametrization gives its weight as a property
        head = getattr(self.lm_head, "weight", None)
        if not isinstance(head, torch.Tensor):  # a head of another kind (a wrapper) reads its own weights
            return False
        layers = self.model.layers
        probes = (head, layers[-1].mlp.down_proj.weight) if len(layers) else (head,)
        return (head.device.type == "cpu" and head.dtype == torch.float32 and not kernels_turned_off()
                and not placed_for_decoding(self, *probes))

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        """generate() hook: the default would build a DynamicCache; a linear-lm model needs states."""
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, LinearAttentionCache):
                raise TypeError(
                    f"linear-lm models decode with a LinearAttentionCache, got {type(user_cache).__name__}"
                )
            user_cache._is_user_defined = True
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"linear-lm models decode with their own recurrent cache; cache_implementation="
                f"{generation_config.cache_implementation!r} is not supported (leave it unset)"
            )
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = LinearAttentionCache(self.config.num_hidden_layers)
