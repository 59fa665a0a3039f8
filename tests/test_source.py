"""Training on the fly: the live model source feeds the trainer exactly the rows a cache would hold (held-out
contexts excluded), resumes exactly, and a run made that way is evaluated on a small cache of the same settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from sae.cli import main
from sae.data.harvest import HarvestConfig, harvest
from sae.saes import SAE
from sae.data.source import ModelSource, SourceError
from sae.data.store import ActivationStore
from sae.training.train import SAESpec, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
HOOK = "blocks.1.hook_resid_post"


def _harvest_cfg(model: Path, texts: Path, out: Path, **kw) -> HarvestConfig:
    return HarvestConfig(model=str(model), hooks=[HOOK], dataset=str(texts), context_size=32, max_tokens=2400,
                         batch_size=8, shard_tokens=600, dtype="float32", eval_fraction=0.25, out=str(out), **kw)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    return x[torch.argsort(x.sum(1))]


def test_live_rows_are_the_caches_training_rows(tiny_llama, text_dir, tmp_path):
    """One chunk covering every training context: the live stream's first epoch is, row for row, the training split
    of a cache harvested with the same settings — no held-out row, none missing."""
    hcfg = _harvest_cfg(tiny_llama, text_dir, tmp_path / "cache")
    store = ActivationStore(harvest(hcfg))
    cached = torch.cat([r.acts[HOOK] for r in store.iter_ordered([HOOK], split="train")])
    n = len(cached)
    source = ModelSource(dataclasses.replace(hcfg, max_tokens=10**6), [HOOK], torch.device("cpu"), shuffle_rows=n)
    assert source.chunk_contexts(1) * source.rows_per_context == n
    live = next(source.batches(n, seed=0, position=0))[HOOK]
    assert torch.allclose(_sorted_rows(live), _sorted_rows(cached), atol=1e-5)
    # Data parallel: the ranks share each chunk's contexts (an even count here), with no context on two ranks.
    m = n // source.rows_per_context // 2 * 2 * source.rows_per_context
    source = ModelSource(dataclasses.replace(hcfg, max_tokens=10**6), [HOOK], torch.device("cpu"), shuffle_rows=m)
    halves = [next(source.batches(m, seed=0, position=0, rank=r, world_size=2))[HOOK] for r in (0, 1)]
    assert torch.allclose(_sorted_rows(torch.cat(halves)), _sorted_rows(cached[:m]), atol=1e-5)
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 40)
    with pytest.raises(SourceError, match="ran out after 0 training tokens"):
        next(ModelSource(dataclasses.replace(hcfg, dataset=str(short)), [HOOK], torch.device("cpu"),
                         shuffle_rows=n).batches(64, seed=0, position=0))


def _run(tiny_llama, text_dir, tmp_path: Path, out: str, **kw) -> TrainConfig:
    return TrainConfig(source="model", harvest=_harvest_cfg(tiny_llama, text_dir, tmp_path / "unused"),
                       out=str(tmp_path / out), saes=[SAESpec("topk", HOOK, expansion_factor=4, k=4)],
                       batch_size=64, total_tokens=64 * 12, shuffle_rows=300, lr=1e-3, checkpoint_every=4,
                       wandb_mode="disabled", **kw)


def test_live_training_resumes_exactly(tiny_llama, text_dir, tmp_path, monkeypatch, patch_batches):
    """Interrupted after the step-4 checkpoint and resumed, a live run ends with the uninterrupted run's weights;
    its 12 steps cross several chunks of ~10 contexts, so resuming rebuilds a chunk mid-way."""
    full = train(_run(tiny_llama, text_dir, tmp_path, "a"))
    patch_batches(interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        train(_run(tiny_llama, text_dir, tmp_path, "b"))
    monkeypatch.undo()
    resumed = train(_run(tiny_llama, text_dir, tmp_path, "b", resume=True))
    a, b = SAE.load(full[0]).state_dict(), SAE.load(resumed[0]).state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_cli_trains_on_the_fly_and_evaluates_on_a_small_cache(tiny_llama, text_dir, tmp_path, capsys):
    """The README's recipe: `sae train train.source=model` reads the file's harvest: section; a small `sae harvest`
    with the same settings gives `sae eval` held-out rows the run never trained on."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "harvest": {**{k: v for k, v in dataclasses.asdict(_harvest_cfg(tiny_llama, text_dir, tmp_path / "cache")).items()
                       if k in ("model", "hooks", "dataset", "context_size", "batch_size", "dtype", "eval_fraction", "out")},
                    "max_tokens": 800},
        "train": {"out": str(tmp_path / "saes"), "source": "model", "total_tokens": 1600, "batch_size": 64,
                  "wandb_mode": "disabled", "saes": [{"architecture": "topk", "hook": HOOK, "expansion_factor": 4, "k": 4}]},
        "eval": {"out": str(tmp_path / "eval"), "max_tokens": 400, "lm_loss_contexts": 2},
    }))
    assert main(["train", "--config", str(config)]) == 0
    assert "from the model" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # nothing cached by the live run
    assert main(["harvest", "--config", str(config)]) == 0
    assert main(["eval", "--config", str(config)]) == 0
    assert "topk" in capsys.readouterr().out
    assert main(["train", "--config", str(config), "source=modle"]) == 2
    assert "source must be cache or model" in capsys.readouterr().err
