"""Feature maps phi for linear attention: sim(q, k) = phi(q) . phi(k), phi >= 0.

Every map is an ``nn.Module`` taking ``(..., d)`` and returning non-negative ``(..., m)`` features
in float32 (float64 inputs stay float64, for gradcheck). Half-precision inputs are upcast here,
so the sums of the normaliser never run in fp16/bf16.

Registry names: ``elu`` (elu(x)+1, the default of "Transformers are RNNs"), ``relu``, ``favor``
(positive orthogonal random features approximating the softmax kernel) and ``hedgehog`` (a
learnable softmax-of-projection map, used to linearise pretrained models).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FEATURE_MAPS",
    "EluFeatureMap",
    "FavorFeatureMap",
    "FeatureMap",
    "HedgehogFeatureMap",
    "ReluFeatureMap",
    "get_feature_map",
    "resolve_feature_maps",
]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FeatureMap(nn.Module):
    """Base class: ``forward(x: (..., d)) -> (..., m)`` non-negative, float32/float64."""

    def feature_dim(self, head_dim: int) -> int:
        """Size m of the features for inputs of size ``head_dim``."""
        return head_dim


class EluFeatureMap(FeatureMap):
    """phi(x) = elu(x) + 1 (strictly positive)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x.to(_compute_dtype(x))).add_(1.0)  # in place on elu's fresh output (its backward reads x)


class ReluFeatureMap(FeatureMap):
    """phi(x) = relu(x). Rows can be all zero; the normaliser's eps then yields a zero output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x.to(_compute_dtype(x)))


class FavorFeatureMap(FeatureMap):
    """Positive orthogonal random features (FAVOR+): E[phi(q).phi(k)] = exp(q.k / sqrt(d)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m) with x' = x / d^(1/4) and W of orthogonal Gaussian
    blocks. The exponent is bounded above by |w|^2 / 2 (about d/2), but not below: inputs of large norm
    give features that underflow. ``linear_attention`` therefore works from :meth:`log_features` with
    shifts that cancel between numerator and normaliser.

    Args:
        head_dim: d, the size of q and k.
        num_features: m, defaults to d.
        seed: seed of the projection; the same seed gives the same features on every call.
    """

    def __init__(self, head_dim: int, num_features: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.num_features = num_features or head_dim
        self.seed = seed
        self.register_buffer("projection", self._draw(seed), persistent=True)

    def _draw(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        d, m = self.head_dim, self.num_features
        blocks = []
        for _ in range(math.ceil(m / d)):
            gaussian = torch.randn(d, d, generator=gen, dtype=torch.float64)
            q, _ = torch.linalg.qr(gaussian)
            blocks.append(q.T)
        w = torch.cat(blocks)[:m]
        # Orthogonal rows have unit norm; give them the norms of Gaussian rows (chi with d dof).
        norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)
        return (w * norms).float()

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw a new projection (``seed`` defaults to the previous seed + 1)."""
        self.seed = self.seed + 1 if seed is None else seed
        self.projection.copy_(self._draw(self.seed))

    def feature_dim(self, head_dim: int) -> int:
        return self.num_features

    def log_features(self, x: torch.Tensor) -> torch.Tensor:
        """The exponent ``W x' - |x'|^2 / 2`` ``(..., m)`` of the features, before any stabilising shift.

        Linear attention works from these: exponentiating them directly underflows to zero for inputs of
        large norm (``|x| ~ 48`` at d = 64 gives exponents near -144), so it subtracts shifts first
        (see ``hf_efficient.attention.linear``).
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"favor feature map was built for dim {self.head_dim}, got inputs of dim {x.shape[-1]}")
        dtype = _compute_dtype(x)
        x = x.to(dtype) * self.head_dim**-0.25
        proj = x @ self.projection.to(device=x.device, dtype=dtype).T
        return proj - 0.5 * x.pow(2).sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unshifted features ``exp(log_features(x)) / sqrt(m)``; zero where the exponent underflows."""
        return torch.exp(self.log_features(x)) * self.num_features**-0.5


class HedgehogFeatureMap(FeatureMap):
    """Learnable map phi(x) = [softmax(x W_h + b_h), softmax(-(x W_h + b_h))] per head.

    Trained by attention transfer to mimic softmax attention ("linearising" a pretrained model).
    Initialised to the identity projection. Inputs are ``(batch, heads, seq, d)``.

    Args:
        num_heads: H, one projection per head.
        head_dim: d.
        feature_dim: half of the output size m (m = 2 * feature_dim), defaults to d.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.half = feature_dim or head_dim
        weight = torch.zeros(num_heads, head_dim, self.half)
        weight[:, : min(head_dim, self.half), : min(head_dim, self.half)] = torch.eye(min(head_dim, self.half))
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, self.half))

    def feature_dim(self, head_dim: int) -> int:
        return 2 * self.half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_heads or x.shape[-1] != self.head_dim:
            raise ValueError(
                f"hedgehog feature map expects (batch, {self.num_heads}, seq, {self.head_dim}), got {tuple(x.shape)}"
            )
        dtype = _compute_dtype(x)
        z = torch.matmul(x.to(dtype), self.weight.to(dtype)) + self.bias.to(dtype)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


# name -> factory(head_dim, num_heads, **options)
FEATURE_MAPS: dict[str, Callable[..., FeatureMap]] = {
    "elu": lambda head_dim, num_heads=None, **kw: EluFeatureMap(),
    "relu": lambda head_dim, num_heads=None, **kw: ReluFeatureMap(),
    "favor": lambda head_dim, num_heads=None, **kw: FavorFeatureMap(head_dim, **kw),
    "hedgehog": lambda head_dim, num_heads=None, **kw: HedgehogFeatureMap(_need_heads(num_heads), head_dim, **kw),
}

_CACHE: dict[tuple, FeatureMap] = {}


def _need_heads(num_heads: int | None) -> int:
    if num_heads is None:
        raise ValueError("the hedgehog feature map needs num_heads (it learns one projection per head)")
    return num_heads


FeatureMapSpec = str | FeatureMap | Callable[[torch.Tensor], torch.Tensor]


def get_feature_map(spec: FeatureMapSpec, head_dim: int, num_heads: int | None = None) -> Callable:
    """Turn a name, module or callable into a feature map.

    Names are looked up in :data:`FEATURE_MAPS`. Stateless and seeded maps built from a name are
    cached, so ``feature_map="favor"`` gives the same features on every call (seed 0); build a
    :class:`FavorFeatureMap` yourself for another seed or to redraw.
    """
    if isinstance(spec, str):
        if spec not in FEATURE_MAPS:
            raise ValueError(f"unknown feature map {spec!r}; accepted: {', '.join(sorted(FEATURE_MAPS))}")
        if spec == "hedgehog":
            return FEATURE_MAPS[spec](head_dim, num_heads)
        key = (spec, head_dim)
        if key not in _CACHE:
            _CACHE[key] = FEATURE_MAPS[spec](head_dim, num_heads)
        return _CACHE[key]
    if callable(spec):
        return spec
    raise TypeError(
        f"feature_map must be a name ({', '.join(sorted(FEATURE_MAPS))}), a module/callable, or a "
        f"(query_map, key_map) pair; got {type(spec).__name__}"
    )


def resolve_feature_maps(spec, head_dim: int, num_heads: int | None = None) -> tuple[Callable, Callable]:
    """Return ``(query_map, key_map)``; a pair gives different maps for queries and keys."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"a feature_map pair must be (query_map, key_map), got {len(spec)} items")
        return get_feature_map(spec[0], head_dim, num_heads), get_feature_map(spec[1], head_dim, num_heads)
    fmap = get_feature_map(spec, head_dim, num_heads)
    return fmap, fmap
