"""shard_latents: a TopK SAE's latents split across torchrun's processes (2 CPU processes over gloo, as in
test_distributed.py), and the global top-k selection that makes it exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sae.saes import INIT_BLOCK, SAEConfig, create_sae
from sae.training.sharded import shard, shard_winners
from sae.training.train import TrainError
from test_distributed import _config, _sae_train, _weights, cache  # noqa: F401 - cache is a fixture


def _sharded_selection(pre: torch.Tensor, world: int, k: int) -> set[tuple[int, int]]:
    """(row, latent) pairs chosen by every rank's local top-min(k, width) followed by `shard_winners`."""
    width = pre.shape[1] // world
    local = [pre[:, r * width:(r + 1) * width].topk(min(k, width), dim=-1) for r in range(world)]
    gathered = torch.stack([t.values for t in local])
    chosen = set()
    for r, top in enumerate(local):
        won = shard_winners(gathered, k, r)
        rows = torch.arange(pre.shape[0]).unsqueeze(1).expand_as(won)
        chosen |= {(int(i), int(j) + r * width) for i, j in zip(rows[won], top.indices[won])}
    return chosen


@pytest.mark.parametrize(("world", "k"), [(2, 4), (4, 3), (4, 16)])  # (4, 16): fewer latents per rank than k
def test_sharded_top_k_is_the_global_top_k(world, k):
    pre = torch.randn(50, 48, generator=torch.Generator().manual_seed(world * k))
    full = pre.topk(k, dim=-1).indices
    assert _sharded_selection(pre, world, k) == {(i, int(j)) for i in range(len(pre)) for j in full[i]}


@pytest.mark.parametrize(("architecture", "d_sae", "k", "message"), [
    ("relu_l1", 64, 4, "supports topk and batchtopk SAEs, not 'relu_l1'"),
    ("topk", 63, 4, "d_sae 63 is not divisible by the 2 processes"),
    ("topk", 64, 40, "hold 32 latents, fewer than k=40"),
])
def test_shard_refuses_what_it_cannot_split(architecture, d_sae, k, message):
    with pytest.raises(TrainError, match=message):
        shard(SAEConfig(architecture, d_in=8, d_sae=d_sae, k=k), 0, 2)


@pytest.mark.parametrize(("architecture", "d_sae", "world"), [("topk", 64, 2), ("batchtopk", 3 * INIT_BLOCK, 4)])
def test_a_shard_is_built_as_the_slice_of_the_whole_sae(architecture, d_sae, world):
    """Built on its own from the same RNG state (never the whole SAE), each shard is the slice of the whole SAE;
    (3·INIT_BLOCK, 4): shards that start and end inside the init's seeded blocks."""
    cfg = SAEConfig(architecture, d_in=8, d_sae=d_sae, k=4)
    torch.manual_seed(0)
    full = create_sae(cfg)
    width = d_sae // world
    for rank in range(world):
        torch.manual_seed(0)
        part = shard(cfg, rank, world)
        latents = slice(rank * width, (rank + 1) * width)
        assert part.cfg.d_sae == width and torch.equal(part.W_enc, full.W_enc[:, latents])
        assert torch.equal(part.W_dec, full.W_dec[latents]) and torch.equal(part.b_dec, full.b_dec)


def test_a_shard_takes_auxks_decode_by_all_the_latents():
    """Each shard decodes its share of the global AuxK selection (~k_aux / shards pairs per row), so the dense path is
    chosen by k_aux over all latents, on every shard alike, and the plan chooses as the shards do."""
    from sae.saes import SAE_CLASSES
    from sae.training.plan import SAECost

    for aux_k, dense in ((16, False), (32, True)):  # 1/16 and 1/8 of 256 latents; 1/4 and 1/2 of a 64-latent shard
        cfg = SAEConfig("topk", d_in=16, d_sae=256, k=4, aux_k=aux_k)
        assert create_sae(cfg)._dense_auxk(torch.zeros(2, 256)) == dense
        assert all(shard(cfg, rank, 4)._dense_auxk(torch.zeros(2, 64)) == dense for rank in range(4))
        cost = SAECost("t", "topk", 16, 64, 4096, aux_k=aux_k, shards=4)
        extra = cost.activation_bytes() - SAECost("t", "topk", 16, 64, 4096).activation_bytes()
        assert extra == pytest.approx(dense * SAE_CLASSES["topk"].dense_auxk_copies * 4 * 4096 * 64, abs=1)


NAMES = ("topk_k2_d256_h1", "batchtopk_k2_d256_h0")
COMMON = dict(saes=[{"architecture": "topk", "hook": "h1", "d_sae": 256, "k": 2, "aux_k": 32},
                    {"architecture": "batchtopk", "hook": "h0", "d_sae": 256, "k": 2}], batch_size=128,
              total_tokens=128 * 20, dead_window_tokens=128, grad_clip=0.05, checkpoint_every=10, topk_warmup_frac=0.5)
"""A short dead window makes AuxK select (globally) among dead latents for most of the run (~45% dead); the small
grad_clip makes every step clip, by the global norm; BatchTopK selects per row for the first 9 steps (the TopK
warm-up), hands over at step 9 and selects over the batch for the last 10, the checkpoint falling between them. TopK's
k_aux of 32 (1/8 of its latents) decodes AuxK densely, BatchTopK's 8 by pairs (``sae.saes.base.AUXK_DENSE_FROM``),
sharded or not."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):  # noqa: F811
    """The same run in 1 process (256 latents) and in 2 processes of 128 latents each."""
    tmp = tmp_path_factory.mktemp("sharded")
    one = _sae_train(_config(tmp, cache, "one", **COMMON))
    two = _sae_train(_config(tmp, cache, "two", shard_latents=True, **COMMON), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes (1/2 of each SAE's latents each)" in two.stdout
    return tmp, cache


def _assert_same(a: Path, b: Path) -> None:
    for name in NAMES:
        wa, wb = _weights(a / name), _weights(b / name)
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], rtol=1e-4, atol=1e-5), (name, key, (wa[key] - wb[key]).abs().max())


def test_sharded_run_writes_the_same_sae_as_one_process(runs):
    tmp, _ = runs
    _assert_same(tmp / "one", tmp / "two")


def test_each_rank_checkpoints_and_resumes_its_own_shard(runs):
    tmp, cache_dir = runs
    files = sorted(p.name for p in (tmp / "two" / "checkpoints").glob("step_*/*.safetensors"))
    assert files == sorted(["rng.safetensors", *(f"{n}.shard{r}.safetensors" for n in NAMES for r in (0, 1))])
    config = _config(tmp, cache_dir, "two", shard_latents=True, **COMMON)
    other = _sae_train(config, "resume=true")
    assert other.returncode == 2 and "resume with torchrun --nproc_per_node 2" in other.stderr
    shutil.copytree(tmp / "two", tmp / "before", ignore=shutil.ignore_patterns("checkpoints"))
    resumed = _sae_train(config, "resume=true", nproc=2)  # at the last step: rewrites the SAE from the shards
    assert resumed.returncode == 0, resumed.stderr
    assert "the run finished at step 20" in resumed.stdout and "nothing left to train" in resumed.stdout
    _assert_same(tmp / "before", tmp / "two")
