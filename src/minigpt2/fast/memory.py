"""Freed memory kept for reuse while training on a CPU: glibc's malloc, told not to give it back.

A training step allocates and frees the same large activations (megabytes each) again and again.
By default glibc's malloc hands large freed blocks back to the kernel (``munmap``, or trimming the
top of the heap), so the next step's allocations fault them back in one 4 KiB page at a time, each
page zeroed by the kernel first: ~20,000 page faults a step for the ``cpu`` preset and ~90,000 for
``shakespeare`` at batch 64 on the 2-core machine of docs/performance.md, where keeping the memory
made the ``cpu`` preset's steps 1.1x-1.9x faster (six pairs of runs taking turns) and its 5-minute
benchmark ran 2,239-2,301 steps instead of ~1,650.

``keep_freed_memory`` raises glibc's two thresholds (``mallopt``) while training, so that freed
blocks of up to 32 MiB stay in the process for the next step, and puts glibc's default values back
when it ends, trimming the heap, so the memory goes back to the system after training. Anywhere but
Linux with glibc (macOS, Windows, musl) it changes nothing. Tests: ``pytest tests/fast/test_cpu_memory.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1  # free memory at the top of the heap beyond this goes back to the kernel
M_MMAP_THRESHOLD = -3  # blocks at least this big get their own mmap, unmapped again when freed
GLIBC_DEFAULT = 128 * 1024  # glibc's starting value of both
KEEP_MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest value glibc accepts on 64-bit systems
KEEP_TRIM_THRESHOLD = 1024 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    """The C library, if it is glibc (the only one with these knobs); else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc's own: absent from musl and others  # noqa: B018
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[bool]:
    """Within: freed memory stays in the process for reuse. Yields whether that applies here."""
    libc = _glibc()
    keep = ((M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD), (M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD))
    applied = libc is not None and all(libc.mallopt(option, value) == 1 for option, value in keep)
    if applied:
        log.debug("malloc keeps freed blocks of up to %d bytes while training", KEEP_MMAP_THRESHOLD)
    try:
        yield applied
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_DEFAULT)
            libc.mallopt(M_TRIM_THRESHOLD, GLIBC_DEFAULT)
            libc.malloc_trim(0)  # hand what training freed back to the system now
