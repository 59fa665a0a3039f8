"""TopK SAE (Gao et al. 2024) and the machinery it shares with BatchTopK: sparse encoder backward and decoder, AuxK."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.saes.base import SAE
from sae.saes.kernels import SparseActs, SparseEncode, sparse_decode

class TopKFamily(SAE):
    """Shared TopK/BatchTopK machinery (Gao et al. 2024, "Scaling and evaluating sparse
    autoencoders"): unit-norm decoder, tied init, b_dec subtracted from the input, sparse
    encoder backward and decoder, and the AuxK loss for dead latents."""

    apply_b_dec_default = True
    uses_k = True
    unit_norm_decoder = True
    sparse_step = True
    has_auxk = True
    dense_auxk_copies = 1.6  # measured 1.58: the pre-activations kept for it, its masked activations, their gradient
    dense_auxk_copies_bf16 = 1.2  # measured 1.10
    dense_act_copies = 2.2  # measured 2.13 (BatchTopK, Matryoshka 2.12): pre-activations, AuxK's masked copy
    dense_act_copies_bf16 = 1.2  # measured 1.12
    reference_steps = 3_000
    paper_d_in = 576
    """SmolLM2-135M's residual stream, where the short-run lr was calibrated; ``sae.training.train.default_lr`` scales
    it by √(576 / d_in). Without that, TopK fell behind the plain reference loop in superposition on `sae planted`
    (issue 18; mean max cosine at n_features = 16·d_in, L0 8, width 2·n_features: TopK 0.768 → 0.927 at d_in 64 and
    0.696 → 0.851 at d_in 32, BatchTopK 0.816 → 0.897 and 0.752 → 0.868), and it still helps at d_in 256 (×1.5;
    TopK 0.842 → 0.888, BatchTopK 0.834 → 0.893 at 1024 features, L0 8); figures in ``default_lr``."""

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 2e-4 / math.sqrt(d_sae / 2**14)  # Gao et al. 2024, §2.2 (scaled with width)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(rows, latents) of the main activation, rows sorted ascending, and a device flag saying the selection is
        inexact and must be redone by ``_select_wider`` (None: exact by construction)."""
        raise NotImplementedError

    def _select_wider(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The exact selection where ``_select`` flagged its own as inexact."""
        raise NotImplementedError

    def _row_topk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of each row's k largest pre-activations, rows ascending."""
        feats = pre.topk(self.cfg.k, dim=-1, sorted=False).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.cfg.k)
        return rows, feats.flatten()

    def _encoder_b_dec(self) -> Tensor:
        """b_dec as the encoder subtracts it (its gradient there is a sum over latents; see ``_sum_over_shards``)."""
        return self.b_dec

    def _train_forward(self, x_n, y_n, dead_mask, penalty_scale):  # type: ignore[no-untyped-def]
        n = x_n.shape[0]
        n_dead = self._dead_total(dead_mask)
        n_main: list[int] = []
        auxk: list[bool] = []

        def select(pre: Tensor) -> tuple[Tensor, Tensor, bool]:
            rows, feats, inexact = self._select(pre)
            checks = [f for f in (inexact, None if n_dead is None else n_dead > 0) if f is not None]
            read = torch.stack(checks).tolist() if checks else []  # the step's one host sync: both flags at once
            redo = inexact is not None and bool(read.pop(0))
            any_dead = n_dead is not None and bool(read.pop(0))
            if redo:
                rows, feats = self._select_wider(pre)
            n_main.append(rows.numel())
            if not any_dead:
                return rows, feats, False
            auxk.append(True)
            if self._dense_auxk(pre):  # AuxK reads the dense pre-activations after the forward
                return rows, feats, True
            aux_rows, aux_feats = self._select_aux(pre, dead_mask, min(self.aux_k, pre.shape[1]))
            return torch.cat([rows, aux_rows]), torch.cat([feats, aux_feats]), False

        vals, rows, feats, pre = SparseEncode.apply(
            x_n, self._encoder_b_dec(), self.W_enc, self.b_enc, self.cfg.apply_b_dec_to_input, select
        )
        m = n_main[0]
        acts = SparseActs(rows[:m], feats[:m], F.relu(vals[:m]))
        self._observe(acts)
        x_hat = self._output_offset(self._sum_over_shards(sparse_decode(acts, self.W_dec, n)), x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        loss = mse
        losses = {"mse": mse.detach()}
        if auxk:
            aux = (self._aux_from(pre, dead_mask) if pre.numel()
                   else self._aux_acts(rows[m:], feats[m:], vals[m:], dead_mask))
            term, losses["auxk"] = self._auxk(aux, y_n, x_hat, n_dead)
            loss = loss + term
        fired = acts.values.detach() > 0
        fire_counts = torch.zeros(self.cfg.d_sae, dtype=torch.long, device=fired.device).index_add_(
            0, acts.features, fired.long())
        l0 = self._sum_over_shards(fired.sum(dtype=torch.float32)) / n
        return x_hat, acts, loss, losses, l0, fire_counts

    def _observe(self, acts: SparseActs) -> None:
        """Hook for statistics gathered from the training activations."""


class TopKSAE(TopKFamily):
    """Exactly k latents per token: ReLU(TopK(W_enc(x − b_dec) + b_enc)) (Gao et al. eq. 3)."""

    sae_lens_architecture = "topk"

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        return (*self._row_topk(pre), None)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))

    def encode_sparse_normalised(self, x_n: Tensor) -> SparseActs:
        pre = self.pre_acts(x_n)
        rows, feats = self._row_topk(pre)
        values = pre[rows, feats]
        active = values > 0  # ReLU(TopK): a selected latent with a negative pre-activation is off
        return SparseActs(rows[active], feats[active], values[active])
