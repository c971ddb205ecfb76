"""empty_on_huge_pages: a plain torch.empty whose whole 2 MiB pages inside are advised huge (madvise).

The advice shows in /proc/self/smaps: madvise splits the mapping, and the advised part carries the "hg"
VmFlag. Values written there read back like any tensor's (the dequantize tests in test_nf4.py run on
outputs of both kinds and compare with bitsandbytes bit for bit).
"""

import sys
from pathlib import Path

import torch

from minift.quant.huge_pages import HUGE_PAGE_BYTES, MIN_ADVISED_BYTES, empty_on_huge_pages, libc_madvise


def vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (from /proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_large_tensor_gets_the_advice_on_its_whole_huge_pages():
    tensor = empty_on_huge_pages(3 * HUGE_PAGE_BYTES // 4 + 5, torch.float32)  # 6 MiB + 20 bytes
    assert tensor.shape == (3 * HUGE_PAGE_BYTES // 4 + 5,) and tensor.dtype == torch.float32
    tensor.fill_(1.5)
    assert (tensor == 1.5).all()
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES  # first whole huge page inside
    end = (tensor.data_ptr() + tensor.numel() * 4) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    assert end - start >= 2 * HUGE_PAGE_BYTES
    if sys.platform.startswith("linux") and Path("/sys/kernel/mm/transparent_hugepage").exists():  # THP built in
        assert libc_madvise() is not None
        assert "hg" in vm_flags_at(start) and "hg" in vm_flags_at(end - 1)


def test_advice_covers_exactly_the_whole_huge_pages_and_skips_small_tensors(monkeypatch):
    import mmap

    import minift.quant.huge_pages as huge_pages

    calls = []
    monkeypatch.setattr(huge_pages, "MADVISE", [lambda *args: calls.append(args) or 0])
    small = empty_on_huge_pages(MIN_ADVISED_BYTES // 2 - 1, torch.bfloat16)  # just under the threshold
    assert small.shape == (MIN_ADVISED_BYTES // 2 - 1,) and small.dtype == torch.bfloat16 and calls == []
    large = empty_on_huge_pages(MIN_ADVISED_BYTES // 8 + 3, torch.float64)
    (start, length, advice), = calls
    assert advice == mmap.MADV_HUGEPAGE and start % HUGE_PAGE_BYTES == 0 and length % HUGE_PAGE_BYTES == 0
    assert large.data_ptr() <= start < large.data_ptr() + HUGE_PAGE_BYTES  # the first boundary inside
    assert start + length <= large.data_ptr() + large.numel() * 8 < start + length + HUGE_PAGE_BYTES  # the last
