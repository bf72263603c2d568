"""Checkpoint hashing benchmark (`ultramem bench checkpoint`, docs/reliability.md §7): what sha256
verification costs per GiB of checkpoint, and what the writers' digests save the manifest.

A table-shaped directory of 2 MiB chunk files (the default chunk size, storage/layout.py) is written
once; then, from the page cache (the state right after a checkpoint is written, and a lower bound
on a cold read, which adds the disk's own read time):

  sha256 in memory     hashlib over one 64 MiB buffer: the CPU's ceiling for one thread
  verify, 1 thread     storage.checkpoint.digest_files(threads=1): open, read, hash every file
  verify, N threads    the same with HASH_THREADS threads (hashlib drops the GIL on big buffers)
  manifest, known      write_manifest with every chunk's digest already known (the shards hashed
                       them as they wrote them): only stats, no reads

Medians of 3 repeats, reported as seconds per GiB and GiB/s; JSON in <out>/checkpoint.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from storage.checkpoint import HASH_THREADS, digest_files, list_files, step_dir, write_manifest

CHUNK = 2 << 20  # bytes per chunk file, storage.layout.DEFAULT_TARGET_CHUNK_BYTES


def _median_s(fn: Any, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(out: Path, quick: bool = False) -> dict[str, Any]:
    """Measure and print; write <out>/checkpoint.json."""
    gib = 0.25 if quick else 1.0
    nbytes = int(gib * (1 << 30))
    scratch = Path(tempfile.mkdtemp(prefix="ultramem-bench-ckpt-"))
    try:
        d = step_dir(scratch, 1)
        chunks = d / "tables" / "t" / "values" / "c"
        rels = []
        block = os.urandom(CHUNK)
        for i in range(nbytes // CHUNK):
            path = chunks / str(i % 256) / str(i // 256) / "0"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(block[i % 97:] + block[: i % 97])
            rels.append(path.relative_to(d).as_posix())
        buf = os.urandom(64 << 20)
        in_memory = _median_s(lambda: hashlib.sha256(buf).digest()) * (1 << 30) / len(buf)
        one = _median_s(lambda: digest_files(d, rels, threads=1)) / gib
        many = _median_s(lambda: digest_files(d, rels, threads=HASH_THREADS)) / gib
        known = {f["path"]: f for f in list_files(d)}
        manifest = _median_s(lambda: write_manifest(d, {}, known=known)) / gib
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {"gib": gib, "files": len(rels), "chunk_bytes": CHUNK, "cpus": os.cpu_count(),
              "hash_threads": HASH_THREADS, "s_per_gib": {"sha256_in_memory": in_memory, "verify_1_thread": one,
                                                          f"verify_{HASH_THREADS}_threads": many,
                                                          "manifest_with_known_digests": manifest},
              "parallel_speedup_ratio": one / many,  # verify, 1 thread / N threads
              "known_digests_saving_ratio": one / manifest}  # manifest hashing everything / with known digests
    print(f"checkpoint hashing, {gib:g} GiB in {len(rels)} chunk files of {CHUNK >> 20} MiB, page cache, "
          f"{os.cpu_count()} CPUs:")
    for name, s in result["s_per_gib"].items():
        print(f"  {name:<28} {s:7.3f} s/GiB  ({1 / s:6.2f} GiB/s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
