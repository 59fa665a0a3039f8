"""Training on the fly against harvesting, and against training from a cache of the same tokens.

Prints ONE JSON document:

``throughput``  ``sae train train.source=model`` with an SAE small enough that the model dominates (TopK, d_sae =
    d_model) in tokens/s, ÷ ``sae harvest`` alone over the same tokens in tokens/s, timed in the same run, each
    including its model load (goal ≥ 0.9).
``quality``     Held-out FVU of a TopK SAE (k 32, 8×) trained on the fly ÷ the same SAE trained from the cache of
    the same tokens (the live source's single chunk is exactly the cache's training contexts; only the row order
    differs), both scored on the cache's held-out rows (goal: within 3%, i.e. a ratio ≤ 1.03).

Run: python scripts/bench_onthefly.py [--tokens 40000] [--hook blocks.15.hook_resid_post] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sae.analysis.evaluate import reconstruction_metrics
from sae.data.harvest import HarvestConfig, harvest
from sae.saes import SAE
from sae.data.store import ActivationStore
from sae.training.train import SAESpec, TrainConfig, train

GOALS = {"throughput_ratio": 0.9, "fvu_ratio_max": 1.03}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=40_000)
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_onthefly_"))
    hcfg = HarvestConfig(model=args.model, hooks=[args.hook], max_tokens=args.tokens, device=args.device,
                         out=str(root / "cache"))
    warm = HarvestConfig(model=args.model, hooks=[args.hook], max_tokens=1024, device=args.device,
                         out=str(root / "warm"))
    harvest(warm)  # off the clock: converts the model once, imports what harvest and train import
    train(TrainConfig(source="model", harvest=warm, out=str(root / "warm_saes"), total_tokens=512, shuffle_rows=512,
                      saes=[SAESpec("topk", args.hook, expansion_factor=1, k=32)], wandb_mode="disabled"))
    cache, harvest_s = timed(lambda: harvest(hcfg))
    store = ActivationStore(cache)
    n_train = store.n_train_rows
    print(f"harvest: {args.tokens / harvest_s:.0f} tok/s; {n_train} training rows", file=sys.stderr)

    def run(name: str, spec: SAESpec, source: str) -> tuple[Path, float]:
        cfg = TrainConfig(source=source, cache=str(cache), harvest=hcfg, out=str(root / name), saes=[spec],
                          total_tokens=n_train, shuffle_rows=n_train, device=args.device, wandb_mode="disabled")
        paths, seconds = timed(lambda: train(cfg))
        return paths[0], seconds

    _, small_s = run("small", SAESpec("topk", args.hook, expansion_factor=1, k=32), "model")
    spec = SAESpec("topk", args.hook, expansion_factor=8, k=32)
    live, _ = run("live", spec, "model")
    cached, _ = run("cached", spec, "cache")
    held_out = store.holdout([args.hook], 20_000)[args.hook]
    fvu = {name: reconstruction_metrics(SAE.load(path), held_out, 0.1).fvu for name, path in
           (("live", live), ("cache", cached))}
    harvest_tps = args.tokens / harvest_s
    live_tps = n_train / small_s
    print(json.dumps({
        "model": args.model, "hook": args.hook, "tokens": args.tokens, "train_rows": n_train,
        "device": str(torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "throughput": {"harvest_tokens_per_s": harvest_tps, "on_the_fly_tokens_per_s": live_tps,
                       "ratio": live_tps / harvest_tps, "goal": GOALS["throughput_ratio"]},
        "quality": {"heldout_fvu_on_the_fly": fvu["live"], "heldout_fvu_from_cache": fvu["cache"],
                    "ratio": fvu["live"] / fvu["cache"], "goal_max": GOALS["fvu_ratio_max"]},
    }, indent=1))


if __name__ == "__main__":
    main()
