"""The one registry of attention kinds.

A kind is a name, a dataclass of its knobs (validated in ``__post_init__``, saved as JSON in model
configs) and a forward function with one signature for every kind. The transformers integration,
``patch_model``, the efficient configs, the CLI and the benchmarks all read this table, so adding a
kind means writing its module and calling :func:`register_attention_kind` there.

The forward signature::

    forward(q, k, v, params, *, causal, key_padding_mask, query_padding_mask, scale, module)
    # q: (batch, heads, n_q, d), k: (batch, heads, n_k, d), v: (batch, heads, n_k, d_v)
    # masks: bool (batch, n), True = real token; module: the attention module (learnable state)
    # -> (batch, heads, n_q, d_v)

A kind that decodes with a state of constant size (a recurrent kind) also declares its decoding
form, which ``LinearAttentionCache`` runs for every cache layer of that kind::

    decode(state, q, k, v, params, *, key_padding_mask, scale, module) -> (out, new_state)
    # q, k: (batch, heads, T, d), v: (batch, heads, T, d_v): the T new tokens only (prefill T > 1,
    # decoding T = 1); state: None before the first token; key_padding_mask: (batch, T)
    # -> out (batch, heads, T, d_v) and the state after these tokens

The state is the kind's own object: ``state.map(fn)`` applies ``fn`` to each of its tensors (beam
search reorders, selects and repeats the batch dimension through it) and ``state.nbytes()`` counts
its bytes. Nothing here imports transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AttentionKind",
    "attention_kind_names",
    "get_attention_kind",
    "recurrent_kind_names",
    "register_attention_kind",
]


@dataclass(frozen=True)
class AttentionKind:
    """An attention kind.

    Attributes:
        name: registry key, e.g. ``"linear"``; also what users pass to ``patch_model``.
        params_class: dataclass of the kind's parameters, with defaults.
        forward: the function described in the module docstring.
        supports_causal: whether ``causal=True`` is implemented.
        supports_recurrent: whether the kind decodes with a constant-size state; True needs ``decode``
            (a kind given ``decode`` is recurrent).
        supports_bidirectional: whether ``causal=False`` is implemented (encoders).
        description: one line for ``--help`` texts and tables.
        decode: the decoding form described in the module docstring, or None.
    """

    name: str
    params_class: type
    forward: Callable[..., Any]
    supports_causal: bool
    supports_recurrent: bool = False
    description: str = ""
    supports_bidirectional: bool = True
    decode: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.decode is not None and not callable(self.decode):
            raise TypeError(f"attention kind {self.name!r}: decode must be callable or None, got "
                            f"{type(self.decode).__name__}")
        if self.decode is not None and not self.supports_causal:
            raise ValueError(f"attention kind {self.name!r}: a decoding form needs supports_causal=True")
        if self.supports_recurrent and self.decode is None:
            raise ValueError(f"attention kind {self.name!r}: supports_recurrent=True needs its decoding form "
                             "(decode=...)")
        object.__setattr__(self, "supports_recurrent", self.decode is not None)

    def make_params(self, **kwargs: Any):
        """Build validated parameters; unknown names give an error listing the accepted ones."""
        fields = {f.name for f in dataclasses.fields(self.params_class)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(
                f"attention kind {self.name!r} got unknown parameter(s) {unknown}; accepted: {sorted(fields)}"
            )
        return self.params_class(**kwargs)


_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(kind: AttentionKind) -> AttentionKind:
    """Add a kind to the registry (re-registering a name replaces it)."""
    if not isinstance(kind, AttentionKind):
        raise TypeError(f"register_attention_kind needs an AttentionKind (name, params_class, forward, ...), got "
                        f"{type(kind).__name__}")
    _KINDS[kind.name] = kind
    return kind


def get_attention_kind(name: str) -> AttentionKind:
    """Look a kind up by name; an unknown name raises ``ValueError`` listing the known kinds."""
    if isinstance(name, AttentionKind):
        return name
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown attention kind {name!r}; accepted: {', '.join(attention_kind_names())}") from None


def attention_kind_names() -> list[str]:
    """Names of all registered kinds, in registration order."""
    return list(_KINDS)


def recurrent_kind_names() -> list[str]:
    """Names of the kinds with a decoding form (``decode``), in registration order: the kinds that decode
    from ``LinearAttentionCache`` and that a softmax model can be linearised to."""
    return [name for name, kind in _KINDS.items() if kind.decode is not None]
