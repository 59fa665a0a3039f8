"""Trainer benchmark: our step vs the matmul ceiling vs SAELens 6's step, plus trainer peak RSS.

One run prints ONE JSON document (on stdout; progress goes to stderr) with three parts:

``throughput``  For each of our variants (relu_l1, topk, batchtopk, matryoshka_batchtopk, jumprelu) the real
    ``SAETrainer.step`` (forward, backward, grad clip, Adam, decoder projection, dead tracking)
    in tokens/s and as a ratio to the *matmul ceiling*: the five matmuls a dense SAE step cannot
    avoid — x@W_enc, its weight gradient, f@W_dec, its weight gradient and its input gradient —
    timed bare in the same run. A ratio above 1 is possible for TopK/BatchTopK because their
    decoder (``embedding_bag``) and encoder backward are sparse, so of the five only x@W_enc
    remains dense.
``topk_auxk``   TopK's step with every latent dead at every step, so AuxK runs at its full k_aux = d_in / 2, by the
    decode ``sae.saes.base.AUXK_DENSE_FROM`` picks for these shapes (``path``), and ``auxk_share_of_step``: the
    share of that step AuxK takes (1 − TopK's time without it ÷ this time; issue 19 §3). Both decodes are timed:
    ``auxk_ms`` (AuxK's milliseconds by each) and ``dense_speedup`` (sparse ÷ dense), the measurement that sets the
    crossover.
``saelens``     SAELens's own training step on the same shapes and data: its
    ``sae_lens.training.sae_trainer.SAETrainer.step`` (``training_forward_pass`` + dead-latent
    tracking + ``loss.backward()`` + ``clip_grad_norm_(1.0)`` + ``Adam.step`` + schedulers; SAELens
    6.54 does no per-step decoder normalisation: TopK rescales by ‖W_dec‖ inside the forward, the
    standard SAE weights its L1 by ‖W_dec‖) for ``StandardTrainingSAE`` (ReLU+L1) and
    ``TopKTrainingSAE`` (k=32), with ours ÷ SAELens per variant.
``rss``         Peak RSS of ``sae.training.train.train`` in a fresh subprocess on an on-disk cache 1× and
    4× as large (float16 shards built with ``sae.data.store.CacheWriter``), same number of steps.

The box is shared, so every contender (ceiling included) is timed once per *round* and the
rounds are interleaved (order rotated each round): load drift hits all of them alike. Wall time
is the headline; process CPU time per step is reported too (less sensitive to being descheduled
by other users' jobs). ``load`` records /proc/loadavg before and after and the CPU share this
process got while timing.

On a GPU (``--device cuda --autocast``) every step runs under bf16 autocast (weights and Adam stay fp32), the
ceiling is the same five matmuls on bf16 tensors, steps are timed with CUDA events, and the goals are the GPU ones
(``GPU_GOALS``): ``scripts/gpu_check.sh`` runs it at d_in 2048 × 32 that way.

Usage: python scripts/bench_train.py [--quick] [--rounds 4] [--warmup 1] [--no-saelens] [--no-rss]
                                     [--no-throughput] [--rss-shards 16 64]
                                     [--d-in 576] [--expansion 16] [--batch 4096] [--device auto] [--autocast]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sae.saes import SAE_CLASSES, SAEConfig, base, create_sae, dense_auxk
from sae.training.train import default_lr
from sae.training.trainer import SAETrainer

PUBLISHED_SAELENS_RATIO = {"relu_l1": 0.44, "topk": 0.48}
"""SAELens's tokens/s as a fraction of the matmul ceiling, as published for this machine."""
GOALS = {"relu_l1_ratio_to_ceiling": 0.7, "topk_speedup_vs_saelens": 2.5, "rss_ratio_4x_vs_1x": 1.1}
GPU_GOALS = {"relu_l1_ratio_to_ceiling": 0.6, "topk_ratio_to_ceiling": 1.0, "rss_ratio_4x_vs_1x": 1.1}
"""Issue 8 §4, for bf16 autocast: ReLU+L1 at ≥ 0.6 of the bf16 ceiling, TopK above it (sparse decoder/backward)."""
HOOK = "blocks.0.hook_resid_post"


def log(msg: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ----- (a)+(b) throughput ---------------------------------------------------------------------


class Contender:
    """A named step function, timed once per round; keeps wall and CPU samples."""

    def __init__(self, name: str, step: Callable[[], object], info: Callable[[], dict]) -> None:
        self.name, self.step, self.info = name, step, info
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def run(self, device: torch.device, record: bool) -> None:
        _sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        if device.type == "cuda":
            # Events bracket the kernels themselves, so host-side jitter around the sync does not count.
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.step()
            end.record()
            end.synchronize()
            wall = start.elapsed_time(end) / 1e3
        else:
            self.step()
            wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        if record:
            self.wall.append(wall)
            self.cpu.append(cpu)

    def summary(self) -> dict:
        w, c = statistics.median(self.wall), statistics.median(self.cpu)
        return {
            "step_ms": round(w * 1e3, 1),
            "step_ms_min_max": [round(min(self.wall) * 1e3, 1), round(max(self.wall) * 1e3, 1)],
            "step_ms_samples": [round(t * 1e3, 1) for t in self.wall],
            "cpu_ms": round(c * 1e3, 1),
        }


def ceiling_contender(x: torch.Tensor, d_sae: int, dtype: torch.dtype = torch.float32) -> Contender:
    """The five dense matmuls of an SAE step, in `dtype` (bf16 under autocast: what autocast runs them in)."""
    d_in = x.shape[1]
    x = x.to(dtype)
    W_enc = (torch.randn(d_in, d_sae, device=x.device) / d_in**0.5).to(dtype)
    W_dec = (torch.randn(d_sae, d_in, device=x.device) / d_sae**0.5).to(dtype)
    f = torch.randn(x.shape[0], d_sae, device=x.device, dtype=dtype)
    g = torch.randn_like(x)

    def five_matmuls() -> None:
        pre = x @ W_enc  # encoder forward
        _ = x.T @ pre  # encoder weight gradient (shape of W_enc)
        _ = f @ W_dec  # decoder forward
        _ = f.T @ g  # decoder weight gradient
        _ = g @ W_dec.T  # decoder input gradient

    return Contender("ceiling", five_matmuls, dict)


def ours_contender(arch: str, x: torch.Tensor, args: argparse.Namespace, d_sae: int,
                   auxk: str | None = None) -> Contender:
    """Our step; ``auxk`` ("sparse" or "dense": AuxK's decode, forced): with every latent dead at every step (a dead
    window of 0 tokens), so AuxK runs at its full k_aux (the ``{arch}_auxk_{path}`` contender, whose extra time over
    ``arch``'s is the AuxK share)."""
    sae = create_sae(SAEConfig(arch, args.d_in, d_sae, k=args.k)).to(x.device)
    sae.initialise_from_data(x)
    trainer = SAETrainer(sae, lr=default_lr(arch, d_sae, None, args.d_in), total_steps=10**6,
                         # without `auxk`: dead after 2 silent steps, so AuxK would run from step 3 — but on this
                         # Gaussian data every latent fires each batch (dead_frac in the JSON is 0)
                         dead_window_tokens=0 if auxk else args.batch * 2)
    state = {"i": 0}

    crossovers = base.AUXK_DENSE_FROM
    forced = {**crossovers, x.device.type: 0.0 if auxk == "dense" else float("inf")}

    def step() -> None:
        i = state["i"] % 4
        state["i"] += 1
        base.AUXK_DENSE_FROM = forced if auxk else crossovers
        try:
            trainer.step(x[i * args.batch : (i + 1) * args.batch], autocast=args.autocast)
        finally:
            base.AUXK_DENSE_FROM = crossovers

    def info() -> dict:
        return {"dead_frac": round(float(trainer.dead_mask.float().mean()), 3),
                "sparse_decoder_and_encoder_backward": SAE_CLASSES[arch].sparse_step}

    return Contender(f"{arch}_auxk_{auxk}" if auxk else arch, step, info)


def saelens_contender(arch: str, x: torch.Tensor, args: argparse.Namespace, d_sae: int) -> Contender:
    """SAELens 6's own ``SAETrainer.step`` (what its ``fit`` loop calls), same shapes, data, lr."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer as LensTrainer

    device = str(x.device)
    if arch == "relu_l1":
        # Anthropic's recipe (ours adds centring and a fast b_enc): L1 on f·‖W_dec‖ (λ = 5), decoder init norm 0.1,
        # no b_dec on input.
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(
            d_in=args.d_in, d_sae=d_sae, device=device, l1_coefficient=5.0,
            apply_b_dec_to_input=False, decoder_init_norm=0.1))
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(
            d_in=args.d_in, d_sae=d_sae, device=device, k=args.k))
    cfg = SAETrainerConfig(
        total_training_samples=10**12, train_batch_size_samples=args.batch,
        lr=default_lr(arch, d_sae, None, args.d_in), lr_end=default_lr(arch, d_sae, None, args.d_in) / 10,
        device=device, autocast=args.autocast, dead_feature_window=1,  # dead after 2 silent steps, like ours (see dead_frac)
        feature_sampling_window=10**9, logger=LoggingConfig(log_to_wandb=False))
    trainer = LensTrainer(cfg, sae, data_provider=iter(()))
    state = {"i": 0}

    def step() -> None:
        i = state["i"] % 4
        state["i"] += 1
        trainer.step(x[i * args.batch : (i + 1) * args.batch])
        trainer.n_training_steps += 1  # what fit() does after each step

    def info() -> dict:
        return {"class": type(sae).__name__,
                "dead_frac": round(float(trainer.dead_neurons.float().mean()), 3)}

    return Contender(f"saelens_{arch}", step, info)


def bench_throughput(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    d_sae = args.d_in * args.expansion
    x = torch.randn(args.batch * 4, args.d_in, device=device)  # in-memory "cache": 4 batches
    contenders = [ceiling_contender(x[: args.batch], d_sae, torch.bfloat16 if args.autocast else torch.float32)]
    contenders += [ours_contender(a, x, args, d_sae) for a in args.arch]
    if "topk" in args.arch:
        contenders += [ours_contender("topk", x, args, d_sae, auxk=path) for path in ("sparse", "dense")]
    saelens_error = None
    if args.saelens:
        try:
            import sae_lens

            for a in ("relu_l1", "topk"):
                torch.manual_seed(0)
                contenders.append(saelens_contender(a, x, args, d_sae))
            saelens_version = sae_lens.__version__
        except Exception as err:  # noqa: BLE001 - reported in the JSON, ours still measured
            saelens_error = f"{type(err).__name__}: {err}"
            saelens_version = None
    load_before = loadavg()
    cpu0, t0 = time.process_time(), time.perf_counter()
    n_rounds = args.warmup + args.rounds
    for r in range(n_rounds):
        shift = r % len(contenders)
        order = contenders[shift:] + contenders[:shift]  # rotate so no one always goes first
        for c in order:
            c.run(device, record=r >= args.warmup)
        log(f"round {r + 1}/{n_rounds} ({'warm-up' if r < args.warmup else 'timed'}) done, "
            f"load {loadavg()}")
    wall_total, cpu_total = time.perf_counter() - t0, time.process_time() - cpu0
    load_after = loadavg()

    ceiling = contenders[0]
    ceil_w, ceil_c = statistics.median(ceiling.wall), statistics.median(ceiling.cpu)

    def entry(c: Contender) -> dict:
        s = c.summary()
        w, cpu = statistics.median(c.wall), statistics.median(c.cpu)
        # per-round ratio (ceiling and contender of the same round) shows the spread
        per_round = [cw / sw for cw, sw in zip(ceiling.wall, c.wall)]
        return {
            "tokens_per_s": round(args.batch / w),
            "tokens_per_s_min_max": [round(args.batch / max(c.wall)), round(args.batch / min(c.wall))],
            "ratio_to_ceiling": round(ceil_w / w, 3),
            "ratio_to_ceiling_per_round_min_max": [round(min(per_round), 3), round(max(per_round), 3)],
            "cpu_ratio_to_ceiling": round(ceil_c / cpu, 3),
            **s, **c.info(),
        }

    by_name = {c.name: c for c in contenders}
    ours = {a: entry(by_name[a]) for a in args.arch}
    out: dict = {
        "ceiling": {"tokens_per_s": round(args.batch / ceil_w), **ceiling.summary(),
                    "gflop_per_s": round(5 * 2 * args.batch * args.d_in * d_sae / ceil_w / 1e9, 1)},
        "ours": ours,
    }
    if "topk" in args.arch:  # issue 19 §3: what AuxK at k_aux = d_in / 2 adds to TopK's step, by either decode
        k_aux, off = args.d_in // 2, statistics.median(by_name["topk"].wall)
        chosen = "dense" if dense_auxk(k_aux, d_sae, device.type) else "sparse"
        on = {path: statistics.median(by_name[f"topk_auxk_{path}"].wall) for path in ("sparse", "dense")}
        out["topk_auxk"] = {**entry(by_name[f"topk_auxk_{chosen}"]), "k_aux": k_aux,  # dead_frac: all, see above
                            "auxk_share_of_step": round(1 - off / on[chosen], 3), "path": chosen,
                            "auxk_ms": {path: round(1e3 * (t - off), 1) for path, t in on.items()},
                            "dense_speedup": round((on["sparse"] - off) / max(on["dense"] - off, 1e-9), 3),
                            "crossover_k_aux_over_d_sae": base.AUXK_DENSE_FROM.get(device.type)}
    if args.saelens:
        lens: dict = {"version": saelens_version, "error": saelens_error}
        for a in ("relu_l1", "topk"):
            c = by_name.get(f"saelens_{a}")
            if c is None:
                continue
            e = entry(c)
            e["published_ratio_to_ceiling"] = PUBLISHED_SAELENS_RATIO[a]
            if a in ours:
                e["ours_over_saelens"] = round(statistics.median(c.wall) / statistics.median(by_name[a].wall), 3)
                e["ours_over_saelens_cpu"] = round(statistics.median(c.cpu) / statistics.median(by_name[a].cpu), 3)
                per_round = [lw / ow for lw, ow in zip(c.wall, by_name[a].wall)]
                e["ours_over_saelens_per_round_min_max"] = [round(min(per_round), 3), round(max(per_round), 3)]
            lens[a] = e
        out["saelens"] = lens
    out["timing_load"] = {
        "loadavg_before": load_before, "loadavg_after": load_after,
        "timed_wall_s": round(wall_total, 1),
        # 1.0 = this process kept all its threads busy the whole time; lower = it was starved
        "cpu_share_of_threads": round(cpu_total / (wall_total * torch.get_num_threads()), 3),
    }
    return out


# ----- (c) peak RSS on a 1× vs 4× cache ------------------------------------------------------


def build_cache(path: Path, n_shards: int, shard_rows: int, d: int, context_size: int = 128) -> None:
    """A complete float16 cache of random activations, written by the store's own writer."""
    from sae.data.store import CacheWriter

    n_ctx = shard_rows // context_size
    meta = {"model": "bench-random", "hooks": {HOOK: d}, "dtype": "float16", "model_dtype": "float32",
            "context_size": context_size, "prepend_bos": False, "exclude_first": False,
            "bos_token_id": None, "dataset": {"name": "random"}, "eval_fraction": 0.05,
            "max_contexts": n_ctx * n_shards}
    writer = CacheWriter(path, meta, contexts_per_shard=n_ctx)
    g = torch.Generator().manual_seed(n_shards)
    try:
        for _ in range(n_shards):
            acts = torch.randn(n_ctx, context_size, d, generator=g).to(torch.float16)
            tokens = torch.randint(0, 50_000, (n_ctx, context_size), generator=g)
            writer.add({HOOK: acts}, tokens, first_pos=0)
        writer.finish(first_pos=0)
    finally:
        writer.close()


def rss_child(spec: dict) -> None:
    """Runs in a fresh interpreter: train, then print peak RSS (VmHWM) as one JSON line.

    VmHWM rather than the parent's getrusage(RUSAGE_CHILDREN): that one is the max over *all*
    children so far and, on this box, also counts the parent's image the child had before exec.
    """
    import torch

    from sae.training.train import SAESpec, TrainConfig, train

    torch.set_num_threads(spec["threads"])
    base_hwm = _proc_status_kb("VmHWM")
    t0 = time.perf_counter()
    train(TrainConfig(
        cache=spec["cache"], out=spec["out"], batch_size=spec["batch"],
        total_tokens=spec["steps"] * spec["batch"], wandb_mode="disabled",
        checkpoint_every=10**9, log_every=10**9, device=spec["device"],
        saes=[SAESpec(spec["arch"], HOOK, expansion_factor=spec["expansion"])],
    ))
    print(json.dumps({"vmhwm_kb": _proc_status_kb("VmHWM"), "vmhwm_after_imports_kb": base_hwm,
                      "train_s": round(time.perf_counter() - t0, 1)}), flush=True)


def bench_rss(args: argparse.Namespace, device: torch.device) -> dict:
    from sae.data.store import ActivationStore

    rows_per_shard = args.rss_shard_rows
    shard_mb = rows_per_shard * args.d_in * 2 / 2**20
    out: dict = {
        "d_in": args.d_in, "storage_dtype": "float16", "shard_rows": rows_per_shard,
        "shard_mb": round(shard_mb, 1), "arch": args.rss_arch, "expansion": args.rss_expansion,
        "batch": args.rss_batch, "steps": args.rss_steps, "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_train_rss_") as tmp:
        for n in args.rss_shards:
            cache = Path(tmp) / f"cache_{n}"
            t0 = time.perf_counter()
            build_cache(cache, n, rows_per_shard, args.d_in)
            store = ActivationStore(cache)
            log(f"built {n}-shard cache ({n * shard_mb:.0f} MB) in {time.perf_counter() - t0:.1f}s")
            spec = {"cache": str(cache), "out": str(Path(tmp) / f"out_{n}"), "batch": args.rss_batch,
                    "steps": args.rss_steps, "arch": args.rss_arch, "expansion": args.rss_expansion,
                    "device": device.type, "threads": torch.get_num_threads()}
            env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
            t0 = time.perf_counter()
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rss-child", json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            stdout, stderr = p.communicate()
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                out["runs"][str(n)] = {"error": stderr[-2000:]}
                continue
            child = json.loads(stdout.strip().splitlines()[-1])
            out["runs"][str(n)] = {
                "shards": n, "cache_mb": round(n * shard_mb), "train_rows": store.n_train_rows,
                "epochs_seen": round(args.rss_steps * args.rss_batch / store.n_train_rows, 2),
                "peak_rss_mb": round(child["vmhwm_kb"] / 1024, 1),
                "rss_after_imports_mb": round(child["vmhwm_after_imports_kb"] / 1024, 1),
                "peak_minus_imports_mb": round((child["vmhwm_kb"] - child["vmhwm_after_imports_kb"]) / 1024, 1),
                "train_s": child["train_s"], "subprocess_s": round(wall, 1),
            }
            log(f"{n}-shard train: peak RSS {child['vmhwm_kb'] / 1024:.0f} MB")
            import shutil

            shutil.rmtree(cache, ignore_errors=True)  # keep the disk footprint to one cache at a time
    runs = [out["runs"][str(n)] for n in args.rss_shards]
    if len(runs) == 2 and all("peak_rss_mb" in r for r in runs):
        small, big = runs
        out["peak_rss_ratio"] = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)
        out["peak_minus_imports_ratio"] = round(
            big["peak_minus_imports_mb"] / max(small["peak_minus_imports_mb"], 1e-9), 3)
        # ShuffledReader loads shards in groups of shuffle_rows = 2**18 rows (its default)
        out["reader_group_shards"] = [min(n, max(1, 2**18 // rows_per_shard)) for n in args.rss_shards]
    return out


# ----- main ----------------------------------------------------------------------------------


def verdict(doc: dict, goals: dict) -> dict:
    """Each measured headline next to whether it meets its goal (only goals this run measured)."""
    t = doc.get("throughput", {"ours": {}})
    out: dict = {}
    if "relu_l1" in t["ours"]:
        out["relu_l1_ratio_to_ceiling"] = t["ours"]["relu_l1"]["ratio_to_ceiling"]
        out["relu_l1_meets_goal"] = out["relu_l1_ratio_to_ceiling"] >= goals["relu_l1_ratio_to_ceiling"]
    if "topk" in t["ours"] and "topk_ratio_to_ceiling" in goals:
        out["topk_ratio_to_ceiling"] = t["ours"]["topk"]["ratio_to_ceiling"]
        out["topk_meets_goal"] = out["topk_ratio_to_ceiling"] > goals["topk_ratio_to_ceiling"]
    for a in ("relu_l1", "topk"):
        e = t.get("saelens", {}).get(a, {})
        if "ours_over_saelens" in e:
            out[f"{a}_ours_over_saelens"] = e["ours_over_saelens"]
            out[f"{a}_saelens_ratio_to_ceiling"] = e["ratio_to_ceiling"]
    if "topk_ours_over_saelens" in out and "topk_speedup_vs_saelens" in goals:
        out["topk_meets_goal"] = out["topk_ours_over_saelens"] >= goals["topk_speedup_vs_saelens"]
    if "rss" in doc and "peak_rss_ratio" in doc["rss"]:
        out["rss_ratio_4x_vs_1x"] = doc["rss"]["peak_rss_ratio"]
        out["rss_meets_goal"] = doc["rss"]["peak_rss_ratio"] <= goals["rss_ratio_4x_vs_1x"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--autocast", action="store_true",
                   help="bf16 autocast for every step and a bf16 ceiling (the trainer's CUDA mode); GPU goals")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (every contender steps once per round)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds; medians are over these")
    p.add_argument("--arch", nargs="*", default=sorted(SAE_CLASSES))
    p.add_argument("--no-saelens", dest="saelens", action="store_false")
    p.add_argument("--no-rss", dest="rss", action="store_false")
    p.add_argument("--no-throughput", dest="throughput", action="store_false", help="only the RSS part")
    p.add_argument("--rss-shards", type=int, nargs=2, default=[16, 64],
                   help="cache sizes (shards of 16k rows) to compare; both above the 2^18-row shuffle window")
    p.add_argument("--rss-shard-rows", type=int, default=16384)
    p.add_argument("--rss-steps", type=int, default=72,
                   help="enough that the 1x cache wraps an epoch and the 4x one changes shard group")
    p.add_argument("--rss-batch", type=int, default=4096)
    p.add_argument("--rss-arch", default="topk")
    p.add_argument("--rss-expansion", type=int, default=2, help="small SAE: the RSS test is about the data path")
    p.add_argument("--quick", action="store_true", help="smoke run: small shapes, 1+2 rounds, tiny caches")
    p.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.rss_child:
        rss_child(json.loads(args.rss_child))
        return
    if args.quick:
        args.d_in, args.expansion, args.batch = 128, 8, 512
        args.warmup, args.rounds = 1, 2
        args.rss_shards, args.rss_shard_rows, args.rss_steps, args.rss_batch = [2, 8], 2048, 12, 512

    from sae.data.model import pick_device

    device = pick_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and synchronize() act on the current device
    if device.type == "cuda":  # as train sets it: the fp32 products outside autocast (AuxK's dense backward) in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
    goals = GPU_GOALS if args.autocast else GOALS
    t_start = time.perf_counter()
    doc: dict = {
        "config": {
            "d_in": args.d_in, "d_sae": args.d_in * args.expansion, "expansion": args.expansion,
            "batch": args.batch, "k": args.k,
            "dtype": "bfloat16 autocast, float32 weights" if args.autocast else "float32", "device": str(device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "warmup_rounds": args.warmup, "timed_rounds": args.rounds,
            "quick": args.quick,
        },
        "goals": goals,
    }
    if device.type == "cuda":
        doc["config"]["gpu"] = torch.cuda.get_device_name(device)
    if args.throughput:
        log(f"throughput: {len(args.arch)} ours + {'2 SAELens' if args.saelens else 'no SAELens'} + "
            f"ceiling, {args.warmup}+{args.rounds} rounds, load {loadavg()}")
        doc["throughput"] = bench_throughput(args, device)
    if args.rss:
        doc["rss"] = bench_rss(args, device)

    doc["verdict"] = verdict(doc, goals)
    doc["total_s"] = round(time.perf_counter() - t_start, 1)
    doc["loadavg_end"] = loadavg()
    print(json.dumps(doc, indent=1), flush=True)


if __name__ == "__main__":
    main()
