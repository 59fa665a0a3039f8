"""At what token budget does the plain reference loop converge on a planted point?

Issue 18 asks for the planted grid at "token budgets a user would pick (the reference loop converges at each)".
`scripts/bench_planted.py`'s default budget (``tokens_for``: 2,000 tokens per true feature) is smaller, because the
whole grid must run on a CPU. This script trains ``sae.planted.reference_topk`` alone (the loop `sae planted` scores
every variant against, with the batch and step count `sae train` would pick for the budget) at multiples of that
budget, and prints its mean max cosine at each and the first multiple from which every doubling gains less than
``CONVERGED_GAIN``: run the grid there with ``bench_planted.py --budget-multiple M``. It draws fresh rows where `sae
planted` reads a shuffled cache of as many, so its figures differ a little from the loop's there (d_in 32, 512
features, L0 3: 0.912 against 0.908 at 1×, 0.953 against 0.954 at 8×).

Prints a table (stdout) and a JSON line. Usage: python scripts/planted_loop_budget.py [--points 32,512,3 ...]
[--multiples 1 2 4 8 16] [--seed 0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from bench_planted import (Point, budget_multiple, parse_point,  # the script's folder is on sys.path
                           positive_int, tokens_for)
from sae.planted import HOOK, RECOVERED_COSINE, REFERENCE_INIT_SEED, PlantedConfig, max_cosines, reference_topk
from sae.training.train import MIN_BATCH, default_batch_size

CONVERGED_GAIN = 0.01
"""Mean max cosine gained by doubling the budget below which the loop counts as converged."""


def loop_at(point: Point, tokens: int, seed: int) -> dict:
    """The reference loop trained on `tokens` fresh rows of the point's data, as `sae planted` trains it."""
    d_in, n_features, l0 = point
    data = PlantedConfig(d_in=d_in, n_features=n_features, l0=l0, seed=seed).data()
    batch = default_batch_size(tokens)
    steps = tokens // batch
    g = torch.Generator().manual_seed(seed + 1)
    batches = ({HOOK: data.sample(batch, g)} for _ in range(steps))
    init = torch.Generator().manual_seed(REFERENCE_INIT_SEED + seed)
    start = time.perf_counter()
    W_dec = reference_topk(batches, d_in, 2 * n_features, max(1, round(l0)), steps, init)[0]
    cos = max_cosines(data.dictionary, W_dec)
    return {"tokens": tokens, "batch": batch, "steps": steps, "mean_max_cos": round(float(cos.mean()), 4),
            "recovered": round(float((cos > RECOVERED_COSINE).float().mean()), 4),
            "seconds": round(time.perf_counter() - start, 1)}


def converged_multiple(multiples: list[float], cosines: list[float]) -> float | None:
    """The first multiple from which every larger one gains less than ``CONVERGED_GAIN`` per doubling over the one
    before it (so one noisy dip does not count); None if the last step still gains that much."""
    gains = [(c_next - c) / math.log2(m_next / m)
             for m, m_next, c, c_next in zip(multiples, multiples[1:], cosines, cosines[1:])]
    for i in range(len(gains)):
        if all(g < CONVERGED_GAIN for g in gains[i:]):
            return multiples[i]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="+", type=parse_point, default=[(32, 512, 3.0)],
                        metavar="D_IN,N_FEATURES,L0")
    parser.add_argument("--multiples", nargs="+", type=budget_multiple, default=[1, 2, 4, 8, 16],
                        help="budgets, as multiples of bench_planted.py's tokens_for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")
    args = parser.parse_args(argv)
    multiples = sorted(set(args.multiples))
    too_few = [(p, m) for p in args.points for m in multiples if tokens_for(p[1], m) < MIN_BATCH]
    if too_few:
        parser.error(f"{too_few[0][1]:g}× at {too_few[0][0]} is fewer than {MIN_BATCH} tokens (one batch): give more")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    print(f"{'d_in':>4} {'feats':>5} {'L0':>3}  {'multiple':>8} {'tokens':>11} {'steps':>5} {'max cos':>7} "
          f"{'recov':>6}")
    for point in args.points:
        runs = [loop_at(point, tokens_for(point[1], m), args.seed) for m in multiples]
        for m, r in zip(multiples, runs):
            print(f"{point[0]:>4} {point[1]:>5} {point[2]:>3g}  {m:>8g} {r['tokens']:>11,} {r['steps']:>5} "
                  f"{r['mean_max_cos']:7.3f} {r['recovered']:6.1%}", flush=True)
        converged = converged_multiple(multiples, [r["mean_max_cos"] for r in runs])
        print(f"  converged at {'%gx' % converged if converged else 'none of these'}", flush=True)
        results.append({"d_in": point[0], "n_features": point[1], "l0": point[2], "converged_multiple": converged,
                        "runs": [{"multiple": m, **r} for m, r in zip(multiples, runs)]})
    print("JSON " + json.dumps({"seed": args.seed, "converged_gain": CONVERGED_GAIN, "points": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
