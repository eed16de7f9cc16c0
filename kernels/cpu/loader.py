"""Compile the C++ kernels on first use and cache the build.

Nothing is compiled at install time. The first call to :func:`load_extension` builds
``causal_linear.cpp`` (and the first call to :func:`load_clustered_extension` builds ``clustered.cpp``)
with ``torch.utils.cpp_extension.load`` into a folder under ``hf_efficient.assets.cache_dir()`` whose
name hashes the source, the torch version and the CPU (the build uses ``-march=native``, so a cache
shared between machines must not mix them). Any failure (no compiler, no ninja, a broken toolchain)
is remembered and reported by :func:`build_error` (:func:`clustered_build_error`); callers then use
the PyTorch reference.

``HF_EFFICIENT_SANITIZE=1`` builds instead with AddressSanitizer and UndefinedBehaviorSanitizer
(``-fsanitize=address,undefined``, any report aborts) into separate folders, for testing: the Python
process must then load the ASan runtime first, e.g.
``LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" ASAN_OPTIONS=detect_leaks=0
python -m pytest tests/kernels`` (libstdc++ right after the ASan runtime, so that ASan finds the real
``__cxa_throw``: the kernels raise C++ exceptions for bad input).
There is no fallback build in that mode, so a failed sanitizer build shows up as a missing kernel.

``HF_EFFICIENT_KERNEL_ARCH=<arch>`` replaces ``-march=native`` by ``-march=<arch>`` (for instance
``x86-64-v3`` for AVX2 without AVX-512, or ``x86-64`` for no vector extensions beyond SSE2), with no
fallback either. The kernels pick their vector code at compile time, so this is how the narrower code
paths are tested on a machine that has wider vectors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_error", "clustered_build_error", "decode_build_error", "decode_calls", "load_clustered_extension",
           "load_decode_extension", "load_extension"]

_SOURCE = Path(__file__).with_name("causal_linear.cpp")
_CLUSTERED_SOURCE = Path(__file__).with_name("clustered.cpp")
_lock = threading.Lock()
_module: Any = None
_error: str | None = None
_tried = False
# the clustered kernels are a second extension: a failed build of one leaves the other usable
_clustered_module: Any = None
_clustered_error: str | None = None
_clustered_tried = False
# the decoding kernels (decode.cpp) are a third extension, for the same reason
_DECODE_SOURCE = Path(__file__).with_name("decode.cpp")
_decode_module: Any = None
_decode_calls: Any = None  # the same extension's Python module: its direct calls skip torch.ops' schema matching
_decode_error: str | None = None
_decode_tried = False

# Tried in order: the fast build, then one without CPU-specific instructions.
_FLAG_SETS = (
    (["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]),
    (["-O3", "-fopenmp"], ["-fopenmp"]),
)
SANITIZE_ENV = "HF_EFFICIENT_SANITIZE"
_SANITIZE = "-fsanitize=address,undefined"
# One set, no fallback: a sanitizer build that silently became a plain one would check nothing.
_SANITIZE_FLAG_SETS = (
    (["-O1", "-g", "-march=native", "-fopenmp", _SANITIZE, "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"],
     ["-fopenmp", _SANITIZE]),
)


ARCH_ENV = "HF_EFFICIENT_KERNEL_ARCH"


def _flag_sets() -> tuple[tuple[list[str], list[str]], ...]:
    sets = _SANITIZE_FLAG_SETS if os.environ.get(SANITIZE_ENV) == "1" else _FLAG_SETS
    arch = os.environ.get(ARCH_ENV)
    if not arch:
        return sets
    if not arch.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"{ARCH_ENV}={arch!r}: expected a GCC -march name such as 'x86-64-v3' or 'native'")
    # one set, no fallback: a build that silently fell back would not test the asked-for code path
    cflags, ldflags = sets[0]
    cflags = [f for f in cflags if not f.startswith("-march=")] + [f"-march={arch}"]
    return ((cflags, ldflags),)


def _cpu_signature() -> str:
    """The CPU flags line on Linux (what -march=native depends on), else the processor name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir(flags: list[str], source: Path = _SOURCE) -> tuple[str, Path]:
    from hf_efficient.assets import cache_dir

    h = hashlib.sha256()
    for part in (source.read_bytes(), torch.__version__.encode(), _cpu_signature().encode(), " ".join(flags).encode()):
        h.update(part)
    tag = h.hexdigest()[:16]
    if _SANITIZE in flags:  # a folder of its own (the hash differs too), easy to tell apart
        tag = f"asan_{tag}"
    path = cache_dir() / "kernels" / f"{source.stem}_{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return f"hf_efficient_{source.stem}_{tag}", path


def _compile(source: Path, namespace: str, python_module: bool = False) -> tuple[Any, str | None]:
    """Build ``source`` (first flag set that works) and return ``(torch.ops.<namespace>, None)`` or
    ``(None, why)``; with ``python_module`` ``((torch.ops.<namespace>, the extension's Python module), None)``."""
    errors = []
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # a torch build without the extension tools
        return None, f"torch.utils.cpp_extension unavailable: {exc}"
    for cflags, ldflags in _flag_sets():
        name, path = _build_dir(cflags, source)
        verbose = bool(os.environ.get("HF_EFFICIENT_KERNELS_VERBOSE"))
        # Quiet: a failed build is reported by build_error(), and the reference still runs.
        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        try:
            if not verbose:
                log.setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = cpp_extension.load(
                    name=name,
                    sources=[str(source)],
                    extra_cflags=cflags,
                    extra_ldflags=ldflags,
                    build_directory=str(path),
                    verbose=verbose,
                    # the library registers torch.ops.<namespace> either way
                    is_python_module=python_module,
                )
            ops = getattr(torch.ops, namespace)
            return ((ops, loaded) if python_module else ops), None
        except Exception as exc:  # no compiler, failed compile, failed import: fall back
            errors.append(f"{' '.join(cflags)}: {type(exc).__name__}: {str(exc).strip()[-500:]}")
        finally:
            log.setLevel(level)
    return None, "; ".join(errors)


def load_extension() -> Any:
    """``torch.ops.hf_efficient_cpu`` (the compiled causal linear ops), building it on the first call; None if
    it cannot be built."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if _tried:
            return _module
        _module, _error = _compile(_SOURCE, "hf_efficient_cpu")
        _tried = True
        return _module


def load_clustered_extension() -> Any:
    """``torch.ops.hf_efficient_clustered_cpu`` (k-means, cluster sums/broadcasts, top-k products), built from
    ``clustered.cpp`` on the first call; None if it cannot be built."""
    global _clustered_module, _clustered_error, _clustered_tried
    if _clustered_tried:
        return _clustered_module
    with _lock:
        if _clustered_tried:
            return _clustered_module
        _clustered_module, _clustered_error = _compile(_CLUSTERED_SOURCE, "hf_efficient_clustered_cpu")
        _clustered_tried = True
        return _clustered_module


def load_decode_extension() -> Any:
    """``torch.ops.hf_efficient_decode_cpu`` (the matrix-vector product and the linear-attention step of one
    decoding token), built from ``decode.cpp`` on the first call; None if it cannot be built."""
    global _decode_module, _decode_calls, _decode_error, _decode_tried
    if _decode_tried:
        return _decode_module
    with _lock:
        if _decode_tried:
            return _decode_module
        loaded, _decode_error = _compile(_DECODE_SOURCE, "hf_efficient_decode_cpu", python_module=True)
        if loaded is not None:
            _decode_module, _decode_calls = loaded
        _decode_tried = True
        return _decode_module


def decode_calls() -> Any:
    """The decoding extension's Python module (None until :func:`load_decode_extension` built it): the hot
    functions of a decoding step (``decode_gemv``, ``decoder_block_step``, ``decode_rms_norm``, ``rotary_cos_sin``)
    as plain calls, about 4 us cheaper each than through ``torch.ops``, and ``decoder_stack_step``, which only it
    has (its blocks' arguments are Python tuples)."""
    return _decode_calls


def decode_build_error() -> str | None:
    """Why the decoding extension failed to build (None if it succeeded or was never tried)."""
    return _decode_error


def clustered_build_error() -> str | None:
    """Why the clustered extension failed to build (None if it succeeded or was never tried)."""
    return _clustered_error


def build_error() -> str | None:
    """Why the last build failed (None if it succeeded or was never tried)."""
    return _error
