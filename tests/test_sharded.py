"""shard_latents: a TopK SAE's latents split across torchrun's processes (2 CPU processes over gloo, as in
test_distributed.py), and the global top-k selection that makes it exact."""

from __future__ import annotations

import pytest
import torch

from sae.sharded import shard_winners
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


def test_sharded_run_writes_the_same_sae_as_one_process(tmp_path, cache):  # noqa: F811
    """2 ranks of 128 latents each == 1 process with 256, batch for batch; a short dead window makes AuxK select
    (globally) among dead latents for most of the run."""
    common = dict(saes=[{"architecture": "topk", "hook": "h1", "d_sae": 256, "k": 2}], batch_size=128,
                  total_tokens=128 * 20, dead_window_tokens=128, grad_clip=0.05, checkpoint_every=10)
    one = _sae_train(_config(tmp_path, cache, "one", **common))
    two = _sae_train(_config(tmp_path, cache, "two", shard_latents=True, **common), nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes (1/2 of each SAE's latents each)" in two.stdout
    ckpt = sorted(p.name for p in (tmp_path / "two" / "checkpoints").glob("step_*/*.safetensors"))
    assert ckpt == ["rng.safetensors", "topk_k2_d256_h1.shard0.safetensors", "topk_k2_d256_h1.shard1.safetensors"]
    name = "topk_k2_d256_h1"
    a, b = _weights(tmp_path / "one" / name), _weights(tmp_path / "two" / name)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (key, (a[key] - b[key]).abs().max())
