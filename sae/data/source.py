"""Where the trainer's activations come from: a harvested cache, or the model itself, live.

Both sources give the trainer the same thing — an infinite stream of shuffled batches {hook: [b, d]} that
resumes exactly from a row count (`position`) — so the training loop does not know which one it reads. Batches come
in the data's storage dtype (float16 by default); the SAE casts them on its device:

* `CacheSource` reads a cache written by `sae harvest` (`store.ShuffledReader`).
* `ModelSource` runs the model as it trains ("on the fly", as SAELens, sparsify and dictionary_learning do), for
  runs whose cache would not fit on disk: a float16 cache of 1B tokens of a d_model-2048 model is about 4 TB.

Data parallelism (torchrun) splits every global batch of `batch_size` rows across `world_size` ranks: rank r gets
rows [r·b, (r+1)·b) of it, b = batch_size / world_size, and `position` always counts global rows.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from sae.data import model as model_lib
from sae.config import UserError
from sae.data.ahead import ahead
from sae.data.harvest import (HarvestConfig, batch_size, check_config, check_range, contexts, forward_rows,
                              host_ids)
from sae.data.store import DTYPES, ActivationStore, is_holdout


class SourceError(UserError):
    """The training data source cannot deliver what the run asks for; the message says what to change."""


class Source(Protocol):
    """What the trainer reads: hook widths, a sample for initialisation, and the shuffled batch stream."""

    hooks: dict[str, int]
    """hook name → d_model, for every hook the run trains on."""
    model_name: str
    n_train_rows: int | None
    """Training rows in one epoch; None when the source does not know in advance (a live model)."""

    def load(self) -> None:
        """Load what the source computes with (a live model's weights): called on every process after the plan
        check and before the job's first collective, so no process waits in a collective while another loads a
        model (which can outlast the collective's timeout) and a load that fails on one process stops them all."""
        ...

    def sample(self, n_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """About `n_rows` float32 training rows per hook, enough to fit the input scale and b_dec. `seed`, `rank`
        and `world_size` are those of the stream `batches` will read next, so a live source can reuse the work."""
        ...

    def batches(self, batch_size: int, *, seed: int, position: int, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, Tensor]]:
        """Rank `rank`'s share of each global batch of `batch_size` rows, from global row `position` on."""
        ...

    def device_bytes(self, device: torch.device, world_size: int) -> int:
        """Memory this source keeps on `device` (for the plan's fit check)."""
        ...


def check_split(batch_size: int, world_size: int) -> int:
    """Rows per rank of a global batch; the batch must split evenly so every rank steps on as many rows."""
    if batch_size % world_size:
        raise SourceError(f"batch_size {batch_size} does not split evenly over {world_size} processes; "
                          f"use a multiple of {world_size}")
    return batch_size // world_size


class CacheSource:
    """A harvested cache (see `store.ShuffledReader` for the shuffle and its exact resume)."""

    def __init__(self, path: str, hooks: list[str], shuffle_rows: int):
        self.store = ActivationStore(path)
        self.store.require_complete()
        self.store.check_hooks(hooks)
        self.hooks = {h: self.store.hooks[h] for h in hooks}
        self.model_name = self.store.model_name
        self.n_train_rows: int | None = self.store.n_train_rows
        self.shuffle_rows = shuffle_rows

    def load(self) -> None:
        """Nothing to load: shards are read as the batches need them."""

    def sample(self, n_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        # A draw of its own (seed + 1), independent of the stream's batch order.
        return self.store.sample(list(self.hooks), min(n_rows, self.store.n_train_rows), seed=seed + 1)

    def batches(self, batch_size: int, *, seed: int, position: int, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, Tensor]]:
        return self.store.shuffled(list(self.hooks), batch_size, seed=seed, position=position,
                                   shuffle_rows=self.shuffle_rows, rank=rank, world_size=world_size)

    def device_bytes(self, device: torch.device, world_size: int) -> int:
        """Two shuffle windows of host memory (the one read and the next), which count where training is on the CPU."""
        if device.type != "cpu":
            return 0
        rows = min(self.shuffle_rows, self.store.n_rows)
        return 2 * rows * sum(self.hooks.values()) * self.store.dtype.itemsize


class ModelSource:
    """Activations computed as the trainer needs them: text → packed contexts → one forward → shuffled rows.

    The contexts are exactly those `sae harvest` would cache with the same harvest settings, minus the held-out
    ones (the same context-hash rule), so a small cache harvested with those settings holds held-out rows that no
    on-the-fly run ever trained on: `sae eval` and `sae analyse` run on it.

    Shuffling: the training contexts are taken in chunks of C contexts (C·rows_per_context ≈ `shuffle_rows`);
    each rank runs the model on its C / world_size contexts of a chunk (contexts t with t mod world_size = rank, so
    ranks never share one), and serves that chunk's rows in a seeded random order. A chunk thus mixes rows of many
    contexts, memory stays at one chunk (two while the next is built), and a global row position names a chunk and
    an offset, which is all exact resume needs: skipped chunks cost tokenisation only, never a forward.
    """

    def __init__(self, cfg: HarvestConfig, hooks: list[str], device: torch.device, shuffle_rows: int):
        check_config(cfg)
        self.cfg, self.device, self.shuffle_rows = cfg, device, shuffle_rows
        d_model = model_lib.hidden_size(cfg.model)  # no weights yet: the trainer plans memory first
        self.hooks = {h: d_model for h in hooks}
        self.model_name = cfg.model
        self.n_train_rows = None
        self.first_pos = int(cfg.exclude_first)
        self.rows_per_context = cfg.context_size - self.first_pos
        self.storage = DTYPES[cfg.dtype]
        self._model = None
        self._tokenizer = None
        self._chunk_cache: tuple[tuple[int, ...], dict[str, Tensor]] | None = None

    def load(self) -> None:
        self._load()

    def _load(self):
        if self._model is None:
            self._model, self._tokenizer = model_lib.load_model(self.cfg.model, str(self.device), self.cfg.model_dtype,
                                                                device_map=self.cfg.device_map)
            for name in self.hooks:
                model_lib.resolve_hook(self._model, name)  # unknown names fail with the list of valid ones
        return self._model, self._tokenizer

    def chunk_contexts(self, world_size: int) -> int:
        """Contexts per chunk: about `shuffle_rows` rows, a multiple of the world size."""
        per_rank = max(1, math.ceil(self.shuffle_rows / self.rows_per_context / world_size))
        return per_rank * world_size

    def _train_contexts(self, tokenizer) -> Iterator[list[int]]:
        """The training contexts in stream order: every packed context whose index the held-out hash skips."""
        for seq, ids in enumerate(contexts(self.cfg, tokenizer)):
            if not is_holdout(torch.tensor([seq]), self.cfg.eval_fraction)[0]:
                yield ids

    def _build_chunk(self, contexts: list[list[int]], key: tuple[int, ...]) -> dict[str, Tensor]:
        """Run the model over one rank's contexts of a chunk and lay the rows out in the chunk's seeded order."""
        model, _ = self._load()
        seed, index, rank, world_size = key
        n_rows = len(contexts) * self.rows_per_context
        g = torch.Generator().manual_seed(seed * 1_000_003 + index * 7919 + rank)
        dest = torch.randperm(n_rows, generator=g).to(self.device)  # row j of the chunk is served at dest[j]
        step = batch_size(self.cfg, self.device)
        hooks = list(self.hooks)
        overflows: list[Tensor | None] = []
        with torch.inference_mode():  # as harvest; batches drawn from the chunk later are ordinary tensors (torch.cat)
            out = {h: torch.empty(n_rows, d, dtype=self.storage, device=self.device) for h, d in self.hooks.items()}
            for start in range(0, len(contexts), step):
                ids = host_ids(contexts[start : start + step], self.device).to(self.device, non_blocking=True)
                rows = forward_rows(model, ids, hooks, self.first_pos, self.storage)
                where = dest[start * self.rows_per_context : (start + len(ids)) * self.rows_per_context]
                for h, t in rows.acts.items():
                    out[h][where] = t.reshape(-1, t.shape[-1])
                overflows.append(rows.overflow)
            # One read for the whole chunk, after every forward is queued: a GPU never waits on the host mid-chunk.
            check_range(torch.stack(overflows).any(0) if overflows[0] is not None else None, hooks)
        return out

    def _chunks(self, seed: int, first: int, rank: int, world_size: int) -> Iterator[dict[str, Tensor]]:
        """Rank `rank`'s chunks from chunk `first` on; the chunk `sample` built is reused, not recomputed."""
        size = self.chunk_contexts(world_size)
        _, tokenizer = self._load()
        # Tokenised a chunk ahead on a worker thread, while this chunk's forwards run.
        stream = itertools.islice(ahead(self._train_contexts(tokenizer), depth=size, name="sae-tokenise"), first * size, None)
        for index in itertools.count(first):
            mine = [ids for t, ids in enumerate(itertools.islice(stream, size)) if t % world_size == rank]
            if len(mine) < size // world_size:
                raise SourceError(
                    f"dataset {self.cfg.dataset!r} ran out after {index * size * self.rows_per_context} training "
                    "tokens; set train.total_tokens below that or use a larger dataset")
            key = (seed, index, rank, world_size)
            if self._chunk_cache is not None and self._chunk_cache[0] == key:
                chunk = self._chunk_cache[1]
            else:
                chunk = self._build_chunk(mine, key)
            self._chunk_cache = None
            yield chunk

    def device_bytes(self, device: torch.device, world_size: int) -> int:
        """The model's weights (their size on disk, high when the model runs in bf16) and two chunks (the one served
        and the next, built by the prefetch thread), all on the training device."""
        source = model_lib.resolve_spec(self.cfg.model)
        weights = sum(f.stat().st_size for f in Path(source).glob("*.safetensors")) if Path(source).is_dir() else 0
        chunk = self.chunk_contexts(world_size) // world_size * self.rows_per_context
        return weights + 2 * chunk * sum(self.hooks.values()) * self.storage.itemsize

    def sample(self, n_rows: int, seed: int, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        """The first rows of this rank's first chunk, i.e. a random sample of that chunk's contexts; the chunk is
        kept, so the training stream's first chunk costs no second forward."""
        key = (seed, 0, rank, world_size)
        chunk = next(self._chunks(seed, 0, rank, world_size))
        self._chunk_cache = (key, chunk)
        return {h: t[:n_rows].float() for h, t in chunk.items()}

    def batches(self, batch_size: int, *, seed: int, position: int, rank: int = 0,
                world_size: int = 1) -> Iterator[dict[str, Tensor]]:
        b = check_split(batch_size, world_size)
        chunk_rows = self.chunk_contexts(world_size) // world_size * self.rows_per_context
        first, offset = divmod(position // world_size, chunk_rows)
        chunks = self._chunks(seed, first, rank, world_size)
        chunk = next(chunks)
        while True:
            parts: dict[str, list[Tensor]] = {h: [] for h in self.hooks}
            need = b
            while need:
                if offset == chunk_rows:
                    chunk, offset = next(chunks), 0
                take = min(need, chunk_rows - offset)
                for h in self.hooks:
                    parts[h].append(chunk[h][offset : offset + take])
                offset += take
                need -= take
            yield {h: torch.cat(p) for h, p in parts.items()}
