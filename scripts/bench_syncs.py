"""Host syncs per training step on CUDA, counted by CUDA's own sync debug mode: does every variant keep its budget?

``tests/test_syncs.py`` counts the ops that read a device value back at the aten level, on the CPU; it cannot see a
sync inside a CUDA kernel's implementation (embedding_bag's backward reads a count back) nor one the CUDA caching
allocator or a copy makes. ``torch.cuda.set_sync_debug_mode("warn")`` warns at every host wait the CUDA runtime makes,
whoever asked for it, so counting its warnings per step is the measurement the CPU test stands in for.

For each variant, with AuxK firing (a dead window of 0 tokens: every latent is dead at every step, so AuxK runs at
any shape; the test's window of one token leaves none dead at small widths) and without (AuxK off), in the TopK
warm-up and after it, the script builds the SAE where it trains, takes ``--warmup-steps`` steps of
``SAETrainer.step`` (lazy CUDA set-up: cuBLAS handles, Adam's state) and then ``--steps`` steps under the sync debug
mode, each in its own ``warnings.catch_warnings``. Like the test it calls the trainer directly: the training loop's
logging steps read metrics back on purpose, and are not what the budget is for.

Prints ONE JSON document on stdout: per case the syncs of each counted step, their maximum against the variant's
budget, ``ok``, and the Python lines the warnings came from. On the CPU (``--device cpu``) there is no sync debug mode:
the same steps run (so ``scripts/gpu_check.sh --cpu`` keeps this script alive) and every count is null.

Usage: python scripts/bench_syncs.py [--device auto] [--d-in 2048] [--d-sae 65536] [--batch 4096] [--k 32]
                                     [--warmup-steps 1] [--steps 5] [--variants topk ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import warnings
from collections import Counter
from collections.abc import Callable

import torch

from sae.data.model import pick_device
from sae.saes import SAEConfig, create_sae
from sae.training.trainer import SAETrainer

BUDGET = {"relu_l1": 0, "topk": 1, "batchtopk": 1, "matryoshka_batchtopk": 1, "jumprelu": 1}
"""Most host syncs a training step may make: the same budget as ``tests/test_syncs.py``'s ``BUDGET``
(``tests/test_gpu_check.py`` checks they are equal). The one allowed read is whether any latent is dead, which
decides whether the AuxK pass runs at all."""
SYNC_WARNING = "synchronizing CUDA operation"
"""What the sync debug mode's warnings say (c10/cuda: "called a synchronizing CUDA operation")."""
NOT_MEASURABLE = "not measurable on CPU: CUDA's sync debug mode exists on CUDA devices only"
SHAPES = {"cuda": (2048, 65536, 4096), "cpu": (64, 1024, 256)}
"""Default (d_in, d_sae, batch) per device type: the issue's full shape on a GPU; on the CPU, where nothing can be
counted, small enough that the same steps run in seconds."""


def make_trainer(arch: str, aux: bool, warmup: bool, args: argparse.Namespace, device: torch.device) -> SAETrainer:
    """The test's trainer at this run's shapes, built on `device` (as train builds it: no host copy)."""
    torch.manual_seed(0)
    extra = {"target_l0": float(args.k)} if arch == "jumprelu" else {}
    cfg = SAEConfig(arch, d_in=args.d_in, d_sae=args.d_sae, k=args.k, **({} if aux else {"aux_coefficient": 0.0}),
                    **extra)
    with torch.device(device):
        sae = create_sae(cfg)
    sae.initialise_from_data(torch.randn(2 * args.batch, args.d_in, device=device))
    return SAETrainer(sae, lr=1e-4, total_steps=4 * (args.warmup_steps + args.steps),  # the warm-up spans them all
                      topk_warmup_frac=0.5 if warmup else 0.0, dead_window_tokens=0 if aux else 10**9)


def syncs_of(step: Callable[[], object]) -> tuple[int, list[str]]:
    """Run `step` and return the sync warnings it raised and the Python lines they came from."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the default filter shows a warning once per line: every sync must count
        step()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    return len(syncs), [f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}" for w in syncs]


def run_case(arch: str, aux: bool, warmup: bool, args: argparse.Namespace, device: torch.device) -> dict:
    trainer = make_trainer(arch, aux, warmup, args, device)
    x = torch.randn(args.batch, args.d_in, device=device)
    for _ in range(args.warmup_steps):
        trainer.step(x, autocast=args.autocast)
    measurable = device.type == "cuda"
    per_step: list[int] = []
    where: Counter[str] = Counter()
    metrics: dict = {}

    def step() -> None:
        metrics.update(trainer.step(x, autocast=args.autocast))  # kept on the device: reading them would sync

    for _ in range(args.steps):
        if not measurable:
            step()
            continue
        torch.cuda.set_sync_debug_mode("warn")
        try:
            n, lines = syncs_of(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        per_step.append(n)
        where.update(lines)
    # A case that did not set up what it meant to (AuxK running or not) confirms nothing, whatever it counted.
    auxk_ran = "auxk" in metrics
    set_up = auxk_ran == (aux and arch != "relu_l1")  # ReLU+L1 has no AuxK
    case = {"arch": arch, "auxk": aux, "topk_warmup": warmup, "budget": BUDGET[arch], "auxk_ran": auxk_ran,
            "set_up": set_up}
    if not measurable:
        return {**case, "syncs_per_step": None, "max_syncs": None, "ok": None, "note": NOT_MEASURABLE}
    return {**case, "syncs_per_step": per_step, "max_syncs": max(per_step), "where": dict(where),
            "ok": set_up and max(per_step) <= BUDGET[arch]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--d-in", type=int, help="default: 2048 on CUDA, 64 on the CPU")
    p.add_argument("--d-sae", type=int, help="default: 65,536 on CUDA, 1,024 on the CPU")
    p.add_argument("--batch", type=int, help="default: 4096 on CUDA, 256 on the CPU")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="fp32 steps (default on CUDA: bf16 autocast, how train steps there)")
    p.add_argument("--variants", nargs="+", default=list(BUDGET), choices=list(BUDGET))
    args = p.parse_args()
    device = pick_device(args.device)
    measurable = device.type == "cuda"
    if measurable and device.index is not None:
        torch.cuda.set_device(device)  # CUDA's current device is where unplaced tensors and synchronize() go
    args.autocast = args.autocast and measurable
    for name, default in zip(("d_in", "d_sae", "batch"), SHAPES["cuda" if measurable else "cpu"]):
        setattr(args, name, getattr(args, name) or default)
    cases = []
    for arch in args.variants:
        for aux in (False, True):
            for warmup in (False, True):
                cases.append(run_case(arch, aux, warmup, args, device))
                gc.collect()  # the last trainer's weights and Adam state (GiBs at full size) go before the next
                print(f"[bench_syncs] {json.dumps(cases[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({
        "shape": {"d_in": args.d_in, "d_sae": args.d_sae, "batch": args.batch, "k": args.k},
        "device": str(device), "gpu": torch.cuda.get_device_name(device) if measurable else None,
        "autocast": args.autocast, "warmup_steps": args.warmup_steps, "steps": args.steps,
        "measurable": measurable, "note": None if measurable else NOT_MEASURABLE,
        "budget": BUDGET, "cases": cases,
        "ok": all(c["ok"] for c in cases) if measurable else None,
        "set_up": all(c["set_up"] for c in cases),  # every case ran the AuxK path it meant to
    }))


if __name__ == "__main__":
    main()
