"""``LinearAttentionCache``: a transformers ``Cache`` that holds recurrent states instead of keys and values.

Causal linear attention is an RNN: everything a new token needs from the past is, per layer,
S = sum_j phi(k_j) v_j^T ``(batch, heads, m, d_v)`` and z = sum_j phi(k_j) ``(batch, heads, m)``
(a :class:`~hf_efficient.attention.LinearAttentionState`). The cache keeps only that, so its size
is the same after 10 or 100,000 tokens.

Two ways in:

* models of the ``linear-lm`` family call :meth:`LinearAttentionLayer.attend` directly;
* stock decoders patched with ``patch_model(model, "linear")`` call ``cache.update(k, v, layer_idx)``
  as they would with a ``DynamicCache``. The layer returns the *new* keys/values, tagged with the
  attribute :data:`RECURRENT_TAG` pointing back at the layer; the attention function of each
  recurrent kind (wrapped by :func:`install_recurrent_attention`) sees the tag and runs the prefill
  (chunked form, seeded with the stored state) or the decoding step (recurrent form) through
  :meth:`LinearAttentionLayer.attend`. Layers a patched model keeps softmax get an ordinary
  ``DynamicLayer`` in the same cache.

Beam search works: ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave``
act on the batch dimension of the states. Cropping (assisted decoding) cannot undo a sum, so it is
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..attention.linear import LinearAttentionState, linear_attention, linear_attention_step
from ..attention.window_linear import window_linear_attention

__all__ = [
    "RECURRENT_TAG",
    "LinearAttentionCache",
    "LinearAttentionLayer",
    "WindowLinearAttentionLayer",
    "install_recurrent_attention",
]

# Attribute set on the key tensor returned by LinearAttentionLayer.update (see the module docstring).
RECURRENT_TAG = "hf_efficient_recurrent_layer"


class LinearAttentionLayer(CacheLayerMixin):
    """One layer's recurrent state; ``keys``/``values`` stay None (nothing grows with the sequence)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.state: LinearAttentionState | None = None
        self.seen_tokens = 0
        self._unread = False  # update() handed out keys that attend() has not consumed yet

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    # ------------------------------------------------------------------ recurrence
    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        feature_map="elu",
        key_padding_mask: torch.Tensor | None = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ) -> torch.Tensor:
        """Causal linear attention of the new tokens over everything seen so far; updates the state.

        Args:
            q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``: the T new tokens only.
            key_padding_mask: ``(batch, T)``, True/1 = real token; padded tokens add nothing to the state.

        Returns:
            ``(batch, heads, T, d_v)``. T > 1 (prefill) runs the chunked form seeded with the
            stored state; T == 1 (decoding) runs one recurrent step.
        """
        self._begin(q, k, v)
        if q.shape[2] == 1:
            state, out = linear_attention_step(
                self.state, q, k, v, feature_map=feature_map, key_padding_mask=key_padding_mask, eps=eps
            )
        else:
            out, state = linear_attention(
                q, k, v, causal=True, feature_map=feature_map, key_padding_mask=key_padding_mask, eps=eps,
                chunk_size=chunk_size, initial_state=self.state, return_state=True,
            )
        self.state = state
        self._consumed(q.shape[2])
        return out

    def _begin(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        if self.state is not None and self.batch_size != q.shape[0]:
            raise ValueError(
                f"LinearAttentionCache holds states for batch {self.batch_size} but got a batch of {q.shape[0]}"
            )

    def _consumed(self, tokens: int) -> None:
        self.seen_tokens += tokens
        self._unread = False

    def attend_with(self, params, q, k, v, *, feature_map, key_padding_mask=None, scale=None) -> torch.Tensor:
        """:meth:`attend` with the knobs of a kind's parameter dataclass (the stock-decoder path)."""
        return self.attend(q, k, v, feature_map=feature_map, key_padding_mask=key_padding_mask, eps=params.eps,
                           chunk_size=params.chunk_size)

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stock-decoder path: hand the new keys/values back, tagged so the attention function runs
        :meth:`attend` (which does the bookkeeping). ``(batch, kv_heads, T, d)`` in and out."""
        if self._unread:
            # The previous keys never reached attend(): this model's attention ignores the tag and
            # would silently attend to the new tokens only.
            raise ValueError(
                "this model's attention does not read LinearAttentionCache; patch it first with "
                "hf_efficient.patch_model(model, 'linear') and build the cache with LinearAttentionCache.from_model"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        setattr(key_states, RECURRENT_TAG, self)
        self._unread = True
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The 2-D padding mask covers past + new tokens; the attention reads its last T columns.
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0
        self._unread = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "LinearAttentionCache cannot remove tokens: the recurrent state is a sum over all of them. "
                "Assisted/speculative decoding is not supported with linear attention."
            )

    def _map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.state is not None:
            self.state = LinearAttentionState(fn(self.state.kv), fn(self.state.k_sum))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda t: t[indices])

    def offload(self) -> None:
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))

    @property
    def batch_size(self) -> int:
        return self.state.kv.shape[0] if self.state is not None else -1

    def nbytes(self) -> int:
        """Bytes held by this layer's state (0 before the first token)."""
        if self.state is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.state)


class WindowLinearAttentionLayer(LinearAttentionLayer):
    """One ``window-linear`` layer: the last ``window - 1`` keys/values plus the linear state of older
    keys (a :class:`~hf_efficient.attention.WindowLinearState`); bounded size however long the text."""

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        feature_map="elu",
        key_padding_mask: torch.Tensor | None = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
        window: int = 64,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Window-linear attention of the T new tokens ``(batch, heads, T, d)`` over all seen tokens."""
        self._begin(q, k, v)
        out, self.state = window_linear_attention(
            q, k, v, window=window, feature_map=feature_map, scale=scale, key_padding_mask=key_padding_mask,
            eps=eps, chunk_size=chunk_size, state=self.state, return_state=True,
        )
        self._consumed(q.shape[2])
        return out

    def attend_with(self, params, q, k, v, *, feature_map, key_padding_mask=None, scale=None) -> torch.Tensor:
        return self.attend(q, k, v, feature_map=feature_map, key_padding_mask=key_padding_mask, eps=params.eps,
                           chunk_size=params.chunk_size, window=params.window, scale=scale)

    def _map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)

    @property
    def batch_size(self) -> int:
        return self.state.keys.shape[0] if self.state is not None else -1

    def nbytes(self) -> int:
        return self.state.nbytes() if self.state is not None else 0


# Cache layer of each recurrent kind (the default is LinearAttentionLayer).
_RECURRENT_LAYERS = {"window-linear": WindowLinearAttentionLayer}


class LinearAttentionCache(Cache):
    """A ``Cache`` of per-layer recurrent states (constant size in the number of tokens).

    Args:
        num_layers: number of decoder layers; None adds recurrent layers lazily as they are used.
        softmax_layers: indices of layers that keep softmax attention (a partially patched model):
            they get an ordinary growing ``DynamicLayer``.

    Use :meth:`from_model` to build the right layout for a patched stock decoder, e.g.
    ``model.generate(**inputs, cache=LinearAttentionCache.from_model(model))``.
    """

    def __init__(
        self, num_layers: int | None = None, softmax_layers: Sequence[int] = (), window_layers: Sequence[int] = ()
    ) -> None:
        if num_layers is None:
            if softmax_layers:
                raise ValueError("LinearAttentionCache: softmax_layers needs num_layers")
            super().__init__(layer_class_to_replicate=LinearAttentionLayer)
            return
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"LinearAttentionCache: num_layers must be a positive int or None, got {num_layers!r}")
        softmax = set()
        for i in softmax_layers:
            if not isinstance(i, int) or not 0 <= i < num_layers:
                raise ValueError(f"LinearAttentionCache: softmax layer index {i!r} is not an int in [0, {num_layers})")
            softmax.add(i)
        windowed = set(window_layers)
        if windowed & softmax:
            raise ValueError("LinearAttentionCache: a layer cannot be both softmax and window-linear")
        def make(i: int) -> CacheLayerMixin:
            if i in softmax:
                return DynamicLayer()
            return WindowLinearAttentionLayer() if i in windowed else LinearAttentionLayer()

        layers = [make(i) for i in range(num_layers)]
        super().__init__(layers=layers)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> LinearAttentionCache:
        """The cache layout for ``model``: a ``linear-lm`` model, or a stock decoder patched with
        ``patch_model(model, "linear")`` (its per-layer plan is read from ``config.hf_efficient``)."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"LinearAttentionCache.from_model needs a transformers model, got {type(model).__name__}")
        config = config.get_text_config(decoder=True)
        record = getattr(config, "hf_efficient", None)
        if getattr(config, "model_type", None) == "linear-lm":
            return cls(config.num_hidden_layers)
        if not record:
            raise ValueError(
                f"{type(model).__name__} does not use linear attention: patch it first with "
                "hf_efficient.patch_model(model, 'linear'), or use a linear-lm model"
            )
        from ..attention.registry import get_attention_kind

        layers = record.get("layers") or []
        softmax, windowed = [], []
        for i, layer in enumerate(layers):
            kind = layer.get("kind")
            if kind is None:
                softmax.append(i)
            elif _RECURRENT_LAYERS.get(kind) is WindowLinearAttentionLayer:
                windowed.append(i)
            elif not get_attention_kind(kind).supports_recurrent:
                raise ValueError(
                    f"layer {i} uses attention kind {kind!r}, which has no recurrent form; LinearAttentionCache needs "
                    "every patched layer to be a recurrent kind such as 'linear'"
                )
        if len(softmax) == len(layers):
            raise ValueError("no layer of this model uses linear attention; use the default DynamicCache")
        return cls(len(layers), softmax, windowed)

    def nbytes(self) -> int:
        """Bytes held by the whole cache: recurrent states plus any softmax layers' keys/values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, LinearAttentionLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def recurrent_state(self, layer_idx: int):
        """The state of layer ``layer_idx``: a ``LinearAttentionState`` (a ``WindowLinearState`` for
        window-linear layers), None before its first token."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, LinearAttentionLayer):
            raise ValueError(f"layer {layer_idx} of this cache keeps softmax keys/values, not a recurrent state")
        return layer.state


# --------------------------------------------------------------------------- stock decoders
def _recurrent_wrapper(inner: Callable, kind_name: str) -> Callable:
    """Route attention calls whose keys came from a :class:`LinearAttentionLayer` to :meth:`attend`;
    everything else goes to ``inner`` (the integration's attention function, unchanged)."""
    from .attention_interface import _layer_for  # the integration's per-module lookup

    def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer_cache = getattr(key, RECURRENT_TAG, None)
        if layer_cache is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        layer = _layer_for(module, kind_name)
        if layer.kind is None:
            raise ValueError("a softmax layer received a recurrent cache layer; build the cache with "
                             "LinearAttentionCache.from_model(model)")
        params = layer.params
        if key.shape[1] != query.shape[1]:  # grouped-query attention: the state is per query head
            groups = query.shape[1] // key.shape[1]
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
            raise ValueError("LinearAttentionCache needs the 2-D padding mask of the hf_efficient mask function")
        padding = attention_mask[:, -query.shape[2]:] if attention_mask is not None else None
        feature_map = getattr(module, "hf_efficient_feature_map", None) or params.feature_map
        if layer.kind == "linear" and params.feature_map == "favor" and scaling is not None:
            query = query * (scaling * query.shape[-1] ** 0.5)  # as the linear kind's own forward does
        expected = _RECURRENT_LAYERS.get(layer.kind, LinearAttentionLayer)
        # by name: two remote-code checkpoints in one process bring two copies of these classes
        if type(layer_cache).__name__ != expected.__name__:
            raise ValueError(f"layer of kind {layer.kind!r} got a {type(layer_cache).__name__} in its cache; build the "
                             "cache with LinearAttentionCache.from_model(model)")
        out = layer_cache.attend_with(params, query, key, value, feature_map=feature_map, key_padding_mask=padding,
                                      scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    attention_forward.hf_efficient_recurrent = True
    attention_forward.__name__ = getattr(inner, "__name__", "attention_forward")
    return attention_forward


def install_recurrent_attention() -> None:
    """Let every recurrent kind's ``hf_efficient_<kind>`` attention function accept a
    :class:`LinearAttentionCache`. Idempotent; called on ``import hf_efficient``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    from ..attention.registry import attention_kind_names, get_attention_kind
    from .attention_interface import implementation_name, make_attention_function, register_with_transformers

    register_with_transformers()
    for kind in attention_kind_names():
        if not get_attention_kind(kind).supports_recurrent:
            continue
        name = implementation_name(kind)
        inner = ALL_ATTENTION_FUNCTIONS.get(name) or make_attention_function(kind)
        if getattr(inner, "hf_efficient_recurrent", False):
            continue
        AttentionInterface.register(name, _recurrent_wrapper(inner, kind))


# A LinearAttentionCache only exists once this module is imported, so this is where the attention
# functions learn to read it.
install_recurrent_attention()
