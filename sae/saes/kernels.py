"""Sparse autograd kernels of the TopK family: the encoder's pre-activations at the selected (row, latent) pairs with
a backward that touches only those pairs, and the decoder as an ``embedding_bag``, so a training step never builds the
dense [batch, d_sae] activations or their gradient."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseActs(NamedTuple):
    """Active latents in coordinate form, rows sorted ascending (one entry per active pair)."""

    rows: Tensor
    """Token index of each entry, int64 [nnz]."""
    features: Tensor
    """Latent index of each entry, int64 [nnz]."""
    values: Tensor
    """Activation of each entry, [nnz]."""

    def to_dense(self, n_rows: int, d_sae: int) -> Tensor:
        out = self.values.new_zeros(n_rows, d_sae)
        out[self.rows, self.features] = self.values
        return out


def _csr_offsets(sorted_index: Tensor, n: int) -> Tensor:
    """Start offset of each of n bags for an ascending ``sorted_index`` (empty bags allowed), by binary search: a
    ``bincount`` would make the host wait for the device on CUDA (see tests/test_syncs.py)."""
    return torch.searchsorted(sorted_index, torch.arange(n, device=sorted_index.device, dtype=sorted_index.dtype))


class SparseEncode(torch.autograd.Function):
    """Pre-activations at selected (row, latent) pairs, with a *sparse* backward.

    Forward runs the dense encoder matmul once and lets ``select`` pick the pairs. Backward
    only touches the selected pairs: dW_enc, db_enc, db_dec and dx cost O(nnz·d_in) instead of
    the O(batch·d_sae·d_in) dense matmuls. dW_enc and dx are assembled with ``embedding_bag``
    (over pairs sorted by latent, and by row), which avoids materialising [nnz, d_in].

    ``select`` also says whether the dense pre-activations [batch, d_sae] must come out too (a fourth output, else
    an empty tensor): AuxK's dense decode uses them where its pairs outnumber what the sparse backward does faster
    (``sae.saes.base.dense_auxk``); their gradient then adds the dense matmuls' terms.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_n: Tensor,
        b_dec: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        apply_b_dec: bool,
        select: Callable[[Tensor], tuple[Tensor, Tensor, bool]],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_c = x_n - b_dec if apply_b_dec else x_n
        pre = torch.addmm(b_enc, x_c, W_enc)
        rows, feats, keep_pre = select(pre)
        ctx.save_for_backward(x_c, W_enc, rows, feats)
        ctx.apply_b_dec = apply_b_dec
        ctx.mark_non_differentiable(rows, feats)
        ctx.set_materialize_grads(False)
        return pre[rows, feats], rows, feats, pre if keep_pre else pre.new_empty(0)

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor | None, _rows: None, _feats: None,  # type: ignore[override]
                 grad_pre: Tensor | None) -> tuple[Tensor | None, ...]:
        # In the parameters' dtype whatever autocast is on: under bf16 autocast (which the forward's matmul runs in)
        # a backward that re-entered it would cast W_enc to bf16 every step and round b_dec's gradient to bf16.
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return SparseEncode._backward(ctx, grad_vals, grad_pre)

    @staticmethod
    def _backward(ctx: Any, grad_vals: Tensor | None, grad_pre: Tensor | None) -> tuple[Tensor | None, ...]:
        x_c, W_enc, rows, feats = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_vals = x_c.new_zeros(rows.shape) if grad_vals is None else grad_vals.to(x_c.dtype)
        order = torch.argsort(feats)
        # dW_encᵀ[j] = Σ_{(b, j) selected} grad · x_c[b]: one bag of token rows per latent.
        grad_W_enc_t = F.embedding_bag(
            rows[order],
            x_c,
            _csr_offsets(feats[order], d_sae),
            mode="sum",
            per_sample_weights=grad_vals[order],
        )
        grad_b_enc = torch.zeros(d_sae, dtype=x_c.dtype, device=x_c.device)
        grad_b_enc.index_add_(0, feats, grad_vals)
        if grad_pre is not None:
            grad_pre = grad_pre.to(x_c.dtype)
            grad_W_enc_t.addmm_(grad_pre.T, x_c)
            grad_b_enc.add_(grad_pre.sum(0))
        # pre = (x − b_dec) W_enc + b_enc  ⇒  ∂/∂b_dec = −W_enc · (∂/∂b_enc).
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.apply_b_dec else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the input itself needs a gradient only when something upstream is trained
            # dx[b] = Σ_{(b, j) selected} grad · W_enc[:, j]: one bag of encoder columns per token row.
            by_row = torch.argsort(rows, stable=True)  # AuxK's pairs follow the main ones: rows are not sorted
            grad_x = F.embedding_bag(
                feats[by_row],
                W_enc.T.contiguous(),
                _csr_offsets(rows[by_row], x_c.shape[0]),
                mode="sum",
                per_sample_weights=grad_vals[by_row],
            )
            if grad_pre is not None:
                grad_x.addmm_(grad_pre, W_enc.T)
        return grad_x, grad_b_dec, grad_W_enc_t.T, grad_b_enc, None, None


TOPK_MAX_ELEMENTS = 2**30
"""Largest input ``flat_topk`` hands to one topk: CUDA sorts a topk over few long slices and refuses more than 2³¹ − 1
elements."""


def flat_topk(values: Tensor, k: int) -> Tensor:
    """Flat indices of the k largest entries of `values` [rows, m], in chunks of rows of at most ``TOPK_MAX_ELEMENTS``
    (each chunk's own top k, then the top k of those), never one topk over more."""
    rows, m = values.shape
    if values.numel() <= TOPK_MAX_ELEMENTS:
        return values.flatten().topk(k, sorted=False).indices
    step = max(1, TOPK_MAX_ELEMENTS // m)
    parts = [flat_topk(values[i:i + step], min(k, values[i:i + step].numel())) + i * m for i in range(0, rows, step)]
    index = torch.cat(parts)
    return index[values.flatten()[index].topk(k, sorted=False).indices]


def sparse_decode(acts: SparseActs, W_dec: Tensor, n_rows: int) -> Tensor:
    """Σ_j values · W_dec[features] per row, without the dense [n_rows, d_sae] matrix.

    ``embedding_bag``'s backward is sparse as well: gradients reach only the used W_dec rows.
    """
    return F.embedding_bag(
        acts.features,
        W_dec,
        _csr_offsets(acts.rows, n_rows),
        mode="sum",
        per_sample_weights=acts.values.to(W_dec.dtype),
    )


