"""Train several SAEs in one pass over an activation cache.

Every batch read from disk feeds all SAEs (different hooks, widths, k or λ), so reading the
cache — the slow part at scale — is paid once. Each SAE has its own Adam, schedules and
dead-latent tracker (``SAETrainer``); ``train`` owns the data stream, checkpoints and logging.

Schedules and windows are fractions of the run's token budget, so one set of defaults fits a
two-minute demo and a 100M-token run alike.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
import typing
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae.training import distributed, plan, sharded
from sae.config import HelpSections, field_docs
from sae.data.ahead import ahead
from sae.data.harvest import HarvestConfig
from sae.saes import SAE_CLASSES, SAEConfig, SAEFormatError, create_sae, failure_signs
from sae.saes.formats import check_replaceable
from sae.saes.pretrained import CFG_FILENAME, read_cfg
from sae.data.source import CacheSource, ModelSource, Source, check_split
from sae.data.store import (DiskFullError, all_finite, atomic_write_json, check_output_folder, disk_full_reported,
                            folder_lock, human_bytes)
from sae.training.trainer import (GAO_DEAD_TOKENS, DivergedError, ResumeMismatch, SAETrainer, TrainError,
                                  topk_warmup_steps)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
PENDING_REMOVAL = "replaces.json"
"""In CHECKPOINT_DIR: every SAE folder of the runs an overwrite=true run replaces, recorded before it deletes the
checkpoints that named them, so a run stopped before its first checkpoint still knows them when run again with
overwrite=true or resume=true (which then removes those it does not write, ``_Start.replaces``; a plain run there is
refused); deleted once they are removed. Marked as ours (``_PENDING_MARK``): a file of that name the toolkit did not
write is neither read nor touched."""
_PENDING_MARK = {"written_by": "sae train", "what": "SAE folders of an overwritten run, to remove once a run finishes"}
_STEP_FOLDER = re.compile(r"(\.tmp_)?step_\d{9,}")
RESERVED_NAMES = (CHECKPOINT_DIR, "wandb")
"""Folders of `out` that are the run's own, so no SAE may be named after them (wandb writes under out/wandb)."""
SCALE_SAMPLE_ROWS = 65536
SPEC_EXCLUDES = ("d_in", "d_sae", "hook_name", "model_name", "dtype", "scale", "hook_name_out", "d_out", "scale_out")
"""SAEConfig fields the run fills in rather than a spec: d_in and d_out from the data, d_sae from the spec's width,
hook_name and hook_name_out from its `hook` and `hook_out`, model_name from the source, scale and scale_out fitted on
the data, and dtype float32 (the trainer keeps float32 weights and autocasts on CUDA)."""
SPEC_DEFAULTS = {"architecture": "topk"}
"""Defaults a spec gives SAEConfig fields that have none."""


def _sae_settings() -> type:
    """A dataclass of every SAEConfig field a user sets, with SAEConfig's own types, defaults and docstrings, so a
    field added to SAEConfig is a spec key and a line of `sae train --help` with nothing restated here. Only
    `architecture` may be given by position (``SAESpec("topk", hook)``); the rest are keywords."""
    hints = typing.get_type_hints(SAEConfig)
    docs = field_docs(SAEConfig)
    settings = [
        (f.name, hints[f.name], field(default=SPEC_DEFAULTS.get(f.name, f.default), default_factory=f.default_factory,
                                      kw_only=f.name != "architecture",
                                      metadata={"doc": docs[f.name]} if f.name in docs else {}))
        for f in fields(SAEConfig) if f.name not in SPEC_EXCLUDES
    ]
    return make_dataclass("SAESettings", settings, namespace={"__module__": __name__})


SAESettings = _sae_settings()


@dataclass
class SAESpec(SAESettings):  # type: ignore[misc,valid-type]
    """One SAE to train: its hook, width, learning rate and folder name, plus every SAEConfig setting (k,
    l1_coefficient, aux_coefficient, ...) under the same name."""

    help_sections: ClassVar[HelpSections] = (
        ("the SAE", ("architecture", "hook", "k", "target_l0", "l1_coefficient", "expansion_factor", "d_sae", "name", "lr")),
        ("transcoders", ("hook_out", "skip")),
        ("variant details", ("l0_coefficient", "bandwidth", "init_threshold", "aux_k", "aux_coefficient",
                             "threshold_momentum", "matryoshka_widths", "apply_b_dec_to_input", "centre_input")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    hook: str = "blocks.15.hook_resid_post"
    """Hook whose activations the SAE reconstructs, or a transcoder reads (must be in the cache)."""
    hook_out: str | None = None
    """Set → a transcoder predicting this hook's activations from `hook`'s, e.g. blocks.15.ln2.hook_normalized →
    blocks.15.hook_mlp_out for layer 15's MLP (Dunefsky et al. 2024); None → an SAE."""
    expansion_factor: int = 16
    """Width as a multiple of d_in."""
    d_sae: int | None = None
    """Explicit width; overrides ``expansion_factor``."""
    lr: float | None = None
    """Overrides ``TrainConfig.lr`` for this SAE."""
    name: str | None = None
    """Output folder name inside `out` (no path separators or leading dot, not checkpoints or wandb); default e.g.
    ``topk_k32_x16_blocks.15.hook_resid_post``, ``jumprelu_target32_x16_…`` for a JumpReLU with a target_l0."""

    def __post_init__(self) -> None:
        if self.architecture not in SAE_CLASSES:
            raise TrainError(
                f"unknown SAE architecture {self.architecture!r}; valid: {sorted(SAE_CLASSES)}"
            )
        if self.d_sae is None and self.expansion_factor <= 0:
            raise TrainError(f"SAE {self.run_name}: expansion_factor={self.expansion_factor} must be > 0 "
                             "(the width is expansion_factor × d_in)")
        name = self.run_name
        if not is_sae_folder_name(name):
            raise TrainError(f"SAE name {name!r} is not a folder name inside `out`: no path separators, no leading "
                             f"dot, not one of {', '.join(RESERVED_NAMES)} (the run's own folders); set `name`")
        unused = self.target_l0 is not None and self.l0_coefficient != SAEConfig.l0_coefficient
        if self.architecture == "jumprelu" and unused:
            raise TrainError(f"SAE {self.run_name}: l0_coefficient={self.l0_coefficient:g} has no effect with "
                             f"target_l0={self.target_l0:g} (the L0 controller sets the penalty's weight); drop one")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        jumprelu = f"l0c{self.l0_coefficient:g}" if self.target_l0 is None else f"target{self.target_l0:g}"
        sparsity = {"relu_l1": f"l1c{self.l1_coefficient:g}", "jumprelu": jumprelu}.get(self.architecture, f"k{self.k}")
        width = f"d{self.d_sae}" if self.d_sae else f"x{self.expansion_factor}"
        if self.hook_out is None:
            return f"{self.architecture}_{sparsity}_{width}_{self.hook}"
        return f"{self.architecture}_{sparsity}_{width}{'_skip' if self.skip else ''}_{self.hook}_to_{self.hook_out}"

    @property
    def hooks(self) -> list[str]:
        """The hooks this SAE reads: its input, and a transcoder's output."""
        return [self.hook] if self.hook_out is None else [self.hook, self.hook_out]

    def sae_config(self, widths: dict[str, int], model_name: str) -> SAEConfig:
        """The SAE's full config once the data gives its hooks' widths; settings it rejects are named with this SAE."""
        d_in = widths[self.hook]
        try:
            return SAEConfig(
                **{f.name: getattr(self, f.name) for f in fields(SAESettings)},
                d_in=d_in,
                d_sae=self.expansion_factor * d_in if self.d_sae is None else self.d_sae,
                hook_name=self.hook,
                hook_name_out=self.hook_out,
                d_out=None if self.hook_out is None else widths[self.hook_out],
                model_name=model_name,
            )
        except SAEFormatError as err:
            raise TrainError(f"SAE {self.run_name}: {err}") from None


@dataclass
class TrainConfig:
    """A training run: where the data is, what to train, and how."""

    help_sections: ClassVar[HelpSections] = (
        ("what to train", ("saes", "source", "cache", "out", "total_tokens", "resume")),
        ("optimisation", ("batch_size", "lr", "lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac", "topk_warmup_frac",
                          "grad_clip", "dead_window_tokens", "shuffle_rows", "seed")),
        ("running", ("device", "checkpoint_every", "log_every", "wandb_mode", "wandb_project", "overwrite",
                     "distribute_saes", "shard_latents", "peer_timeout_minutes", "harvest")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    source: str = "cache"
    """Where activations come from: "cache" (read `cache`) or "model" (run the `harvest` settings' model as the
    SAEs train, with no cache on disk; `sae eval`/`analyse` then read a small cache harvested with the same
    harvest settings, whose held-out contexts no on-the-fly run trains on)."""
    cache: str = "runs/demo/cache"
    """Activation cache written by `sae harvest` (source=cache)."""
    harvest: HarvestConfig = field(default_factory=HarvestConfig)
    """source=model: model, dataset, context_size, exclude_first, dtype, eval_fraction, ... as for `sae harvest`
    (the CLI fills it from the config file's harvest: section); the hooks are the SAEs' own."""
    out: str = "runs/demo/saes"
    """Output folder: one sub-folder per SAE (SAELens layout), checkpoints/ and wandb/."""
    saes: list[SAESpec] = field(default_factory=lambda: [SAESpec()])
    """SAEs to train, all fed by the same batches (a sweep costs one pass over the cache)."""
    batch_size: int | None = None
    """Tokens per step; None → ``default_batch_size(total_tokens)``: the papers' 4096 when the
    run is long enough, else the largest power of two that still leaves ≥ 4,000 steps (never
    below 256). A 2M-token run at 4096 would take 500 Adam steps, too few for any recipe to
    converge (``default_batch_size`` has the measurements); from 16.4M tokens (4,000 × 4096)
    nothing changes."""
    total_tokens: int | None = None
    """Tokens to train on; None → one epoch over the cache's training split (source=model: harvest.max_tokens)."""
    shuffle_rows: int = 2**18
    """Rows mixed together before batches are drawn (a group of cache shards, or a chunk of contexts run through
    the model): the reader's memory is about twice this many rows per hook."""
    lr: float | None = None
    """Adam learning rate; None → ``default_lr(architecture, d_sae, total_steps, d_in)``."""
    lr_warmup_frac: float = 0.01
    """Linear lr warm-up over this fraction of the run."""
    lr_decay_frac: float = 0.2
    """Linear decay to 0 over the last fraction of the run (Anthropic April 2024)."""
    l1_warmup_frac: float = 0.05
    """Linear warm-up of the sparsity coefficient (L1 or L0) from 0 (Anthropic April 2024)."""
    topk_warmup_frac: float = 0.9
    """Fraction of the run in which BatchTopK and JumpReLU with a target_l0 select each token's top k latents, as TopK
    does, before their own batch-wide L0 budget takes over: a batch-wide budget spends no latent on a token whose
    features have no trained latent yet, so latents for rare features never start learning. On hard planted data it
    lifts BatchTopK's recovery of the true dictionary from 0.82 to 0.96–0.97 and JumpReLU's from 0.77 to 0.95–0.96
    (``sae.saes.BatchTopKSAE`` has the table). BatchTopK hands over to its batch budget gradually over the warm-up's
    last tenth (see its class). Matryoshka skips it (see its class). 0 turns it off."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold (Anthropic April 2024)."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (one is always written at the end)."""
    dead_window_tokens: int | None = None
    """Tokens without firing after which a latent counts as dead; None → 10M (Gao et al.) or
    a tenth of the run if that is shorter, so short runs still measure something."""
    seed: int = 0
    """Seeds the initialisation and the order of the shuffled batches."""
    device: str = "auto"
    """"auto" (CUDA when present, with bf16 autocast), "cpu", "cuda", ..."""
    wandb_mode: str = "offline"
    """wandb mode: offline (default, no account needed), online, or disabled."""
    wandb_project: str = "sae"
    """wandb project name."""
    resume: bool = False
    """Continue from the latest checkpoint in `out` exactly where it stopped."""
    overwrite: bool = False
    """Start afresh in an `out` that holds an earlier run's checkpoints, deleting them, and once this run's SAEs are
    written, that run's SAE folders this one did not replace (without it, such an `out` is refused: resume=true
    continues it)."""
    distribute_saes: bool = False
    """Under torchrun: split the SAEs of the sweep across the processes, each training its share on the whole
    stream with no gradient traffic (sparsify's --distribute_modules), instead of splitting every batch (DDP)."""
    shard_latents: bool = False
    """Under torchrun: shard the latents of each (topk) SAE across the processes, for SAEs too wide for one device
    (Gao et al. 2024): each holds d_sae / processes latents and reads every batch whole; see `sae.training.sharded`."""
    log_every: int = 10
    """Steps between log lines (wandb and the progress bar's FVU)."""
    peer_timeout_minutes: float = 30.0
    """Under torchrun: how long a process waits in a collective for the others before the job fails (torch's own
    default is 10 minutes under nccl). A process that fails alone tells the others at once (see
    ``sae.training.distributed.fail_together``) and one that dies is reported by gloo at the next step, so this bounds
    only a hang (a wedged GPU, a peer stuck in I/O). It must exceed the longest stretch one process works while the
    others wait: rank 0's initial fit and its checkpoint and SAE folder writes (~1 GB/s: ~2 minutes for the weights
    and Adam moments of 1M latents at d_in 4096), or the spread of the model loads of an on-the-fly run."""

PAPER_BATCH = 4096
MIN_STEPS = 4000
MIN_BATCH = 256
MAX_LR_BOOST = 25.0


def default_batch_size(total_tokens: int) -> int:
    """The papers' 4096, halved until the run has ≥ ``MIN_STEPS`` steps, floored at 256.

    At a fixed token budget, a short run's recovery is set by its number of Adam steps, not by its batch: with
    the same 2M tokens and seed (`sae planted`, width 2·n_features, fresh rows, 2026-12-07), mean max cosine (FVU)
    at 500 steps of 4096 → 2,000 of 1024 → 4,000 of 512 → 8,000 of 256:
    - d_in 256, 1024 features, L0 8: TopK 0.923 (0.080) → 0.969 (0.070) → 0.994 (0.065); BatchTopK 0.878 →
      0.896 → 0.939 (0.071); JumpReLU 0.941 (0.078) → 0.995 (0.062) at 4,000. TopK at 500 steps with the 2,000-step
      run's smaller lr: 0.892, so it is the steps, not the lr that comes with them.
    - d_in 64, 1024 features, L0 8 (16 features per dimension): TopK 0.916 → 0.942 → 0.948, BatchTopK 0.888 →
      0.920 → 0.914, JumpReLU 0.931 → 0.949 → 0.945: gains stop by 4,000.
    - SmolLM2-135M layer 15 (`sae eval`'s held-out rows, width ×8, k / target L0 32, 313k tokens: 612 steps of
      512 → 1,224 of 256): held-out FVU TopK 0.163 → 0.160, BatchTopK 0.159 → 0.156, JumpReLU 0.150 → 0.143.
    Hence ``MIN_STEPS`` 4,000 (it was 500): runs of ≥ 16.4M tokens keep the papers' 4096, which a GPU needs to be fed;
    shorter ones take seconds to minutes there at any batch."""
    batch = PAPER_BATCH
    while batch > MIN_BATCH and total_tokens // batch < MIN_STEPS:
        batch //= 2
    return batch


def default_lr(architecture: str, d_sae: int, total_steps: int | None, d_in: int) -> float:
    """Adam learning rate of each recipe (for inputs with E‖x − x̄‖² = d_in), raised for short runs.

    Adam moves each weight by at most ~lr per step, so the distance the weights can travel
    is ~lr·steps; a recipe tuned for 10⁴–10⁵ steps cannot get anywhere in 500. A run of
    n < N steps (the variant's ``reference_steps``) gets lr·√(N / n) — √ rather than N / n to keep the noise
    of the larger steps in check, as in the square-root batch-size/lr rule — capped at 25×;
    ``total_steps=None`` or n ≥ N gives the paper's lr (the variant's ``paper_lr``) unchanged.

    N was calibrated on the demo cache (SmolLM2 layer 15, 8×, 449 steps of 256 tokens), judged on held-out FVU
    against PCA at the SAE's own L0 and on dead latents. ReLU+L1 λ=5 (then uncentred) needs the large boost (N = 200k): FVU 0.32 vs
    PCA-25 0.53 at lr ≈ 1e-3, but 0.375 vs 0.367 (beaten by PCA) at ~4e-4. TopK k=32 needs far less (N = 3k): lr
    1e-3 gives FVU 0.187 with 2.8% dead latents, while 3.1e-3 (N = 30k) gives 0.173 but leaves 47.7% of latents dead.

    Every variant sets ``paper_d_in`` (TopK, BatchTopK and Matryoshka 576, where their values above were calibrated;
    JumpReLU 2304; ReLU+L1 4096) and gets ×√(paper_d_in / d_in): Adam moves every coordinate of a unit-norm row by
    ~lr per step, a rotation of ~lr·√d_in, so a recipe keeps its pace at another width with lr ∝ 1/√d_in. JumpReLU on
    the CI-sized hard `sae planted` data (d_in 32, 128 features, L0 3, 781 steps, TopK warm-up 0.75): lr 1.1e-3
    (without the factor) reaches mean max cosine 0.69–0.73 and FVU 0.27, 9.5e-3 (with it) 0.90 and FVU 0.11.
    ReLU+L1: see ``ReLUL1SAE``.
    The TopK family went without the factor while only that CI point was measured (TopK held 0.96–0.97 there from
    3e-3 to 1.5e-2), until it fell behind the plain reference loop in superposition (issue 18). Mean max cosine
    without → with the factor, `sae planted` at width 2·n_features:
    - d_in 32, 512 features, L0 8 (500 steps; ×4.24): TopK 0.696 → 0.851 (FVU 0.182 → 0.156), BatchTopK
      0.752 → 0.868 (FVU 0.374 → 0.205, L0 5.7 → 7.8 of 8);
    - d_in 64, 1024 features, L0 8 (976 steps; ×3): TopK 0.768 → 0.927, BatchTopK 0.816 → 0.897;
    - d_in 256, 1024 features, L0 8 (500 steps of 1024; ×1.5): TopK 0.842 → 0.888 (FVU 0.108 → 0.092), BatchTopK
      0.834 → 0.893 (FVU 0.108 → 0.090);
    - the CI point, seeds 0 / 1 / 2 (×4.24): BatchTopK 0.966 / 0.963 / 0.957 → 0.966 / 0.958 / 0.968 with FVU
      0.14 → 0.13 (an earlier single run had it lose 0.96 → 0.93 at 4×), Matryoshka 0.767 / 0.768 / 0.773 →
      0.794 / 0.805 / 0.794.
    At d_in 576 the TopK family's factor is 1: its SmolLM2 defaults are unchanged.
    """
    variant = SAE_CLASSES[architecture]
    ref = variant.reference_steps
    steps = total_steps or ref
    boost = min(MAX_LR_BOOST, max(1.0, math.sqrt(ref / max(1, steps))))
    width = math.sqrt(variant.paper_d_in / d_in) if variant.paper_d_in else 1.0
    return variant.paper_lr(d_sae) * boost * width


# ----- data ----------------------------------------------------------------------------------


def checked_batches(reader: Iterator[dict[str, Tensor]], *, start: int, batch_size: int, n_batches: int,
                    pin: bool) -> Iterator[dict[str, Tensor]]:
    """The reader's next `n_batches` batches, each checked for NaN/inf on the CPU, where it costs no device sync, and
    on CUDA pinned so the host→device copy can run asynchronously. Training takes them through ``ahead``, so the
    reading and these checks overlap the SAE steps."""
    for i in range(n_batches):
        batch = next(reader)
        for hook, t in batch.items():
            if not all_finite(t):
                row = start + i * batch_size
                raise TrainError(f"non-finite values (NaN/inf) in the cache for hook {hook!r} in the batch at "
                                 f"training-stream rows {row}..{row + batch_size}; the cache is corrupt or the model "
                                 "overflowed in its storage dtype")
        if pin:  # a live model's batches are already on the GPU
            batch = {h: t.pin_memory() if t.device.type == "cpu" else t for h, t in batch.items()}
        yield batch


# ----- checkpoints ---------------------------------------------------------------------------


def _checkpoint_file(name: str, shard: int | None) -> str:
    """An SAE's file in a checkpoint: one per rank when its latents are sharded (`shard` = the rank)."""
    return f"{name}.safetensors" if shard is None else f"{name}.shard{shard}.safetensors"


def _step_folders(root: Path, pattern: str = "step_*") -> list[Path]:
    """The folders under `root` matching `pattern` that ``_write_checkpoint`` names (``step_N`` or, mid-write,
    ``.tmp_step_N``, N of nine digits or more): the only ones ever deleted or read as checkpoints, so a user's
    ``step_notes/`` in there is left alone."""
    return [p for p in root.glob(pattern) if p.is_dir() and _STEP_FOLDER.fullmatch(p.name)]


def _write_checkpoint(out: Path, step: int, state: dict[str, Any], trainers: dict[str, SAETrainer],
                      world: distributed.World, writes_saes: bool, shard: int | None) -> None:
    """Write ``checkpoints/step_N/`` completely, then point ``latest.json`` at it (atomic
    rename), then drop older checkpoints: a crash at any moment leaves one whole checkpoint.

    Rank 0 writes the run's state; the SAEs' files come from the ranks that train them (rank 0
    alone when data-parallel ranks hold identical copies; every rank its own shard with shard_latents). Each of the
    three parts (the folder, the SAEs' files, the state) ends with the ranks agreeing that it was written
    (``distributed.fail_together``): a full disk under one rank stops them all, saying so."""
    root = out / CHECKPOINT_DIR
    folder = root / f"step_{step:09d}"
    tmp = root / f".tmp_step_{step:09d}"

    @contextmanager
    def written() -> Iterator[None]:
        """One part of the checkpoint: ENOSPC said in one line, and every rank told whether it was written."""
        with distributed.fail_together(), disk_full_reported(root, then="resume"):
            yield

    with written():
        if world.is_main:
            for stale in _step_folders(root, ".tmp_step_*"):  # left by a process killed mid-checkpoint
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
    try:
        with written():
            for name, trainer in trainers.items() if writes_saes else []:
                save_file(trainer.state_tensors(), str(tmp / _checkpoint_file(name, shard)))
        metas = distributed.gather_objects({n: t.state_json() for n, t in trainers.items()})
        with written():
            if world.is_main:
                rng = {"cpu": torch.get_rng_state()}
                if torch.cuda.is_available():
                    rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
                save_file(rng, str(tmp / "rng.safetensors"))
                state = {**state, "step": step, "saes": {n: m for part in metas for n, m in part.items()}}
                (tmp / "state.json").write_text(json.dumps(state, indent=1))
                shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
                atomic_write_json(root / LATEST, {"step": step, "folder": folder.name})
    except BaseException:
        if world.is_main:  # a full disk (or any failure) leaves no half-written checkpoint behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world.is_main:
        for old in _step_folders(root):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)


def _read_checkpoint(out: Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, state) of the checkpoint to continue from: the one latest.json names, else (that file missing or
    damaged, or its folder gone) the newest step folder whose state reads; a step folder is renamed into place only
    once whole (``_write_checkpoint``), so any that reads is a whole checkpoint. None where there is none at all."""
    root = out / CHECKPOINT_DIR
    candidates = sorted(_step_folders(root), reverse=True)
    try:
        candidates.insert(0, root / json.loads((root / LATEST).read_text())["folder"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for folder in candidates:
        try:
            return folder, json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            continue
    if candidates or (root / LATEST).exists():
        raise TrainError(f"{root} holds no readable checkpoint (its latest.json and state.json files are damaged); "
                         "start over with overwrite=true, or use another `out` folder")
    return None


# ----- the run -------------------------------------------------------------------------------


STREAM_KEYS = ("model", "dataset", "dataset_split", "text_column", "context_size", "prepend_bos", "exclude_first",
               "dtype", "model_dtype", "eval_fraction")
"""The harvest settings that decide what an on-the-fly run reads (its batch size, device or out do not)."""


class JobStopped(TrainError):
    """torchrun stopped this process because another process of the job failed."""


def _run_config(cfg: TrainConfig, batch_size: int, world_size: int) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    keys = ("source", "total_tokens", "lr", "lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac", "topk_warmup_frac",
            "grad_clip", "dead_window_tokens", "seed", "shuffle_rows", "distribute_saes", "shard_latents")
    data = {k: getattr(cfg.harvest, k) for k in STREAM_KEYS} if cfg.source == "model" else cfg.cache
    return {"batch_size": batch_size, "world_size": world_size, "data": data,
            "saes": [asdict(s) for s in cfg.saes], **{k: getattr(cfg, k) for k in keys}}


def _warms_up(spec: dict[str, Any]) -> bool:
    """Whether the SAE of a (checkpoint's) spec has a TopK warm-up (see ``TrainConfig.topk_warmup_frac``)."""
    return spec.get("architecture") in SAE_CLASSES and SAE_CLASSES[spec["architecture"]].warms_up(spec.get("target_l0"))


READ_ONLY_BY: dict[str, Callable[[dict[str, Any]], bool]] = {
    "l1_coefficient": lambda spec: spec.get("architecture") == "relu_l1",
    "threshold_momentum": lambda spec: spec.get("architecture") in ("batchtopk", "matryoshka_batchtopk")
    or _warms_up(spec),
}
"""SAE settings whose default changed, each with the test of whether a spec's SAE reads it (``_flat_run_config``)."""


IDENTITY = ("architecture", "d_sae", "hook_name", "hook_name_out", "skip", "k", "target_l0", "l1_coefficient",
            "l0_coefficient", "bandwidth", "init_threshold", "aux_k", "aux_coefficient", "threshold_momentum")
"""SAEConfig fields that tell SAEs apart, checked per name at resume (``_resume_or_initialise``): the ones a spec sets
as given (not resolved from data or defaults), those of ``READ_ONLY_BY`` only where the SAE reads them; and its lr
where the run sets one (a default lr's rule may have changed since the checkpoint)."""


def is_sae_folder_name(name: object) -> bool:
    """Whether `name` may be an SAE's folder inside `out`: a plain name, no path, not hidden, not the run's own."""
    return (isinstance(name, str) and bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")
            and name not in RESERVED_NAMES)


def _flat_run_config(run_config: dict[str, Any]) -> dict[str, Any]:
    """A run config with each SAE's settings as keys of their own (`saes[1].k`), so a refused resume names the
    setting that changed. A spec key a checkpoint lacks (written before SAESpec had it) takes its default, which is
    what that run used; a key SAESpec no longer has is dropped. A checkpoint written before the TopK warm-up existed
    ran without one (``topk_warmup_frac`` 0: resuming it exactly needs topk_warmup_frac=0); it counts only when
    some SAE has a warm-up. A setting in ``READ_ONLY_BY`` counts only for the SAEs that read it (its default changed:
    an old TopK run must not be refused over l1_coefficient)."""
    flat = {"topk_warmup_frac": 0.0, **run_config, "saes": len(run_config["saes"])}
    if not any(_warms_up(spec) for spec in run_config["saes"]):
        del flat["topk_warmup_frac"]
    for i, spec in enumerate(run_config["saes"]):
        flat.update({f"saes[{i}].{k}": v for k, v in _spec_settings(spec).items()})
    return flat


def _spec_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's (or this run's) SAE spec as ``_flat_run_config`` compares it: every SAESpec key, a missing one
    at its default, without the ``READ_ONLY_BY`` settings it does not read, nor its name (a name places the SAE's
    folder only; ``_resume_point`` checks the names against the checkpoint's)."""
    unused = {k for k, reads in READ_ONLY_BY.items() if not reads(spec)} | {"name"}
    return {k: spec.get(k, d) for k, d in asdict(SAESpec()).items() if k not in unused}


def _open_source(cfg: TrainConfig, hooks: list[str], device: torch.device) -> Source:
    """The run's data: the cache, or the model harvested on the fly (``train`` has refused any other source)."""
    if cfg.source == "cache":
        return CacheSource(cfg.cache, hooks, cfg.shuffle_rows)
    run_rows = cfg.total_tokens or cfg.harvest.max_tokens  # a longer chunk would run the model on rows nobody trains on
    return ModelSource(cfg.harvest, hooks, device, min(cfg.shuffle_rows, run_rows))


def _sae_seed(seed: int, index: int) -> int:
    """Each SAE's initialisation has its own seed, so a sweep split across processes (distribute_saes) starts
    every SAE exactly as one process would."""
    return seed * 1_000_003 + index


def _check_out(cfg: TrainConfig, out: Path) -> None:
    """Refuse, before any work, an `out` that holds what this run would overwrite without being asked to: another
    run's checkpoints, an overwrite stopped before its first checkpoint, or SAE folders no checkpoint accounts for
    (``_resume_point`` then knows the checkpoint, if any, is one to continue or to delete)."""
    if cfg.overwrite:
        return
    pending = _pending_removal(out)
    if not cfg.resume and pending:  # a plain run would forget the record
        raise TrainError(f"{out} holds an overwrite=true run stopped before its first checkpoint (its old SAE folders "
                         "are still to be removed); run it again with overwrite=true, or use another `out` folder")
    checkpoint = _read_checkpoint(out)
    if checkpoint is None and (earlier := sorted(set(_sae_folders(out)) - set(pending or []))):
        raise TrainError(f"{out} holds SAE folders ({', '.join(earlier)}) but no checkpoint to resume or to say "
                         "which run wrote them; use another `out` folder, or overwrite=true to delete them and train "
                         "in their place")
    if checkpoint is not None and not cfg.resume:
        raise TrainError(f"{out} holds a training run (checkpoint at step {checkpoint[1]['step']}); continue it with "
                         "resume=true, start over with overwrite=true (deleting its checkpoints), or use another "
                         "`out` folder")


def _resume_point(cfg: TrainConfig, out: Path, run_config: dict[str, Any], world: distributed.World,
                  replaced: list[str], pending: list[str] | None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, or None for a fresh run (``_check_out`` has refused what this run must not
    touch, and a checkpoint here is one to continue, or to delete with overwrite=true). An overwrite=true run
    records the SAE folders of the runs it ``replaced`` (``PENDING_REMOVAL``, whose ``pending`` record is None where
    that name is not ours) before it deletes the checkpoints."""
    root = out / CHECKPOINT_DIR
    ours = [root / LATEST] * (root / LATEST).exists() + [*_step_folders(root), *_step_folders(root, ".tmp_step_*")]
    if cfg.overwrite and world.is_main and replaced and pending is not None:  # train() refuses it with resume
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(root / PENDING_REMOVAL, {**_PENDING_MARK, "saes": replaced})
    if cfg.overwrite and ours:  # deleted unread: they may be damaged
        distributed.barrier()  # every rank has seen the folder before rank 0 deletes it
        if world.is_main:
            for path in ours:  # only what checkpoints write: a file of the user's in there stays
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            with suppress(OSError):
                root.rmdir()
        return None
    checkpoint = _read_checkpoint(out)
    if checkpoint is None:
        if cfg.resume and world.is_main:
            print(f"no checkpoint in {out / CHECKPOINT_DIR}: starting a fresh run")
        return None
    folder, state = checkpoint
    old = state["run_config"]
    if old.get("world_size", 1) != run_config["world_size"]:
        raise ResumeMismatch(f"cannot resume from {folder}: it was written by a job of {old.get('world_size', 1)} "
                             f"process(es), this one has {run_config['world_size']}; resume with torchrun "
                             f"--nproc_per_node {old.get('world_size', 1)}")
    if len(old.get("saes", [])) != len(run_config["saes"]):  # each spec's every field listed as changed before
        raise ResumeMismatch(f"cannot resume from {folder}: it trains {len(old.get('saes', []))} SAEs "
                             f"({', '.join(_run_order(state))}), this run lists {len(run_config['saes'])}; a run "
                             "cannot add or drop SAEs, so list the checkpoint's, or use another `out` folder")
    in_any_order = [sorted(json.dumps(_spec_settings(s), sort_keys=True, default=str) for s in c["saes"])
                    for c in (old, run_config)]
    old, new = _flat_run_config(old), _flat_run_config(run_config)
    changed = {k: (old.get(k), new.get(k)) for k in {**old, **new} if old.get(k) != new.get(k)}
    if changed and all(k.startswith("saes[") for k in changed) and in_any_order[0] == in_any_order[1]:
        raise ResumeMismatch(f"cannot resume from {folder}: it lists the same SAEs in another order; list them as the "
                             f"checkpoint's run did ({', '.join(_run_order(state))})")
    if changed:
        diff = "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in changed.items())
        raise ResumeMismatch(f"cannot resume from {folder}: it was made with other settings ({diff}); "
                             "resume with the original settings or use another `out` folder")
    names = {s.run_name for s in cfg.saes}
    if set(state["saes"]) != names:  # e.g. a target-L0 JumpReLU's default name was jumprelu_l0c2_… before 2026-12-07
        raise ResumeMismatch(f"cannot resume from {folder}: its SAEs are named {sorted(state['saes'])}, this run's "
                             f"{sorted(names)}; give each SAE its checkpoint's name (`name`) to resume, or use another "
                             "`out` folder")
    return checkpoint


def train(cfg: TrainConfig) -> list[Path]:
    """Train every SAE in ``cfg.saes`` in one pass; returns their output folders.

    In one process, or under torchrun: data-parallel (each rank a share of every batch) or, with
    ``distribute_saes``, each rank its share of the SAEs."""
    if not cfg.saes:
        raise TrainError("the train config lists no SAEs (train.saes is empty)")
    low = [f"{k}={getattr(cfg, k)}" for k in ("shuffle_rows", "checkpoint_every", "log_every") if getattr(cfg, k) < 1]
    low += [f"{k}={getattr(cfg, k)}" for k in ("batch_size", "total_tokens", "dead_window_tokens")
            if getattr(cfg, k) is not None and getattr(cfg, k) < 1]
    if low:
        raise TrainError(f"{', '.join(low)}: must be ≥ 1")
    fracs = [f"{k}={getattr(cfg, k)}" for k in ("lr_warmup_frac", "lr_decay_frac", "l1_warmup_frac")
             if not 0 <= getattr(cfg, k) <= 1]
    if fracs or cfg.lr_warmup_frac + cfg.lr_decay_frac > 1:
        raise TrainError(f"{', '.join(fracs) or 'lr_warmup_frac + lr_decay_frac'}: fractions of the run must be in "
                         "[0, 1], and the lr warm-up and decay together at most 1")
    if not cfg.grad_clip > 0:
        raise TrainError(f"grad_clip={cfg.grad_clip} must be > 0 (the largest gradient norm a step may take)")
    if not cfg.peer_timeout_minutes > 0:
        raise TrainError(f"peer_timeout_minutes={cfg.peer_timeout_minutes} must be > 0")
    if cfg.resume and cfg.overwrite:
        raise TrainError("resume=true continues the run in `out` and overwrite=true deletes it: give one of them")
    if cfg.source not in ("cache", "model"):
        raise TrainError(f"source must be cache or model, not {cfg.source!r}")
    if not 0 <= cfg.topk_warmup_frac < 1:
        raise TrainError(f"topk_warmup_frac={cfg.topk_warmup_frac} must be in [0, 1): the batch-wide budget needs the "
                         "steps after the warm-up to set its thresholds")
    lrs = [("lr", cfg.lr), *((f"saes[{i}].lr", s.lr) for i, s in enumerate(cfg.saes))]
    bad_lr = [f"{key}={lr}" for key, lr in lrs if lr is not None and not (lr > 0 and math.isfinite(lr))]
    if bad_lr:  # checked before any work (torch's optimiser would refuse it after the plan; 0 would mean the default)
        raise TrainError(f"{', '.join(bad_lr)}: a learning rate must be a finite number > 0 (leave it unset for the "
                         "recipe's default)")
    names = [s.run_name for s in cfg.saes]
    check_output_folder(cfg.out)
    if len(set(names)) != len(names):
        raise TrainError(f"two SAEs share an output name: {names}; set distinct `name`s")
    for name in names:  # before any work, not hours later at the save
        check_replaceable(Path(cfg.out) / name)
    # One job per folder: the process that will be rank 0 holds the lock (taken before the process group exists, so a
    # refusal needs no collective; torchrun then stops the other ranks).
    with folder_lock(cfg.out, "sae train") if os.environ.get("RANK", "0") == "0" else nullcontext():
        _check_out(cfg, Path(cfg.out))
        world, device = distributed.init(cfg.device, timedelta(minutes=cfg.peer_timeout_minutes))
        try:
            return _train(cfg, names, world, device)
        finally:
            distributed.shutdown()


def _train(cfg: TrainConfig, names: list[str], world: distributed.World, device: torch.device) -> list[Path]:
    """The run, in its four parts: lay it out and build the trainers (the plan checked first), resume or initialise
    them, step through the batches, and write the SAE folders."""
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":  # TF32 for the fp32 matrix products outside autocast (the dense init, eval of a batch)
        torch.backends.cuda.matmul.allow_tf32 = True
    with distributed.fail_together():  # the plan is checked on each process's own device: one may fail alone
        lay = _layout(cfg, world, device)
        trainers, lrs = _build_trainers(cfg, names, lay, world, device)
        lay.source.load()
    start = _resume_or_initialise(cfg, out, lay, trainers, world)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics = _step_loop(cfg, out, lay, trainers, world, device, start, lrs)
    paths = [out / name for name in names]
    # Every folder is written before any rank returns, and a failed write stops every rank. A latent shard's save
    # is collective (rank 0 gathers and writes the whole SAE), so the ranks agree after each one.
    saves = list(trainers.items()) if lay.writes_saes else []
    for group in [[save] for save in saves] if lay.shard is not None else [saves]:
        with distributed.fail_together():
            for name, trainer in group:
                trainer.sae.eval()
                trainer.sae.save(out / name)
    if world.is_main:
        _remove_replaced(out, start.replaces, paths)
        if (out / CHECKPOINT_DIR / PENDING_REMOVAL).is_file() and _pending_removal(out) is not None:
            (out / CHECKPOINT_DIR / PENDING_REMOVAL).unlink()
        _warn_failed(metrics, names, [s.architecture for s in cfg.saes])
    return paths


def _remove_replaced(out: Path, replaced: list[str], written: list[Path]) -> None:
    """Remove the overwritten run's SAE folders this run did not write (``_Start.replaces``): only a plain folder
    inside `out` that holds an SAE's own files and nothing else (a user's file inside keeps it), never a link, nor
    one of this run's own under another spelling (a case-insensitive disk)."""
    removed = []
    for name in replaced:
        folder = out / name
        if not is_sae_folder_name(name) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            check_replaceable(folder)
            if any(p.exists() and folder.samefile(p) for p in written):
                continue
            shutil.rmtree(folder)
        except (SAEFormatError, OSError) as err:
            why = err if isinstance(err, OSError) else "it holds files the toolkit did not write"
            print(f"kept {folder}, an SAE of the overwritten run: {why}; `sae eval` on {out} still finds it, so move "
                  "your files out and delete it")
            continue
        removed.append(name)
    if removed:
        print(f"removed the overwritten run's SAE folders: {', '.join(removed)}")


@dataclass
class _Layout:
    """How a run is laid out over its processes, resolved once from the config, the data and the world."""

    source: Source
    batch_size: int
    """Rows per step, over all processes."""
    total_steps: int
    dead_window: int
    """Tokens without a firing after which a latent counts as dead."""
    ddp: bool
    """Data parallel: every rank steps every SAE on its share of each batch."""
    shard: int | None
    """This rank's slice of every SAE's latents (shard_latents), else None."""
    mine: list[int]
    """Indices into ``cfg.saes`` of the SAEs this rank trains (all but under distribute_saes: r, r + W, ...)."""
    rank: int
    """Which share of each batch this rank reads, of ``shards``."""
    shards: int
    writes_saes: bool
    """Data-parallel ranks hold identical copies: rank 0 writes them."""
    local_batch: int


def _layout(cfg: TrainConfig, world: distributed.World, device: torch.device) -> _Layout:
    hooks = sorted({h for s in cfg.saes for h in s.hooks})
    source = _open_source(cfg, hooks, device)
    total_tokens = cfg.total_tokens or source.n_train_rows or cfg.harvest.max_tokens
    if cfg.batch_size and cfg.batch_size > total_tokens:  # its one step would cycle the cache several times
        run = ("total_tokens" if cfg.total_tokens
               else "one epoch of the cache's training split" if cfg.source == "cache" else "harvest.max_tokens")
        raise TrainError(f"batch_size={cfg.batch_size} is more than the {total_tokens:,} tokens this run trains on "
                         f"({run}); lower batch_size or raise total_tokens")
    batch_size = cfg.batch_size or default_batch_size(total_tokens)
    if not cfg.batch_size and world.distributed:  # the default is a power of two; 3 or 6 processes need a multiple
        batch_size = -(-batch_size // world.size) * world.size
    total_steps = max(1, total_tokens // batch_size)
    dead_window = cfg.dead_window_tokens or min(
        GAO_DEAD_TOKENS, max(batch_size, total_steps * batch_size // 10)
    )
    if cfg.distribute_saes and cfg.shard_latents:
        raise TrainError("distribute_saes and shard_latents exclude each other: set one")
    ddp = world.distributed and not cfg.distribute_saes and not cfg.shard_latents
    if cfg.distribute_saes and len(cfg.saes) < world.size:  # every rank sees it, so every rank stops
        raise TrainError(f"distribute_saes needs at least one SAE per process: {len(cfg.saes)} SAEs, "
                         f"{world.size} processes")
    rank, shards = (world.rank, world.size) if ddp else (0, 1)
    return _Layout(
        source=source, batch_size=batch_size, total_steps=total_steps, dead_window=dead_window, ddp=ddp,
        shard=world.rank if world.distributed and cfg.shard_latents else None,
        mine=[i for i in range(len(cfg.saes)) if not cfg.distribute_saes or i % world.size == world.rank],
        rank=rank, shards=shards, writes_saes=world.is_main or not ddp, local_batch=check_split(batch_size, shards),
    )


def _build_trainers(cfg: TrainConfig, names: list[str], lay: _Layout, world: distributed.World,
                    device: torch.device) -> tuple[dict[str, SAETrainer], dict[str, float]]:
    """This rank's SAEs and their trainers, and each one's learning rate, after the plan: an SAE that cannot fit fails here, before its weights,
    the model or a shard are allocated. Every rank checks every SAE's settings, so a bad one stops the whole job
    rather than the rank that trains it."""
    source, shard = lay.source, lay.shard
    every = [spec.sae_config(source.hooks, source.model_name) for spec in cfg.saes]
    configs = {names[i]: every[i] for i in lay.mine}
    lrs = {name: cfg.saes[i].lr or cfg.lr or default_lr(c.architecture, c.d_sae, lay.total_steps, c.d_in)
           for i, (name, c) in zip(lay.mine, configs.items())}
    warmup = topk_warmup_steps(cfg.topk_warmup_frac, lay.total_steps) > 0
    shards = world.size if shard is not None else 1
    costs = [plan.SAECost(n, c.architecture, c.d_in, c.d_sae // shards, lay.local_batch, d_out=c.d_out, skip=c.skip,
                          init_rows=SCALE_SAMPLE_ROWS, precision=plan.step_precision(device), aux_k=c.auxk_latents,
                          shards=shards, device_type=device.type, topk_warmup=warmup and c.warms_up)
             for n, c in configs.items()]
    data_bytes = source.device_bytes(device, lay.shards)
    plan.check_fits(costs, device, data_bytes=data_bytes)
    if world.is_main:
        share = ("one share of the SAEs" if cfg.distribute_saes else f"1/{world.size} of each SAE's latents"
                 if shard is not None else f"{lay.local_batch} rows")
        mode = f" on {world.size} processes ({share} each)" if world.distributed else ""
        tokens, rows = lay.total_steps * lay.batch_size, source.n_train_rows
        passes = f" ({tokens / rows:.2f} passes over its {rows:,} training rows)" if rows and tokens > rows else ""
        print(f"plan: {tokens:,} tokens from the {cfg.source}{passes} in {lay.total_steps:,} "
              f"step{'' if lay.total_steps == 1 else 's'} "
              f"of {lay.batch_size}{mode} on {device} ({plan.step_precision(device)})")
        fast = {n: f" ({', '.join(c.fast_biases)} ×√d_in)" if c.fast_biases else "" for n, c in configs.items()}
        print("\n".join(c.describe() + f", lr {lrs[c.name]:.3g}{fast[c.name]}" for c in costs))
        print(f"  data ({cfg.source}) on {device}: {human_bytes(data_bytes)}")

    trainers: dict[str, SAETrainer] = {}
    for i, (name, sae_cfg) in zip(lay.mine, configs.items()):
        with torch.random.fork_rng(devices=[]), torch.device(device):  # built where it trains: no host copy
            torch.manual_seed(_sae_seed(cfg.seed, i))
            sae = create_sae(sae_cfg) if shard is None else sharded.shard(sae_cfg, world.rank, world.size)
        trainers[name] = (SAETrainer if shard is None else sharded.ShardedTrainer)(
            sae,
            lr=lrs[name],
            total_steps=lay.total_steps,
            lr_warmup_frac=cfg.lr_warmup_frac,
            lr_decay_frac=cfg.lr_decay_frac,
            penalty_warmup_frac=cfg.l1_warmup_frac,
            topk_warmup_frac=cfg.topk_warmup_frac,
            grad_clip=cfg.grad_clip,
            dead_window_tokens=lay.dead_window,
            world_size=lay.shards,
        )
    return trainers, lrs


@dataclass
class _Start:
    """Where the step loop starts: step 0 of a fresh run, or a checkpoint's."""

    step: int = 0
    position: int = 0
    """The reader's position, in rows."""
    wandb_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """The last logged metrics (a finished run resumed takes no step, and reports these)."""
    run_config: dict[str, Any] = field(default_factory=dict)
    replaces: list[str] = field(default_factory=list)
    """SAE folders of the run this one overwrote (overwrite=true) that it does not write itself: removed once its own
    are written, so `out` then holds this run's SAEs alone (kept until then, in case this run fails)."""


def _resume_or_initialise(cfg: TrainConfig, out: Path, lay: _Layout, trainers: dict[str, SAETrainer],
                          world: distributed.World) -> _Start:
    """Load the latest checkpoint into the trainers (resume=true), or fit each SAE's input scale and b_dec from a
    sample of the data: computed once (rank 0) and broadcast when data-parallel. Either is work a process does on its
    own (its sample, its shard's file), so a failure there stops every process (``distributed.fail_together``)."""
    run_config = _run_config(cfg, lay.batch_size, world.size)
    pending = _pending_removal(out)
    replaced = _replaced_saes(cfg, out, pending)
    replaces = sorted(set(replaced) - {s.run_name for s in cfg.saes})
    checkpoint = _resume_point(cfg, out, run_config, world, replaced, pending)
    if checkpoint is None:
        with distributed.fail_together():
            if not lay.ddp or world.is_main:
                sample = lay.source.sample(SCALE_SAMPLE_ROWS, seed=cfg.seed, rank=lay.rank, world_size=lay.shards)
                _check_sample_finite(lay.source, sample)
                for i, trainer in zip(lay.mine, trainers.values()):
                    trainer.sae.initialise_from_data(*(sample[h] for h in cfg.saes[i].hooks),
                                                      topk_warmup=trainer.topk_warmup_steps > 0)
                del sample
        if lay.ddp:
            for trainer in trainers.values():
                distributed.broadcast_module_(trainer.sae)
                trainer.sae.sync_cfg_scales()
        return _Start(run_config=run_config, replaces=replaces)
    folder, state = checkpoint
    explicit_lr = {s.run_name: s.lr or cfg.lr for s in cfg.saes}
    with distributed.fail_together():
        for name, trainer in trainers.items():
            meta = state["saes"][name]
            if meta["sae_config"]["d_in"] != trainer.sae.cfg.d_in:
                raise TrainError(
                    f"cannot resume {name}: checkpoint d_in {meta['sae_config']['d_in']} but "
                    f"the data's hook has d_model {trainer.sae.cfg.d_in}"
                )
            ours, theirs = asdict(trainer.sae.cfg), meta["sae_config"]  # names are no settings: a swap is caught here
            other = [f"{k} {theirs[k]!r} → {ours[k]!r}" for k in IDENTITY
                     if k in theirs and theirs[k] != ours[k] and READ_ONLY_BY.get(k, lambda _: True)(theirs)]
            lr = (meta["param_groups"][0].get("initial_lr"), trainer.optimizer.param_groups[0].get("initial_lr"))
            if explicit_lr[name] is not None and None not in lr and not math.isclose(*lr):  # a default's rule may move
                other.append(f"lr {lr[0]!r} → {lr[1]!r}")
            if other:
                raise ResumeMismatch(f"cannot resume {name}: the checkpoint's SAE of that name is another one "
                                     f"({', '.join(other)}); give each SAE the name it was trained under")
            trainer.load_state(load_file(str(folder / _checkpoint_file(name, lay.shard))), meta)
        rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        if f"cuda{i}" in rng:  # another set of visible GPUs at resume is no reason to fail
            torch.cuda.set_rng_state(rng[f"cuda{i}"], i)
    if world.is_main:
        done = state["step"] >= lay.total_steps  # a finished run: its SAE folders are written again, nothing trains
        print(f"the run finished at step {state['step']:,} ({folder}): nothing left to train; writing its SAEs again"
              if done else f"resuming from step {state['step']:,} ({folder})")
    return _Start(state["step"], state["reader_position"], state.get("wandb_id"), state.get("metrics", {}), run_config,
                  _folder_names(state.get("replaces")))


def _run_order(state: dict[str, Any]) -> list[str]:
    """A checkpoint's SAE names in the order its run listed them (its ``saes`` entries are grouped by process)."""
    try:
        return [SAESpec(**spec).run_name for spec in state["run_config"]["saes"]]
    except (TypeError, KeyError, ValueError):  # a spec from another version: its names in the checkpoint's order
        return list(state["saes"])


def _replaced_saes(cfg: TrainConfig, out: Path, pending: list[str] | None) -> list[str]:
    """Every SAE folder name of the runs an overwrite=true run replaces: those of the checkpoint it is about to
    delete, those that checkpoint had still to remove, and those an earlier overwrite stopped before its first
    checkpoint recorded (``PENDING_REMOVAL``; read by resume=true too, which then finds no checkpoint). The run
    removes those it does not write itself (``_Start.replaces``)."""
    if not (cfg.overwrite or cfg.resume):
        return []
    old, checkpoint = list(pending or []), None
    if cfg.overwrite:
        with suppress(TrainError):  # a damaged checkpoint: overwrite deletes it unread
            checkpoint = _read_checkpoint(out)
        if checkpoint is not None:
            old += _folder_names(list(checkpoint[1].get("saes", {}))) + _folder_names(checkpoint[1].get("replaces"))
        else:  # no checkpoint says whose they are: the folders a plain run is refused over (``_check_out``)
            old += _sae_folders(out)
    return sorted(set(old))


def _sae_folders(out: Path) -> list[str]:
    """The folders in `out` (by name) that this toolkit saved an SAE in: plain folders holding only an SAE save's
    files, whose settings carry our own config (``metadata.sae_config``; an SAE downloaded from SAELens's hub lacks
    it, and is the user's). Where no checkpoint says which run they are from, a run would replace those of its own
    names and leave the others for `sae eval` to score beside its own (``_check_out`` refuses it; overwrite=true
    replaces them all)."""
    if not out.is_dir():
        return []
    found = []
    for folder in sorted(out.iterdir()):
        with suppress(SAEFormatError, OSError):  # an unreadable folder is the user's business
            if is_sae_folder_name(folder.name) and not folder.is_symlink() and (folder / CFG_FILENAME).is_file():
                meta = read_cfg(folder).get("metadata")
                if isinstance(meta, dict) and isinstance(meta.get("sae_config"), dict):
                    check_replaceable(folder)
                    found.append(folder.name)
    return found


def _pending_removal(out: Path) -> list[str] | None:
    """The SAE folder names recorded in ``PENDING_REMOVAL`` ([] where there is no such file); None where something
    else has that name, unreadable or without our mark (left alone: it may be the user's)."""
    path = out / CHECKPOINT_DIR / PENDING_REMOVAL
    if not path.exists() and not path.is_symlink():
        return []
    try:
        record = json.loads(path.read_text()) if path.is_file() and not path.is_symlink() else None
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in _PENDING_MARK.items()):
        return None
    return _folder_names(record.get("saes"))


def _folder_names(value: object) -> list[str]:
    """The SAE folder names in a list read from a checkpoint's state (anything else in it, or a non-list: none)."""
    return [v for v in value if is_sae_folder_name(v)] if isinstance(value, list) else []


def _check_sample_finite(source: Source, sample: dict[str, Tensor]) -> None:
    """The rows the initial fit reads must be finite: a NaN row makes the input scale and b_dec NaN, and the first
    step's NaN loss would then be blamed on the learning rate. A cache's message names the shards holding such rows
    (read in full only on this failure path)."""
    from sae.data.store import NonFiniteError, check_finite

    for hook, rows in sample.items():
        if all_finite(rows):
            continue
        store = getattr(source, "store", None)
        if store is None:
            raise NonFiniteError(f"the activations the model computed at {hook} hold NaN/inf values (in the sample the "
                                 "initial fit reads); the model overflowed: use model_dtype=float32")
        files = [store.shards[i]["file"] for i in range(len(store.shards))
                 if not torch.isfinite(store.load_shard(i, [hook])[hook]).all()]
        shards = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        check_finite(rows, f"{hook} in {store.path} (the sample the initial fit reads; shards holding such rows: "
                           f"{shards or 'none found'})")


def _step_loop(cfg: TrainConfig, out: Path, lay: _Layout, trainers: dict[str, SAETrainer], world: distributed.World,
               device: torch.device, start: _Start, lrs: dict[str, float]) -> dict[str, float]:
    """Step every trainer through the batches from `start`, logging and checkpointing on the way; returns the last
    logged metrics. A failure names the last good checkpoint to resume from."""
    from tqdm.auto import tqdm

    batch_size, total_steps = lay.batch_size, lay.total_steps
    with ExitStack() as cleanup:  # each resource is released, last made first, whatever fails after it is made
        with distributed.fail_together():  # rank 0 alone starts a real wandb run (online: a login it may lack)
            run = _init_wandb(cfg, out, world, start.wandb_id, batch_size=batch_size, total_steps=total_steps,
                              lrs=lrs)
        cleanup.callback(run.finish)
        bar = cleanup.enter_context(tqdm(total=total_steps * batch_size, initial=start.step * batch_size, unit="tok",
                                         unit_scale=True, desc="train", dynamic_ncols=True,
                                         disable=not world.is_main))
        reader = lay.source.batches(batch_size, seed=cfg.seed, position=start.position, rank=lay.rank,
                                    world_size=lay.shards)
        if hasattr(reader, "close"):  # a cache's pool, a live model's stream
            cleanup.callback(reader.close)
        prefetch = ahead(checked_batches(reader, start=start.position, batch_size=batch_size,
                                         n_batches=total_steps - start.step, pin=device.type == "cuda"),
                         depth=2, name="sae-prefetch")
        cleanup.callback(prefetch.close)  # stops the worker before the reader it reads from
        if world.distributed:
            cleanup.enter_context(_stop_on_sigterm())
        return _steps(cfg, out, lay, trainers, world, device, start, prefetch, bar, run)


def _steps(cfg: TrainConfig, out: Path, lay: _Layout, trainers: dict[str, SAETrainer], world: distributed.World,
           device: torch.device, start: _Start, prefetch: Iterator[dict[str, Tensor]], bar: Any,
           run: Any) -> dict[str, float]:
    """The steps themselves (see ``_step_loop``)."""
    batch_size, total_steps = lay.batch_size, lay.total_steps
    autocast = plan.step_precision(device) == "bf16"
    state = {"run_config": start.run_config, "wandb_id": run.id if world.is_main else None, "metrics": start.metrics,
             "replaces": start.replaces}
    labels = _bar_labels([s.run_name for s in cfg.saes])
    last_good = start.step
    t_log, tokens_log = time.perf_counter(), 0
    try:
        for step in range(start.step, total_steps):
            with distributed.fail_together():  # a rank's own share of the data can fail (NaN rows, a bad shard)
                batch = next(prefetch)
            xs = {h: t.to(device, non_blocking=True) for h, t in batch.items()}
            metrics = {}
            for i, (name, trainer) in zip(lay.mine, trainers.items()):
                metrics[name] = trainer.step(*(xs[h] for h in cfg.saes[i].hooks), autocast=autocast)
            bar.update(batch_size)
            tokens_log += batch_size
            done = step + 1
            if done % cfg.log_every == 0 or done == total_steps:
                _check_finite(trainers)
                elapsed = time.perf_counter() - t_log
                logged = _gather_metrics(metrics, lay.ddp or lay.shard is not None, device)
                logged["tokens_per_s"] = tokens_log / max(elapsed, 1e-9)
                run.log({**logged, "step": done})
                state["metrics"] = logged
                bar.set_postfix({f"{labels[k[:-4]]}_fvu": f"{v:.3f}" for k, v in logged.items()
                                 if k.endswith("/fvu") and k[:-4] in labels})
                t_log, tokens_log = time.perf_counter(), 0
            if done % cfg.checkpoint_every == 0 or done == total_steps:
                _check_finite(trainers)
                state["reader_position"] = start.position + (done - start.step) * batch_size
                _write_checkpoint(out, done, state, trainers, world, writes_saes=lay.writes_saes, shard=lay.shard)
                last_good = done
    except Exception as err:
        if not isinstance(err, (DivergedError, JobStopped, distributed.PeerLost, distributed.PeerFailed,
                                DiskFullError)):
            raise
        if last_good == 0:  # nothing to resume from: no checkpoint was written
            raise type(err)(f"{err}; no checkpoint was written yet (the first is at step "
                            f"{min(cfg.checkpoint_every, total_steps)}): run again to start over") from None
        raise type(err)(f"{err}; the last good checkpoint is step {last_good} in {out / CHECKPOINT_DIR}: run again "
                  "with resume=true to continue from it") from None
    return state["metrics"]


def _bar_labels(names: list[str]) -> dict[str, str]:
    """Each SAE's label on the progress bar: its name less what every name ends with (the width and hook of a
    sweep: ``jumprelu_target16``, ``jumprelu_target32``), or its architecture's first word when it trains alone."""
    if len(names) == 1:
        return {names[0]: names[0].split("_")[0]}
    tail = os.path.commonprefix([n[::-1] for n in names])[::-1]
    tail = tail[tail.find("_"):] if "_" in tail else ""  # whole words only
    return {n: n[: len(n) - len(tail)] or n for n in names}


def _warn_failed(metrics: dict[str, float], names: list[str], architectures: list[str]) -> None:
    """A loud line for each SAE whose last logged metrics say it learned nothing useful (L0 = 0, mostly dead, or a
    last batch reconstructed worse than by its mean), which a falling loss can hide; `sae eval` flags the same on
    held-out rows. FVU ≥ 1 at the end: BatchTopK at SmolLM2-135M layer 6 in a 111-step run, when its TopK warm-up
    ended abruptly, with the unit-norm encoder start tried and not adopted on 2026-12-07 (1.38; 0.40 with the default
    start; see ``sae.saes.BatchTopKSAE`` for the hand-over that replaced the abrupt switch)."""
    for name, architecture in zip(names, architectures):
        if f"{name}/l0" not in metrics:  # a checkpoint written before metrics were kept has none
            continue
        signs = failure_signs(metrics[f"{name}/l0"], metrics[f"{name}/dead_frac"])
        for sign in signs:
            print(f"warning: SAE {name} ended training with {sign}")
        if not signs and metrics.get(f"{name}/fvu", 0.0) >= 1:
            hint = " (batchtopk: topk_warmup_frac=0 trains with the batch budget throughout)" * (
                architecture == "batchtopk")
            print(f"warning: SAE {name} ended training with FVU {metrics[f'{name}/fvu']:.2f} on its last batch (worse "
                  f"than the batch's mean); check it with `sae eval`{hint}")


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """torchrun answers a failed process by sending SIGTERM to the others: turn it into a message that says what to
    do, instead of a silent exit. Once the job has failed here, SIGTERM is ignored (once any process exits, torchrun's
    must not cut the message); after a clean run the previous handler is back."""

    def handler(_signum: int, _frame: Any) -> None:
        raise JobStopped("stopped by torchrun because another process of the job failed")

    previous, failed = signal.signal(signal.SIGTERM, handler), False
    try:
        yield
    except Exception:
        failed = True
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if failed else previous)


def _gather_metrics(metrics: dict[str, dict[str, Tensor]], every_rank: bool,
                    device: torch.device) -> dict[str, float]:
    """Every SAE's metrics on rank 0 as plain floats: averaged over the ranks when `every_rank` steps every SAE
    (data parallel; shard_latents, where the dead fraction is per shard and the rest is the same everywhere), or
    collected from the ranks that train them (distribute_saes)."""
    keys = [(n, k) for n, m in metrics.items() for k in m]
    if every_rank:
        values = distributed.all_reduce_(torch.stack([metrics[n][k].to(device, torch.float32) for n, k in keys]), "mean").tolist()
        return {f"{n}/{k}": v for (n, k), v in zip(keys, values)}
    local = {f"{n}/{k}": float(metrics[n][k]) for n, k in keys}
    return {k: v for part in distributed.gather_objects(local) for k, v in part.items()}


def _check_finite(trainers: dict[str, SAETrainer]) -> None:
    """Stop on a NaN/inf loss; every rank stops together (a NaN on one rank reaches the others' weights)."""
    steps = torch.stack([t.first_nonfinite_step for t in trainers.values()])
    worst = torch.where(steps < 0, torch.iinfo(torch.long).max, steps)
    first = -distributed.all_reduce_(-worst.min(), "max")  # the earliest bad step anywhere
    if first < torch.iinfo(torch.long).max:
        name = next((n for n, t in trainers.items() if int(t.first_nonfinite_step) == int(first)), "on another rank")
        raise DivergedError(f"NaN/inf loss for SAE {name} at step {int(first)}; lower the learning rate or check "
                            "the data")


def _init_wandb(cfg: TrainConfig, out: Path, world: distributed.World, run_id: str | None, **resolved: Any) -> Any:
    """A wandb run on rank 0 (disabled elsewhere), logging the config with the values actually used (`resolved`:
    batch size, steps, learning rates) and, on resume, continuing the same wandb run."""
    if cfg.wandb_mode not in ("offline", "online", "disabled"):
        raise TrainError(f"wandb_mode must be offline, online or disabled, not {cfg.wandb_mode!r}")
    import wandb

    if not world.is_main:
        return wandb.init(mode="disabled")
    run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(out), id=run_id,
                     resume="allow" if run_id else None, config={**asdict(cfg), "resolved": resolved})
    # The training step is a metric of its own, the x-axis of every other one, rather than wandb's `step=`: wandb
    # drops any point whose `step=` is not above the last one it holds, so a run resumed from a checkpoint older
    # than its crash would lose every point up to the crash's step. wandb's own step keeps counting log calls.
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run
