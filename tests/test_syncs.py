"""Host syncs per training step, counted at the aten level on the CPU: each op below makes a CUDA host wait for the
device (a scalar read, a boolean-mask index, `nonzero`, `bincount`, ...), so a step that makes many of them cannot
keep a GPU busy. Every variant stays within its budget with AuxK firing and without, in and after the TopK warm-up.

What this cannot see: syncs inside a CUDA kernel's own implementation (embedding_bag's backward sorts its indices and
reads a count back); `scripts/gpu_check.sh` runs the steps under CUDA's sync debug mode for those.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sae.training.trainer as trainer_module
from sae.saes import SAEConfig, create_sae
from sae.training.trainer import SAETrainer

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default: ".item() / int() / bool()",
    aten.is_nonzero.default: "bool(tensor)",
    aten.nonzero.default: "nonzero",
    aten.bincount.default: "bincount",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read a device value back to the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            pass
        elif func in SYNCING:
            self.counts[SYNCING[func]] += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            self.counts["boolean-mask index"] += 1
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.counts["repeat_interleave by a tensor"] += 1
        return func(*args, **kwargs)


BUDGET = {"relu_l1": 0, "topk": 1, "batchtopk": 1, "matryoshka_batchtopk": 1, "jumprelu": 1}
"""Most syncs a training step may make, outside logging (the one left: whether any latent is dead, which decides
whether the AuxK pass runs at all)."""


def _trainer(architecture: str, aux: bool, warmup: bool) -> SAETrainer:
    torch.manual_seed(0)
    extra = {"target_l0": 4} if architecture == "jumprelu" else {}
    sae = create_sae(SAEConfig(architecture, d_in=16, d_sae=512, k=4, aux_k=8, aux_coefficient=1 / 32 if aux else 0,
                               **extra))
    sae.initialise_from_data(torch.randn(512, 16))
    # A window of one token: every latent that did not fire in the last step is dead, so AuxK runs every step.
    return SAETrainer(sae, lr=1e-3, total_steps=20, topk_warmup_frac=0.5 if warmup else 0.0,
                      dead_window_tokens=1 if aux else 10**9)


@pytest.mark.parametrize("warmup", [False, True, "hand-over"], ids=["after-warmup", "in-warmup", "hand-over"])
@pytest.mark.parametrize("aux", [None, "sparse", "dense"], ids=["no-auxk", "auxk", "auxk-dense"])
@pytest.mark.parametrize("architecture", sorted(BUDGET))
def test_syncs_per_step_within_budget(architecture, aux, warmup, monkeypatch):
    import sae.saes.base as base

    if aux == "dense" and architecture == "relu_l1":
        pytest.skip("ReLU+L1 has no AuxK")
    monkeypatch.setitem(base.AUXK_DENSE_FROM, "cpu", 0.0 if aux == "dense" else 2.0)  # AuxK's decode path
    aux = aux is not None
    if warmup == "hand-over":  # BatchTopK's hand-over from the warm-up's third step on, so every counted step is one
        monkeypatch.setattr(trainer_module, "HANDOVER_FRAC", 0.8)
    trainer = _trainer(architecture, aux, bool(warmup))
    x = torch.randn(32, 16)
    for _ in range(2):  # the first steps set thresholds and the dead tracker up
        trainer.step(x)
    assert bool(trainer.dead_mask.any()) == aux or architecture == "relu_l1"  # ReLU fires densely: none dead
    counter = SyncCounter()
    adam_step = trainer.optimizer.step

    def uncounted_adam_step(*args, **kwargs):
        """Adam keeps its step counts on the CPU unless fused or capturable, so their reads are no device syncs."""
        counter.paused = True
        try:
            return adam_step(*args, **kwargs)
        finally:
            counter.paused = False

    trainer.optimizer.step = uncounted_adam_step
    with counter:
        for _ in range(3):
            trainer.step(x)
    per_step = sum(counter.counts.values()) / 3
    assert per_step <= BUDGET[architecture], dict(counter.counts)
    if aux and architecture != "relu_l1":
        assert "auxk" in trainer.step(x)


def test_the_counter_sees_the_syncs_it_names():
    x = torch.randn(10, 4)
    counter = SyncCounter()
    with counter:
        x.sum().item()
        bool(x.max() > 0)
        x[x > 0]
        torch.bincount(x.argmax(1), minlength=4)
        x.nonzero()
        x.argmax(1).repeat_interleave(x.argmax(1))
        torch.arange(10).repeat_interleave(3)  # a fixed count: no sync
    assert counter.counts[".item() / int() / bool()"] >= 2 and counter.counts["boolean-mask index"] == 1
    assert counter.counts["bincount"] == 1 and counter.counts["nonzero"] >= 1
    assert counter.counts["repeat_interleave by a tensor"] == 1
