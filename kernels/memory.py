"""Where decoding weights live: one mapping of memory, in the order a step reads them, on huge pages.

A decoding step at batch 1 reads every weight once, so its time is the time to stream the weights from
memory. Spread over ordinary 4 KiB pages, in as many allocations as there are tensors, a step's reads stop
at every page and every allocation: measured here, a matrix-vector pass over a 6-layer model's weights
read 20-22 GB/s that way, and 30 GB/s (a plain streaming read's speed) once the same weights sat back to
back in memory advised for 2 MiB pages. :func:`huge_page_copies` makes such copies.

Each copy is a tensor with its *own* storage (``torch.frombuffer`` at an offset of one anonymous mapping),
so checkpoint writers that look for shared storage (safetensors, ``save_pretrained``) see separate
tensors, as before. The advice is only advice: where the system has no transparent huge pages (or is not
Linux) the copies are still contiguous and still correct.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
from collections.abc import Sequence

import torch

__all__ = ["HUGE_PAGE_BYTES", "huge_page_copies", "huge_page_empty"]

HUGE_PAGE_BYTES = 2 * 1024 * 1024
_ALIGN = 64  # a cache line: every copy starts on one, so vector loads never straddle two
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _advise_huge_pages(address: int, length: int) -> bool:
    """madvise(MADV_HUGEPAGE) on ``[address, address + length)`` (page-aligned); False where it cannot."""
    if not sys.platform.startswith("linux") or length <= 0:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def huge_page_empty(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of the given ``(shape, dtype)`` specs, back to back (in the given order, each on a
    cache line) in one private anonymous mapping advised for huge pages; each has a storage of its own.

    Memory is committed page by page as the tensors are written, so a caller that fills them one at a time and
    drops each original as it goes never holds two copies of everything. ``HF_EFFICIENT_HUGE_PAGES=0`` skips the
    advice (the tensors are still back to back).
    """
    specs = [(tuple(int(n) for n in shape), dtype) for shape, dtype in specs]
    counts = [math.prod(shape) for shape, _ in specs]
    sizes = [-(-n * torch.empty((), dtype=dtype).element_size() // _ALIGN) * _ALIGN
             for n, (_, dtype) in zip(counts, specs)]
    total = sum(sizes)
    if total == 0:
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    rounded = -(-total // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    # private, not mmap's default shared mapping: shared anonymous memory is shmem, which huge pages skip
    buffer = mmap.mmap(-1, rounded + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20))
    anchor = ctypes.c_char.from_buffer(buffer)
    base = ctypes.addressof(anchor)
    del anchor  # the tensors below keep the mapping alive through their own exports of it
    # one huge page of slack lets the data start on a huge-page boundary whatever address the mapping got
    start = -base % HUGE_PAGE_BYTES
    advice = os.environ.get("HF_EFFICIENT_HUGE_PAGES", "1").strip()
    if advice not in ("0", "1"):
        raise ValueError(f"HF_EFFICIENT_HUGE_PAGES={advice!r} is not understood; accepted: 1 (advise huge pages, the "
                         "default) or 0 (do not)")
    if advice == "1":
        _advise_huge_pages(base + start, rounded)
    out, offset = [], start
    with torch.inference_mode(False):  # ordinary tensors, usable later in training
        for (shape, dtype), n, size in zip(specs, counts, sizes):
            t = torch.frombuffer(buffer, dtype=dtype, count=n, offset=offset) if n else torch.empty(0, dtype=dtype)
            out.append(t.view(shape))
            offset += size
    return out


def huge_page_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU ``tensors`` made by :func:`huge_page_empty` (same values, shapes and dtypes, contiguous).
    Raises ``ValueError`` for a tensor that is not on the CPU."""
    tensors = list(tensors)
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            raise ValueError(f"huge_page_copies: CPU tensors only, got {getattr(t, 'device', type(t).__name__)}")
    copies = huge_page_empty([(t.shape, t.dtype) for t in tensors])
    with torch.inference_mode(False), torch.no_grad():
        for copy, t in zip(copies, tensors):
            copy.copy_(t)
    return copies
