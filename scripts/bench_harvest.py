"""Harvest throughput against a bare forward pass of the same model on the same batches; cache size per token.

Prints JSON. The bare forwards run on batches tokenised beforehand and already on the device, so the harvest pays
everything else: opening the dataset and tokenising (on its worker thread, `tokenise_s` says how much there was to
hide), the copies in and out, the cast and the shard writes. `ratio_vs_same_depth` compares with a bare forward
stopped at the same layer (goal ≥ `GOAL`, `ratio` is the lowest over the hooks); `ratio_vs_full_forward` with a full
forward (what a harvester without early stopping would pay). Run: python scripts/bench_harvest.py [--model smollm2]
[--tokens 16384] [--device auto] [--model-dtype float32] [--batch-size N, default the harvest's for the device]; on a
GPU, `--model-dtype bfloat16` is how the harvester should run there.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import tempfile
import time

import torch

from sae.data import model as model_lib
from sae.data.harvest import HarvestConfig, batch_size, contexts, harvest_with
from sae.data.store import ActivationStore

#: The harvest's target, as a fraction of a bare forward stopped at the same layer (issue 19, item 7).
GOAL = 0.95


def bare_forward(model, batches, stop_after: str | None) -> float:
    """Seconds for forwards over `batches`, stopped after hook `stop_after` (None: all layers, no hooks)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            if stop_after is None:
                model(input_ids=ids, use_cache=False)
            else:
                with model_lib.hooks(model, {stop_after: lambda t: None}, stop_after=stop_after):
                    try:
                        model(input_ids=ids, use_cache=False)
                    except model_lib.StopForward:
                        pass
    if batches and batches[0].device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: count them, not just their launch
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=3, help="bare/harvest pairs per hook; the median is reported")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the harvest's default for the device")
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--hooks", nargs="*", default=None, help="default: a mid-depth and the last residual")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--model-dtype", default="float32", help="dtype the model runs in, e.g. bfloat16 on a GPU")
    args = parser.parse_args()

    model, tokenizer = model_lib.load_model(args.model, args.device, args.model_dtype)
    n_layers = len(model_lib.layers(model))
    hooks = args.hooks or [f"blocks.{n_layers // 2}.hook_resid_post", f"blocks.{n_layers - 1}.hook_resid_post"]
    n_ctx = args.tokens // args.context_size
    base = HarvestConfig(model=args.model, max_tokens=n_ctx * args.context_size, context_size=args.context_size,
                         batch_size=args.batch_size, exclude_first=False, eval_fraction=0.0,
                         model_dtype=args.model_dtype)
    device = model_lib.input_device(model)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the harvest's streams and events, and synchronize(), act on the current one
    size = batch_size(base, device)
    base = dataclasses.replace(base, batch_size=size)  # set, so the harvest prints nothing into the JSON
    t0 = time.perf_counter()
    packed = list(itertools.islice(contexts(base, tokenizer), n_ctx))
    tokenise = time.perf_counter() - t0
    batches = [torch.tensor(packed[i : i + size], device=device) for i in range(0, n_ctx, size)]
    bare_forward(model, batches[:2], None)  # warm-up
    full = bare_forward(model, batches, None)
    results = {"model": args.model, "tokens": n_ctx * args.context_size, "batch_size": size,
               "threads": torch.get_num_threads(), "device": str(device), "model_dtype": args.model_dtype,
               "tokenise_s": tokenise, "bare_full_forward_tok_s": n_ctx * args.context_size / full, "goal": GOAL,
               "hooks": {}}
    tokens = n_ctx * args.context_size
    for hook in hooks:
        # Bare and harvest runs alternate, and the ratio is the median over pairs: on a shared 2-core machine the
        # load drifts between runs, and a pair taken back to back sees nearly the same machine.
        pairs = []
        for _ in range(args.repeats):
            same = bare_forward(model, batches, hook)
            with tempfile.TemporaryDirectory() as out:
                t0 = time.perf_counter()
                harvest_with(dataclasses.replace(base, hooks=[hook], out=out), model, tokenizer)
                took = time.perf_counter() - t0
                store = ActivationStore(out)
                size = sum((store.path / s["file"]).stat().st_size for s in store.shards)
            pairs.append((same, took))
        same, took = sorted(pairs, key=lambda p: p[0] / p[1])[len(pairs) // 2]
        results["hooks"][hook] = {
            "harvest_tok_s": tokens / took,
            "bare_same_depth_tok_s": tokens / same,
            "ratio_vs_same_depth": same / took,
            "ratio_vs_same_depth_all": sorted(round(a / b, 3) for a, b in pairs),
            "ratio_vs_full_forward": full / took,
            "cache_bytes_per_token": size / store.n_rows,
            "bytes_ratio": size / store.n_rows / (store.dtype.itemsize * store.hooks[hook]),
        }
    results["ratio"] = min(h["ratio_vs_same_depth"] for h in results["hooks"].values())
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
