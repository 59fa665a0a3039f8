"""One SAE's optimiser step: Adam, lr and sparsity schedules, gradient clipping, the unit-norm decoder
constraint, dead-latent tracking and, for data-parallel ranks, the all-reduces that keep them in step.

`sae.training.train` runs many of these over one data stream; `sae.training.sharded` extends them to SAEs whose latents are split
across processes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from sae.training import distributed
from sae.config import UserError
from sae.saes import SAE

GAO_DEAD_TOKENS = 10_000_000
"""Gao et al. call a latent dead after 10M tokens without firing; shorter runs scale it down."""


class TrainError(UserError):
    """Training cannot go on; the message says why and what to do."""


class ResumeMismatch(TrainError):
    """The checkpoint in `out` is another run than the one asked for (other settings, SAEs, names or processes)."""


class DivergedError(TrainError):
    """The loss became NaN/inf."""


def lr_factor(step: int, total_steps: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up, constant, then linear decay to zero."""
    warmup = max(1, round(warmup_frac * total_steps))
    decay = max(1, round(decay_frac * total_steps))
    return max(0.0, min(1.0, (step + 1) / warmup, (total_steps - step) / decay))


BUCKET_FLOATS = 2**22
"""Largest flat fp32 bucket ``mean_over_ranks_`` packs (16 MiB): it bounds the copy a bucket costs, where a tensor
at least this large is reduced in place on its own (a bucket of one, nothing to copy)."""


def mean_over_ranks_(tensors: list[Tensor], bucket_floats: int = BUCKET_FLOATS) -> None:
    """Average `tensors` over the data-parallel ranks in place, with one fp32 all-reduce per bucket of consecutive
    tensors of at most `bucket_floats` elements in all instead of one per tensor (issue 19 §6). The sums are the ones
    a per-tensor all-reduce forms, element by element, so the result is the same. Measured by
    ``scripts/bench_ddp.py`` (2 gloo ranks, TopK): at d_in 64 × 1024 the synchronisation took 6.1 ms instead of
    12.1 ms; at 576 × 9216 the bucket cap keeps it level (54 against 48 ms, noise), where one flat bucket of all
    10.6 M gradients took 165 against 77 ms, its copies costing more than the collectives it saved."""
    buckets: list[list[Tensor]] = []
    size = bucket_floats
    for t in tensors:
        if size + t.numel() > bucket_floats:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += t.numel()
    for bucket in buckets:
        if len(bucket) == 1 and bucket[0].dtype == torch.float32:
            distributed.all_reduce_(bucket[0], "mean")
            continue
        flat = distributed.all_reduce_(torch.cat([t.reshape(-1).float() for t in bucket]), "mean")
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))


def topk_warmup_steps(topk_warmup_frac: float, total_steps: int) -> int:
    """Steps of the TopK warm-up (``sae.training.train.TrainConfig.topk_warmup_frac``); the last step is never one."""
    return min(round(topk_warmup_frac * total_steps), total_steps - 1)


HANDOVER_FRAC = 0.1
"""Last fraction of the TopK warm-up over which BatchTopK's selection moves from each row's top k to the batch's top
k·B (``sae.saes.BatchTopKSAE`` has the measurements behind it)."""


def topk_row_weight(step: int, warmup_steps: int) -> float:
    """The TopK warm-up's weight at `step` (``SAE.train_forward``'s ``topk_warmup``): 1 in the warm-up, falling
    linearly over its last ``HANDOVER_FRAC`` (BatchTopK's hand-over), 0 once it is over."""
    if step >= warmup_steps:
        return 0.0
    start = round((1 - HANDOVER_FRAC) * warmup_steps)
    return 1.0 if step < start else 1.0 - (step - start + 1) / (warmup_steps - start + 1)


class SAETrainer:
    """Everything one SAE needs to take a step: Adam, lr and sparsity schedules, gradient
    clipping, the unit-norm decoder constraint, and dead-latent tracking."""

    def __init__(
        self,
        sae: SAE,
        *,
        lr: float,
        total_steps: int,
        lr_warmup_frac: float = 0.01,
        lr_decay_frac: float = 0.2,
        penalty_warmup_frac: float = 0.05,
        topk_warmup_frac: float = 0.0,
        grad_clip: float = 1.0,
        dead_window_tokens: int = GAO_DEAD_TOKENS,
        world_size: int = 1,
    ) -> None:
        self.sae = sae
        self.world_size = world_size
        """Data-parallel ranks stepping this SAE together (1: no gradient traffic)."""
        if world_size > 1:  # batch statistics over the global batch (see SAE.mean_over_ranks, SAE.gather_over_ranks)
            sae.mean_over_ranks = functools.partial(distributed.all_reduce_, op="mean")
            sae.gather_over_ranks = distributed.all_gather
            sae.rank_of_process = distributed.rank()
        self.total_steps = total_steps
        self.penalty_warmup_steps = max(1, round(penalty_warmup_frac * total_steps))
        self.topk_warmup_steps = topk_warmup_steps(topk_warmup_frac, total_steps)
        self.grad_clip = grad_clip
        self.dead_window_tokens = dead_window_tokens
        named = list(sae.named_parameters())
        fast = [p for n, p in named if n in sae.cfg.fast_biases]
        groups = [{"params": [p for n, p in named if n not in sae.cfg.fast_biases]}]
        if fast:  # ReLU+L1's b_enc (an SAE's, centred): see ReLUL1SAE
            groups.append({"params": fast, "lr": lr * math.sqrt(sae.cfg.d_in)})
        betas = getattr(sae, "adam_betas", (0.9, 0.999))  # JumpReLU: β₁ = 0
        # On CUDA the fused kernel: one launch for every parameter instead of a chain of foreach kernels with
        # parameter-sized temporaries (Adam's √v). Same update; the CPU keeps the default (foreach) implementation.
        self.optimizer = torch.optim.Adam(groups, lr=lr, betas=betas, fused=sae.W_dec.is_cuda or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, total_steps, lr_warmup_frac, lr_decay_frac),
        )
        self.tokens_since_fired = torch.zeros(
            sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device
        )
        self.step_count = 0
        self.first_nonfinite_step = torch.tensor(-1, device=sae.W_dec.device)
        """First step whose loss was NaN/inf (-1: none); kept on device to avoid a sync per step."""

    @property
    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_window_tokens

    def step(self, x: Tensor, target: Tensor | None = None, autocast: bool = False) -> dict[str, Tensor]:
        """One optimiser step on raw activations x [batch, d_in] (and, for a transcoder, the `target` [batch, d_out]
        at its output hook); returns detached metrics, the FVU being the target's."""
        cfg = self.sae.cfg
        for hook, t, what, d in ((cfg.hook_name, x, "d_in", cfg.d_in), (cfg.hook_name_out, target, "d_out", cfg.d_out)):
            if t is not None and t.shape[-1] != d:
                raise TrainError(f"batch for hook {hook!r} has d_model {t.shape[-1]} but the SAE expects {what} {d}; "
                                 "the cache and the SAE do not match")
        sae = self.sae
        penalty_scale = min(1.0, (self.step_count + 1) / self.penalty_warmup_steps)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = sae.train_forward(x, target, dead_mask=self.dead_mask, penalty_scale=penalty_scale,
                                    topk_warmup=topk_row_weight(self.step_count, self.topk_warmup_steps))
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        fire_counts, tokens = out.fire_counts, x.shape[0]
        if self.world_size > 1:
            fire_counts, tokens = self._synchronise(fire_counts), tokens * self.world_size
        if sae.unit_norm_decoder:
            sae.remove_parallel_grads()
        if self.grad_clip:
            self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        sae.project_parameters()
        self.tokens_since_fired = torch.where(fire_counts > 0, 0, self.tokens_since_fired + tokens)
        self.step_count += 1
        bad = ~torch.isfinite(out.loss.detach()) & (self.first_nonfinite_step < 0)
        self.first_nonfinite_step = torch.where(bad, self.step_count, self.first_nonfinite_step)
        with torch.no_grad():
            y = (x if target is None else target).float()
            err = (y - out.x_hat.float()).pow(2).sum()
            fvu = err / (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        return {
            "loss": out.loss.detach(),
            **out.losses,
            "l0": out.l0,
            "fvu": fvu,
            "dead_frac": self.dead_mask.float().mean(),
            "lr": torch.tensor(lr),
        }

    def _clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.grad_clip)

    def _synchronise(self, fire_counts: Tensor) -> Tensor:
        """Data parallel: average the gradients and the buffers training updates (BatchTopK's threshold) over the
        ranks, and sum the fire counts, so every rank takes the same optimiser step and sees the same dead latents.

        Each rank's loss is a mean over its b = B/W rows, so the average of the ranks' gradients is the gradient of
        the mean over the global batch B: the step a single process takes on B rows (up to float rounding), AuxK
        included (its normaliser is averaged over the ranks, ``SAE.mean_over_ranks``); statistics of the whole batch
        (BatchTopK's selection and threshold, JumpReLU's warm-up cut) are taken over the gathered global batch
        (``SAE.gather_over_ranks``), so the buffers they update are the same on every rank before the mean.
        """
        # A parameter without a gradient (JumpReLU's θ in the TopK warm-up) has none on every rank (it depends on
        # the step and the config alone) and Adam skips it, as in one process.
        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        bufs = [b for n, b in self.sae.named_buffers() if n not in self.sae.FITTED_BUFFERS and b.is_floating_point()]
        mean_over_ranks_(grads + bufs)
        return distributed.all_reduce_(fire_counts.clone(), "sum")

    # ----- checkpoint state ----------------------------------------------------------------

    def state_tensors(self) -> dict[str, Tensor]:
        """Model weights, Adam moments and the dead tracker, for one safetensors file."""
        out = {f"model.{k}": v for k, v in self.sae.state_dict().items()}
        for i, state in self.optimizer.state_dict()["state"].items():
            out.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
        out["tokens_since_fired"] = self.tokens_since_fired
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def state_json(self) -> dict[str, Any]:
        groups = self.optimizer.state_dict()["param_groups"]
        return {
            "step": self.step_count,
            "sae_config": asdict(self.sae.cfg),
            "param_groups": groups,
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        device = self.sae.W_dec.device
        weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        # A checkpoint from before input centring has no fitted mean: its run trained on uncentred inputs, which a
        # mean of zero reproduces exactly.
        weights.setdefault("mean", torch.zeros_like(self.sae.mean))
        if hasattr(self.sae, "warmup_threshold"):  # a JumpReLU checkpoint from before the TopK warm-up
            weights.setdefault("warmup_threshold", torch.zeros_like(self.sae.warmup_threshold))
        if hasattr(self.sae, "last_l0"):  # ... or before its L0 controller: no L0 recorded yet
            weights.setdefault("last_l0", torch.full_like(self.sae.last_l0, -1.0))
            # ... or before its λ: the threshold phase goes on with λ·L0, λ from θ̄² (JumpReLUSAE's controller)
            weights.setdefault("l0_multiplier", torch.full_like(self.sae.l0_multiplier, -1.0))
        self.sae.load_state_dict(weights)
        self.sae.sync_cfg_scales()
        state: dict[int, dict[str, Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        if len(meta["param_groups"]) != len(self.optimizer.param_groups):
            raise TrainError(f"the checkpoint of {self.sae.cfg.architecture} SAE {self.sae.cfg.hook_name} was written "
                             "by an older version of its training recipe; resume it with that version, or start over "
                             "with overwrite=true")
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        self.tokens_since_fired = tensors["tokens_since_fired"].to(device)
        self.step_count = meta["step"]
