"""Harvest throughput against a bare forward pass of the same model on the same batches; cache size per token.

Prints JSON. `ratio_vs_same_depth` compares with a bare forward stopped at the same layer (the honest overhead of
hooking, copying, casting and writing); `ratio_vs_full_forward` compares with a full forward (what a harvester
without early stopping would pay). Run: python scripts/bench_harvest.py [--model smollm2] [--tokens 16384]
[--device auto] [--model-dtype float32]; on a GPU, `--model-dtype bfloat16` is how the harvester should run there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time

import torch

from sae.data import model as model_lib
from sae.data.text import load_texts, pack
from sae.data.harvest import HarvestConfig, harvest_with
from sae.data.store import ActivationStore


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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--hooks", nargs="*", default=None, help="default: a mid-depth and the last residual")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--model-dtype", default="float32", help="dtype the model runs in, e.g. bfloat16 on a GPU")
    args = parser.parse_args()

    model, tokenizer = model_lib.load_model(args.model, args.device, args.model_dtype)
    n_layers = len(model_lib.layers(model))
    hooks = args.hooks or [f"blocks.{n_layers // 2}.hook_resid_post", f"blocks.{n_layers - 1}.hook_resid_post"]
    n_ctx = args.tokens // args.context_size
    contexts = list(itertools.islice(pack(load_texts("stdlib"), tokenizer, args.context_size), n_ctx))
    device = next(model.parameters()).device
    batches = [torch.tensor(contexts[i : i + args.batch_size], device=device) for i in range(0, n_ctx, args.batch_size)]
    bare_forward(model, batches[:2], None)  # warm-up
    full = bare_forward(model, batches, None)
    results = {"model": args.model, "tokens": n_ctx * args.context_size, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "device": str(device), "model_dtype": args.model_dtype,
               "bare_full_forward_tok_s": n_ctx * args.context_size / full, "hooks": {}}
    tokens = n_ctx * args.context_size
    for hook in hooks:
        # Bare and harvest runs alternate, and the ratio is the median over pairs: on a shared 2-core machine the
        # load drifts between runs, and a pair taken back to back sees nearly the same machine.
        pairs = []
        for _ in range(args.repeats):
            same = bare_forward(model, batches, hook)
            with tempfile.TemporaryDirectory() as out:
                cfg = HarvestConfig(model=args.model, hooks=[hook], max_tokens=tokens, context_size=args.context_size,
                                    batch_size=args.batch_size, exclude_first=False, eval_fraction=0.0, out=out,
                                    model_dtype=args.model_dtype)
                t0 = time.perf_counter()
                harvest_with(cfg, model, tokenizer)
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
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
