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
    dense_act_copies = 2  # only the pre-activations and the selection's workspace (see SparseEncode)
    reference_steps = 3_000

    @staticmethod
    def paper_lr(d_sae: int) -> float:
        return 2e-4 / math.sqrt(d_sae / 2**14)  # Gao et al. 2024, §2.2 (scaled with width)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, latents) of the main activation, rows sorted ascending."""
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
        n_dead = int(self._sum_over_shards(dead_mask.sum())) if dead_mask is not None else 0
        aux_k = min(self.aux_k, n_dead)
        n_main: list[int] = []

        def select(pre: Tensor) -> tuple[Tensor, Tensor]:
            rows, feats = self._select(pre)
            n_main.append(rows.numel())
            if n_dead == 0:
                return rows, feats
            aux_rows, aux_feats = self._select_aux(pre, dead_mask, aux_k)
            return torch.cat([rows, aux_rows]), torch.cat([feats, aux_feats])

        vals, rows, feats = SparseEncode.apply(
            x_n, self._encoder_b_dec(), self.W_enc, self.b_enc, self.cfg.apply_b_dec_to_input, select
        )
        m = n_main[0]
        acts = SparseActs(rows[:m], feats[:m], F.relu(vals[:m]))
        self._observe(acts)
        x_hat = self._output_offset(self._sum_over_shards(sparse_decode(acts, self.W_dec, n)), x_n)
        mse = (x_hat - y_n).pow(2).sum(-1).mean()
        loss = mse
        losses = {"mse": mse.detach()}
        if n_dead:
            term, losses["auxk"] = self._auxk(SparseActs(rows[m:], feats[m:], F.relu(vals[m:])), y_n, x_hat, n_dead)
            loss = loss + term
        fired = acts.values.detach() > 0
        fire_counts = torch.bincount(acts.features[fired], minlength=self.cfg.d_sae)
        l0 = self._sum_over_shards(fired.sum(dtype=torch.float32)) / n
        return x_hat, acts, loss, losses, l0, fire_counts

    def _observe(self, acts: SparseActs) -> None:
        """Hook for statistics gathered from the training activations."""


class TopKSAE(TopKFamily):
    """Exactly k latents per token: ReLU(TopK(W_enc(x − b_dec) + b_enc)) (Gao et al. eq. 3)."""

    sae_lens_architecture = "topk"

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        return self._row_topk(pre)

    def encode_normalised(self, x_n: Tensor) -> Tensor:
        pre = self.pre_acts(x_n)
        top = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, top.indices, F.relu(top.values))

    def encode_sparse_normalised(self, x_n: Tensor) -> SparseActs:
        pre = self.pre_acts(x_n)
        rows, feats = self._select(pre)
        values = pre[rows, feats]
        active = values > 0  # ReLU(TopK): a selected latent with a negative pre-activation is off
        return SparseActs(rows[active], feats[active], values[active])
