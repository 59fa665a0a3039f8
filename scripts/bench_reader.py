"""Shuffled-reader throughput against reading the same shard files raw, in one run, on one float16 cache.

A TopK SAE at d_in 576 on one modern GPU eats about 10^6 rows/s, so the reader must keep up. The cache is built
in a temporary folder with the store's own writer, small enough to stay in the page cache, and read once untimed
so every figure below is from memory, not disk. The raw reference reads every shard file's bytes into one reused
buffer (`readinto`): a reader that also shuffles, splits off held-out rows and gathers rows into batches cannot beat it,
so `ratio_*` (reader rows/s over raw rows/s) says how much the reader's own work costs whatever the machine.

The first epoch of a fresh store also verifies every shard's checksum (xxh3_64, see store.CHECKSUMS); later epochs do
not, so both are reported, and so is a first epoch verified by sha256 alone, as for a cache harvested before xxh3_64
was recorded. Raw and reader timings alternate (--repeats) and medians are reported, since other work on the machine
varies; the load average is reported with them, since on a busy machine a reader's threads get another share of the
cores than the raw read's one thread.
Prints one JSON object. Usage: python scripts/bench_reader.py [--gb 2.5] [--d 576] [--batch 4096] [--world-size 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_train import HOOK, build_cache  # the same random float16 cache, built by the store's writer
from sae.data.store import GATHER_THREADS, READ_THREADS, ActivationStore



def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_raw(files: list[Path]) -> float:
    """Seconds to read every byte of `files` into one reused buffer: the floor for any reader of them."""
    buf = bytearray(max(f.stat().st_size for f in files))
    view = memoryview(buf)
    start = time.perf_counter()
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return time.perf_counter() - start


def read_shuffled(store: ActivationStore, batch: int, n_batches: int, position: int, **kw) -> float:
    """Seconds for `n_batches` shuffled batches (storage dtype) from `position`."""
    reader = store.shuffled([HOOK], batch, position=position, **kw)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(reader)
    seconds = time.perf_counter() - start
    reader.close()
    return seconds


def sha256_only(path: Path) -> ActivationStore:
    """A fresh store of the cache at `path`, its shards checked as those of a cache from before xxh3_64 was recorded."""
    store = ActivationStore(path)
    for shard in store.shards:
        del shard["xxh3_64"]
    return store


def figures(rows: int, seconds: list[float]) -> dict:
    """Median rows/s over repeats, and every repeat's, since the load on a shared machine changes between them."""
    return {"rows_per_s": round(rows / statistics.median(seconds)), "rows_per_s_each": [round(rows / s) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5, help="cache size; keep it well inside the page cache")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--shard-rows", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--shuffle-rows", type=int, default=2**18)
    parser.add_argument("--world-size", type=int, default=1, help="time rank 0's slice of each global batch")
    parser.add_argument("--repeats", type=int, default=3, help="raw/reader pairs timed; medians are reported")
    parser.add_argument("--dir", default=None, help="where to build the temporary cache (default: the system temp)")
    args = parser.parse_args()

    row_bytes = args.d * 2
    n_shards = max(1, round(args.gb * 2**30 / (args.shard_rows * row_bytes)))
    with tempfile.TemporaryDirectory(prefix="bench_reader_", dir=args.dir) as tmp:
        path = Path(tmp) / "cache"
        start = time.perf_counter()
        build_cache(path, n_shards, args.shard_rows, args.d)
        store = ActivationStore(path)
        files = [path / s["file"] for s in store.shards]
        size = sum(f.stat().st_size for f in files)
        log(f"built {n_shards} shards ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f}s")
        read_raw(files)  # untimed: make sure every page is in the page cache
        loadavg_before = os.getloadavg()
        # the rank's share of one epoch per timing; ranks > 0 would read the same amount of the same groups
        kw = {"shuffle_rows": args.shuffle_rows, "world_size": args.world_size}
        n_batches = store.n_train_rows // args.batch
        rows = n_batches * args.batch // args.world_size
        read_shuffled(store, args.batch, n_batches, 0, **kw)  # untimed: `store` has verified every shard
        timings: dict[str, list[float]] = {"raw": [], "first": [], "first_sha256": [], "steady": []}
        for r in range(args.repeats):  # interleaved, so that all see the same load
            timings["raw"].append(read_raw(files))
            timings["first"].append(read_shuffled(ActivationStore(path), args.batch, n_batches, 0, **kw))
            timings["first_sha256"].append(read_shuffled(sha256_only(path), args.batch, n_batches, 0, **kw))
            timings["steady"].append(read_shuffled(store, args.batch, n_batches, (r + 1) * n_batches * args.batch, **kw))
        raw_fig = figures(store.n_rows, timings["raw"])
        first, first_sha256, steady = (figures(rows, timings[k]) for k in ("first", "first_sha256", "steady"))
        doc = {
            "config": {"d": args.d, "dtype": "float16", "cache_gib": round(size / 2**30, 2), "shards": n_shards,
                       "shard_rows": args.shard_rows, "batch": args.batch, "world_size": args.world_size,
                       "shuffle_rows": args.shuffle_rows, "train_rows": store.n_train_rows, "repeats": args.repeats,
                       "torch_threads": torch.get_num_threads(), "read_threads": READ_THREADS,
                       "gather_threads": GATHER_THREADS,
                       "cpu_count": os.cpu_count(), "loadavg_before": loadavg_before,
                       "loadavg_after": os.getloadavg()},
            "raw_read": {**raw_fig, "gb_per_s": round(size / statistics.median(timings["raw"]) / 1e9, 2)},
            "reader_first_epoch": {**first, "note": "fresh store: includes verifying every shard's checksum (xxh3_64)"},
            "reader_first_epoch_sha256": {**first_sha256,
                                          "note": "the same, verified by sha256 (a cache harvested before xxh3_64)"},
            "reader_steady": {**steady, "note": "later epochs, same store: checksums already verified"},
            **{f"ratio_{name}": round(fig["rows_per_s"] / raw_fig["rows_per_s"], 3)
               for name, fig in (("first_epoch", first), ("first_epoch_sha256", first_sha256), ("steady", steady))},
            "goals": {"ratio_at_least": 0.25, "rows_per_s_at_least": 10**6},
        }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
