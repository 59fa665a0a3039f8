"""The CUDA path: bf16 autocast training of every architecture, `train` end to end, a bf16 harvest against the fp32
CPU one, pinned prefetch. Skipped without CUDA; `scripts/gpu_check.sh` runs them on a GPU machine.

`SAE_TEST_GPU_DEVICE=cpu pytest -m gpu tests/test_gpu.py` runs the same tests on the CPU (CPU autocast is bf16 too):
a way to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from sae.data.harvest import HarvestConfig, harvest
from sae.saes import SAE, SAE_CLASSES, SAEConfig, create_sae
from sae.data.store import ActivationStore
from sae.training import train as train_lib
from sae.training.train import SAESpec, SAETrainer, TrainConfig, train

DEVICE = torch.device(os.environ.get("SAE_TEST_GPU_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


def sparse_data(n: int, d: int, n_true: int = 128, seed: int = 0) -> torch.Tensor:
    """~4 active directions of a random unit dictionary per row: data an SAE can fit quickly, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    D = F.normalize(torch.randn(n_true, d, generator=g), dim=1)
    on = torch.rand(n, n_true, generator=g) < 4 / n_true
    coef = torch.rand(n, n_true, generator=g) * 1.5 + 0.5
    return ((on * coef) @ D + 0.01 * torch.randn(n, d, generator=g)).to(DEVICE)


def run_twin(arch: str, data: torch.Tensor, autocast: bool, steps: int, batch: int) -> tuple[SAETrainer, list[dict]]:
    """`steps` trainer steps of a fresh SAE (same seed, same batches whatever `autocast` is); metrics per step."""
    torch.manual_seed(0)
    d_in = data.shape[1]
    sae = create_sae(SAEConfig(arch, d_in, 8 * d_in, k=16)).to(DEVICE)
    sae.initialise_from_data(data[: 8 * batch])
    trainer = SAETrainer(sae, lr=1e-3, total_steps=steps)
    n = len(data) // batch
    metrics = [{k: float(v) for k, v in trainer.step(data[(s % n) * batch : (s % n + 1) * batch],
                                                     autocast=autocast).items()} for s in range(steps)]
    return trainer, metrics


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_autocast_training_lowers_the_loss_keeps_fp32_weights_and_tracks_fp32(arch: str) -> None:
    """bf16 autocast is how `train` runs on CUDA: the matmuls go bf16, but the weights and Adam's moments must stay
    fp32 (a bf16 master copy would stall small updates), the custom autograd functions of TopK/JumpReLU must take
    the mixed dtypes, and the SAE must end up about as good as its fp32 twin trained on the same batches."""
    steps, batch = 200, 512
    data = sparse_data(8 * batch, 64)
    trainer, metrics = run_twin(arch, data, autocast=True, steps=steps, batch=batch)
    _, fp32 = run_twin(arch, data, autocast=False, steps=steps, batch=batch)

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    # after the sparsity penalty's warm-up (5% of the run) the total loss only has to fall
    assert mean(metrics[-10:], "loss") < 0.9 * mean(metrics[10:20], "loss"), [m["loss"] for m in metrics[::10]]
    assert abs(mean(metrics[-10:], "fvu") - mean(fp32[-10:], "fvu")) < 0.05 + 0.1 * mean(fp32[-10:], "fvu")
    for name, p in trainer.sae.named_parameters():
        assert p.dtype == torch.float32 and p.device.type == DEVICE.type, name
        assert torch.isfinite(p).all(), name
    for state in trainer.optimizer.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")


def test_train_end_to_end_on_the_device_with_pinned_batches(tiny_cache, hook, tmp_path, monkeypatch) -> None:
    """`train(device=cuda)`: the prefetcher hands over pinned batches (so the copy to the GPU is asynchronous), the
    SAEs train under autocast and come out as fp32, finite SAELens folders."""
    pinned: list[bool] = []
    real_batches = train_lib.checked_batches

    def spying_batches(*args, **kwargs) -> Iterator[dict[str, torch.Tensor]]:
        for batch in real_batches(*args, **kwargs):
            pinned.extend(t.is_pinned() for t in batch.values())
            yield batch

    monkeypatch.setattr(train_lib, "checked_batches", spying_batches)
    cfg = TrainConfig(cache=str(tiny_cache), out=str(tmp_path), device=str(DEVICE), wandb_mode="disabled",
                      batch_size=128, total_tokens=128 * 20, checkpoint_every=10, log_every=5,
                      saes=[SAESpec("topk", hook, expansion_factor=4, k=8),
                            SAESpec("relu_l1", hook, expansion_factor=4)])
    paths = train(cfg)
    assert pinned and all(p == (DEVICE.type == "cuda") for p in pinned)
    for path in paths:
        sae = SAE.load(path)
        for name, p in sae.state_dict().items():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), (path.name, name)


def test_bf16_harvest_on_the_device_matches_the_fp32_cpu_harvest(tiny_llama, text_dir, hook, tmp_path) -> None:
    """The harvester's GPU setting (model in bf16) stores the same rows as the fp32 CPU reference, within what bf16
    (8 bits of mantissa, through three layers) allows."""
    base = HarvestConfig(model=str(tiny_llama), hooks=[hook], dataset=str(text_dir), context_size=32, max_tokens=1200,
                         batch_size=8, shard_tokens=600, dtype="float32", eval_fraction=0.0, out="")
    ref = ActivationStore(harvest(dataclasses.replace(base, device="cpu", out=str(tmp_path / "cpu"))))
    gpu = ActivationStore(harvest(dataclasses.replace(base, device=str(DEVICE), model_dtype="bfloat16",
                                                      out=str(tmp_path / "gpu"))))
    a = [r for r in ref.iter_ordered([hook])]
    b = [r for r in gpu.iter_ordered([hook])]
    assert torch.equal(torch.cat([r.tokens for r in a]), torch.cat([r.tokens for r in b]))
    x, y = torch.cat([r.acts[hook] for r in a]), torch.cat([r.acts[hook] for r in b])
    assert x.shape == y.shape and torch.isfinite(y).all()
    rel = ((x - y).norm() / x.norm()).item()
    cos = F.cosine_similarity(x, y, dim=1).min().item()
    assert rel < 3e-2 and cos > 0.99, (rel, cos)
    assert rel > 0, "the bf16 harvest should differ from fp32 at all: did the model really run in bf16?"
