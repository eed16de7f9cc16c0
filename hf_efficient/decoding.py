"""Decoding at batch 1 on a CPU at the speed of reading the weights.

A generated token runs every weight once against a handful of rows, so a step's time is the time to stream
the weights from memory. Two things stand between a model and that floor, and this module removes both:

- :class:`DecodeLinear`: ``nn.Linear`` whose few-row products run the compiled matrix-vector kernel (the
  BLAS this PyTorch ships reads a weight at about half the speed of a plain streaming read).
- :func:`place_for_decoding`: the weights of the linear layers moved, in the order a step reads them, into
  one mapping advised for huge pages (:func:`hf_efficient_kernels.memory.huge_page_empty`): over separate
  4 KiB-paged allocations the same kernel read 20-22 GB/s here, back to back on huge pages 30 GB/s.

``linear-lm`` models use both by themselves; :func:`hf_efficient.patch_model` gives a decoder patched with a
recurrent kind (``linear``, ``window-linear``) both as well. Neither changes a parameter, a checkpoint or a
gradient: ``DecodeLinear`` is an ``nn.Linear`` (same state dict), and placement keeps every ``nn.Parameter``
object, swapping only the memory under it (each weight keeps a storage of its own).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from hf_efficient_kernels import dispatch
from hf_efficient_kernels.memory import huge_page_empty

try:  # where transformers keeps the outputs a running call collects (None outside such a call)
    from transformers.utils.output_capturing import _active_collector as _ACTIVE_COLLECTOR
except ImportError:  # another transformers: its hooks all count
    _ACTIVE_COLLECTOR = None
_CAPTURE_MODULE = "transformers.utils.output_capturing"

# BlockStep, run_block_steps, norm_arguments and linear_arguments are the package's own plumbing for its models'
# decoding steps, not part of the public API
__all__ = ["DecodeLinear", "as_decode_linear", "hooked", "kernels_turned_off", "place_for_decoding",
           "placed_for_decoding", "plain_linear", "rms_norm_step", "swap_classes"]

# floating dtypes whose weights a decoding step streams (the compiled product reads float32; the others still read
# faster back to back on huge pages)
_PLACED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLACEMENT = "_hf_efficient_decode_placement"


class DecodeLinear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoints) whose decoding steps read the weight at memory speed.

    For up to ``DECODE_MAX_ROWS`` rows of float32 on a CPU, with no gradient needed, the compiled matrix-vector
    product of ``hf_efficient_kernels.dispatch.decode_gemv_kernel`` runs (it streams each weight row once);
    everything else, training included, is ``torch.nn.functional.linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= dispatch.DECODE_MAX_ROWS * self.in_features:
            kernel = dispatch.decode_gemv_kernel(x, self.weight, self.bias)
            if kernel is not None:
                return kernel()
        return nn.functional.linear(x, self.weight, self.bias)


def swap_classes(model: nn.Module, classes: dict[type, type]) -> list[str]:
    """Give every module of ``model`` whose class is exactly a key of ``classes`` the class it maps to, in place (the
    same object, parameters and hooks; the classes must share their layout); returns the names of those modules."""
    names = []
    for name, module in model.named_modules():
        new = classes.get(type(module))
        if new is not None:
            module.__class__ = new
            names.append(name)
    return names


def as_decode_linear(model: nn.Module) -> list[str]:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`DecodeLinear` in place and return their names.
    Subclasses (quantised or adapter layers) are left as they are. :func:`plain_linear` undoes it."""
    return swap_classes(model, {nn.Linear: DecodeLinear})


def plain_linear(model: nn.Module) -> list[str]:
    """Undo :func:`as_decode_linear`: every :class:`DecodeLinear` of ``model`` becomes an ``nn.Linear`` again (the
    same object); returns their names."""
    return swap_classes(model, {DecodeLinear: nn.Linear})


def _idle_capture_hook(hook) -> bool:
    """Whether ``hook`` is transformers' own output-capturing hook while nothing is being captured. transformers
    puts these on decoder layers and attention modules the first time a model is asked for hidden states or
    attentions, and leaves them there; they record only while a call that asked for outputs is running, so until
    then they see nothing a compiled step would skip. Anything not recognised counts as a hook."""
    return (_ACTIVE_COLLECTOR is not None and getattr(hook, "__name__", None) == "output_capturing_hook"
            and getattr(hook, "__module__", None) == _CAPTURE_MODULE and _ACTIVE_COLLECTOR.get() is None)


def hooked(modules) -> bool:
    """Whether a forward hook (global, or on one of ``modules``), a ``forward`` set on one of the module objects
    (accelerate's hooks, a user's wrapper) or a ``Module.compile()`` of one of them would see these modules run: a
    compiled step that skips them must then step aside. transformers' output-capturing hooks count only while they
    capture."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    for m in modules:
        attributes = m.__dict__
        if m._forward_pre_hooks or "forward" in attributes or attributes.get("_compiled_call_impl") is not None:
            return True
        hooks = m._forward_hooks
        if hooks:
            for hook in hooks.values():
                if not _idle_capture_hook(hook):
                    return True
    return False


def norm_arguments(norm: nn.Module, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, float] | None:
    """``(weight, eps)`` for a compiled step to compute an RMSNorm module the caller knows computes
    ``torch.rms_norm(hidden, (n,), weight, eps)`` on float32 input, or None when the module must run itself (hooked,
    without a weight, a weight not in float32)."""
    if weight is None or weight.dtype != torch.float32 or hooked((norm,)):
        return None
    return weight, eps


def linear_arguments(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight, bias)`` for a compiled step to compute ``linear`` itself: exactly a :class:`DecodeLinear` (not a
    subclass, an adapter or a parametrization) without hooks, whose weight and bias (or None) are its parameters;
    else None (the module must run)."""
    params = linear._parameters
    # a weight or bias set as a plain tensor after its parameter was deleted is not in _parameters
    if type(linear) is not DecodeLinear or "weight" not in params or "bias" not in params or hooked((linear,)):
        return None
    return params["weight"], params["bias"]


class BlockStep(NamedTuple):
    """A decoder block's compiled decoding step, checked and not yet run: ``kernel`` (the compiled block, see
    ``hf_efficient_kernels.dispatch.decoder_block_step_kernel``) gives the block's output and its state tensors,
    which ``commit`` then keeps in the block's cache layer. The state was read when the step was made: run it once,
    before the next step of this layer."""

    kernel: dispatch.DecodeBlockStep
    commit: Callable[[list[torch.Tensor]], None]

    def run(self, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The block by itself on ``hidden`` (None: the input it was made for), its state kept; its output."""
        out, *state = self.kernel(hidden)
        self.commit(state)
        return out


def run_block_steps(hidden: torch.Tensor, steps: list[BlockStep], norm: tuple[torch.Tensor, float] | None,
                    final_norm: Callable[[torch.Tensor], torch.Tensor], head: nn.Module | None = None,
                    implementation: str | None = None) -> tuple[torch.Tensor, bool]:
    """Run a decoding step's blocks in order on ``hidden`` ``(batch, 1, hidden)``, then the final norm (``norm``: its
    :func:`norm_arguments`) and ``head`` (a causal LM's head, or None), as one compiled call
    (``decoder_stack_kernel``): Python between the blocks would run on code and data each weight stream has just
    evicted from the caches. A norm or head the kernels do not compute (``norm`` None, a head
    :func:`linear_arguments` refuses, weights the kernels do not read) runs after the call: ``final_norm(hidden)``,
    ``head`` not at all (the caller runs it). The states are kept once every block has run, so a block that fails
    leaves every cache layer as it was. Returns the output and whether the head ran."""
    head_args = linear_arguments(head) if head is not None and norm is not None else None
    kernels = [step.kernel for step in steps]
    stack = dispatch.decoder_stack_kernel(hidden, kernels, norm, head_args, implementation=implementation)
    tail = stack is not None  # the norm and head in the call
    if not tail:  # a norm or head the kernels do not read: the blocks alone (built, so the kernels take them)
        stack = dispatch.decoder_stack_kernel(hidden, kernels, implementation=implementation)
    hidden, states = stack()
    for step, state in zip(steps, states, strict=True):
        step.commit(state)
    if not tail or norm is None:
        hidden = final_norm(hidden)
    return hidden, tail and head_args is not None


def rms_norm_step(norm: nn.Module, hidden: torch.Tensor, weight: torch.Tensor | None, eps: float,
                  implementation: str | None = None) -> torch.Tensor:
    """``norm(hidden)`` for an RMSNorm module (``hidden`` ``(..., n)``) the caller knows computes
    ``torch.rms_norm(hidden, (n,), weight, eps)``: a decoding step's final norm, as one compiled call
    (``decode_rms_norm_kernel``), else that one fused op; the module itself when hooked, without a weight, or not
    in float32 (:func:`norm_arguments`). ``implementation``: the kernels' setting (None: read it)."""
    if hidden.dtype != torch.float32 or norm_arguments(norm, weight, eps) is None:
        return norm(hidden)
    kernel = dispatch.decode_rms_norm_kernel(hidden, weight, eps, implementation=implementation)
    if kernel is not None:
        return kernel()
    return torch.rms_norm(hidden, (hidden.shape[-1],), weight, eps)


def kernels_turned_off() -> bool:
    """``HF_EFFICIENT_KERNELS=reference``: the PyTorch path as it is, without the compiled kernels or the
    weight placement made for them (read and validated by the dispatcher)."""
    return dispatch._requested(None) == "reference"


def _decode_weights(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s linear layers in module order (the order a decoding step reads them), each
    once, that live on the CPU in a floating dtype. A parameter that shares its storage with another parameter
    (views of one fused tensor) is left out: copies of its own would silently stop the sharing."""
    owners: dict[int, set[int]] = {}
    for p in model.parameters():
        if p.device.type == "cpu":
            owners.setdefault(p.untyped_storage().data_ptr(), set()).add(id(p))
    seen, out = set(), []
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        for p in (module.weight, module.bias):
            if (p is None or id(p) in seen or p.device.type != "cpu" or p.dtype not in _PLACED_DTYPES
                    or p.numel() == 0 or len(owners.get(p.untyped_storage().data_ptr(), ())) > 1):
                continue
            seen.add(id(p))
            out.append(p)
    return out


def place_for_decoding(model: nn.Module) -> int:
    """Move the weights (and biases) of ``model``'s linear layers, in the order a decoding step reads them, into one
    mapping of memory advised for huge pages; returns the bytes moved (0 when they are already there).

    Every ``nn.Parameter`` stays the same object with the same values, dtype, shape and ``requires_grad`` (weights
    tied between modules stay tied); only ``.data`` changes, to a copy with a storage of its own, so optimisers,
    checkpoints and ``save_pretrained`` see no difference. CPU parameters only (others are left where they are).
    Called by ``linear-lm`` at its first compiled decoding step and by :func:`hf_efficient.patch_model` for recurrent
    kinds; ``HF_EFFICIENT_HUGE_PAGES=0`` keeps the copies but skips the huge-page advice.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"place_for_decoding: expected a torch.nn.Module, got {type(model).__name__}")
    params = _decode_weights(model)
    placed = model.__dict__.get(_PLACEMENT, frozenset())
    if params and all(p.data_ptr() in placed for p in params):
        return 0
    try:
        homes = huge_page_empty([(p.shape, p.dtype) for p in params])
    except OSError as error:  # no memory to map: decoding still works, from where the weights are
        warnings.warn(f"place_for_decoding: the weights stay where they are ({error})", RuntimeWarning, stacklevel=2)
        model.__dict__[_PLACEMENT] = frozenset(p.data_ptr() for p in params)
        return 0
    with torch.inference_mode(False), torch.no_grad():
        for p, home in zip(params, homes):  # one at a time: each old storage is freed as its copy is made
            p.data = home.copy_(p.data)
    model.__dict__[_PLACEMENT] = frozenset(p.data_ptr() for p in params)
    return sum(p.numel() * p.element_size() for p in params)


def placed_for_decoding(model: nn.Module, *weights: torch.Tensor) -> bool:
    """Whether ``weights`` (a cheap sample, checked on each decoding step) sit where :func:`place_for_decoding` put
    ``model``'s weights; a weight loaded or assigned since then reads False, and placement runs again."""
    placed = model.__dict__.get(_PLACEMENT)
    return placed is not None and all(w.data_ptr() in placed for w in weights)
