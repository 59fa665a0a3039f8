"""Know the cost before the run: memory per SAE, what the device has free, and the widest SAE that would fit.

The figure is what a step really holds, measured (``scripts/bench_memory.py``: peak RSS of every variant's
initialisation and first steps, fp32 and bf16 autocast, AuxK firing), not a count of the tensors one would name: an
SAE that cannot fit fails before the model loads and the first shard is read, with the width that would fit, and
one the plan admits does not run out of memory at step 1. It is the larger of two moments:

* the initial fit, before any gradient or Adam state exists: the weights, the sample's working copies and the
  variant's own workspace (JumpReLU's per-latent quantile, in bounded chunks);
* a training step: ``STEP_PARAM_COPIES`` parameter-sized tensors and the variant's ``dense_act_copies``
  [batch, d_sae] ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae.config import UserError
from sae.data.model import free_bytes
from sae.data.store import human_bytes
from sae.saes import SAE_CLASSES, dense_auxk

STEP_PARAM_COPIES = 5.25
"""Parameter-sized fp32 tensors alive at a step's peak: the weights, their gradients and Adam's two moments (4), and
the step's temporaries (a second decoder gradient accumulated into the first by the AuxK decode, the transposed
encoder gradient, ``remove_parallel_grads``'s product, Adam's √v, bf16 copies under autocast). Measured by
``scripts/bench_memory.py`` as the batch-independent part of the peak (batches of 512 and 2,048 rows at d_in 256,
d_sae 8,192, AuxK firing): 4.4 for the TopK family, 5.0 ReLU+L1, 4.9 JumpReLU (4.3–4.7 under bf16 autocast). With
4 and fewer activation copies, the plan left TopK's peak at d_in 1024 × 32,768 ~35% above it (issue 19)."""
INIT_SAMPLE_COPIES = 2.5
"""Copies of the initial fit's sample [rows, d_in] alive while it runs: 2.05 measured on the CPU (a working copy and
the centred one); on a GPU the sample's device copy may live beside the first working copy."""
HEADROOM = 0.9
"""Fraction of the free memory a plan may use: allocator fragmentation and the data stream need the rest."""


class PlanError(UserError):
    """The run cannot fit the device; the message names the largest width that would."""


@dataclass(frozen=True)
class SAECost:
    name: str
    architecture: str
    d_in: int
    d_sae: int
    batch: int
    """Rows per step on this process."""
    d_out: int | None = None
    """A transcoder's output width (None: an SAE, d_in)."""
    skip: bool = False
    """A transcoder's linear skip W_skip [d_out, d_in]."""
    init_rows: int = 0
    """Rows of the sample the initial fit reads (``sae.training.train.SCALE_SAMPLE_ROWS``; 0: no initial fit)."""
    precision: str = "fp32"
    """How the step computes (``step_precision``): under bf16 autocast some [batch, d_sae] tensors are half size."""
    aux_k: int = 0
    """k_aux of its AuxK pass (``SAEConfig.auxk_latents``; 0: none)."""
    shards: int = 1
    """Processes its latents are split over (``d_sae`` is one shard's): AuxK's path is chosen by all of them."""
    device_type: str = "cpu"
    """Where it trains: AuxK's decode is dense past a k_aux / d_sae crossover that depends on it
    (``sae.saes.base.dense_auxk``), and holds the variant's ``dense_auxk_copies`` more [batch, d_sae] tensors then."""
    topk_warmup: bool = False
    """The SAE trains with the TopK warm-up from its first step (``SAEConfig.warms_up`` in a run with warm-up steps):
    its initial fit is then the base one, without the variant's workspace (JumpReLU's b_enc starts at 0)."""

    def params(self, d_sae: int | None = None) -> int:
        """W_enc, W_dec, b_enc, a threshold, b_dec and a transcoder's W_skip, at this SAE's width or at `d_sae`."""
        d = self.d_sae if d_sae is None else d_sae
        d_out = self.d_out or self.d_in
        return (self.d_in + d_out) * d + 2 * d + d_out + (self.d_in * d_out if self.skip else 0)

    def activation_bytes(self, d_sae: int | None = None) -> int:
        """[batch, d_sae] tensors alive at a step's peak, in fp32 sizes: the variant's measured ``dense_act_copies``
        (``dense_act_copies_bf16`` under autocast; about one for TopK, whose sparse step never builds the dense
        activations)."""
        variant = SAE_CLASSES[self.architecture]
        bf16 = self.precision == "bf16"
        copies = variant.dense_act_copies_bf16 if bf16 else variant.dense_act_copies
        d = self.d_sae if d_sae is None else d_sae
        if self.aux_k and dense_auxk(self.aux_k, d * self.shards, self.device_type):
            copies += variant.dense_auxk_copies_bf16 if bf16 else variant.dense_auxk_copies
        return round(4 * copies * self.batch * d)

    def step_bytes(self, d_sae: int | None = None) -> int:
        return round(4 * STEP_PARAM_COPIES * self.params(d_sae)) + self.activation_bytes(d_sae)

    def init_bytes(self, d_sae: int | None = None) -> int:
        """The initial fit's peak: the weights, the sample's copies and the variant's workspace."""
        if not self.init_rows:
            return 0
        workspace = 0 if self.topk_warmup else SAE_CLASSES[self.architecture].init_workspace_bytes
        width = self.d_in + (self.d_out or 0)  # a transcoder's sample holds its output hook too
        return round(4 * self.params(d_sae) + 4 * INIT_SAMPLE_COPIES * self.init_rows * width) + workspace

    def bytes(self, d_sae: int | None = None) -> int:
        return max(self.step_bytes(d_sae), self.init_bytes(d_sae))

    def describe(self) -> str:
        p = self.params()
        init = f"; initial fit {human_bytes(self.init_bytes())}" if self.init_bytes() > self.step_bytes() else ""
        count = f"{p / 1e6:.2f}M" if p >= 100_000 else f"{p:,}"  # a planted or test SAE: 8,448, not 0.01M
        return (f"  {self.name}: d_sae {self.d_sae:,}, {count} parameters: {human_bytes(4 * p)} weights + "
                f"{human_bytes(8 * p)} Adam + {human_bytes(4 * p)} gradients + "
                f"{human_bytes(4 * (STEP_PARAM_COPIES - 4) * p)} step temporaries + "
                f"{human_bytes(self.activation_bytes())} activations (batch {self.batch}){init}")


def step_precision(device: torch.device) -> str:
    """How a training step computes on `device`: "bf16" (autocast for the matrix products; weights, gradients and
    Adam's moments stay fp32) on a CUDA GPU with native bf16 (Ampere and later), "fp32" elsewhere. On older GPUs bf16
    is emulated, slower than fp32 (``torch.cuda.is_bf16_supported(including_emulation=False)`` is False there), and
    fp16 autocast would need a loss scaler for gradients that underflow its range; on the CPU most x86 cores have no
    fast bf16 matrix product either. Train prints the choice with the plan."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def check_fits(costs: list[SAECost], device: torch.device, free: int | None = None, data_bytes: int = 0) -> None:
    """Raise `PlanError` when the SAEs of this process, with the `data_bytes` its data source keeps on the device
    (a live model and its shuffle chunks, a cache's read-ahead windows), need more than the device has free, naming
    the largest width the biggest SAE could have with the rest unchanged."""
    free = free_bytes(device) if free is None else free
    if free is None or not costs:
        return
    budget = HEADROOM * free
    need = data_bytes + sum(c.bytes() for c in costs)
    if need <= budget:
        return
    big = max(costs, key=lambda c: c.bytes())
    rest = need - big.bytes()
    fits = _widest(big, budget - rest)
    hint = (f"{big.name} would fit with d_sae ≤ {fits:,} (expansion_factor ≤ {fits // big.d_in})" if fits > 0
            else "even the smallest width does not fit beside the other SAEs")
    raise PlanError(f"the SAEs and their data need ≈ {human_bytes(need)} on {device} but {human_bytes(free)} is "
                    f"free; {hint}; or lower batch_size, or spread a sweep over processes with torchrun and "
                    "distribute_saes=true")


def _widest(cost: SAECost, budget: float) -> int:
    """The largest d_sae whose cost fits `budget` (0 if none does); cost grows with d_sae, so bisect."""
    lo, hi = 0, max(1, cost.d_sae)
    while cost.bytes(hi) <= budget:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost.bytes(mid) <= budget else (lo, mid)
    return lo
