"""Fresh tensors on huge pages: why writing a new 64 MiB tensor can cost more than computing it.

Lesson
------
`torch.empty(n)` for a large n returns memory the operating system has only promised: the C library
maps a fresh region (mmap) and no physical page stands behind it yet. The first write to each page
traps into the kernel, which finds a free page, zeroes it and maps it; then the write resumes. With the
usual 4 KiB pages a 64 MiB float32 tensor takes 16,384 such page faults, and on this project's test
machine (AMD EPYC, KVM) they cost about 28 ms, while bitsandbytes' whole NF4 decode of the same 16.8M
weights into memory that is already mapped takes about 3-4 ms (benchmarks/results/nf4_cpu.md). Freeing
the tensor unmaps the region, so the next call pays again.

Linux can back a region with 2 MiB "transparent huge pages" instead: one fault, one 2 MiB zeroing, 512
times fewer traps (and fewer TLB misses afterwards). Under the common setting
/sys/kernel/mm/transparent_hugepage/enabled = "madvise", a process asks for it per address range:

    madvise(start, length, MADV_HUGEPAGE)        # start and length whole 2 MiB pages

before the pages are touched. torch itself does this for every allocation of 2 MiB or more when the
environment variable THP_MEM_ALLOC_ENABLE=1 is set before it starts (it then also aligns them to 2 MiB);
`empty_on_huge_pages` does it for the one tensor it returns, so a caller that is about to write a large
output in full can have it without changing how the rest of the process allocates:

    tensor = torch.empty(numel)                                   # untouched memory
    [first 2 MiB boundary inside it ... last 2 MiB boundary inside it)   -> madvise(MADV_HUGEPAGE)
    the few KiB before and after that range stay on 4 KiB pages

It is advice, nothing more. With transparent huge pages set to "never", on a system without madvise,
when no free 2 MiB page is at hand, or when the C library handed back memory that was already mapped
(a reused heap block, which then has no faults to save), the kernel keeps 4 KiB pages: the tensor and
everything computed into it are the same either way; only the time to first write it differs. The price
of asking: under the usual defrag setting ("madvise") a fault in an advised range may first compact memory
to free a 2 MiB page, which can stall when memory is fragmented.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20  # 2 MiB: the x86-64 and (4 KiB-granule) ARM64 transparent huge page size
MIN_ADVISED_BYTES = 2 * HUGE_PAGE_BYTES  # below this, at most one whole huge page fits inside: not worth a call
MADVISE: list = []  # [libc madvise function, or None where there is none]; looked up on first use


def libc_madvise():
    """The C library's madvise(void *addr, size_t length, int advice), or None off Linux."""
    if not MADVISE:
        function = None
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                function = ctypes.CDLL(None, use_errno=True).madvise
                function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        MADVISE.append(function)
    return MADVISE[0]


def empty_on_huge_pages(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(numel, dtype=dtype) on the CPU, with the whole 2 MiB pages inside it advised to be huge.

    For a tensor the caller will overwrite in full (uninitialized, like torch.empty). Small tensors and
    systems without madvise get a plain torch.empty; a refused advice (errno) is ignored, as it only
    changes speed.
    """
    tensor = torch.empty(numel, dtype=dtype)
    nbytes = numel * tensor.element_size()
    madvise = libc_madvise() if nbytes >= MIN_ADVISED_BYTES else None
    if madvise is not None:
        start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES  # first 2 MiB boundary inside
        end = (tensor.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES  # last one
        if end > start:
            madvise(start, end - start, mmap.MADV_HUGEPAGE)
    return tensor
