"""Memory plan vs real peak: does every variant's training step fit the plan that admitted it?

For each variant, in fp32 and under bf16 autocast, the script builds the SAE where it trains, runs its
data-dependent initialisation (``initialise_from_data`` on the trainer's 65,536-row sample, JumpReLU's per-latent
quantile included; ``--sample-rows``) and ``steps`` optimiser steps of ``SAETrainer`` (AuxK firing: a latent is dead
after one batch without firing; the TopK warm-up of BatchTopK/JumpReLU on the first steps). The peak is what the SAE,
its optimiser and its step added, the initial fit's reported apart (``init_peak_bytes``, against the plan's
``init_plan_bytes``):

* on the CPU (``--device cpu``, the default) each variant and mode runs in a fresh subprocess, and the peak is the
  process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs`` once the data exists) minus its RSS then;
* on CUDA (``--device cuda``) one process measures them all: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus the bytes allocated before the SAE was built (the data stays outside).

The plan's figure is ``sae.training.plan.SAECost.bytes()`` for the same shapes. The goal (issue 19 §2): peak ≤ plan
≤ 1.3 × peak for every variant and mode.

Prints ONE JSON document on stdout: per variant and mode the peak, the plan and plan / peak, and ``ok``.

Usage: python scripts/bench_memory.py [--d-in 2048] [--d-sae 65536] [--batch 4096] [--steps 3] [--sample-rows 65536]
                                      [--variants topk ...] [--modes fp32 bf16] [--device cpu] [--auxk-path auto]
Linux only (the CPU path reads /proc).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

GOAL_MAX_RATIO = 1.3
"""The plan may over-count by at most 30% (issue 19 §2); it must never under-count."""
VARIANTS = ("relu_l1", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class RssMeter:
    """Bytes this process holds above a base, from /proc: ``VmHWM`` is reset to ``VmRSS`` through ``clear_refs``."""

    def start(self) -> None:
        self.base = _status_kib("VmRSS")
        self.reset()

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on

    def peak(self) -> int:
        return (_status_kib("VmHWM") - self.base) * 1024


class CudaMeter:
    """Bytes of live tensors on a GPU above a base, from the caching allocator: what the SAE needs, whatever the
    allocator keeps cached (the plan's headroom is for that)."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda, self.device = torch.cuda, device

    def start(self) -> None:
        self.cuda.synchronize(self.device)
        self.base = self.cuda.memory_allocated(self.device)
        self.reset()

    def reset(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        self.cuda.synchronize(self.device)
        return self.cuda.max_memory_allocated(self.device) - self.base


@functools.cache
def _data(d_in: int, batch: int, steps: int, sample_rows: int, device: str) -> tuple:
    """The initial fit's sample on the host (where train's sample comes from) and the batches already where they are
    trained on, so neither is charged to the SAE (the plan counts the data apart); made once per process."""
    import torch

    torch.manual_seed(0)
    return torch.randn(sample_rows, d_in), [torch.randn(batch, d_in, device=device) for _ in range(steps)]


def force_auxk_path(path: str, device: str) -> None:
    """AuxK's decode on `device`: "auto" (the crossover ``sae.saes.base.AUXK_DENSE_FROM``), "sparse" or "dense"."""
    from sae.saes import base

    if path != "auto":
        base.AUXK_DENSE_FROM[device.split(":")[0]] = 0.0 if path == "dense" else float("inf")


def measure(architecture: str, autocast: bool, d_in: int, d_sae: int, batch: int, steps: int,
            sample_rows: int, device: str = "cpu") -> dict:
    """Peak bytes the SAE's initialisation and `steps` training steps add to this process (on CUDA: to the GPU's
    allocator), and the plan's figures."""
    import torch

    from sae.saes import SAEConfig, create_sae
    from sae.training.plan import SAECost
    from sae.training.trainer import SAETrainer

    meter = CudaMeter(device) if device.startswith("cuda") else RssMeter()
    sample, batches = _data(d_in, batch, steps, sample_rows, device)
    # JumpReLU in its λ form: its initial fit runs the per-latent quantile (with a target L0 and the TopK warm-up
    # b_enc starts at 0, and the fit is the base one's).
    kwargs = {"k": 32} if "topk" in architecture else {}
    cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_name="h", **kwargs)

    def trainer_for(sae: torch.nn.Module, total_steps: int) -> SAETrainer:
        return SAETrainer(sae, lr=1e-4, total_steps=total_steps, topk_warmup_frac=0.5 if sae.warms_up else 0.0,
                          dead_window_tokens=batch)

    with torch.device(device):  # built where it trains, as train builds it
        # The same path once at a tiny width first: the first call of each kernel pages in its code and sets up
        # thread pools (tens of MiB of RSS, none of it tensors; on CUDA the cuBLAS workspace), which would otherwise
        # be charged to the SAE.
        tiny = create_sae(SAEConfig(architecture=architecture, d_in=d_in, d_sae=256, hook_name="h", **kwargs))
        tiny.initialise_from_data(sample[:1024])
        warm = trainer_for(tiny, 2)
        for x in batches[:2]:
            warm.step(x[:256], autocast=autocast)
        del tiny, warm
        gc.collect()
        meter.start()
        sae = create_sae(cfg)
    sae.initialise_from_data(sample)
    init_peak = meter.peak()
    meter.reset()
    trainer = trainer_for(sae, steps)
    for x in batches:
        trainer.step(x, autocast=autocast)
    step_peak = meter.peak()
    del sae, trainer
    gc.collect()  # on CUDA the next variant is measured in this process
    peak = max(init_peak, step_peak)
    cost = SAECost("bench", architecture, d_in, d_sae, batch, init_rows=sample_rows,
                   precision="bf16" if autocast else "fp32", aux_k=cfg.auxk_latents, device_type=torch.device(device).type)
    plan = cost.bytes()
    return {"peak_bytes": peak, "init_peak_bytes": init_peak, "step_peak_bytes": step_peak, "plan_bytes": plan,
            "init_plan_bytes": cost.init_bytes(), "plan_over_peak": round(plan / peak, 3),
            "ok": peak <= plan <= GOAL_MAX_RATIO * peak}


def measure_in_subprocess(arch: str, mode: str, args: argparse.Namespace) -> dict:
    """One variant and mode in a fresh process: RSS only falls back where nothing else was ever allocated."""
    cmd = [sys.executable, __file__, "--worker", arch, mode, "--d-in", str(args.d_in), "--d-sae", str(args.d_sae),
           "--batch", str(args.batch), "--steps", str(args.steps), "--sample-rows", str(args.sample_rows),
           "--auxk-path", args.auxk_path]
    # Every allocation above 128 KiB gets its own mapping, returned to the OS when freed, so RSS follows the live
    # tensors; glibc's default raises that cut to 32 MiB after the first large free, and freed tensors below it stay
    # in the heap, counted in RSS: the peak would then depend on allocation history.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=2048)
    parser.add_argument("--d-sae", type=int, default=65536)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sample-rows", type=int, default=65536,
                        help="rows of the initial fit's sample (train's SCALE_SAMPLE_ROWS)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--modes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS), cuda or cuda:N (the allocator's peak)")
    parser.add_argument("--auxk-path", default="auto", choices=["auto", "sparse", "dense"],
                        help="AuxK's decode: the crossover's choice for these shapes (auto), or forced")
    parser.add_argument("--worker", nargs=2, metavar=("ARCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.d_in, args.d_sae, args.batch, args.steps, args.sample_rows)
    force_auxk_path(args.auxk_path, args.device)
    if args.worker:
        print(json.dumps(measure(args.worker[0], args.worker[1] == "bf16", *shape)))
        return
    on_cuda = args.device.startswith("cuda")
    if on_cuda:
        import torch

        device = torch.device(args.device)
        if device.index is not None:
            torch.cuda.set_device(device)  # synchronize() and the allocator's statistics default to the current one
    results: dict[str, dict] = {}
    for arch in args.variants:
        for mode in args.modes:
            # On CUDA one process measures them all: the allocator's peak resets, and its base excludes what earlier
            # variants left cached (a process per variant would cost ~10 s of CUDA start-up each).
            results[f"{arch}/{mode}"] = (measure(arch, mode == "bf16", *shape, device=args.device) if on_cuda
                                         else measure_in_subprocess(arch, mode, args))
            print(f"{arch:22s} {mode}: {results[f'{arch}/{mode}']}", file=sys.stderr, flush=True)
    print(json.dumps({"shape": dict(zip(("d_in", "d_sae", "batch", "steps", "sample_rows"), shape)),
                      "device": args.device, "auxk_path": args.auxk_path, "meter": "cuda max_memory_allocated" if on_cuda else "peak RSS (VmHWM)",
                      "goal_max_ratio": GOAL_MAX_RATIO, "results": results,
                      "ok": all(r["ok"] for r in results.values())}))


if __name__ == "__main__":
    main()
