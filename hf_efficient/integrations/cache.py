"""``LinearAttentionCache``: a transformers ``Cache`` that keeps recurrent states instead of keys and values.

Causal linear attention is an RNN: everything a new token needs from the past is, per layer,
S = sum_j phi(k_j) v_j^T ``(batch, heads, m, d_v)`` and z = sum_j phi(k_j) ``(batch, heads, m)``
(a :class:`~hf_efficient.attention.LinearAttentionState`); window-linear adds the last
``window - 1`` keys/values. So a replaced layer's cache has the same size after 10 or 100,000
tokens. Each replaced layer gets a :class:`RecurrentStateLayer` of its kind, which runs the decoding
form the kind declares in the registry (``AttentionKind.decode``, see
:mod:`hf_efficient.attention.registry`): nothing here is particular to one kind. Layers a patched
model keeps softmax get transformers' own cache layers for their layer type:
``DynamicSlidingWindowLayer`` (bounded by the window) for sliding layers, ``DynamicLayer`` for full
ones. A hybrid model whose full layers are replaced (Gemma 3: 5 sliding : 1 full)
therefore decodes in constant memory as a whole, from one cache:
``LinearAttentionCache(config=model.config)``, which ``generate()`` builds by itself.

Two ways in:

* models of the ``linear-lm`` family call :meth:`LinearStateLayer.attend` directly;
* stock decoders call ``cache.update(k, v, layer_idx, kwargs=kwargs)`` as with any cache. A
  recurrent layer returns the new keys/values unchanged and adds itself to the attention module's
  keyword arguments (:data:`~.attention_interface.CACHE_KWARG`); the attention function then runs
  the kind's decoding form on the new tokens (prefill or one step) through
  :meth:`RecurrentStateLayer.attend_with`.

Beam search works: ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave`` act
on the batch dimension of the states. A state cannot be rewound: cropping (assisted decoding) is
refused, and ``generate()`` refuses a cache whose tokens are not the start of its input (see
:meth:`LinearAttentionCache.check_reuse`).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from ..attention.linear import linear_attention_decode
from ..attention.registry import get_attention_kind, recurrent_kind_names
from .attention_interface import CACHE_KWARG
from .plan import CONFIG_KEY, plan_from_record
from .surgery import LAYER_ATTRIBUTE, shares_kwargs_with_cache

__all__ = [
    "CacheReuseMixin",
    "LinearAttentionCache",
    "LinearStateLayer",
    "RecurrentStateLayer",
    "WindowRing",
]


class WindowRing(NamedTuple):
    """The window buffers behind a state the compiled window-linear step made (see
    :meth:`RecurrentStateLayer.window_ring`).

    state: the state whose keys, values and mask view the buffers; frontier: a one-item list, shared by every
    state viewing them, holding the first row no view handed out covers; end: the row after this state's view;
    capacity: rows the buffers have room for."""

    state: object
    frontier: list
    end: int
    capacity: int


class RecurrentStateLayer(CacheLayerMixin):
    """One replaced layer's state; ``keys``/``values`` stay None (nothing grows with the sequence).

    Args:
        kind: the registry name of a kind with a decoding form (``AttentionKind.decode``); the layer
            keeps that kind's state and runs its decoding form.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        found = get_attention_kind(kind)
        if found.decode is None:
            raise ValueError(f"attention kind {found.name!r} has no decoding form; the kinds that have one: "
                             f"{', '.join(recurrent_kind_names())}")
        self.kind = found.name  # the name, also when given the AttentionKind itself (layouts compare names)
        self.state = None
        self.seen_tokens = 0
        self.dtype: torch.dtype | None = None
        self._unread = False  # update() handed out keys that attend() has not consumed yet
        self._ring: WindowRing | None = None  # when the compiled step made the state's window buffers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    # ------------------------------------------------------------------ recurrence
    def advance(self, step: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Run ``step(state) -> (out, new_state)`` for the T new tokens ``q, k`` ``(batch, heads, T, d)``, ``v``
        ``(batch, heads, T, d_v)`` once they are checked to continue this state; keep the new state."""
        self._begin(q, k, v)
        out, state = step(self.state)
        self._check_step(out, state, q, v)
        self._keep(state, q.shape[2])
        return out

    def commit(self, state, x: torch.Tensor) -> None:
        """Keep ``state``, the state after the new tokens of ``x`` ``(batch, T, hidden)``, computed from this layer's
        state by a fused decoding step (a whole block in one compiled call, see ``linear-lm``); checked like
        :meth:`advance` to continue this state (batch, device, dtype)."""
        self._begin(x, x, x)
        self._keep(state, x.shape[1])

    def continues_in_float32(self) -> bool:
        """Whether a compiled float32 decoding step may continue this layer's state as it stands: filled by a
        float32 model, no keys handed out and left unread. A step that checked this (and the state's batch) before
        it ran keeps its result with :meth:`commit_token`; anything else takes the module path, which names the
        mismatch."""
        return self.is_initialized and self.dtype == torch.float32 and not self._unread

    def commit_token(self, state, ring: WindowRing | None = None) -> None:
        """Keep ``state``, the state after one new token per row, from a compiled step that checked
        :meth:`continues_in_float32` and the state's batch before it ran: :meth:`commit` without checking again
        (this runs for every layer of every decoded token). ``ring``: what :meth:`window_ring` gives for it."""
        self._keep(state, 1)
        self._ring = ring

    def window_ring(self) -> WindowRing | None:
        """The :class:`WindowRing` of the current state when its window keys, values and mask are views ending at
        row ``end`` of buffers the compiled step made; else None.

        The frontier is shared by every state viewing those buffers, this layer's copies included (``copy.copy``;
        a deep copy or a pickle gets buffers and a frontier of its own). A step may write the new key into row
        ``end`` in place only while ``frontier[0] == end`` (no other state has written past this one) and ``end <
        capacity``, and then moves the frontier on; so no state anyone holds ever changes. Any other state
        (replaced, reordered, from the modules) has no ring, and its step copies the window to new buffers."""
        ring = self.__dict__.get("_ring")  # absent in a layer pickled before it existed
        return ring if ring is not None and ring.state is self.state else None

    def _keep(self, state, tokens: int) -> None:
        """The state after ``tokens`` more tokens, checked by the caller."""
        self.state = state
        self.seen_tokens += tokens
        self._unread = False
        self._ring = None

    def _check_step(self, out, state, q: torch.Tensor, v: torch.Tensor) -> None:
        """A decoding form's result must be what the cache relies on: ``out`` ``(batch, heads, T, d_v)`` and a
        state with ``map(fn)`` and ``nbytes()`` (beam search and the size reports go through them)."""
        where = f"attention kind {self.kind!r}: its decoding form (AttentionKind.decode)"
        expected = (*q.shape[:3], v.shape[-1])
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"{where} returned an output of shape {got}; expected (batch, heads, T, d_v) = {expected}")
        missing = [name for name in ("map", "nbytes") if not callable(getattr(state, name, None))]
        if missing:
            raise TypeError(f"{where} returned a state of type {type(state).__name__} without {' and '.join(missing)}"
                            "(); the state must be an object with map(fn) (fn applied to each of its tensors) and "
                            "nbytes(), e.g. a NamedTuple of tensors with those two methods")

    def attend_with(self, params, q, k, v, *, module=None, key_padding_mask=None, scale=None) -> torch.Tensor:
        """The kind's decoding form with its parameter dataclass (the stock-decoder path).

        Args:
            params: the kind's parameters; module: the attention module (a learned feature map lives there).
            q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``: the T new tokens only.
            key_padding_mask: ``(batch, T)``, True = real token; scale: the softmax temperature.

        Returns:
            ``(batch, heads, T, d_v)``.
        """
        decode = get_attention_kind(self.kind).decode
        return self.advance(lambda state: decode(state, q, k, v, params, key_padding_mask=key_padding_mask,
                                                 scale=scale, module=module), q, k, v)

    def _begin(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        if self.state is None:
            return
        held = self._state_tensor()  # once: this runs for every layer of every decoded token
        if held.shape[0] != q.shape[0]:
            raise ValueError(f"LinearAttentionCache holds states for batch {held.shape[0]} but got a batch of "
                             f"{q.shape[0]}; use a fresh cache (or cache.reset()) for a new batch")
        device = held.device
        if device != k.device:
            raise ValueError(f"LinearAttentionCache holds its state on {device} but the model computes on {k.device}; "
                             "use a fresh cache after moving the model")
        if self.dtype is not None and k.dtype != self.dtype:
            raise ValueError(f"LinearAttentionCache was filled by a {self.dtype} model but now gets {k.dtype} keys; "
                             "use a fresh cache after changing the model's dtype")

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Stock-decoder path: hand the new keys/values ``(batch, kv_heads, T, d)`` back unchanged and
        offer this layer to the attention function through the module's keyword arguments."""
        if self._unread:
            # The previous keys never reached attend(): this model's attention ignored the cache layer
            # and would silently attend to the new tokens only.
            raise ValueError(
                "this model's attention does not read LinearAttentionCache; patch it first with "
                "hf_efficient.patch_model(model, 'linear') and build the cache with "
                "LinearAttentionCache(config=model.config). (Or an earlier call with this cache stopped with an "
                "error before its attention read the cache: the cache is then out of step; cache.reset() starts "
                "over.)"
            )
        shared = kwargs.get("kwargs")
        if not isinstance(shared, dict):
            raise ValueError(
                "this model's attention module does not pass its keyword arguments to the cache "
                "(cache.update(..., kwargs=kwargs)), so a recurrent cache cannot reach its attention; decode it with "
                "transformers' DynamicCache (generate() picks it by default for this architecture)"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        shared[CACHE_KWARG] = self
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
        self._ring = None
        self.seen_tokens = 0
        self._unread = False
        # a reset cache may be filled by another model (another dtype): it is initialised again by the next call
        self.dtype = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "LinearAttentionCache cannot remove tokens: the recurrent state is a sum over all of them. "
                "Assisted/speculative decoding is not supported with linear attention."
            )

    def _map_state(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.state is not None:
            self.state = self.state.map(fn)
            self._ring = None  # the mapped state has buffers of its own (or shares them without knowing the frontier)

    def _state_tensor(self) -> torch.Tensor:
        """A tensor of the state (the state's batch size and device are its)."""
        found = []
        self.state.map(lambda t: found.append(t) or t)
        return found[0]

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
        return self._state_tensor().shape[0] if self.state is not None else -1

    def nbytes(self) -> int:
        """Bytes held by this layer's state (0 before the first token), with the room the compiled window-linear
        step's buffers keep for the next keys."""
        if self.state is None:
            return 0
        if self.window_ring() is None:
            return self.state.nbytes()
        # the state's tensors view buffers of the compiled step's making: their whole storages are what it holds
        storages = {}

        def note(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self.state.map(note)
        return sum(storages.values())


class LinearStateLayer(RecurrentStateLayer):
    """A ``linear`` layer whose :meth:`attend` takes the knobs themselves (``linear-lm`` models call it)."""

    def __init__(self, **kwargs) -> None:
        super().__init__("linear", **kwargs)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **knobs) -> torch.Tensor:
        """Causal linear attention of the new tokens over everything seen so far; updates the state.

        Args:
            q, k: ``(batch, heads, T, d)``; v: ``(batch, heads, T, d_v)``: the T new tokens only.
            knobs: ``feature_map`` (a registry name or a feature-map module), ``key_padding_mask``
                (``(batch, T)``, True/1 = real token; padded tokens add nothing to the state), ``eps``,
                ``chunk_size``: those of :func:`~hf_efficient.attention.linear.linear_attention_decode`.

        Returns:
            ``(batch, heads, T, d_v)``. T > 1 (prefill) runs the chunked form seeded with the
            stored state; T == 1 (decoding) runs one recurrent step.
        """
        return self.advance(lambda state: linear_attention_decode(state, q, k, v, **knobs), q, k, v)


def _layers_for_config(config) -> list:
    """One cache layer per decoder layer of a model with this config (see the module docstring)."""
    text = config.get_text_config(decoder=True)
    if getattr(text, "model_type", None) == "linear-lm":
        return [LinearStateLayer() for _ in range(text.num_hidden_layers)]
    record = getattr(text, CONFIG_KEY, None)
    if not record:
        raise ValueError(
            f"a {getattr(text, 'model_type', type(text).__name__)!r} config does not use linear attention: patch the "
            "model first with hf_efficient.patch_model(model, 'linear'), or use a linear-lm model"
        )
    plan = plan_from_record(record)
    types, per_layer_kwargs = get_layer_types_and_kwargs(text)
    if len(types) != len(plan):
        raise ValueError(f"config.{CONFIG_KEY} plans {len(plan)} layers but the config has {len(types)}")
    layers = []
    for i, (layer, layer_type, kwargs) in enumerate(zip(plan, types, per_layer_kwargs, strict=True)):
        if layer.kind is None:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        elif get_attention_kind(layer.kind).decode is not None:
            layers.append(RecurrentStateLayer(layer.kind))
        else:
            raise ValueError(f"layer {i} uses attention kind {layer.kind!r}, which has no recurrent form; "
                             "LinearAttentionCache needs every replaced layer to be a recurrent kind "
                             f"({', '.join(recurrent_kind_names())})")
    return layers


def _describe(layer) -> tuple:
    return getattr(layer, "kind", type(layer).__name__), getattr(layer, "sliding_window", None)


def _digest(row: torch.Tensor) -> str:
    return hashlib.sha256(row.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


class LinearAttentionCache(Cache):
    """A ``Cache`` of per-layer recurrent states (constant size in the number of tokens).

    Build it for a model as transformers' caches are built: ``LinearAttentionCache(config=model.config)``
    (a patched model, an efficient checkpoint or a ``linear-lm`` model). ``generate()`` of such a
    model builds one by itself.

    Args:
        num_layers: (without ``config``) number of layers, all ``linear``; None adds ``linear``
            layers lazily as they are used.
        softmax_layers: (without ``config``) indices of layers that keep softmax attention: they get
            a growing ``DynamicLayer``.
        window_layers: (without ``config``) indices of ``window-linear`` layers.
        config: the model's config: the layout follows its plan and layer types.
    """

    def __init__(
        self,
        num_layers: int | None = None,
        softmax_layers: Sequence[int] = (),
        window_layers: Sequence[int] = (),
        *,
        config=None,
    ) -> None:
        self._owner: weakref.ref | None = None
        self._digests: list[str] | None = None
        self._digest_tokens = 0
        if config is not None:
            if num_layers is not None or softmax_layers or window_layers:
                raise TypeError("LinearAttentionCache: pass either config= or num_layers/softmax_layers/window_layers")
            super().__init__(layers=_layers_for_config(config))
            return
        if num_layers is None:
            if softmax_layers or window_layers:
                raise ValueError("LinearAttentionCache: softmax_layers/window_layers need num_layers")
            super().__init__(layer_class_to_replicate=LinearStateLayer)
            return
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"LinearAttentionCache: num_layers must be a positive int or None, got {num_layers!r}")
        indices = {}
        for name, spec in (("softmax", softmax_layers), ("window-linear", window_layers)):
            indices[name] = set()
            for i in spec:
                if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers:
                    raise ValueError(f"LinearAttentionCache: {name} layer index {i!r} is not an int in "
                                     f"[0, {num_layers})")
                indices[name].add(i)
        if indices["softmax"] & indices["window-linear"]:
            raise ValueError("LinearAttentionCache: a layer cannot be both softmax and window-linear")

        def make(i: int) -> CacheLayerMixin:
            if i in indices["softmax"]:
                return DynamicLayer()
            return RecurrentStateLayer("window-linear") if i in indices["window-linear"] else LinearStateLayer()

        super().__init__(layers=[make(i) for i in range(num_layers)])

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> LinearAttentionCache:
        """``LinearAttentionCache(config=model.config)``, after checking that the model's attention
        modules can reach a recurrent cache (GPT-NeoX's cannot: it decodes with ``DynamicCache``)."""
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"LinearAttentionCache.from_model needs a transformers model, got {type(model).__name__}")
        from_config = cls(config=config)
        for module in model.modules():
            layer = getattr(module, LAYER_ATTRIBUTE, None)
            if layer is not None and layer.kind is not None and not shares_kwargs_with_cache(type(module)):
                raise ValueError(
                    f"{type(module).__name__} does not pass its keyword arguments to the cache, so a recurrent cache "
                    "cannot reach its attention; generate() decodes this model with transformers' DynamicCache "
                    "(exact, but its memory grows with the length)"
                )
        return from_config

    # ------------------------------------------------------------------ Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.layer_class_to_replicate is None and not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"this LinearAttentionCache has {len(self.layers)} layers but the model called layer "
                             f"{layer_idx}; build it for the model with LinearAttentionCache(config=model.config)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def reset(self) -> None:
        super().reset()
        self._owner, self._digests, self._digest_tokens = None, None, 0

    def nbytes(self) -> int:
        """Bytes held by the whole cache: recurrent states plus the kept layers' keys/values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, RecurrentStateLayer):
                total += layer.nbytes()
            elif getattr(layer, "keys", None) is not None and layer.keys.numel():
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
        return total

    def recurrent_state(self, layer_idx: int):
        """The state of layer ``layer_idx`` as its kind's decoding form keeps it (a ``LinearAttentionState``
        for linear layers, a ``WindowLinearState`` for window-linear ones), None before its first token."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, RecurrentStateLayer):
            raise ValueError(f"layer {layer_idx} of this cache keeps softmax keys/values, not a recurrent state")
        return layer.state

    def __getstate__(self) -> dict:
        # Pickled without its owner (a weak reference): a copy in another process cannot be continued.
        return {**self.__dict__, "_owner": None}

    def __deepcopy__(self, memo: dict) -> LinearAttentionCache:
        # A deep copy in this process keeps its owner, so it continues like the original (prompt reuse).
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for name, value in self.__dict__.items():
            setattr(clone, name, value if name == "_owner" else copy.deepcopy(value, memo))
        return clone

    # ------------------------------------------------------------------ reuse across generate() calls
    def check_layout(self, config) -> None:
        """Raise ``ValueError`` unless this cache has the layout ``LinearAttentionCache(config=config)`` has."""
        if self.layer_class_to_replicate is not None and not self.layers:
            return  # lazy: grows to whatever the model asks for
        expected = [_describe(layer) for layer in _layers_for_config(config)]
        got = [_describe(layer) for layer in self.layers]
        if got != expected:
            raise ValueError(
                f"this LinearAttentionCache was built for another layer layout ({len(got)} layers: "
                f"{sorted({name for name, _ in got})}) than this model's ({len(expected)} layers: "
                f"{sorted({name for name, _ in expected})}); build it with LinearAttentionCache(config=model.config)"
            )

    def check_reuse(self, model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None) -> None:
        """Called by ``generate()`` before it uses this cache: a state can only be continued.

        A fresh (or reset) cache is accepted if its layout fits the model. A used one only by the
        model whose ``generate()`` filled it, with ``input_ids`` that start with exactly the tokens it
        has seen (or only the new tokens, with an ``attention_mask`` covering old + new), never by
        another model, after beam search, or after a forward outside ``generate()``.
        """
        seen = self.get_seq_length()
        if seen == 0 and not any(getattr(layer, "state", None) is not None for layer in self.layers):
            self.check_layout(model.config)
            return
        fresh = "pass a fresh cache (LinearAttentionCache(config=model.config)) or call cache.reset()"
        owner = self._owner() if self._owner is not None else None
        if owner is not model:
            who = "another model" if owner is not None else "a forward call outside generate()"
            raise ValueError(f"this LinearAttentionCache holds the state of {seen} tokens from {who}; {fresh}")
        if self._digests is None or self._digest_tokens != seen:
            raise ValueError(f"this LinearAttentionCache holds {seen} tokens that cannot be continued (the generate() "
                             "that filled it ran beam search, or the cache was used since); " + fresh)
        if input_ids is None:
            raise ValueError("continuing a LinearAttentionCache needs input_ids (the tokens are checked against it)")
        if input_ids.shape[0] != len(self._digests):
            raise ValueError(f"this LinearAttentionCache holds {len(self._digests)} rows but input_ids has "
                             f"{input_ids.shape[0]}; {fresh}")
        mask_length = attention_mask.shape[-1] if attention_mask is not None else input_ids.shape[1]
        if mask_length == input_ids.shape[1]:  # the full sequence: old tokens then new ones
            if input_ids.shape[1] <= seen or [_digest(row[:seen]) for row in input_ids] != self._digests:
                raise ValueError(
                    f"input_ids do not continue the {seen} tokens this LinearAttentionCache has seen: a recurrent "
                    f"state cannot be rewound or swapped for another prompt; {fresh}"
                )
        elif mask_length != seen + input_ids.shape[1]:
            raise ValueError(f"attention_mask covers {mask_length} tokens, but this cache has seen {seen} and "
                             f"input_ids adds {input_ids.shape[1]}")

    def record_generation(self, model, sequences: torch.Tensor | None) -> None:
        """Called by ``generate()`` after it used this cache: remember who filled it with which tokens."""
        self._owner = weakref.ref(model)
        seen = self.get_seq_length()
        self._digests, self._digest_tokens = None, seen
        if (isinstance(sequences, torch.Tensor) and sequences.dim() == 2 and sequences.shape[1] >= seen
                and sequences.shape[0] == self.batch_size):
            self._digests = [_digest(row[:seen]) for row in sequences]


class CacheReuseMixin:
    """Mixed into models that decode with a :class:`LinearAttentionCache`: ``generate()`` checks a
    cache it is given (:meth:`LinearAttentionCache.check_reuse`) and records what filled it, so a
    recurrent state is never silently continued with a prompt it has not seen."""

    def generate(self, inputs=None, *args, **kwargs):
        cache = kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")
        if isinstance(cache, LinearAttentionCache):
            input_ids = inputs if isinstance(inputs, torch.Tensor) else kwargs.get("input_ids")
            cache.check_reuse(self, input_ids, kwargs.get("attention_mask"))
        output = super().generate(inputs, *args, **kwargs)
        used = cache if isinstance(cache, LinearAttentionCache) else getattr(output, "cache", None)
        if isinstance(used, LinearAttentionCache):
            used.record_generation(self, output if isinstance(output, torch.Tensor) else output.sequences)
        return output


# Old names: LinearAttentionLayer shadowed transformers' own class of that name; a window-linear layer
# is now the generic layer of its kind, RecurrentStateLayer("window-linear").
_DEPRECATED = {
    "LinearAttentionLayer": (LinearStateLayer, "LinearStateLayer"),
    "WindowLinearStateLayer": (RecurrentStateLayer, "RecurrentStateLayer('window-linear')"),
    "WindowLinearAttentionLayer": (RecurrentStateLayer, "RecurrentStateLayer('window-linear')"),
    "RECURRENT_TAG": (CACHE_KWARG, "CACHE_KWARG"),
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        value, new = _DEPRECATED[name]
        warnings.warn(f"hf_efficient.integrations.cache.{name} is deprecated; use {new}", DeprecationWarning,
                      stacklevel=2)
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
