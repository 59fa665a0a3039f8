"""Data-parallel step benchmark: the trainer's gradient all-reduce vs one all-reduce per parameter (issue 19 §6).

Starts ``--ranks`` CPU processes in one gloo group (as ``torchrun -m sae train`` on a CPU does), each with one thread
and its share of the global batch, and times ``SAETrainer.step`` with two gradient synchronisations, interleaved
round by round so load drift hits both alike:

``per_parameter``  the trainer before issue 19, reproduced here: one ``all_reduce`` per gradient and per buffer;
``trainer``        ``SAETrainer._synchronise`` as it is now.

Prints ONE JSON document: median step and synchronisation times per mode (rank 0's), their ratios
(per_parameter ÷ trainer: above 1 the trainer is faster) and /proc/loadavg before and after.

Usage: python scripts/bench_ddp.py [--arch topk] [--d-in 576] [--d-sae 9216] [--batch 4096] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from sae.saes import SAEConfig, create_sae
from sae.training import distributed
from sae.training.trainer import SAETrainer


def loadavg() -> list[float]:
    return [float(v) for v in open("/proc/loadavg").read().split()[:3]]


class TimedTrainer(SAETrainer):
    """The trainer, recording the wall time of each gradient synchronisation."""

    sync_s: list[float]

    def _synchronise(self, fire_counts: Tensor) -> Tensor:
        t0 = time.perf_counter()
        out = super()._synchronise(fire_counts)
        self.sync_s.append(time.perf_counter() - t0)
        return out


class PerParameterTrainer(TimedTrainer):
    """The baseline: one all-reduce per gradient and per trained buffer (the trainer before issue 19)."""

    def _synchronise(self, fire_counts: Tensor) -> Tensor:
        t0 = time.perf_counter()
        for p in self.sae.parameters():
            if p.grad is not None:
                distributed.all_reduce_(p.grad, "mean")
        for name, buf in self.sae.named_buffers():
            if name not in self.sae.FITTED_BUFFERS and buf.is_floating_point():
                distributed.all_reduce_(buf, "mean")
        out = distributed.all_reduce_(fire_counts.clone(), "sum")
        self.sync_s.append(time.perf_counter() - t0)
        return out


def worker(rank: int, args: argparse.Namespace, port: int, queue: mp.SimpleQueue) -> None:
    torch.set_num_threads(1)  # one core per rank, as the tests' OMP_NUM_THREADS=1
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.ranks)
    local = args.batch // args.ranks
    torch.manual_seed(0)
    x = torch.randn(args.batch * 2, args.d_in)[rank * local: (rank + 1) * local]  # each rank its share
    trainers: dict[str, TimedTrainer] = {}
    for name, cls in (("per_parameter", PerParameterTrainer), ("trainer", TimedTrainer)):
        torch.manual_seed(1)
        sae = create_sae(SAEConfig(args.arch, args.d_in, args.d_sae, k=args.k))
        trainers[name] = cls(sae, lr=1e-4, total_steps=10**6, world_size=args.ranks)
        trainers[name].sync_s = []
    step_s: dict[str, list[float]] = {name: [] for name in trainers}
    load_before = loadavg()
    for r in range(args.warmup + args.rounds):
        for name, trainer in sorted(trainers.items(), reverse=r % 2 == 1):
            dist.barrier()
            t0 = time.perf_counter()
            trainer.step(x)
            if r >= args.warmup:
                step_s[name].append(time.perf_counter() - t0)
            else:
                trainer.sync_s.clear()
    if rank == 0:
        ms = {name: {"step_ms": round(statistics.median(step_s[name]) * 1e3, 1),
                     "step_ms_samples": [round(t * 1e3, 1) for t in step_s[name]],
                     "sync_ms": round(statistics.median(t.sync_s) * 1e3, 1)}
              for name, t in trainers.items()}
        queue.put({
            "config": {**vars(args), "rows_per_rank": local, "threads_per_rank": 1,
                       "gradient_floats": sum(p.numel() for p in trainers["trainer"].sae.parameters())},
            "modes": ms,
            "step_ratio": round(ms["per_parameter"]["step_ms"] / ms["trainer"]["step_ms"], 3),
            "sync_ratio": round(ms["per_parameter"]["sync_ms"] / ms["trainer"]["sync_ms"], 3),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
        })
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="topk")
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="global batch, split over the ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(args, port, queue), nprocs=args.ranks)
    print(json.dumps(queue.get(), indent=1), flush=True)


if __name__ == "__main__":
    main()
