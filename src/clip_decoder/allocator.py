"""The C allocator, set for torch on CPU: large tensors from a heap that keeps what is freed.

glibc's malloc maps each block above its mmap threshold afresh and unmaps it when freed, and gives
the heap's top back to the system past its trim threshold. A tower's forward pass allocates and frees
activations of megabytes for every batch, so each batch paid for new pages again (`python -m
bench.library` times `predict` both ways; docs/BENCHMARKS.md, "library").
PyTorch's CPU tuning guide answers the same cost by preloading jemalloc or TCMalloc; neither comes with
pip, so `predict` and `extract` set glibc's own options (mallopt) when they start, and so does `bench
--jobs N` (N > 1) in its own process, which extracts the features while its workers train. Set
CLIP_DECODER_MALLOC=default to leave glibc's defaults (freed memory then goes back to the system sooner).

Processes that train keep glibc's defaults (`train`, `bench`'s workers, `bench --jobs 1`): it did not make a
training step faster, and with the setting everywhere `make demo`'s tables moved (single runs' mAP by up to 1.5
points, within the seeds' spread; docs/EXPERIMENTS.md). `serve` keeps them as well: its memory over many
requests (README, "HTTP service") was measured without it.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "CLIP_DECODER_MALLOC"
# mallopt's options (glibc's malloc.h) and the values set: blocks up to 32 MiB (glibc's largest threshold)
# come from the heap, and up to 1 GiB of freed memory at its top is kept for the next batch.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))


def keep_freed_memory() -> bool:
    """Set glibc's malloc as above for this process; False, changing nothing, off Linux, on another C library,
    or with CLIP_DECODER_MALLOC=default."""
    if os.environ.get(ENV) == "default" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the C library this process runs on
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc alone has it (musl's mallopt does nothing)
        return False
    return all(libc.mallopt(option, value) == 1 for option, value in SETTINGS)
