"""TopK/BatchTopK SAEs too wide for one device: the latents sharded across torchrun's processes (`shard_latents`).

Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") train TopK SAEs of up to 16M latents; at that width
W_enc and W_dec alone (2·d_in·d_sae floats) outgrow one device. The latent dimension is split the way a
tensor-parallel MLP splits its hidden layer (Megatron-LM, Shoeybi et al. 2019 §3): with W processes, rank r holds
latents [r·d/W, (r+1)·d/W) — its slice of W_enc [d_in, d/W], b_enc [d/W] and W_dec [d/W, d_in] — while b_dec and
the input scale are replicated. Every rank reads the same full batch, so the only traffic per step is:

* selection: each rank takes its local top-k per row (BatchTopK: its top k·n of the batch), all-gathers these
  candidate values, and keeps those of its own candidates that are among the global top-k (``shard_winners``);
  exact, since a global winner is always among its own shard's top k. AuxK selects among dead latents the same way.
* decoding: x̂ = Σ_ranks (partial sum over own latents) + b_dec, all-reduced. The loss is then computed identically on
  every rank, so the gradient of x̂ is already the full one everywhere and the backward passes it through unchanged
  (Megatron-LM's "g" operator; torch.distributed.nn's all_reduce would sum it again).
* b_dec's encoder-side gradient −W_enc·∂b_enc is a sum over latents, so each rank holds a partial sum: it is
  all-reduced in the backward (Megatron's "f": identity forward, all-reduce backward).
* gradient clipping uses the global norm; logged L0 and the AuxK dead count are summed over shards; each rank tracks
  only its own latents' deaths.

Only ``TopKFamily``'s hooks are overridden, so the loss is the single-process one; ``save`` gathers the shards
into an ordinary SAE folder on rank 0.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from sae.training import distributed
from sae.saes import SAE, BatchTopKSAE, SAEConfig, SparseActs, TopKSAE, TopKFamily, create_sae
from sae.training.trainer import SAETrainer, TrainError

LATENT_DIM = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
"""The sharded tensors and the dimension that indexes latents; every other tensor is replicated."""


def shard_winners(candidates: Tensor, k: int, rank: int) -> Tensor:
    """Which of `rank`'s candidates are among the top k of all ranks' candidates, per group.

    ``candidates`` [W, groups, c]: every rank's c candidate values per group (a token row for TopK), gathered in
    rank order. Returns a bool mask [groups, c] over `rank`'s own candidates. Exact whenever each rank's candidates
    are its own top c ≥ min(k, latents per rank) per group: a global winner is among its rank's top k.
    """
    world, groups, c = candidates.shape
    flat = candidates.permute(1, 0, 2).reshape(groups, world * c)
    won = torch.zeros_like(flat, dtype=torch.bool)
    won.scatter_(1, flat.topk(k, dim=-1, sorted=False).indices, True)
    return won.view(groups, world, c)[:, rank]


class _SumOverShards(torch.autograd.Function):
    """Forward: sum over ranks. Backward: identity, the incoming gradient being the same on every rank."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return distributed.all_reduce_(t.clone())

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class _SumGradOverShards(torch.autograd.Function):
    """Forward: identity on a replicated tensor. Backward: sum over ranks of the per-shard partial gradients."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        return t.view_as(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        return distributed.all_reduce_(grad.clone())


class _LatentShard(TopKFamily):
    """Rank `rank`'s shard of a TopK-family SAE of `world_size`·cfg.d_sae latents (``cfg.d_sae`` is the shard's
    width), mixed in before the variant. Its training forward pass is collective: every rank calls it on the same
    batch."""

    batch_wide: ClassVar[bool]
    """The variant selects its top activations over the whole batch (BatchTopK), not row by row (TopK)."""

    def __init__(self, cfg: SAEConfig, rank: int, world_size: int) -> None:
        self.rank, self.world_size, self.first_latent = rank, world_size, rank * cfg.d_sae  # read by the init
        super().__init__(cfg)

    @property
    def total_latents(self) -> int:
        return self.cfg.d_sae * self.world_size

    def _global_winners(self, values: Tensor, k: int) -> Tensor:
        """Flat mask of this rank's candidate `values` [groups, c] that are among their group's global top k."""
        return shard_winners(distributed.all_gather(values), k, self.rank).flatten()

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        # The variant's own selection on this shard gives as many candidates per group (row, or batch) as the
        # global selection keeps: k per row for TopK, k·n per batch for BatchTopK.
        rows, feats, inexact = super()._select(pre)
        if inexact is not None:  # every shard redoes its selection if any must
            inexact = distributed.all_reduce_(inexact.to(torch.int32), "max").bool()
        return (*self._global(pre, rows, feats), inexact)

    def _select_wider(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return self._global(pre, *super()._select_wider(pre))

    def _global(self, pre: Tensor, rows: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        """This shard's part of the global selection, from its own candidates (rows, feats)."""
        values = pre[rows, feats]
        if self.batch_wide and self._handover_scale is not None:  # BatchTopK's hand-over: ranked as in one process
            values = values.float() / self._handover_scale[rows, 0]
        values = values.view(1 if self.batch_wide and self.row_weight < 1 else pre.shape[0], -1)
        keep = self._global_winners(values, values.shape[1])
        return rows[keep], feats[keep]

    def _select_aux(self, pre: Tensor, dead_mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
        # k ≤ dead latents of all shards, so the -inf of a shard short of dead latents never wins.
        rows, feats = super()._select_aux(pre, dead_mask, min(k, pre.shape[1]))
        values = torch.where(dead_mask[feats], pre[rows, feats], -torch.inf)
        keep = self._global_winners(values.view(pre.shape[0], -1), k)
        return rows[keep], feats[keep]

    def _sum_over_shards(self, t: Tensor) -> Tensor:
        return _SumOverShards.apply(t)

    def _encoder_b_dec(self) -> Tensor:
        return _SumGradOverShards.apply(self.b_dec)

    def gather(self) -> SAE | None:
        """The whole SAE on rank 0 (None elsewhere); collective."""
        parts = distributed.gather_to_main({k: v.detach().cpu() for k, v in self.state_dict().items()})
        if parts is None:
            return None
        state = {k: torch.cat([p[k] for p in parts], LATENT_DIM[k]) if k in LATENT_DIM else v
                 for k, v in parts[0].items()}
        full = create_sae(replace(self.cfg, d_sae=self.cfg.d_sae * len(parts)))
        full.load_state_dict(state)
        return full.train(self.training)

    def save(self, path: str | Path) -> Path:
        """Collective: rank 0 writes the whole SAE's folder, exactly as a single process would."""
        full = self.gather()
        if full is not None:
            full.save(path)
        return Path(path)


class ShardedTopKSAE(_LatentShard, TopKSAE):
    batch_wide = False


class ShardedBatchTopKSAE(_LatentShard, BatchTopKSAE):
    batch_wide = True

    def _row_kth(self, pre: Tensor) -> Tensor:
        # The k-th largest over every shard's latents is among the shards' own top k.
        k = self.cfg.k  # ≤ a shard's latents (``shard`` refuses fewer)
        own = pre.topk(k, dim=-1, sorted=False).values
        every = distributed.all_gather(own).transpose(0, 1).flatten(1)
        return every.topk(k, dim=-1, sorted=False).values.min(-1, keepdim=True).values

    @torch.no_grad()
    def _observe(self, acts: SparseActs) -> None:
        # The threshold follows the smallest positive activation kept in the whole batch, i.e. on any shard.
        if self.warming_up:
            return
        smallest = torch.where(acts.values > 0, acts.values, torch.inf).min()
        smallest = -distributed.all_reduce_(-smallest, "max")
        super()._observe(acts._replace(values=smallest.view(1)))  # +inf (none positive anywhere) leaves θ as it is


SHARDED_CLASSES: dict[str, type[_LatentShard]] = {"topk": ShardedTopKSAE, "batchtopk": ShardedBatchTopKSAE}


def shard(cfg: SAEConfig, rank: int, world_size: int) -> _LatentShard:
    """Rank `rank`'s shard of the SAE `cfg` describes, initialised as the matching slice of that SAE built whole from
    the same RNG state (see ``SAE._init_tied``; the whole SAE is never built), so that a sharded run starts (and, up
    to float rounding, stays) where a single process would."""
    if cfg.architecture not in SHARDED_CLASSES:
        raise TrainError(f"shard_latents supports {' and '.join(SHARDED_CLASSES)} SAEs, not {cfg.architecture!r}; "
                         "train it with data parallelism or distribute_saes=true instead")
    if cfg.d_sae % world_size:
        raise TrainError(f"shard_latents: d_sae {cfg.d_sae} is not divisible by the {world_size} processes; "
                         "choose a width that is")
    if cfg.d_sae // world_size < cfg.k:
        raise TrainError(f"shard_latents: each of the {world_size} processes would hold {cfg.d_sae // world_size} "
                         f"latents, fewer than k={cfg.k}; use fewer processes")
    return SHARDED_CLASSES[cfg.architecture](replace(cfg, d_sae=cfg.d_sae // world_size), rank, world_size)


class ShardedTrainer(SAETrainer):
    """``SAETrainer`` for a latent shard: clips by the norm of the whole SAE's gradient."""

    @torch.no_grad()
    def _clip_gradients(self) -> None:
        # The shards' squared norms add up; replicated tensors (b_dec) hold the same gradient everywhere: count once.
        grads = {n: p.grad for n, p in self.sae.named_parameters() if p.grad is not None}
        sq = [g.float().pow(2).sum() for g in grads.values()]
        sharded = distributed.all_reduce_(torch.stack([s for n, s in zip(grads, sq) if n in LATENT_DIM]).sum())
        replicated = sum((s for n, s in zip(grads, sq) if n not in LATENT_DIM), torch.zeros_like(sharded))
        coef = (self.grad_clip / ((sharded + replicated).sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(coef.to(g.dtype))
