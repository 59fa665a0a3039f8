"""BatchTopK (Bussmann et al. 2024) and Matryoshka BatchTopK (Bussmann et al. 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.saes.base import SAEConfig
from sae.saes.kernels import SparseActs, sparse_decode
from sae.saes.topk import TopKFamily

class BatchTopKSAE(TopKFamily):
    """Top k·B activations over the whole batch (Bussmann et al. 2024, "BatchTopK Sparse
    Autoencoders"), so tokens get a variable number of latents. Inference replaces the
    batch-dependent selection by a global threshold θ — the running average of the smallest
    kept activation — i.e. a JumpReLU with one θ shared by all latents; SAELens saves it as
    ``jumprelu`` with that θ broadcast to every latent, and so do we.

    Training starts with a per-token TopK warm-up (``sae.training.train.TrainConfig.topk_warmup_frac``): the batch-wide
    selection gives no latent to a token whose features have no trained latent yet, so rare features are never
    learnt. Mean max cosine with the true dictionary on the CI-sized hard `sae planted` data (power-law frequencies,
    781 steps, k 3), seeds 0 / 1 / 2, by warm-up fraction:

    | warm-up | BatchTopK | JumpReLU (target_l0 3) |
    |---|---|---|
    | none | 0.82 | 0.77 (seed 0) |
    | 0.75 | 0.96 / 0.946 / 0.949 | 0.91 / 0.906 / 0.899 |
    | 0.9 | 0.97 / 0.960 / 0.962 | 0.956 / 0.954 / 0.953 |

    Recovery peaks at the end of the warm-up; JumpReLU's then drifts down while its thresholds settle (0.95 → 0.93 in
    200 steps, even with its L0 held at the target by λ = 100), BatchTopK's barely. The last tenth still gives the
    batch budget its variable per-token L0 and its thresholds time to settle (``SAEConfig.threshold_momentum``)."""

    sae_lens_architecture = "jumprelu"

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return True

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_enc.dtype))
        # Smaller encoder at init, as in Bussmann et al.'s reference code (github.com/
        # bartbussmann/BatchTopK, sae.py): W_enc ~ kaiming_uniform_ on [d_in, d_sae] (column norm
        # √(2·d_in/d_sae)), W_dec = W_encᵀ row-normalised — i.e. our tied init with W_enc scaled.
        # With unit-norm encoder columns the batch-wide selection gives high-norm tokens many
        # overlapping latents, the first reconstructions overshoot (FVU ≈ 1.5 at step 1 on the
        # planted-dictionary test vs 0.7 for TopK), and the gradients shrink every encoder
        # column; most latents then never clear the global threshold again.
        with torch.no_grad():
            self.W_enc.mul_(min(1.0, math.sqrt(2 * cfg.d_in / self.total_latents)))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        if self.warming_up:
            return self._row_topk(pre)
        n, d_sae = pre.shape
        k_total = self.cfg.k * n
        # A flat topk over n·d_sae entries is ~6× slower than a row-wise one on CPU, so first
        # keep each row's top-m candidates. This is exact unless some row needs all m of them
        # (it might need more): then fall back to the flat topk.
        m = min(d_sae, 4 * self.cfg.k)
        cand = pre.topk(m, dim=-1, sorted=False)
        flat = cand.values.flatten().topk(k_total, sorted=False).indices
        rows = flat // m
        if m < d_sae and bool((torch.bincount(rows, minlength=n) == m).any()):
            flat = pre.flatten().topk(k_total, sorted=False).indices
            rows, feats = flat // d_sae, flat % d_sae
        else:
            feats = cand.indices.flatten()[flat]
        order = torch.argsort(rows)
        return rows[order], feats[order]

    @torch.no_grad()
    def _observe(self, acts: SparseActs) -> None:
        positive = acts.values[acts.values > 0]
        if not self.training or self.warming_up or positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if self.threshold == 0:  # first batch: start at the observed value, not at 0
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, self.cfg.threshold_momentum)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        return F.relu(pre) * (pre > self.threshold)

    def _extra_inference_tensors(self) -> dict[str, Tensor]:
        return {"threshold": self.threshold.expand(self.cfg.d_sae)}

    def _load_extra_inference_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.threshold.copy_(tensors["threshold"].flatten()[0])


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK with nested dictionaries (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
    Features with Matryoshka Sparse Autoencoders"; Nabeshima 2024, "Matryoshka Sparse Autoencoders"). With prefix
    widths m₁ < … < m_L = d_sae (``cfg.matryoshka_widths``) and f the one BatchTopK selection over all latents,

        L = Σ_ℓ ‖x − b_dec − Σ_{j < m_ℓ} f_j W_dec,j‖² + α·AuxK,

    so the first m₁ latents must reconstruct x on their own and learn the general features, while later ones add
    detail. That counters feature absorption (Chanin et al. 2024, "A is for Absorption"): when a parent feature is
    present whenever its child is, a plain sparse SAE saves L0 by folding the parent's direction into the child's
    latent and silencing the parent's latent on the child's tokens; here an inner prefix that holds the parent's
    latent but not the child's must still reconstruct those tokens, so the parent's latent keeps firing on them.

    The loss is SAELens's (``MatryoshkaBatchTopKTrainingSAE``: the full-width loss plus each inner prefix's MSE, all
    summed) and the paper's; Bussmann et al.'s reference code averages the levels instead, which under Adam only
    changes AuxK's weight relative to them. AuxK models the full reconstruction's residual, as in both (SAELens's
    default ``use_matryoshka_aux_loss=False``). Inference and the saved folder are BatchTopK's: SAELens saves its
    Matryoshka SAEs as ``jumprelu`` with the global threshold broadcast, and so do we.

    It skips BatchTopK's TopK warm-up: per-token TopK training folds parents into children as TopK does, and the
    nested loss cannot undo that in the steps left (absorption test: the parent latent fired on 0.001 of child tokens
    after a 90% warm-up, against 0.88–1.00 without).
    """

    @staticmethod
    def warms_up(target_l0: float | None) -> bool:
        return False

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        x_hat, acts, loss, losses, l0, fire_counts = super()._train_forward(x_n, y_n, dead_mask, penalty_scale)
        # Cumulative partial decodes: each prefix adds only its own band [previous width, width) of the active
        # latents to the one before, so all inner reconstructions together decode each active latent at most once.
        partial, start = self._output_offset(0.0, x_n), 0
        for width in self.cfg.matryoshka_widths[:-1]:
            band = (acts.features >= start) & (acts.features < width)
            partial = partial + sparse_decode(SparseActs(*(t[band] for t in acts)), self.W_dec, len(x_n))
            mse = (partial - y_n).pow(2).sum(-1).mean()
            loss = loss + mse
            losses[f"mse_{width}"] = mse.detach()
            start = width
        return x_hat, acts, loss, losses, l0, fire_counts
