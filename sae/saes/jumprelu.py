"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead") and its straight-through estimators."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from sae.saes.base import SAE, SAEConfig

INIT_CHUNK_ELEMENTS = 2**24
"""Pre-activations per chunk of the initialisation's quantile (64 MB in fp32; torch.quantile takes at most 2²⁴)."""


def _above(z: Tensor, theta: Tensor | float, dtype: torch.dtype) -> Tensor:
    """H(z − θ) as 0/1 in `dtype`, written by the comparison itself: a bool mask multiplied into floats costs a cast
    pass over the dense [batch, d_sae] matrix (104 ms against 45 ms for the float product, 4096 × 9216 on 2 CPU
    threads)."""
    return torch.gt(z, theta, out=torch.empty(z.shape, dtype=dtype, device=z.device))


class _JumpReLU(torch.autograd.Function):
    """Training's JumpReLU in one pass over the pre-activations z [batch, d_sae]: the codes f = z·H(z − θ), each
    row's L0 Σᵢ H(zᵢ − θᵢ) for the L0 penalty, and each latent's fire count (no gradient), with the straight-through
    pseudo-derivatives of Rajamanoharan et al. 2024 ("Jumping Ahead", §4 and their appendix's pseudo-code):
    ∂f/∂z = H(z − θ), ∂f/∂θ := −(θ/ε)·K((z − θ)/ε), ∂H/∂z := 0, ∂H/∂θ := −(1/ε)·K((z − θ)/ε), K the rectangle
    kernel 1{|u| < ½}.

    One function, where there were two (f's and the step's), because on the dense [batch, d_sae] matrix every
    elementwise pass costs about a fifth of a matmul: the two each rebuilt the kernel window in backward, the masks
    were bools multiplied into floats (a cast each) and the counts went through bool → int64 copies. Now the
    comparisons write 0/1 straight into float tensors (`out=`), products run in place, and the step's θ term is a
    matrix-vector product. `scripts/bench_train.py` (d_in 576, 16×, batch 4096, 2 CPU threads, 2026-12-06): the
    step took 2.75–3.4 s against 0.8–1.0 s for its five matmuls (0.28–0.30 of that ceiling), now 1.34–1.73 s (0.54)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        fired = _above(z, theta, z.dtype)
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        counts = fired.sum(0, dtype=torch.float32)
        ctx.mark_non_differentiable(counts)
        return z * fired, fired.sum(-1, dtype=torch.float32), counts  # fp32: exact counts under bf16 autocast

    @staticmethod
    def backward(ctx: Any, grad_f: Tensor, grad_l0: Tensor, _: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, theta = ctx.saved_tensors
        u = z - theta
        grad_z = _above(u, 0, grad_f.dtype).mul_(grad_f)
        window = torch.lt(u.abs_(), ctx.eps / 2, out=u)  # K((z − θ)/ε), in place of z − θ
        step_part = grad_l0.to(window.dtype) @ window
        grad_theta = -(theta * window.mul_(grad_f).sum(0) + step_part) / ctx.eps
        return grad_z, grad_theta.to(theta.dtype), None


class JumpReLUSAE(SAE):
    """JumpReLU SAE trained on L0 directly (Rajamanoharan et al. 2024, "Jumping Ahead"):
    L = ‖x − x̂‖² + λ‖f‖₀ with per-latent thresholds θ learnt through the pseudo-derivatives
    above. Decoder rows are kept unit-norm, the L0 penalty being blind to their scale.

    θ is the trainable parameter itself, kept ≥ 0 by projection after each step, not
    log θ as in the paper's Appendix J: Adam moves a parameter by ~lr per step, so in log
    space θ moves by only ~θ·lr and a small θ₀ stays frozen in a short run (SAELens issue
    #494, fixed the same way in SAELens PR #718; dictionary_learning's ``JumpReluTrainer``
    also trains θ directly for this reason).

    ε and θ₀ default to 1.0 in our units, not the paper's 0.001. The paper's inputs have unit mean
    squared norm; ours are centred with E‖x_n‖² = d_in, so a unit-norm encoder direction's
    pre-activation has variance ≈ 1 on isotropic data whatever d_in is, and the kernel is best of
    that width: a window ε much narrower than the pre-activations' spread catches almost no
    tokens, so θ gets almost no gradient in a run of a few hundred steps. Measured on the CI-sized
    hard configuration of `sae planted` (d_in 32, 128 true features, 781 steps, target_l0 3):
    mean max cosine 0.61 with the old 0.001·√d_in, 0.67 with ε = θ₀ = 1 (0.72 with 0.5), and 0.74
    to 0.81 when the lr is also raised 3–9× (which the default now does at d_in 32; see ``paper_d_in``).

    Training recipe beyond the paper's loss:

    * ``cfg.target_l0`` set → the paper's λ·L0 with λ moved by the L0 controller below, which holds L0 at the
      target rather than trading it against MSE at a λ that must be searched for.
    * Adam β₁ = 0, β₂ = 0.999 (Jumping Ahead's training details; also ``JumpReluTrainer``):
      the STE gradients of θ are sparse, noisy and sign-flipping, and momentum smears them.
    * b_enc starts so that each latent fires on ``init_fire_rate`` of the init sample (Anthropic, "Circuits
      Updates – January 2025": b_e chosen so each feature is active on a small, fixed fraction of the data), rather
      than at 0, where most latents fire; but at 0, as TopK's, when training starts with the TopK warm-up below,
      which keeps each row's top k *positive* pre-activations: a b_enc that makes 99.6% of them negative leaves rows
      with fewer than k (38% of rows, 17% with none, on the planted data below), and the dictionary starves.
      Measured with ``sae planted`` (mean max cosine, fire-rate b_enc → 0): d_in 32, 512 features, L0 8, 1M tokens
      0.696 → 0.860 (TopK 0.843); d_in 64, 1024 features, L0 8, 2M tokens 0.803 → 0.937 (TopK 0.917); the CI point
      (d_in 32, 128 features, L0 3) 0.964 → 0.971. Neither Adam's β₁ 0.9 (0.698) nor a longer warm-up (0.99 of the
      run: 0.699) helped while b_enc starved it. The price, on SmolLM2-135M layer 15 (target_l0 32, 4,608 latents,
      300k tokens, held-out FVU, seeds 0 and 1): 0.145 and 0.141 → 0.157 and 0.151 (TopK k 32: 0.163; PCA 0.48),
      dead latents 1% → 2.7%. A fire rate of 0.05 sits between (planted 0.797, SmolLM2 0.148), and equalising the
      latents' quantiles around 0 gained nothing (0.848, 0.158): the real data gains from a sparse start, the
      planted dictionary loses more, and recovering the true features is what the dictionary is for.
    * With ``target_l0``, a per-token TopK warm-up (``sae.training.train.TrainConfig.topk_warmup_frac``): each row keeps its
      k = round(target_l0) largest pre-activations, θ unused, while ``warmup_threshold`` follows the batch-wide
      threshold that would keep k per row on average (the (k·B)-th largest pre-activation, as BatchTopK's); at the
      first step after the warm-up every θ starts there, so L0 starts at the target. As for BatchTopK, the L0
      budget alone gives no latent to tokens whose features have none yet; on the CI-sized hard planted data this
      takes mean max cosine from 0.77 to 0.956 (with the lr below; ``BatchTopKSAE`` has other seeds).
    * With ``target_l0``, an L0 controller after the warm-up, in two parts, each driven by the error
      e = L0/target_l0 − 1 of the previous step's batch L0 (``last_l0``, averaged over data-parallel ranks like every
      buffer and summed over latent shards). Fast: every θ is multiplied by 1 + ``l0_control_rate``·e. A penalty
      alone (dictionary_learning's λ·(L0/target − 1)², which this used before) did not hold the target in short
      runs: the warm-up ends inside the lr decay (the last ``lr_decay_frac`` of the run), where Adam moves θ by at
      most ~lr per step whatever λ is, while the encoder's gradient pushes the pre-activations of latents that fire
      wrongly after the switch below θ. Measured with ``sae planted`` (L0 and FVU on fresh rows): d_in 32, 512
      features, target 3, 1M tokens: L0 2.04 at λ 2, 2.04 at λ 8 and 2.01 at λ 50 (FVU 0.299); with the θ
      controller L0 2.96, FVU 0.249. d_in 64, 1024 features, target 8, 2M tokens: L0 6.14 → 8.09, FVU 0.257 →
      0.227. SmolLM2-135M layer 15 (target 32, 4,608 latents, 300k tokens): training L0 28.0 →
      32.2; held-out L0 33.2 → 38.6 and FVU 0.155 → 0.151 (the held-out text fires more latents: BatchTopK at k 32
      gives L0 34.2 there). Slow: the penalty is λ·L0 and λ is multiplied by 1 + ``l0_multiplier_rate``·e, from
      λ = θ̄² at the switch (hard thresholding: with unit-norm decoder rows a code a lowers the squared error by
      about a², so a latent is worth its λ when a > √λ, and θ̄ is where the warm-up's latents fired). The θ
      controller alone collapsed long runs: with dictionary_learning's λ·(L0/target − 1)², which pushes nothing at
      the target, θ's only gradient was the reconstruction's, lowering θ wherever a latent fires, so L0 sat above
      the target and the controller raised every θ each step; Adam paid latents that fire every step back ~lr per
      step, but a latent firing on a fraction p of steps only ~√p·lr (its normalised steps come when it fires), so
      rare latents' θ climbed until they died. d_in 64, 1024 features, target 8, 2M tokens, warm-up 0.5 (a threshold
      phase of 488 steps): dead latents 0 → 92% and training FVU 0.22 → 0.49 (fresh rows: FVU 0.486). With the
      integral λ the reconstruction's pull on θ is balanced per latent, in the same units, so Adam's normalisation
      cannot favour frequent latents: 27% dead at the end (the spare half of a dictionary twice the true one),
      FVU 0.217, L0 8.07 (SmolLM2 layer 15 at that warm-up: dead 14.4% → 8.7%, held-out FVU 0.1441 both); λ alone
      (no θ controller) let L0 sink to 6.5 at the default warm-up. At the default warm-up, where the threshold
      phase is short, nothing changed: the same point (2M tokens; fresh rows) 0.947 / 0.220 / 8.11 (mean max cosine
      / FVU / L0) → 0.947 / 0.221 / 8.07, SmolLM2 layer 15 (above, seed 0) held-out FVU 0.1500 → 0.1502, L0 39.2
      → 39.1, dead 0.54% → 0.56%; docs/planted.md has the other grid points. Tried instead: θ in an Adam group of
      its own without the lr decay held the planted targets (3.21, 9.27) but not SmolLM2's (training L0 34.6,
      held-out 41.9; 40.1 with λ 100: the reconstruction's pull on θ outweighs the penalty at d_in 576); per-latent
      θ at the switch reproducing each latent's TopK fire count overshot (L0 5.41 of 3).
    * AuxK on dead latents (Gao et al. §A.2, as in ``TopKFamily``), weight
      ``cfg.aux_coefficient``: a dead JumpReLU latent gets no gradient from either loss (its
      pre-activations sit outside the ε window), and AuxK gives it the residual to model.
      Anthropic's pre-act loss λ_P·ReLU(θ − z)·‖W_dec‖ on dead latents revives them too, but
      with no direction to learn they come back as duplicates: in the planted test it cut
      dead latents 592 → 120 but mean max cosine stayed 0.87, against 0.98 with AuxK α 0.5.
    """

    sae_lens_architecture = "jumprelu"
    apply_b_dec_default = False
    unit_norm_decoder = True
    has_auxk = True
    dense_auxk_copies_bf16 = 0.4  # measured 0.33; in fp32 none (-0.03): the dense step's own peak comes later
    dense_act_copies = 6.25  # measured 6.10 (7.31 before the STE was fused): f, the 0/1 mask, u = z − θ and the grads
    dense_act_copies_bf16 = 4.0  # measured 3.39 (3.92 before the STE was fused; plan 1.15x the peak at 2048 x 65,536)
    init_workspace_bytes = 5 * 4 * INIT_CHUNK_ELEMENTS  # a chunk's fp32 pre-activations and the quantile's sorted
    # copies and int64 indices: 2.1 chunks measured with 65,536 sample rows, 4.2 with 4,096
    reference_steps = 200_000

    paper_d_in = 2304  # Gemma 2 2B's residual stream, where Gemma Scope set its lr

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 7e-5  # Gemma Scope (Lieberum et al. 2024)

    adam_betas = (0.0, 0.999)
    """Read by ``SAETrainer`` when it builds the optimiser (default (0.9, 0.999))."""
    init_fire_rate = 0.004
    l0_control_rate = 0.1
    """With ``target_l0``, the gain of the L0 controller's fast part: each step multiplies every θ by
    1 + rate·(L0/target_l0 − 1), L0 being the previous step's (see the class docstring)."""
    l0_multiplier_rate = 0.2
    """With ``target_l0``, the gain of its slow part: each step multiplies the penalty's weight λ by
    1 + rate·(L0/target_l0 − 1), so λ settles where the θ controller no longer has to push."""

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return target_l0 is not None  # the warm-up's k

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        theta0 = cfg.init_threshold or 1.0
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), theta0, dtype=self.W_enc.dtype))
        self.register_buffer("warmup_threshold", torch.zeros((), dtype=self.W_enc.dtype))
        """The warm-up's running batch-wide threshold; > 0 until the first step after the warm-up copies it into θ."""
        self.register_buffer("last_l0", torch.full((), -1.0))
        """The previous step's batch L0 (all ranks and shards; -1: none yet), read by the L0 controller."""
        self.register_buffer("l0_multiplier", torch.full((), -1.0))
        """With ``target_l0``: λ, the L0 penalty's weight, which the L0 controller moves (-1: not started yet)."""

    @property
    def bandwidth(self) -> float:
        return self.cfg.bandwidth or 1.0

    @property
    def active_threshold(self) -> Tensor:
        """max(θ, 0), the threshold the latents act on: SAELens's JumpReLU computes ReLU(pre)·1[pre > θ], which is
        pre·1[pre > max(θ, 0)], so a negative θ (a folder from elsewhere; training keeps θ ≥ 0) lets no negative
        pre-activation through. The clamp passes θ's gradient wherever θ ≥ 0, so training is unchanged by it."""
        return self.threshold.clamp_min(0)

    @torch.no_grad()
    def initialise_from_data(self, sample: Tensor, target: Tensor | None = None, *, topk_warmup: bool = False) -> None:
        super().initialise_from_data(sample, target)
        if topk_warmup and self.cfg.warms_up:
            return  # b_enc stays where the base fit left it (0 for an SAE): see the class docstring
        # b_enc = θ − (1 − p)-quantile of W_enc·x: each latent fires on a fraction p at init. Over chunks of latents,
        # so the [rows, d_sae] pre-activations never exist whole (64 GiB at 65,536 rows × 65,536 latents, before the
        # quantile's sorted copy).
        x_n = self.normalise(sample.to(self.W_enc.device))
        if self.cfg.apply_b_dec_to_input:
            x_n = x_n - self.b_dec
        step = max(1, INIT_CHUNK_ELEMENTS // len(x_n))
        for j in range(0, self.cfg.d_sae, step):
            pre = (x_n @ self.W_enc[:, j:j + step]).float()
            q = torch.quantile(pre, 1 - self.init_fire_rate, dim=0)
            self.b_enc[j:j + step] = self.threshold[j:j + step] - q.to(self.b_enc.dtype)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        return pre * _above(pre, self.active_threshold, pre.dtype)

    @torch.no_grad()
    def _warmup_mask(self, pre: Tensor) -> Tensor:
        """The warm-up's active latents: each row's top k pre-activations that are positive (ReLU(TopK)), a bool mask
        [batch, d_sae]; also moves ``warmup_threshold`` towards the batch's (k·B)-th largest pre-activation (EMA
        rate threshold_momentum)."""
        k = max(1, round(self.cfg.target_l0 or 1))
        # Each row's top 4k, sorted: its first k are the row's selection, and all of them are the candidates for the
        # (k·B)-th largest, as in BatchTopK's selection (a full-matrix kthvalue is one slow select over B·d_sae on
        # CUDA). Inexact only if a row holds more than 4k of the batch's top k·B.
        # Over the global batch under data parallelism (the mean of the ranks' cuts is not the batch's: 2 ranks left
        # W_enc 0.003–0.005 (max abs) from 1 process 10 steps past the switch; `tests/test_distributed.py`).
        cand = pre.topk(min(pre.shape[1], 4 * k), dim=-1)
        flat = self.gather_over_ranks(cand.values).flatten()
        rows = flat.numel() // cand.values.shape[1]
        cut = flat.kthvalue(flat.numel() - k * rows + 1).values.to(self.warmup_threshold.dtype).clamp_min(1e-6)
        self.warmup_threshold.copy_(torch.where(self.warmup_threshold > 0,
                                                self.warmup_threshold.lerp(cut, self.cfg.threshold_momentum), cut))
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, cand.indices[:, :k], cand.values[:, :k] > 0)

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        pre = self.pre_acts(x_n)
        if self.warming_up:
            mask = self._warmup_mask(pre)
            f = pre * mask  # the gradient reaches the kept pre-activations only
            x_hat = self._output_offset(f @ self.W_dec, x_n)
            mse = (x_hat - y_n).pow(2).sum(-1).mean()
            return self._with_auxk(x_hat, f, mse, {"mse": mse.detach()}, pre, y_n, dead_mask,
                                   mask.sum(0, dtype=torch.float32))
        if self.cfg.target_l0 is not None:
            with torch.no_grad():  # the first step after a warm-up: every θ starts at its batch-wide threshold
                self.threshold.copy_(torch.where(self.warmup_threshold > 0, self.warmup_threshold, self.threshold))
                self.warmup_threshold.zero_()
                # then the L0 controller (class docstring): θ and λ each times 1 + rate·(last step's L0 / target
                # − 1), λ from θ̄² at its first step
                error = torch.where(self.last_l0 >= 0, self.last_l0 / self.cfg.target_l0 - 1, 0)
                self.threshold.mul_(1 + self.l0_control_rate * error).clamp_(min=0)
                start = (self._sum_over_shards(self.active_threshold.sum()) / self.total_latents).float().square()
                self.l0_multiplier.copy_(torch.where(self.l0_multiplier < 0, start,
                                                     self.l0_multiplier * (1 + self.l0_multiplier_rate * error)))
        f, row_l0, fire_counts = _JumpReLU.apply(pre, self.active_threshold, self.bandwidth)
        l0_loss = row_l0.mean()
        if self.cfg.target_l0 is not None:
            self.last_l0.copy_(self._sum_over_shards(l0_loss.detach()))
        x_hat = self._output_offset(f @ self.W_dec, x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        weight = self.cfg.l0_coefficient if self.cfg.target_l0 is None else self.l0_multiplier
        loss = mse + penalty_scale * weight * l0_loss
        return self._with_auxk(x_hat, f, loss, {"mse": mse.detach(), "l0": l0_loss.detach()}, pre, y_n, dead_mask,
                               fire_counts)

    def _with_auxk(self, x_hat, f, loss, losses, pre, y_n, dead_mask, fire_counts):  # type: ignore[no-untyped-def]
        """The step's outputs, with AuxK on the dead latents added to ``loss``."""
        n_dead = self._dead_total(dead_mask)
        if n_dead is not None and bool(n_dead > 0):  # the step's one host sync
            term, losses["auxk"] = self._auxk(self._aux_from(pre, dead_mask), y_n, x_hat, n_dead)
            loss = loss + term
        return x_hat, f, loss, losses, fire_counts.sum() / len(f), fire_counts

    @torch.no_grad()
    def project_parameters(self) -> None:
        super().project_parameters()
        # θ < 0 would let negative pre-activations through (SAELens PR #718 projects too).
        self.threshold.clamp_(min=0.0)

    def _extra_inference_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold}

    def _load_extra_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"])
