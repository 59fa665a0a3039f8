"""Trainer throughput against the dense-matmul ceiling, one JSON line per architecture.

The ceiling is the time of the five matmuls a dense SAE step cannot avoid — x@W_enc, its
weight gradient, f@W_dec, its weight gradient and its input gradient — timed bare in the
same process. A ratio above 1 is possible for TopK/BatchTopK because their decoder
(``embedding_bag``) and encoder backward (gradients only at the selected latents) are sparse,
so of the five only x@W_enc remains dense.

Usage: python scripts/bench_train.py [--d-in 576] [--expansion 16] [--batch 4096] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sae.sae import SAE_CLASSES, SAEConfig, create_sae
from sae.train import SAETrainer, default_lr


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceiling_seconds(x: torch.Tensor, d_sae: int, warmup: int, steps: int) -> float:
    d_in = x.shape[1]
    W_enc = torch.randn(d_in, d_sae, device=x.device) / d_in**0.5
    W_dec = torch.randn(d_sae, d_in, device=x.device) / d_sae**0.5
    f = torch.randn(x.shape[0], d_sae, device=x.device)
    g = torch.randn_like(x)

    def five_matmuls() -> None:
        pre = x @ W_enc  # encoder forward
        _ = x.T @ pre  # encoder weight gradient (shape of W_enc)
        _ = f @ W_dec  # decoder forward
        _ = f.T @ g  # decoder weight gradient
        _ = g @ W_dec.T  # decoder input gradient

    return median_seconds(five_matmuls, x.device, warmup, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--arch", nargs="*", default=sorted(SAE_CLASSES))
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    d_sae = args.d_in * args.expansion
    x = torch.randn(args.batch * 4, args.d_in, device=device)  # in-memory "cache"
    ceiling = ceiling_seconds(x[: args.batch], d_sae, args.warmup, args.steps)
    for arch in args.arch:
        sae = create_sae(SAEConfig(arch, args.d_in, d_sae, k=args.k)).to(device)
        sae.initialise_from_data(x)
        trainer = SAETrainer(sae, lr=default_lr(arch, d_sae), total_steps=10**6,
                             dead_window_tokens=args.batch * 2)  # AuxK active from step 3
        batches = iter(range(10**9))

        def step() -> None:
            i = next(batches) % 4
            trainer.step(x[i * args.batch : (i + 1) * args.batch])

        seconds = median_seconds(step, device, args.warmup, args.steps)
        print(json.dumps({
            "arch": arch, "device": device.type, "threads": torch.get_num_threads(),
            "d_in": args.d_in, "d_sae": d_sae, "batch": args.batch,
            "tokens_per_s": round(args.batch / seconds),
            "ceiling_tokens_per_s": round(args.batch / ceiling),
            "ratio_to_ceiling": round(ceiling / seconds, 3),
            "step_ms": round(seconds * 1e3, 1), "ceiling_ms": round(ceiling * 1e3, 1),
            "dead_frac": round(float(trainer.dead_mask.float().mean()), 3),
            "sparse_decoder_and_encoder_backward": arch in ("topk", "batchtopk"),
        }), flush=True)


if __name__ == "__main__":
    main()
