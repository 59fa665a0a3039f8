"""BatchTopK (Bussmann et al. 2024) and Matryoshka BatchTopK (Bussmann et al. 2025)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.saes.base import SAEConfig
from sae.saes.kernels import SparseActs, flat_topk, sparse_decode
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
    batch budget its variable per-token L0 and its thresholds time to settle (``SAEConfig.threshold_momentum``).

    The warm-up's last tenth hands over gradually (``sae.training.trainer.topk_row_weight``): candidates are ranked by
    pre-activation / t^w, t being their row's k-th largest pre-activation, while w falls from 1 (every row's k-th scores
    1, so the batch's top k·B is each row's top k) to 0 (BatchTopK). A row whose k-th is not positive (t taken as 1e-6)
    gives up its non-positive slots at once, as ReLU(TopK) never fires them anyway. An abrupt switch fails where a few
    rows carry much of the energy (SmolLM2-135M layer 6: 0.5% of rows, 28% of the centred energy): the batch-wide
    selection gives those rows many latents at once, too late in the run (lr decaying) for the encoder to adapt.
    Held-out FVU (`sae eval`, k 32, width ×8, 1,171 steps of 256 over a 28k-token cache; PCA at the same L0 in
    brackets):

    | switch | layer 6 | layer 15 |
    |---|---|---|
    | abrupt at 0.9 | 0.278 at L0 20 (0.385) | 0.154 at L0 40 (0.433) |
    | hand-over 0.81 → 0.9 | 0.079 at L0 36 (0.307) | 0.151 at L0 40 (0.433) |
    | hand-over 0.855 → 0.9 | 0.124 at L0 23 (0.368) | |
    | abrupt at 0.8 | 0.090 at L0 27 (0.347) | |
    | no warm-up | 0.069 at L0 39 (0.295) | |

    Its length is a fraction of the warm-up (``HANDOVER_FRAC``), so it scales with the run. It costs some planted
    recovery (mean max cosine of BatchTopK trained alone at d_in 32 / 128 features / L0 3, 32 / 512 / 3 and 64 / 1024 /
    8: 0.959, 0.863, 0.925 with the abrupt switch at 0.9; 0.944, 0.836, 0.909 with the hand-over; 0.829 and 0.901 with
    the abrupt switch at 0.8; 2026-12-07). Real activations decide (docs/planted.md has the grid)."""

    sae_lens_architecture = "jumprelu"
    _handover_scale: Tensor | None = None
    """[rows, 1] fp32 in the hand-over, set by ``_select`` for this batch: each row's k-th largest pre-activation
    (at least 1e-6) to the power ``row_weight``, by which its candidates are ranked (``_top_of_candidates``); None
    outside it."""

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
        # Tried on 2026-12-07 and not adopted: unit-norm columns (TopK's start) when the TopK warm-up runs. On the
        # planted grid it recovered more at four points (d_in 32 / 512 features / L0 3: 0.853 → 0.927; d_in 256 /
        # 1024 / 8: 0.967 → 0.990) and less at six (d_in 256 / 1024 / 3: 0.995 → 0.958; docs/planted.md), and on
        # SmolLM2 it reconstructed worse: layer 15 held-out FVU 0.155 → 0.159 (k 32, ×8, 1,224 steps), layer 6 0.278 →
        # 0.343 (1,171 steps) and 0.356 → 0.860 (111 steps), both with the abrupt switch to the batch-wide selection
        # that the hand-over (see the class) has since replaced. With the hand-over (2026-12-07), unit-norm columns
        # again: d_in 256 / 1024 / 3 0.996 → 0.957, SmolLM2 layer 6 (×8) 0.079 → 0.100; this scale floored at 0.5 (its
        # width-×8 value): 0.837 → 0.917 at d_in 32 / 512 / 3, but SmolLM2 layer 6 at ×32 0.078 → 0.086 and 0.087 (two
        # seeds), layer 15 0.170 → 0.173 (docs/planted.md has the table).
        with torch.no_grad():
            self.W_enc.mul_(min(1.0, math.sqrt(2 * cfg.d_in / self.total_latents)))

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        # The top k·B of the batch come from each row's top m = 4k candidates: a flat topk over all B·d_sae entries
        # is ~6× slower than a row-wise one on CPU, a full sort on CUDA (≈5 GB at 4096 × 65,536), and refused past
        # 2³¹ entries. It is exact unless some row took all m of its candidates (it might have needed more), which
        # the returned flag says without a host read; ``_select_wider`` then widens the candidates until none does.
        hand_over = 0 < self.row_weight < 1
        # fp32: a bf16 quotient would tie hundreds of candidates at the cut (measured at weight 0.99)
        self._handover_scale = self._row_kth(pre).float().clamp_min(1e-6).pow(self.row_weight) if hand_over else None
        if self.row_weight >= 1:
            return (*self._row_topk(pre), None)
        m = min(pre.shape[1], 4 * self.cfg.k)
        rows, feats, full = self._top_of_candidates(pre, m)
        return rows, feats, full if m < pre.shape[1] else None

    def _select_wider(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        m = min(pre.shape[1], 4 * self.cfg.k)
        while True:
            m = min(pre.shape[1], 4 * m)
            rows, feats, full = self._top_of_candidates(pre, m)
            if m == pre.shape[1] or not bool(full):  # rare: a sync per widening
                return rows, feats

    def _row_kth(self, pre: Tensor) -> Tensor:
        """[rows, 1]: each row's k-th largest pre-activation (over every latent)."""
        return pre.topk(self.cfg.k, dim=-1, sorted=False).values.min(-1, keepdim=True).values

    def _top_of_candidates(self, pre: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
        """(rows, latents) of the batch's top k·B among each row's top m, rows ascending, and whether a row took all
        m (a device flag). In the hand-over the candidates are ranked by pre-activation / ``_handover_scale``.

        Data parallel, the batch is the global one, as in one process: every rank gathers all ranks' candidate
        values (b·m floats each, against the gradients' 2·d_in·d_sae), takes the same top k·b·ranks of them and
        keeps the entries of its own rows; the flag covers every rank's rows, so all widen together. Per-rank top
        k·b selections (before) kept a fixed share of the budget on each rank, so 2 ranks ≠ 1 process. Its own
        entries' count varies, read on the host: one sync per step, data parallel only."""
        n = pre.shape[0]
        cand = pre.topk(m, dim=-1, sorted=False)
        scale = self._handover_scale
        every = self.gather_over_ranks(cand.values if scale is None else cand.values.float() / scale)
        ranks = every.shape[0]
        flat = flat_topk(every.reshape(ranks * n, m), self.cfg.k * n * ranks)
        rows = flat // m
        per_row = torch.zeros(ranks * n, dtype=torch.long, device=pre.device).index_add_(0, rows, torch.ones_like(rows))
        full = (per_row == m).any()
        if ranks == 1:
            order = torch.argsort(rows)
            return rows[order], cand.indices.flatten()[flat][order], full
        flat = flat.sort().values  # rank by rank, row by row
        mine = self.rank_of_process * n * m
        lo, hi = torch.searchsorted(flat, torch.tensor([mine, mine + n * m], device=flat.device)).tolist()
        flat = flat[lo:hi] - mine
        return flat // m, cand.indices.flatten()[flat], full

    @torch.no_grad()
    def _observe(self, acts: SparseActs) -> None:
        """θ follows the smallest positive activation kept (EMA), starting at the first batch's; with device-side
        `where`s rather than host reads (a batch with none positive, +inf here, leaves θ as it is)."""
        if not self.training or self.warming_up:  # the hand-over's selections are not the batch budget's yet
            return
        smallest = torch.where(acts.values > 0, acts.values, torch.inf).min().to(self.threshold.dtype)
        smallest = self.gather_over_ranks(smallest).min()  # the global batch's, as one process sees it
        moved = torch.where(self.threshold == 0, smallest, self.threshold.lerp(smallest, self.cfg.threshold_momentum))
        self.threshold.copy_(torch.where(torch.isfinite(smallest), moved, self.threshold))

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
        # Each band is decoded with the other latents' weights zeroed rather than cut out: a boolean-mask index would
        # make the host wait for the device three times per band.
        partial, start = self._output_offset(0.0, x_n), 0
        for width in self.cfg.matryoshka_widths[:-1]:
            band = (acts.features >= start) & (acts.features < width)
            partial = partial + sparse_decode(acts._replace(values=acts.values * band), self.W_dec, len(x_n))
            mse = (partial - y_n).pow(2).sum(-1).mean()
            loss = loss + mse
            losses[f"mse_{width}"] = mse.detach()
            start = width
        return x_hat, acts, loss, losses, l0, fire_counts
