"""glibc malloc settings for the processes that move lookups: shards and model workers (DESIGN §8).

Every lookup allocates and frees buffers of ~1-100 MB: request and answer messages, pooled sums,
row gradients. glibc serves a block above its mmap threshold with a fresh mapping and unmaps it when
freed, so each such buffer is page-faulted in and zeroed again on every call (~1.9 GB/s measured,
against 11-14 GB/s for a copy into reused memory). Fixed thresholds keep blocks under 32 MiB in the
heap, and up to 256 MiB of freed heap in the process, so a buffer of the last call is reused.

A shard with a RAM budget does the opposite: blocks over 1 MiB go back to the OS when freed, so its
RSS stays near the budget (chunk-cache and storage buffers come and go). Every shard uses two
arenas: the gRPC threads' freed request buffers are reused instead of each thread's arena keeping
its own high-water mark resident (+28 MB RSS on a 24 MB shard with the default, measured).

Launchers set these as environment variables of the processes they start (Ray `runtime_env`);
a process started by hand (`ultramem shard serve`) applies them to itself at start with `apply`.
A MALLOC_* variable already in the environment is the user's choice and is kept.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# keep freed blocks under 32 MiB in the heap; give memory back to the OS only past 256 MiB free
REUSE = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
# mallopt parameter numbers of the environment variables (glibc's malloc.h)
_MALLOPT = {"MALLOC_TRIM_THRESHOLD_": -1, "MALLOC_MMAP_THRESHOLD_": -3, "MALLOC_ARENA_MAX": -8}


def shard_settings(*, budgeted: bool) -> dict[str, str]:
    """A shard's settings: two arenas, and REUSE, or unmapping blocks over 1 MiB with a RAM budget."""
    env = {"MALLOC_ARENA_MAX": "2"}
    env.update({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if budgeted else REUSE)
    return env


def worker_settings() -> dict[str, str]:
    """A model worker's settings: REUSE (its lookup answers and gradients are shards' messages)."""
    return dict(REUSE)


def apply(settings: Mapping[str, str]) -> dict[str, str]:
    """Set `settings` in this running process with glibc's mallopt, each one unless the environment
    already sets it; later allocations follow them. Returns what was set ({} without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): the allocator's own defaults stay
        return {}
    applied = {}
    for name, value in settings.items():
        if name in os.environ:
            continue
        if libc.mallopt(_MALLOPT[name], int(value)) == 1:
            applied[name] = value
        else:
            logger.warning("mallopt refused %s=%s", name, value)
    return applied
