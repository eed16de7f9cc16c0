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
        supports_recurrent: whether the kind decodes with a constant-size state (linear kinds).
        supports_bidirectional: whether ``causal=False`` is implemented (encoders).
        description: one line for ``--help`` texts and tables.
    """

    name: str
    params_class: type
    forward: Callable[..., Any]
    supports_causal: bool
    supports_recurrent: bool = False
    description: str = ""
    supports_bidirectional: bool = True

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
