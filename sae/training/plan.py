"""Know the cost before the run: memory per SAE, what the device has free, and the widest SAE that would fit.

The estimate is deliberately simple and on the high side — fp32 weights, their gradients and Adam's two moments
(4 copies of the parameters), plus the [batch, d_sae] activations a step keeps for its backward — so that an SAE
that cannot fit fails before the model loads and the first shard is read, with the width that would fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sae.config import UserError
from sae.saes import SAE_CLASSES

PARAM_COPIES = 4
"""Weights, gradients, Adam's first and second moments, all fp32."""
HEADROOM = 0.9
"""Fraction of the free memory a plan may use: allocator fragmentation and the data stream need the rest."""
GIB = 2**30


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

    def params(self, d_sae: int | None = None) -> int:
        """W_enc, W_dec, b_enc, a threshold, b_dec and a transcoder's W_skip, at this SAE's width or at `d_sae`."""
        d = self.d_sae if d_sae is None else d_sae
        d_out = self.d_out or self.d_in
        return (self.d_in + d_out) * d + 2 * d + d_out + (self.d_in * d_out if self.skip else 0)

    def activation_bytes(self, d_sae: int | None = None) -> int:
        """fp32 [batch, d_sae] tensors alive in one step: the variant's ``dense_act_copies`` (TopK's sparse step keeps
        only the pre-activations and the selection's workspace, never the dense activations)."""
        copies = SAE_CLASSES[self.architecture].dense_act_copies
        return 4 * copies * self.batch * (self.d_sae if d_sae is None else d_sae)

    def bytes(self, d_sae: int | None = None) -> int:
        return 4 * PARAM_COPIES * self.params(d_sae) + self.activation_bytes(d_sae)

    def describe(self) -> str:
        p = self.params()
        return (f"  {self.name}: d_sae {self.d_sae:,}, {p / 1e6:.2f}M parameters: {size(4 * p)} weights + "
                f"{size(8 * p)} Adam + {size(4 * p)} gradients + {size(self.activation_bytes())} activations "
                f"(batch {self.batch})")


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: the CUDA allocator's view, or MemAvailable on Linux; None when
    unknown (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


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
    per_latent = big.bytes(1) - big.bytes(0)
    fits = int((budget - rest - big.bytes(0)) // per_latent)
    hint = (f"{big.name} would fit with d_sae ≤ {fits:,} (expansion_factor ≤ {fits // big.d_in})" if fits > 0
            else "even the smallest width does not fit beside the other SAEs")
    raise PlanError(f"the SAEs and their data need ≈ {size(need)} on {device} but {size(free)} is free; {hint}; "
                    "or lower batch_size, or spread a sweep over processes with torchrun and distribute_saes=true")
