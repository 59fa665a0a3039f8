"""Harvest: run text through the model and cache the activations at the named hooks.

The loop is deliberately thin — packed contexts in, one forward that stops after the deepest hook, a cast to
the storage dtype, and a hand-off to the writer thread — so that it runs at the speed of the forward pass itself.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generator, Iterator

import torch
from tqdm.auto import tqdm

from sae.config import HelpSections
from sae.data import model as model_lib
from sae.data.ahead import ahead
from sae.data.text import DataError, bos_token, load_texts, pack
from sae.data.store import (DTYPES, MANIFEST, ActivationStore, CacheError, CacheWriter, check_output_folder,
                            check_same_settings, folder_lock)


@dataclass
class HarvestConfig:
    """The `harvest:` section: the model, its hook points, the text and how it is packed into contexts, and the cache
    the activations are written to."""

    help_sections: ClassVar[HelpSections] = (
        ("what to run", ("model", "hooks", "dataset", "max_tokens", "out")),
        ("text and contexts", ("dataset_split", "text_column", "context_size", "prepend_bos", "exclude_first", "eval_fraction")),
        ("storage and speed", ("dtype", "model_dtype", "device", "device_map", "batch_size", "shard_tokens", "repair")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    model: str = "smollm2"
    """Model: "smollm2" (embedded GGUF), a .gguf file, a local Hugging Face folder, or a hub id."""
    hooks: list[str] = field(default_factory=lambda: ["blocks.15.hook_resid_post"])
    """Hook points, TransformerLens style: blocks.{i}.hook_resid_pre|hook_attn_out|hook_mlp_in|ln2.hook_normalized|hook_mlp_out|hook_resid_post."""
    dataset: str = "stdlib"
    """Text: "stdlib" (the Python standard library's source), a local file/folder, or a hub dataset id (streamed)."""
    dataset_split: str = "train"
    """Split of a hub dataset."""
    text_column: str = "text"
    """Column holding the text, for json/jsonl/parquet/csv/hub datasets."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    prepend_bos: bool = True
    """Start every context with the BOS token (as SAELens does), so position 0 is always the same token."""
    exclude_first: int = 2
    """Leading positions of each context whose rows are not stored (true = 1). They carry "massive activations":
    in SmolLM2's layer-15 residual, position 0 (BOS) has norm ≈ 24,000 and position 1 up to 25,000 on some tokens
    (mean 394), against ≈ 175 at every later position (max 252); left in, a few such rows dominate the MSE."""
    max_tokens: int = 300_000
    """Rows to store per hook (rounded up to whole contexts); fewer if the dataset runs out first."""
    batch_size: int | None = None
    """Contexts per forward pass; None: 16 on the CPU (`CPU_BATCH`) and `CUDA_BATCH_TOKENS` // context_size
    (128 at context_size 128) on CUDA, where 16 contexts of SmolLM2 leave the GPU waiting on kernel launches."""
    shard_tokens: int = 65_536
    """Rows per shard (rounded up to whole batches of contexts); bounds the training reader's memory. A cache being
    resumed keeps the shard size it started with, whatever `batch_size` and this say now."""
    dtype: str = "float16"
    """Storage dtype: float16 (default: half the disk of float32, relative error 2e-4 on SmolLM2), bfloat16 (1.6e-3) or float32."""
    model_dtype: str = "auto"
    """Dtype the model runs in: "auto" (bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or float16."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", "cuda:1", ..."""
    device_map: str | dict[str, str | int] = ""
    """For a model bigger than one device, instead of `device`: accelerate's "auto" fills the visible GPUs, then CPU
    memory, then disk; or a mapping {module name: device} ("cuda:0", 1, "cpu", "disk"), as transformers takes it. The
    forward still stops after the deepest hook, and each batch's activations come to the host once. Empty: the whole
    model on `device`."""
    eval_fraction: float = 0.05
    """Fraction of contexts held out from training (chosen by a hash of the context index)."""
    out: str = "runs/demo/cache"
    """Cache folder. Running again with the same config resumes an interrupted harvest."""
    repair: bool = False
    """Check every listed shard and re-harvest exactly those missing or failing their checksum (the text stream is
    deterministic, so they come back byte-identical), then finish the cache if it is incomplete."""


def check_config(cfg: HarvestConfig) -> None:
    if cfg.dtype not in DTYPES:
        raise CacheError(f"dtype {cfg.dtype!r} is not a storage dtype; use one of {', '.join(DTYPES)}")
    if not cfg.hooks:
        raise CacheError("hooks is empty; name at least one, e.g. blocks.15.hook_resid_post")
    if cfg.context_size < 2 or (cfg.batch_size is not None and cfg.batch_size < 1) or cfg.max_tokens < 1:
        raise CacheError("context_size must be ≥ 2, batch_size and max_tokens ≥ 1")
    if not 0 <= int(cfg.exclude_first) < cfg.context_size:
        raise CacheError(f"exclude_first must be between 0 and context_size - 1 = {cfg.context_size - 1}")
    if not 0 <= cfg.eval_fraction < 1:
        raise CacheError("eval_fraction must be in [0, 1)")


def check_context_size(context_size: int, model) -> None:
    """Contexts must fit the model's positions: past its maximum a learned position table fails with an index error,
    and rotary models run, but on positions they were never trained on (activations nobody would want cached)."""
    limit = getattr(model_lib.text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and context_size > limit:
        raise CacheError(f"context_size={context_size} is more than this model's maximum of {limit} positions "
                         f"(its config's max_position_embeddings); use context_size={limit} or less")


def harvest(cfg: HarvestConfig) -> Path:
    """Fill (or finish) the cache at `cfg.out`; returns its path."""
    check_config(cfg)
    check_output_folder(cfg.out)
    with folder_lock(cfg.out, "sae harvest"):
        if (Path(cfg.out) / MANIFEST).exists():  # other settings are refused before the model loads, and a
            settings = {**_settings(cfg), "hooks": cfg.hooks}  # complete cache is said to be so without loading it
            if isinstance(dtype := getattr(torch, cfg.model_dtype, None), torch.dtype):  # "half" is float16
                settings["model_dtype"] = str(dtype).removeprefix("torch.")
            if check_same_settings(Path(cfg.out), settings)["complete"] and not cfg.repair:
                print(f"cache at {cfg.out} is already complete ({ActivationStore(cfg.out).n_contexts} contexts)")
                return Path(cfg.out)
        cfg = _as_resumed(cfg)
        model, tokenizer = model_lib.load_model(cfg.model, cfg.device, cfg.model_dtype, device_map=cfg.device_map)
        return harvest_with(cfg, model, tokenizer)


def harvest_with(cfg: HarvestConfig, model, tokenizer) -> Path:
    """`harvest` with the model already loaded (benchmarks and notebooks keep one model across runs)."""
    with _no_empty_folder_left(Path(cfg.out)):
        return _harvest_into(cfg, model, tokenizer)


@contextmanager
def _no_empty_folder_left(folder: Path) -> Iterator[None]:
    """A harvest that fails before its first shard (no network, a bad dataset) removes the `out` folder it made,
    so a retry or another config does not meet a puzzling empty folder."""
    existed = folder.exists()
    try:
        yield
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _harvest_into(cfg: HarvestConfig, model, tokenizer) -> Path:
    check_config(cfg)
    for name in cfg.hooks:
        model_lib.resolve_hook(model, name)  # unknown names fail here with the list of valid ones
    check_context_size(cfg.context_size, model)
    device = model_lib.input_device(model)
    size = batch_size(cfg, device)
    if cfg.batch_size is None:
        print(f"harvest: batch_size {size} contexts per forward ({size * cfg.context_size} tokens), the default on "
              f"{device.type}")
    first_pos = int(cfg.exclude_first)
    rows_per_context = cfg.context_size - first_pos
    per_shard, planned = _contexts_per_shard(cfg, rows_per_context, size)
    meta = {
        **_settings(cfg),
        "hooks": {h: model_lib.hidden_size(model) for h in cfg.hooks},
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "bos_token_id": bos_token(tokenizer),
    }
    max_contexts = meta["max_contexts"]
    writer = CacheWriter(cfg.out, meta, per_shard)
    if per_shard != planned:
        print(f"harvest: resuming {cfg.out} at its own {per_shard} contexts per shard (batch_size {size} and "
              f"shard_tokens {cfg.shard_tokens} would give {planned})")
    try:
        if cfg.repair:
            _repair(cfg, writer, model, tokenizer, size)
        if writer.complete:
            print(f"cache at {cfg.out} is already complete ({writer.contexts_done} contexts)")
            return Path(cfg.out)
        done = writer.contexts_done
        # Resume: the stream is deterministic, so skipping what the manifest lists continues where we stopped.
        batches = id_batches(cfg, tokenizer, done, max_contexts, size, device)
        n_done = done
        bar = tqdm(total=max_contexts * rows_per_context, initial=done * rows_per_context, unit="tok", desc="harvest", unit_scale=True, smoothing=0.1)
        # The bar is closed before an error's message is printed, not after; the tokenising worker stops with the loop.
        with bar, torch.inference_mode(), closing(batches):
            for ids, acts in stored_batches(model, batches, cfg.hooks, first_pos, DTYPES[cfg.dtype]):
                writer.add(acts, ids, first_pos)
                n_done += len(ids)
                bar.update(len(ids) * rows_per_context)
        if n_done == 0:
            raise DataError(f"dataset {cfg.dataset!r} yielded fewer than {cfg.context_size} tokens: nothing to harvest")
        if n_done < max_contexts:
            print(f"dataset ran out after {n_done * rows_per_context} tokens (asked for {cfg.max_tokens})")
        writer.finish(first_pos)
    finally:
        writer.close()
    return Path(cfg.out)


#: Contexts per forward on the CPU when `batch_size` is unset: with it `scripts/bench_harvest.py` measured the
#: harvest at 0.96-0.97 of a bare forward of SmolLM2 on batches tokenised beforehand (docs/benchmarks.md); a CPU
#: has no kernel launches to amortise, so the old default stays.
CPU_BATCH = 16
#: Tokens per forward on CUDA when `batch_size` is unset (128 contexts of 128 tokens). Not yet measured on a GPU
#: (docs/gpu.md); the reasoning: 16 contexts of SmolLM2-135M are 2,048 tokens, ≈ 0.55 TFLOP, ≈ 1.5 ms at an H100's
#: bf16 rate, against 30 layers × ~20 kernels × ~5 µs ≈ 3 ms of launches, so the GPU waits on the host; 8× the
#: tokens per launch puts the work ahead of the launches. At context_size 1024 it is 16 contexts, the CPU default.
CUDA_BATCH_TOKENS = 16_384


def _as_resumed(cfg: HarvestConfig) -> HarvestConfig:
    """A cache being resumed with `model_dtype` "auto" keeps the dtype "auto" gave it when it started (bfloat16 on a
    GPU, float32 on the CPU), so a harvest started on one can be finished on the other in one dtype; it keeps its shard
    size too (`_contexts_per_shard`)."""
    if cfg.model_dtype != "auto" or not (Path(cfg.out) / MANIFEST).exists():
        return cfg
    started = ActivationStore(cfg.out).manifest.get("model_dtype")
    if started is None:  # a cache from before model_dtype was recorded
        return cfg
    print(f"harvest: resuming {cfg.out} with its model_dtype {started}")
    return dataclasses.replace(cfg, model_dtype=started)


def _settings(cfg: HarvestConfig) -> dict:
    """The manifest's settings that come from the config alone (the rest need the model loaded)."""
    return {"model": cfg.model, "dtype": cfg.dtype, "context_size": cfg.context_size, "prepend_bos": cfg.prepend_bos,
            "exclude_first": int(cfg.exclude_first),
            "dataset": {"name": cfg.dataset, "split": cfg.dataset_split, "text_column": cfg.text_column},
            "eval_fraction": cfg.eval_fraction,
            "max_contexts": math.ceil(cfg.max_tokens / (cfg.context_size - int(cfg.exclude_first)))}


def _contexts_per_shard(cfg: HarvestConfig, rows_per_context: int, size: int) -> tuple[int, int]:
    """(kept, planned): whole batches of `size` contexts per shard, about `shard_tokens` rows (planned); a cache
    being resumed keeps its own, so a harvest started on a GPU (128 contexts per forward) can be finished on a CPU
    (16), or the other way round, with `batch_size` unset or set to suit the device: the shards' boundaries stay where
    the manifest says, and a batch may straddle one (the writer cuts shards by context count)."""
    planned = math.ceil(cfg.shard_tokens / rows_per_context / size) * size
    if (Path(cfg.out) / MANIFEST).exists():
        return ActivationStore(cfg.out).contexts_per_shard, planned
    return planned, planned


def batch_size(cfg: HarvestConfig, device: torch.device) -> int:
    """Contexts per forward: `cfg.batch_size`, or when unset the default for the device the ids go to."""
    if cfg.batch_size is not None:
        return cfg.batch_size
    if device.type == "cuda":
        return max(1, CUDA_BATCH_TOKENS // cfg.context_size)
    return CPU_BATCH


def contexts(cfg: HarvestConfig, tokenizer) -> Iterator[list[int]]:
    """The packed context stream, the same on every run (resume, repair and on-the-fly training rely on that)."""
    return pack(load_texts(cfg.dataset, cfg.dataset_split, cfg.text_column), tokenizer, cfg.context_size, cfg.prepend_bos)


def host_ids(batch: list[list[int]], device: torch.device) -> torch.Tensor:
    """Contexts as an id tensor on the host, pinned when bound for a GPU so that copy there does not block. The
    harvest keeps this tensor for the cache's token ids instead of copying the device's back."""
    ids = torch.tensor(batch)
    return ids.pin_memory() if device.type == "cuda" else ids


def id_batches(cfg: HarvestConfig, tokenizer, start: int, stop: int, size: int,
               device: torch.device) -> Generator[torch.Tensor, None, None]:
    """Contexts [start, stop) of the stream in batches of `size` host ids, tokenised two batches ahead."""
    def batches() -> Iterator[torch.Tensor]:
        stream = itertools.islice(contexts(cfg, tokenizer), start, stop)
        while batch := list(itertools.islice(stream, size)):
            yield host_ids(batch, device)

    return ahead(batches(), depth=2, name="sae-tokenise")


@dataclass
class Rows:
    """A batch's rows per hook, [n_ctx, context_size - first_pos, d] in the storage dtype, and for float16 storage
    `overflow`: whether each hook's values exceed float16's range (bool [n_hooks], computed on the device with the
    rows). It is read once per batch by `checked`, where a check per hook cost a host sync each."""

    acts: dict[str, torch.Tensor]
    overflow: torch.Tensor | None
    ready: list[torch.cuda.Event] = field(default_factory=list)
    """Events the host copies of `to_host` complete at."""

    def to_host(self) -> Rows:
        """Queue copies to the host: from CUDA non-blocking, each into newly allocated pinned memory (PyTorch's
        caching host allocator reuses blocks whose copies have finished, so no cudaHostAlloc after the first
        batches), with an event per device to wait on; from elsewhere `.cpu()`, a no-op on the CPU."""
        parts = {**self.acts, **({"": self.overflow} if self.overflow is not None else {})}
        host, devices = {}, set()
        for key, t in parts.items():
            if t.device.type == "cuda":
                host[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                devices.add(t.device)
            else:
                host[key] = t.cpu()
        events = [torch.cuda.Event() for _ in devices]
        for event, device in zip(events, devices):
            event.record(torch.cuda.current_stream(device))
        return Rows({h: host[h] for h in self.acts}, host.get(""), events)

    def checked(self) -> dict[str, torch.Tensor]:
        """The rows, once their copies are done, refusing values float16 cannot hold."""
        for event in self.ready:
            event.synchronize()
        check_range(self.overflow, list(self.acts))
        return self.acts


def check_range(overflow: torch.Tensor | None, hooks: list[str]) -> None:
    """Refuse rows whose values exceed float16's range (`overflow` as in `Rows`: one read, a sync on a device)."""
    if overflow is not None and bool(overflow.any()):
        hook = hooks[int(overflow.to(torch.uint8).argmax())]
        raise CacheError(f"activations at {hook} exceed the float16 range; harvest with dtype=bfloat16 or float32")


def forward_rows(model, ids: torch.Tensor, hooks: list[str], first_pos: int, storage: torch.dtype) -> Rows:
    """Rows at `hooks` for contexts `ids`, in the storage dtype and on the device of the layer that made them: one
    forward that stops after the deepest hook, and no host sync. Harvest and on-the-fly training share it, so a live
    run sees exactly the rows a cache would hold."""
    acts = model_lib.capture(model, ids, hooks)
    rows = {h: acts[h][:, first_pos:] for h in hooks}
    overflow = None
    if storage == torch.float16:  # cast on the model's device (less to copy), checked against the range first
        device = rows[hooks[0]].device
        overflow = torch.stack([rows[h].abs().amax().to(device) for h in hooks]) > torch.finfo(torch.float16).max
    return Rows({h: t.to(storage) for h, t in rows.items()}, overflow)


def stored_batches(model, batches: Iterator[torch.Tensor], hooks: list[str], first_pos: int,
                   storage: torch.dtype) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(host ids, rows on the host) per batch of `batches`. Batch k+1's copy in, forward and copies out are queued
    before batch k's rows are waited for, so on a GPU they run while the host hands batch k to the writer (double
    buffering); on the CPU each batch is simply done in turn."""
    device = model_lib.input_device(model)
    landing: tuple[torch.Tensor, Rows] | None = None
    for ids in batches:
        rows = forward_rows(model, ids.to(device, non_blocking=True), hooks, first_pos, storage).to_host()
        if landing is not None:
            yield landing[0], landing[1].checked()
        landing = ids, rows
    if landing is not None:
        yield landing[0], landing[1].checked()


def _repair(cfg: HarvestConfig, writer: CacheWriter, model, tokenizer, size: int) -> None:
    """Re-harvest exactly the listed shards that are missing or corrupt, in batches from each shard's first context,
    so each comes back byte-identical (`CacheWriter.rewrite` checks it). Shards start at multiples of the batch size
    unless the cache was resumed at another one (`_contexts_per_shard`); then the batches differ from the harvest's,
    which the CPU's kernels gave the same bytes for in a test, but other kernels need not."""
    damaged = writer.damaged_shards()
    device = model_lib.input_device(model)
    for index in damaged:
        start = index * writer.contexts_per_shard
        batches = id_batches(cfg, tokenizer, start, start + writer.manifest["shards"][index]["contexts"], size, device)
        with torch.inference_mode(), closing(batches):
            parts = list(stored_batches(model, batches, cfg.hooks, int(cfg.exclude_first), DTYPES[cfg.dtype]))
        acts = {h: torch.cat([a[h] for _, a in parts]) for h in cfg.hooks}
        writer.rewrite(index, acts, torch.cat([t for t, _ in parts]), int(cfg.exclude_first))
    print(f"repair: {len(damaged)} of {len(writer.manifest['shards'])} shards re-harvested"
          + (f" ({', '.join(writer.manifest['shards'][i]['file'] for i in damaged)})" if damaged else ""))
