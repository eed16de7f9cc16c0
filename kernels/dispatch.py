"""The one place that decides whether a compiled kernel runs: each ``*_kernel`` function checks its
inputs and returns the kernel call, ready to run, or None, in which case the caller runs its PyTorch
path. The PyTorch paths live only in :mod:`hf_efficient.attention` (``hf_efficient.kernels`` offers
both together); this package imports nothing of ``hf_efficient``.

Order of precedence: the per-call ``implementation=`` argument, then the ``HF_EFFICIENT_KERNELS``
environment variable, then automatic choice. Accepted values for both:

* ``"auto"`` (default): the compiled kernel when it exists for the tensors' device and dtype and can
  be built/imported here, otherwise None (the PyTorch path);
* ``"reference"``: always None;
* ``"kernel"``: the compiled kernel, raising a ``RuntimeError`` that says why if it is unavailable.

:func:`available` reports what this machine can run, and why not.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import partial

import torch

__all__ = [
    "CLUSTERED_OPS",
    "DECODE_MAX_ROWS",
    "ENV_VAR",
    "FUSED_FEATURE_MAPS",
    "IMPLEMENTATIONS",
    "available",
    "causal_linear_feature_map_kernel",
    "causal_linear_kernel",
    "causal_linear_normalized_kernel",
    "centroid_topk_kernel",
    "cluster_broadcast_kernel",
    "cluster_mean_kernel",
    "clustered_topk_kernel",
    "DecodeBlockStep",
    "decode_gemv_kernel",
    "decode_rms_norm_kernel",
    "decoder_block_step_kernel",
    "decoder_stack_kernel",
    "hamming_kmeans_kernel",
    "improved_topk_kernel",
    "linear_decode_step_kernel",
    "rope_cos_sin_kernel",
    "rotary_cos_sin_kernel",
    "select_clustered_implementation",
    "select_implementation",
]

ENV_VAR = "HF_EFFICIENT_KERNELS"
IMPLEMENTATIONS = ("auto", "reference", "kernel")
# Tokens per block inside the CPU kernel when it applies the feature map itself (a speed knob; the result does
# not depend on it): 32 measured 6-15% faster than 64 at N = 8k-16k, d = 64, one thread (bench_linear_end_to_end).
# Only the backward uses it now: the forward runs the recurrence token by token in blocks it sizes by cache.
FUSED_CHUNK = 32
_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _requested(implementation: str | None) -> str:
    if implementation is None:
        value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"{ENV_VAR}={value!r} is not understood; accepted: {', '.join(IMPLEMENTATIONS)}")
        return value
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not understood; accepted: {', '.join(IMPLEMENTATIONS)}")
    return implementation


def _cpu_kernel() -> tuple[bool, str | None]:
    from .cpu import build_error, load_extension

    return load_extension() is not None, build_error()


def _triton_kernel() -> tuple[bool, str | None]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, None


def available(build: bool = True) -> dict:
    """What can run here.

    Args:
        build: build (or load from cache) the CPU kernel to answer; with False, report only whether it
            was already loaded in this process.

    Returns:
        ``{"cpu": bool, "cpu_error": str | None, "cpu_clustered": bool, "cpu_clustered_error": str | None,
        "cuda": bool, "cuda_error": str | None, "forced": str}``: ``cpu`` is the causal linear kernel,
        ``cpu_clustered`` the clustered-attention kernels (a separate build), ``forced`` the value of
        ``HF_EFFICIENT_KERNELS`` (``"auto"`` if unset).
    """
    if build:
        cpu, cpu_error = _cpu_kernel()
        clustered, clustered_error = _clustered_cpu_kernel()
    else:
        from .cpu import loader

        cpu = loader._module is not None
        cpu_error = loader.build_error() or (None if loader._tried else "not built yet")
        clustered = loader._clustered_module is not None
        clustered_error = loader.clustered_build_error() or (None if loader._clustered_tried else "not built yet")
    cuda, cuda_error = _triton_kernel()
    return {"cpu": cpu, "cpu_error": cpu_error, "cpu_clustered": clustered, "cpu_clustered_error": clustered_error,
            "cuda": cuda, "cuda_error": cuda_error, "forced": _requested(None)}


def select_implementation(phi_q: torch.Tensor, implementation: str | None = None) -> str:
    """``"kernel"`` or ``"reference"``: what causal linear attention runs for this input."""
    wanted = _requested(implementation)
    if wanted == "reference":
        return "reference"
    reason = None
    if phi_q.dtype not in _KERNEL_DTYPES:
        reason = f"dtype {phi_q.dtype} has no kernel (accepted: float32, float64, bfloat16, float16)"
    elif phi_q.device.type == "cpu":
        ok, err = _cpu_kernel()
        reason = None if ok else f"the CPU kernel could not be built: {err}"
    elif phi_q.device.type == "cuda":
        ok, err = _triton_kernel()
        reason = None if ok else err
    else:
        reason = f"no kernel for device {phi_q.device.type}"
    if reason is None:
        return "kernel"
    if wanted == "kernel":
        raise RuntimeError(f"causal_linear: implementation='kernel' was requested but {reason}")
    return "reference"


def causal_linear_kernel(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The compiled form of ``hf_efficient.attention.linear.causal_linear_chunked``: the inputs checked (phi_q, phi_k
    ``(batch, heads, n, m)``, v ``(batch, heads, n, e)``, initial ``(batch, heads, m, e)`` or None), then the kernel
    call without arguments giving y ``(batch, heads, n, e)`` and the final state ``(batch, heads, m, e)``; None
    where the PyTorch path runs. ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads
    ``HF_EFFICIENT_KERNELS``.
    """
    _check(phi_q, phi_k, v, initial, extra_cols=0)
    if select_implementation(phi_q, implementation) != "kernel":
        return None
    from .ops import causal_linear_op

    return partial(causal_linear_op, phi_q, phi_k, v, None if initial is None else initial.to(phi_q.dtype))


def causal_linear_normalized_kernel(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    eps: float = 1e-6,
    initial: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The compiled form of ``hf_efficient.attention.linear.causal_linear_normalized_reference``: the inputs checked
    (phi_q, phi_k ``(batch, heads, n, m)``, v ``(batch, heads, n, d_v)``, eps > 0, packed initial ``(batch, heads,
    m, d_v + 1)`` or None), then the kernel call without arguments giving out ``(batch, heads, n, d_v)`` and the
    packed state ``(batch, heads, m, d_v + 1)``; the normaliser is fused (no ``(batch, heads, n, d_v + 1)`` tensor);
    None where the PyTorch path runs. ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads
    ``HF_EFFICIENT_KERNELS``.
    """
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"causal_linear_normalized: eps must be a positive number, got {eps!r}")
    _check(phi_q, phi_k, v, initial, extra_cols=1, name="causal_linear_normalized")
    if select_implementation(phi_q, implementation) != "kernel":
        return None
    from .ops import causal_linear_normalized_op

    initial = None if initial is None else initial.to(phi_q.dtype)
    return lambda: causal_linear_normalized_op(phi_q, phi_k, v, initial, float(eps))[:2]


FUSED_FEATURE_MAPS = ("elu", "relu")


def causal_linear_feature_map_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str,
    eps: float = 1e-6,
    initial: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The compiled form of ``hf_efficient.attention.linear.causal_linear_feature_map``: the inputs checked (q, k
    ``(batch, heads, n, d)`` raw, v ``(batch, heads, n, d_v)``, eps > 0, packed initial ``(batch, heads, d, d_v +
    1)`` or None, key_mask ``(batch, n)`` bool or None), then the kernel call without arguments giving out ``(batch,
    heads, n, d_v)`` in float32 (float64 for float64 inputs) and the packed state; the map (one of
    :data:`FUSED_FEATURE_MAPS`) is applied to each chunk inside the CPU kernel, so None on other devices; None where
    the PyTorch path runs. ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads
    ``HF_EFFICIENT_KERNELS``.
    """
    name = "causal_linear_feature_map"
    if feature_map not in FUSED_FEATURE_MAPS:
        raise ValueError(f"{name}: feature_map must be one of {FUSED_FEATURE_MAPS}, got {feature_map!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{name}: eps must be a positive number, got {eps!r}")
    _check(q, k, v, initial, extra_cols=1, name=name, same_dtype=False)
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (q.shape[0], q.shape[2])):
        raise ValueError(f"{name}: key_mask must be a (batch, n) bool tensor, got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    if q.device.type != "cpu" or select_implementation(q, implementation) != "kernel":
        return None
    from .ops import FUSED_FEATURES, causal_linear_fused_op

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    initial = None if initial is None else initial.to(acc)
    return lambda: causal_linear_fused_op(q, k, v, initial, float(eps), FUSED_CHUNK, FUSED_FEATURES[feature_map],
                                          key_mask)[:2]


def _check(phi_q, phi_k, v, initial, extra_cols: int, name: str = "causal_linear", same_dtype: bool = True) -> None:
    """Shapes, dtypes and types; the state has v's columns plus ``extra_cols`` (the fused normaliser)."""
    for label, t in (("phi_q", phi_q), ("phi_k", phi_k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: {label} must be (batch, heads, n, dim), got shape {tuple(t.shape)}")
    if phi_q.shape != phi_k.shape or phi_q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{name}: expected phi_q, phi_k (batch, heads, n, m) and v (batch, heads, n, e), got "
            f"{tuple(phi_q.shape)}, {tuple(phi_k.shape)}, {tuple(v.shape)}"
        )
    if same_dtype and not (phi_q.dtype == phi_k.dtype == v.dtype):
        raise ValueError(
            f"{name}: phi_q, phi_k, v must share a dtype, got {phi_q.dtype}, {phi_k.dtype}, {v.dtype}"
        )
    b, h, _, m = phi_q.shape
    state_cols = v.shape[-1] + extra_cols
    if initial is not None and tuple(initial.shape) != (b, h, m, state_cols):
        raise ValueError(
            f"{name}: initial must be (batch, heads, m, {state_cols}) = {(b, h, m, state_cols)}, "
            f"got {tuple(initial.shape)}"
        )


# --------------------------------------------------------------------------- clustered attention
# Ops of clustered attention that have a CPU kernel. Where a kernel measured no faster than its PyTorch
# path at the sizes clustered attention runs (scripts/bench_kernels.py --clustered), "auto" keeps the
# reference; "kernel" still runs it.
CLUSTERED_OPS = ("hamming_kmeans", "cluster_mean", "cluster_broadcast", "clustered_topk", "centroid_topk")
_CLUSTERED_AUTO = {"hamming_kmeans": True, "cluster_mean": True, "cluster_broadcast": True, "clustered_topk": True,
                   "centroid_topk": True}
# CUDA tensors of these ops go to the Triton kernels (centroid_topk keeps its PyTorch path there).
_TRITON_CLUSTERED_OPS = ("hamming_kmeans", "cluster_mean", "cluster_broadcast", "clustered_topk")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _clustered_cpu_kernel() -> tuple[bool, str | None]:
    from .cpu import clustered_build_error, load_clustered_extension

    return load_clustered_extension() is not None, clustered_build_error()


def select_clustered_implementation(x: torch.Tensor, op: str, implementation: str | None = None) -> str:
    """``"kernel"`` or ``"reference"``: what the clustered op ``op`` (one of :data:`CLUSTERED_OPS`) runs for ``x``.

    CPU tensors have the C++ kernel (float32, float64, bfloat16, float16); CUDA tensors have the Triton
    kernels of :mod:`hf_efficient_kernels.triton.clustered` when triton is installed (float32, bfloat16,
    float16; ``centroid_topk`` has none). The k-means takes bool codes: any dtype there.
    """
    if op not in CLUSTERED_OPS:
        raise ValueError(f"unknown clustered op {op!r}; accepted: {', '.join(CLUSTERED_OPS)}")
    wanted = _requested(implementation)
    if wanted == "reference" or (wanted == "auto" and not _CLUSTERED_AUTO[op]):
        return "reference"
    reason = None
    if x.device.type == "cuda":
        if op not in _TRITON_CLUSTERED_OPS:
            reason = f"no Triton {op} kernel"
        elif op != "hamming_kmeans" and x.dtype not in _TRITON_DTYPES:
            reason = f"dtype {x.dtype} has no Triton kernel (accepted: float32, bfloat16, float16)"
        else:
            ok, err = _triton_kernel()
            reason = None if ok else err
    elif x.device.type != "cpu":
        reason = f"no {op} kernel for device {x.device.type}"
    elif op != "hamming_kmeans" and x.dtype not in _KERNEL_DTYPES:
        reason = f"dtype {x.dtype} has no kernel (accepted: float32, float64, bfloat16, float16)"
    else:
        ok, err = _clustered_cpu_kernel()
        reason = None if ok else f"the clustered CPU kernel could not be built: {err}"
    if reason is None:
        return "kernel"
    if wanted == "kernel":
        raise RuntimeError(f"{op}: implementation='kernel' was requested but {reason}")
    return "reference"


def _tensor(t, name: str, label: str, dim: int, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: {label} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: {label} must be {dtype}, got {t.dtype}")


def _check_assign(x: torch.Tensor, assign: torch.Tensor, name: str) -> None:
    _tensor(x, name, "x", 4)
    _tensor(assign, name, "assign", 3, torch.int64)
    if tuple(assign.shape[:2]) != tuple(x.shape[:2]):
        raise ValueError(f"{name}: assign must be (batch, heads, n) with x's batch and heads, got "
                         f"{tuple(assign.shape)} for x {tuple(x.shape)}")


def hamming_kmeans_kernel(
    bits: torch.Tensor, valid: torch.Tensor, clusters: int, iterations: int, *, implementation: str | None = None
) -> Callable[[], torch.Tensor] | None:
    """The compiled form of ``hf_efficient.attention.hashing.hamming_kmeans``: the inputs checked (bits bool ``(s, n,
    n_bits)``, valid bool ``(s, n)``, clusters >= 1, iterations >= 0), then the kernel call without arguments giving
    the same assignment, int64 ``(s, n)``: popcounts over 64-bit words on the CPU, +-1 signs through ``tl.dot`` in
    the Triton kernel; None where the PyTorch path runs. ``implementation``: ``"auto"``, ``"reference"`` or
    ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.
    """
    name = "hamming_kmeans"
    _tensor(bits, name, "bits", 3, torch.bool)
    _tensor(valid, name, "valid", 2, torch.bool)
    if tuple(valid.shape) != tuple(bits.shape[:2]):
        raise ValueError(f"{name}: valid must be (s, n) = {tuple(bits.shape[:2])}, got {tuple(valid.shape)}")
    for label, value, low in (("clusters", clusters, 1), ("iterations", iterations, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: {label} must be an int >= {low}, got {value!r}")
    if select_clustered_implementation(bits, name, implementation) != "kernel":
        return None
    if bits.device.type == "cuda":
        from .triton.clustered import triton_hamming_kmeans

        return partial(triton_hamming_kmeans, bits, valid, clusters, iterations)
    from .ops import hamming_kmeans_op

    return partial(hamming_kmeans_op, bits, valid, clusters, iterations)


def cluster_mean_kernel(
    x: torch.Tensor, assign: torch.Tensor, clusters: int, *, implementation: str | None = None
) -> Callable[[], torch.Tensor] | None:
    """The compiled form of ``hf_efficient.attention.clustered.cluster_mean``: the inputs checked (x ``(batch, heads,
    n, d)``, assign int64 ``(batch, heads, n)`` in ``[0, C)`` or -1, clusters C), then the kernel call without
    arguments giving ``(batch, heads, C, d)``, differentiable in x; None where the PyTorch path runs.
    ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.
    """
    _check_assign(x, assign, "cluster_mean")
    if select_clustered_implementation(x, "cluster_mean", implementation) != "kernel":
        return None
    if x.device.type == "cuda":
        from .triton.clustered import triton_cluster_mean

        return partial(triton_cluster_mean, x, assign, clusters)
    from .ops import cluster_sum_op

    return partial(cluster_sum_op, x, assign, clusters, True)


def cluster_broadcast_kernel(
    y: torch.Tensor, assign: torch.Tensor, *, implementation: str | None = None
) -> Callable[[], torch.Tensor] | None:
    """The compiled form of ``hf_efficient.attention.clustered.cluster_broadcast``: the inputs checked (y ``(batch,
    heads, C, e)``, assign int64 ``(batch, heads, n)`` in ``[0, C)`` or -1), then the kernel call without arguments
    giving ``(batch, heads, n, e)``, differentiable in y; None where the PyTorch path runs. ``implementation``:
    ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.
    """
    _check_assign(y, assign, "cluster_broadcast")
    if select_clustered_implementation(y, "cluster_broadcast", implementation) != "kernel":
        return None
    if y.device.type == "cuda":
        from .triton.clustered import triton_cluster_broadcast

        return partial(triton_cluster_broadcast, y, assign)
    from .ops import cluster_gather_op

    return partial(cluster_gather_op, y, assign, False)


def clustered_topk_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    *,
    implementation: str | None = None,
) -> Callable[[], torch.Tensor] | None:
    """The compiled form of ``hf_efficient.attention.clustered.clustered_topk``: the inputs checked (q ``(b, h, n,
    d)``, k ``(b, h, n_k, d)``, v ``(b, h, n_k, e)``, assign int64 ``(b, h, n)``, top int64 ``(b, h, C, t)``,
    key_mask bool ``(b, n_k)`` or None, scale), then the kernel call without arguments giving ``(batch, heads, n,
    e)``, differentiable in q, k, v; the kernel reads the top keys in place; None where the PyTorch path runs.
    ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.
    """
    name = "clustered_topk"
    for label, t in (("q", q), ("k", k), ("v", v)):
        _tensor(t, name, label, 4)
    _check_assign(q, assign, name)
    _tensor(top, name, "top", 4, torch.int64)
    b, h, n, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != k.shape[:3] or assign.shape[2] != n \
            or top.shape[:2] != (b, h):
        raise ValueError(f"{name}: expected q (b, h, n, d), k (b, h, n_k, d), v (b, h, n_k, e), assign (b, h, n), "
                         f"top (b, h, C, t); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, "
                         f"{tuple(assign.shape)}, {tuple(top.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _check_key_mask(key_mask, b, k.shape[2], name)
    if select_clustered_implementation(q, name, implementation) != "kernel":
        return None
    if q.device.type == "cuda":
        from .triton.clustered import triton_clustered_topk

        return partial(triton_clustered_topk, q, k, v, assign, top, key_mask, float(scale))
    from .ops import clustered_topk_op

    return lambda: clustered_topk_op(q, k, v, assign, top, key_mask, float(scale))[0]


def centroid_topk_kernel(
    cent: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    t: int,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The compiled form of ``hf_efficient.attention.clustered.centroid_topk``: the inputs checked (cent ``(b, h, C,
    d)``, k ``(b, h, n_k, d)``, v ``(b, h, n_k, e)``, key_mask bool ``(b, n_k)`` or None, scale, 1 <= t <= n_k),
    then the kernel call without arguments giving ``(top, mass, rest)`` without a ``(batch, heads, C, n_k)`` tensor;
    the kernel is forward only, so None when a gradient is needed (``"kernel"`` then raises); None where the PyTorch
    path runs. ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads ``HF_EFFICIENT_KERNELS``.
    """
    name = "centroid_topk"
    for label, x in (("cent", cent), ("k", k), ("v", v)):
        _tensor(x, name, label, 4)
    b, h, _, d = cent.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: expected cent (b, h, C, d), k (b, h, n_k, d), v (b, h, n_k, e); got "
                         f"{tuple(cent.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (cent.dtype == k.dtype == v.dtype):
        raise ValueError(f"{name}: cent, k, v must share a dtype, got {cent.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= k.shape[2]:
        raise ValueError(f"{name}: t must be an int in [1, n_k = {k.shape[2]}], got {t!r}")
    _check_key_mask(key_mask, b, k.shape[2], name)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (cent, k, v)):
        if _requested(implementation) == "kernel":
            raise RuntimeError(f"{name}: the kernel is forward only and an input requires a gradient")
        return None
    if select_clustered_implementation(cent, name, implementation) != "kernel":
        return None
    from .ops import centroid_topk_op

    return partial(centroid_topk_op, cent, k, v, key_mask, float(scale), t)


def improved_topk_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assign: torch.Tensor,
    top: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    mass: torch.Tensor,
    rest: torch.Tensor,
    *,
    implementation: str | None = None,
) -> Callable[[], torch.Tensor] | None:
    """The CPU kernel for improved clustered attention's last step, forward only: ``clustered_topk`` (arguments as
    in :func:`clustered_topk_kernel`) combined with the centroid half, ``mass_c * out_i + rest_c`` for query i of
    cluster c (mass ``(b, h, C)``, rest ``(b, h, C, e)`` in q's dtype), in one pass. None when a gradient is
    needed, on CUDA (the caller then runs the separate steps) or where the PyTorch path runs.
    """
    name = "improved_topk"
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, mass, rest)):
        return None
    if q.device.type != "cpu":
        return None
    run = clustered_topk_kernel(q, k, v, assign, top, key_mask, scale, implementation=implementation)
    if run is None:
        return None
    b, h, c = top.shape[:3]
    if tuple(mass.shape) != (b, h, c) or tuple(rest.shape) != (b, h, c, v.shape[-1]) \
            or mass.dtype != q.dtype or rest.dtype != q.dtype:
        raise ValueError(f"{name}: expected mass (b, h, C) = {(b, h, c)} and rest (b, h, C, e) = "
                         f"{(b, h, c, v.shape[-1])} in {q.dtype}; got {tuple(mass.shape)} {mass.dtype}, "
                         f"{tuple(rest.shape)} {rest.dtype}")
    from .ops import improved_topk_op

    return partial(improved_topk_op, q, k, v, assign, top, key_mask, float(scale), mass, rest)


def _check_key_mask(key_mask: torch.Tensor | None, b: int, n_k: int, name: str) -> None:
    if key_mask is not None:
        _tensor(key_mask, name, "key_mask", 2, torch.bool)
        if tuple(key_mask.shape) != (b, n_k):
            raise ValueError(f"{name}: key_mask must be (batch, n_k) = {(b, n_k)}, got {tuple(key_mask.shape)}")


# --------------------------------------------------------------------------- non-causal linear attention
def linear_feature_map_kernel(x: torch.Tensor, feature_map: str, implementation: str | None = None):
    """The compiled non-causal linear attention with a built-in feature map, for tensors like ``x``, or None.

    Returns ``run(q, k, v, eps, key_mask=None) -> out``: q ``(batch, heads, n_q, d)``, k ``(batch, heads, n_k,
    d)`` raw queries and keys, v ``(batch, heads, n_k, d_v)``, key_mask optional ``(batch, n_k)`` bool (False =
    padded key, skipped); out ``(batch, heads, n_q, d_v)`` in the inputs' dtype (accumulated in float32,
    float64 for float64), differentiable. None when the map is not ``elu``/``relu``, ``x`` is not a CPU tensor
    of a kernel dtype or the kernel cannot be built (then the caller runs its PyTorch path); with
    ``implementation="kernel"`` those cases raise ``RuntimeError`` instead.
    """
    wanted = _requested(implementation)
    if wanted == "reference":
        return None
    reason = None
    if feature_map not in FUSED_FEATURE_MAPS:
        reason = f"feature map {feature_map!r} is not built in (accepted: {', '.join(FUSED_FEATURE_MAPS)})"
    elif x.device.type != "cpu":
        reason = f"no non-causal kernel for device {x.device.type}"
    elif select_implementation(x, implementation) != "kernel":
        return None
    if reason is not None:
        if wanted == "kernel":
            raise RuntimeError(f"linear_feature_map_kernel: implementation='kernel' was requested but {reason}")
        return None
    from .ops import FUSED_FEATURES, linear_fused_op

    feature = FUSED_FEATURES[feature_map]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float,
            key_mask: torch.Tensor | None = None) -> torch.Tensor:
        name = "linear_feature_map_kernel"
        for label, t in (("q", q), ("k", k), ("v", v)):
            _tensor(t, name, label, 4, x.dtype)
        b, h, _, d = q.shape
        if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"{name}: expected q (b, h, n_q, d), k (b, h, n_k, d), v (b, h, n_k, d_v); got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        _check_key_mask(key_mask, b, k.shape[2], name)
        return linear_fused_op(q, k, v, float(eps), feature, key_mask)[0]

    return run


# --------------------------------------------------------------------------- decoding at batch 1
# Rows of x (batch x new tokens) up to which a linear layer runs the compiled matrix-vector product: a decoding
# step is bound by reading each weight once, which this kernel does in memory order; with more rows the BLAS
# matrix product, bound by arithmetic, is the faster one.
DECODE_MAX_ROWS = 4
_DECODE_FEATURES = {"elu": 1, "relu": 2}


_DECODE_BUILT = False  # set once the extension has loaded: a decoding step then skips the lookup
_DECODE_CALLS = None  # the extension's Python module: direct calls, without torch.ops' schema matching


def _decode_cpu_kernel() -> tuple[bool, str | None]:
    global _DECODE_BUILT, _DECODE_CALLS
    if _DECODE_BUILT:
        return True, None
    from .cpu import decode_build_error, decode_calls, load_decode_extension

    built = load_decode_extension() is not None
    # the calls first: another thread that finds the build done reads them next
    _DECODE_CALLS = decode_calls() if built else None
    _DECODE_BUILT = _DECODE_CALLS is not None
    return _DECODE_BUILT, decode_build_error()


def _decode_op(name: str):
    """The decoding extension's function ``name`` as a direct call (once :func:`_decode_cpu_kernel` built it)."""
    return getattr(_DECODE_CALLS, name)


def _decode_kernel_ready(tensors, implementation: str | None, name: str) -> bool:
    """Whether the decoding kernels run these tensors (CPU, no gradient needed, the extension built). Only a
    failed build under ``implementation="kernel"`` raises: the other cases are routing (the step is not a
    decoding step), for which the PyTorch path is the right one even when the kernels are forced."""
    for t in tensors:
        if not t.is_cpu:
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # no backward: training and gradient checks take the PyTorch path
    return _decode_route(implementation, name)


def _decode_route(implementation: str | None, name: str) -> bool:
    """Whether the decoding kernels are asked for (``implementation``, else the environment) and built; only a
    failed build under ``"kernel"`` raises."""
    wanted = _requested(implementation)
    if wanted == "reference":
        return False
    ok, err = _decode_cpu_kernel()
    if not ok and wanted == "kernel":
        raise RuntimeError(f"{name}: implementation='kernel' was requested but the CPU decoding kernels could not "
                           f"be built: {err}")
    return ok


def _linear_fits(weight: torch.Tensor, bias: torch.Tensor | None, n: int) -> bool:
    """Whether the compiled product reads ``weight`` ``(out, n)`` and ``bias`` ``(out,)`` or None: float32, the
    weight in rows of n contiguous floats that do not overlap."""
    return (weight.dtype == torch.float32 and weight.dim() == 2 and weight.shape[1] == n and weight.stride(1) == 1
            and (weight.shape[0] <= 1 or weight.stride(0) >= n)
            and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (weight.shape[0],))))


def _norm_fits(weight: torch.Tensor, n: int) -> bool:
    """Whether the compiled RMSNorm reads ``weight``: float32 ``(n,)``, contiguous."""
    return weight.dtype == torch.float32 and weight.dim() == 1 and weight.shape[0] == n and weight.is_contiguous()


def decode_gemv_kernel(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, implementation: str | None = None
) -> Callable[[], torch.Tensor] | None:
    """The compiled ``torch.nn.functional.linear(x, weight, bias)`` of a decoding step, or None.

    x ``(..., in)`` with at most :data:`DECODE_MAX_ROWS` rows, weight ``(out, in)``, bias ``(out,)`` or None, all
    float32 CPU tensors that need no gradient; the call gives ``(..., out)``. None where the PyTorch path runs
    (more rows, another dtype or device, a gradient needed); ``implementation="kernel"`` raises ``RuntimeError``
    only when the kernels cannot be built. ``implementation``: ``"auto"``, ``"reference"`` or ``"kernel"``; None reads
    ``HF_EFFICIENT_KERNELS``.
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if (x.dtype != torch.float32 or x.dim() < 1 or not _linear_fits(weight, bias, x.shape[-1])
            or x.numel() > DECODE_MAX_ROWS * max(1, x.shape[-1])
            or not _decode_kernel_ready(tensors, implementation, "decode_gemv")):
        return None
    return partial(_decode_op("decode_gemv"), x, weight, bias)


def decode_rms_norm_kernel(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, implementation: str | None = None
) -> Callable[[], torch.Tensor] | None:
    """The compiled ``torch.rms_norm(x, (n,), weight, eps)`` of a decoding step (a decoder's final norm), or None.

    x ``(..., n)``, weight ``(n,)`` contiguous, float32 CPU tensors that need no gradient; the call gives ``(...,
    n)``. None where the PyTorch path runs; ``implementation`` as for :func:`decode_gemv_kernel`.
    """
    if (x.dtype != torch.float32 or x.dim() < 1 or not _norm_fits(weight, x.shape[-1])
            or not _decode_kernel_ready((x, weight), implementation, "decode_rms_norm")):
        return None
    return partial(_decode_op("decode_rms_norm"), x, weight, float(eps))


def rotary_cos_sin_kernel(
    inv_freq: torch.Tensor, position: int, scaling: float, *, implementation: str | None = None
) -> Callable[[], list[torch.Tensor]] | None:
    """transformers' rotary table ``(cos, sin)``, each ``(1, 1, 2 * len(inv_freq))``, of the one position
    ``position`` for a decoding step: the same float32 ATen ops as the Python expression (``cat((f, f)).cos() *
    scaling`` with ``f = inv_freq * position``, the position rounded to float32 as there) in one call; or None
    (inv_freq not a float32 CPU vector needing no gradient)."""
    if (inv_freq.dtype != torch.float32 or inv_freq.dim() != 1
            or not _decode_kernel_ready((inv_freq,), implementation, "rotary_cos_sin")):
        return None
    return partial(_decode_op("rotary_cos_sin"), inv_freq, int(position), float(scaling))


def rope_cos_sin_kernel(
    head_dim: int, theta: float, position: int, *, implementation: str | None = None
) -> Callable[[], list[torch.Tensor]] | None:
    """A rotary table ``(cos, sin)``, each float32 ``(1, 1, 1, head_dim)``, of the one position ``position`` with
    frequencies ``theta ** (-2j / head_dim)`` for a decoding step: the float32 ATen ops of ``1.0 / (theta **
    (arange(0, head_dim, 2) / head_dim))``, then as :func:`rotary_cos_sin_kernel`, in one call; or None (an odd or
    non-positive ``head_dim``, the kernels not asked for)."""
    if head_dim < 2 or head_dim % 2 or not _decode_route(implementation, "rope_cos_sin"):
        return None
    return partial(_decode_op("rope_cos_sin"), int(head_dim), float(theta), int(position))


def linear_decode_step_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: torch.Tensor,
    k_sum: torch.Tensor,
    feature_map: str,
    eps: float = 1e-6,
    key_mask: torch.Tensor | None = None,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, torch.Tensor]] | None:
    """The compiled step of causal linear attention for one new token, or None.

    q, k ``(batch, heads, 1, d)`` raw (the map, one of :data:`FUSED_FEATURE_MAPS`, is applied inside), v ``(batch,
    heads, 1, d_v)``, float32 or bfloat16; the state before the token: kv ``(batch, heads, d, d_v)`` and k_sum
    ``(batch, heads, d)`` float32 (any strides); key_mask ``(batch,)`` bool (False: the token is padding and adds
    nothing) or None. The call gives ``(out (batch, heads, 1, d_v) in q's dtype, the new packed state (batch,
    heads, d, d_v + 1) float32)``; the state passed in is not written. None where the PyTorch path runs.
    """
    if q.dim() != 4:
        return None
    b, h, t, d = q.shape
    if (feature_map not in _DECODE_FEATURES or q.dtype not in (torch.float32, torch.bfloat16)
            or k.dtype != q.dtype or v.dtype != q.dtype or kv.dtype != torch.float32 or k_sum.dtype != torch.float32
            or t != 1 or d == 0 or tuple(k.shape) != (b, h, 1, d) or v.dim() != 4 or tuple(v.shape[:3]) != (b, h, 1)
            or v.shape[3] == 0 or tuple(kv.shape) != (b, h, d, v.shape[3]) or tuple(k_sum.shape) != (b, h, d)
            or (key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b,)))
            or not _decode_kernel_ready((q, k, v, kv, k_sum), implementation, "linear_decode_step")):
        return None
    return partial(torch.ops.hf_efficient_decode_cpu.linear_decode_step, q, k, v, kv, k_sum, key_mask,
                   _DECODE_FEATURES[feature_map], float(eps))


def decoder_block_step_kernel(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    biases: tuple[torch.Tensor | None, ...],
    rotary: tuple[torch.Tensor, torch.Tensor] | None,
    state: dict,
    heads: int,
    kv_heads: int,
    head_dim: int,
    feature_map: str,
    window: int,
    scale: float,
    eps: float,
    rms_eps: float,
    *,
    append: bool = False,
    implementation: str | None = None,
) -> DecodeBlockStep | None:
    """One decoder block (Llama, Mistral, Qwen2 layout) patched with ``linear`` (``window=0``) or ``window-linear``
    attention, for one new token per row, compiled; or None.

    x ``(batch, 1, hidden)`` with batch <= :data:`DECODE_MAX_ROWS`; weights ``(norm1, q, k, v, o, norm2, gate, up,
    down)`` (q ``(heads * head_dim, hidden)``, k/v ``(kv_heads * head_dim, hidden)``); biases of ``(q, k, v, o, gate,
    up, down)``, each a tensor or None; rotary ``(cos, sin)`` ``(batch or 1, 1, head_dim)`` or None; state: ``kv``
    ``(batch, heads, head_dim, head_dim)`` and ``k_sum`` ``(batch, heads, head_dim)`` (None for window-linear before
    any key left the window), and for window-linear ``keys``/``values`` ``(batch, heads, r, head_dim)`` and
    ``key_mask`` ``(batch, r)`` bool, each with contiguous rows. All float32 CPU tensors needing no gradient.

    The call gives ``[out (batch, 1, hidden), kv (batch, heads, head_dim, head_dim), k_sum (batch, heads,
    head_dim)]`` (the new linear state, views of one buffer; empty tensors while window-linear has none) and, for
    window-linear, the new ``keys``, ``values`` and ``key_mask``: views of new buffers with room for more rows or,
    with ``append``, of the given ones, whose row ``r`` (past the given view) is then the only thing written. The
    caller must know that no view it handed out covers that row (see ``RecurrentStateLayer.window_ring``); nothing
    else of an input is written. The call takes ``x`` or, as its argument, another input of x's shape, dtype and
    device (the output of the block before, once it is computed; the kernel checks it like ``x``); or hand the
    blocks of a step to :func:`decoder_stack_kernel`. None where the module path runs.
    """
    feature = _DECODE_FEATURES.get(feature_map)
    kv, k_sum = state.get("kv"), state.get("k_sum")
    keys, values, key_mask = state.get("keys"), state.get("values"), state.get("key_mask")
    if (feature is None or x.dim() != 3 or x.shape[1] != 1 or not 1 <= x.shape[0] <= DECODE_MAX_ROWS
            or len(weights) != 9 or len(biases) != 7
            or (window > 0 and (key_mask is None or key_mask.dtype != torch.bool))):
        return None
    # plain loops, one test per tensor: this runs for every layer of every decoded token
    f32 = torch.float32
    for w in weights:
        if w.dtype is not f32 or not w.is_cpu or not w.is_contiguous():
            return None
    others = (biases, (x, kv, k_sum, keys, values), rotary or ())
    for group in others:
        for t in group:
            if t is not None and (t.dtype is not f32 or not t.is_cpu):
                return None
    if torch.is_grad_enabled():  # no backward: a tensor needing a gradient takes the PyTorch path
        for group in (weights, *others):
            for t in group:
                if t is not None and t.requires_grad:
                    return None
    if not _decode_route(implementation, "decoder_block_step"):
        return None
    cos, sin = rotary if rotary is not None else (None, None)
    return DecodeBlockStep(x, (list(weights), list(biases), cos, sin, kv, k_sum, keys, values, key_mask, int(heads),
                               int(kv_heads), int(head_dim), feature, int(window), float(scale), float(eps),
                               float(rms_eps), bool(append)))


class DecodeBlockStep:
    """One compiled decoder block of a decoding step (:func:`decoder_block_step_kernel`): ``step()`` runs it on its
    ``x``, ``step(hidden)`` on another input of x's shape, dtype and device; ``arguments`` are the kernel's arguments
    after the input, which :func:`decoder_stack_kernel` takes."""

    __slots__ = ("arguments", "x")

    def __init__(self, x: torch.Tensor, arguments: tuple) -> None:
        self.x, self.arguments = x, arguments

    def __call__(self, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
        return _decode_op("decoder_block_step")(self.x if hidden is None else hidden, *self.arguments)


def decoder_stack_kernel(
    x: torch.Tensor,
    blocks: list[DecodeBlockStep],
    norm: tuple[torch.Tensor, float] | None = None,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    *,
    implementation: str | None = None,
) -> Callable[[], tuple[torch.Tensor, list[list[torch.Tensor]]]] | None:
    """A decoding step's blocks, in order, then optionally the final RMSNorm and the head's product, in one compiled
    call (nothing runs between the blocks' weight streams); or None.

    x ``(batch, 1, hidden)``: the first block's input; blocks: each block's :class:`DecodeBlockStep` (made for an
    input of x's shape, dtype and device; each block's input is the output of the one before); norm: ``(weight
    (hidden,), eps)`` of ``torch.rms_norm`` after the last block, or None; head: ``(weight (vocab, hidden), bias
    (vocab,) or None)`` of ``torch.nn.functional.linear`` after the norm, or None (a head needs the norm). The call
    gives the last output (``(batch, 1, vocab)`` with a head, else ``(batch, 1, hidden)``) and each block's state
    tensors (its call's results after the output), to be kept only once the call has returned: a block that fails
    raises after the blocks before it ran. None where each block runs by itself (another dtype or device, a weight
    not laid out as the kernels read it, a gradient needed).
    """
    if not blocks or x.dim() != 3 or (head is not None and (norm is None or norm[0] is None)):
        return None
    n = x.shape[-1]
    norm_weight, norm_eps = norm if norm is not None else (None, 0.0)
    head_weight, head_bias = head if head is not None else (None, None)
    if ((norm_weight is not None and not _norm_fits(norm_weight, n))
            or (head_weight is not None and not _linear_fits(head_weight, head_bias, n))):
        return None
    tensors = [t for t in (x, norm_weight, head_weight, head_bias) if t is not None]
    if not _decode_kernel_ready(tensors, implementation, "decoder_stack_step"):
        return None
    return partial(_decode_op("decoder_stack_step"), x, [block.arguments for block in blocks], norm_weight,
                   float(norm_eps), head_weight, head_bias)
