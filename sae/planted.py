"""A ground-truth benchmark: activations built from a known dictionary, shaped like a real residual stream.

`sae planted` writes such activations as an ordinary cache (the store's own writer), trains the configured SAEs on
it through the normal `sae train` path, and scores each against the dictionary it was built from: the mean over true
directions of the best cosine with any decoder row, the fraction recovered at cosine > 0.9, and L0 and FVU on fresh
rows, beside PCA at the SAE's L0 and a plain PyTorch TopK loop trained on the same batches.

The data has the properties that made the toolkit's defaults fail on real data while they passed on easy planted
data (issue 9): a constant offset much larger than the signal's spread (a residual stream's mean), feature
frequencies following a power law, groups of features that co-occur, log-normal magnitudes and a little noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.config import HelpSections, UserError
from sae.analysis.evaluate import fit_pca, fvu, pca_fvu_curve
from sae.saes import SAE
from sae.data.model import PLANTED_MODEL
from sae.data.store import (ActivationStore, CacheWriter, atomic_write_json, check_output_folder,
                            check_report_is_ours, folder_lock)
from sae.training.train import MIN_BATCH, SAESpec, TrainConfig, default_batch_size, train
from sae.training.trainer import ResumeMismatch

HOOK = "planted"
"""The hook name of the planted cache (its only one)."""
CONTEXT_SIZE = 64
"""Rows per "context" of the planted cache (they are independent draws; the store wants whole contexts)."""
RECOVERED_COSINE = 0.9
"""A true direction counts as recovered when some decoder row has at least this cosine with it."""
REFERENCE_INIT_SEED = 1_000_003
"""Offset of the reference loop's initialisation seed from ``PlantedConfig.seed``. The dictionary is the first
draw of a generator seeded with ``seed`` itself, so a reference initialised from that seed (as it was, through
``torch.manual_seed(seed)``) started with its first n_features decoder rows equal to the true dictionary: mean max
cosine 1.0 before training, and 0.982 after, at d_in 64, 1024 features, L0 8 (976 steps of 2048), against 0.687
from an independent initialisation (0.572 in ``scripts/bench_planted.py``'s 500 steps of 4096). CPU generators keep
only the low 32 bits of a seed, so the offset must not be a multiple of 2³²."""


@dataclass
class PlantedConfig:
    """Planted data with real data's hard properties, SAEs trained on it by `sae train`, scored against the truth."""

    help_sections: ClassVar[HelpSections] = (
        ("the benchmark", ("d_in", "n_features", "l0", "tokens", "saes", "out", "seed", "overwrite")),
        ("the data's shape", ("frequency_exponent", "correlation", "group_size", "magnitude_sigma", "offset", "noise",
                              "eval_tokens")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    out: str = "runs/planted"
    """Folder for the planted cache (cache/), the SAEs (saes/) and the scores (planted.json)."""
    d_in: int = 64
    """Width of the activations."""
    n_features: int = 512
    """True dictionary directions (random unit vectors, so more than d_in of them are in superposition)."""
    l0: float = 4.0
    """Mean number of true features active per token, and the SAEs' k / target L0; the data's own mean falls short
    where the first features' frequencies cap at 1 (``PlantedData.frequency``)."""
    frequency_exponent: float = 1.0
    """Feature i (by rank) fires with probability ∝ i^−exponent (a power law, as in real SAE latent densities)."""
    correlation: float = 0.5
    """Correlation of the latent Gaussians of the features in one group: features of a group co-occur."""
    group_size: int = 4
    """Features per co-occurring group."""
    magnitude_sigma: float = 0.5
    """σ of the log-normal magnitudes of active features (mean 1)."""
    offset: float = 4.0
    """‖constant offset‖ / √E‖x − E x‖²: a residual stream's mean dwarfs its spread (SmolLM2-135M layer 15: 1.09)."""
    noise: float = 0.02
    """Energy of the isotropic Gaussian noise as a fraction of the signal's (centred) energy."""
    tokens: int = 400_000
    """Training rows written to the planted cache (one epoch of `sae train`)."""
    eval_tokens: int = 16_384
    """Fresh rows the SAEs, PCA and the reference loop are scored on."""
    seed: int = 0
    """Seeds the dictionary, the data and the training."""
    saes: list[SAESpec] | None = None
    """SAEs to train (their hook is set to the planted cache's); None → TopK, BatchTopK, JumpReLU and ReLU+L1 at
    width 2·n_features with k = target_l0 = l0 and every other setting at its default."""
    overwrite: bool = False
    """Train the SAEs afresh in `out`, replacing the SAEs and checkpoints of its earlier run (the cache is kept where
    its settings match), instead of going on with that run: how to change `saes` in an existing `out`."""

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)} must be > 0" for k in ("d_in", "n_features", "l0", "tokens", "eval_tokens",
                                                                 "group_size") if not getattr(self, k) > 0]
        bad += [f"{k}={getattr(self, k)} must be ≥ 0" for k in ("frequency_exponent", "magnitude_sigma", "offset",
                                                                 "noise") if not getattr(self, k) >= 0]
        if not 0 <= self.correlation < 1:
            bad.append(f"correlation={self.correlation} must be in [0, 1)")
        if 0 < self.tokens < MIN_BATCH:
            bad.append(f"tokens={self.tokens} must be at least {MIN_BATCH} (one training batch)")
        if self.l0 > self.n_features:
            bad.append(f"l0={self.l0} must be at most n_features={self.n_features}")
        if bad:
            raise UserError(f"planted: {'; '.join(bad)}")

    def specs(self) -> list[SAESpec]:
        """The SAEs to train, on the planted hook."""
        if self.saes is not None:
            return [replace(s, hook=HOOK) for s in self.saes]
        width, k = 2 * self.n_features, max(1, round(self.l0))
        return [SAESpec("topk", HOOK, d_sae=width, k=k), SAESpec("batchtopk", HOOK, d_sae=width, k=k),
                SAESpec("jumprelu", HOOK, d_sae=width, target_l0=self.l0), SAESpec("relu_l1", HOOK, d_sae=width)]

    def data(self) -> PlantedData:
        return make_planted(self.d_in, self.n_features, self.l0, self.frequency_exponent, self.correlation,
                            self.group_size, self.magnitude_sigma, self.offset, self.noise, self.seed)


@dataclass
class PlantedData:
    """The generator's ground truth: draw rows with ``sample``."""

    dictionary: Tensor
    """True feature directions, unit rows [n_features, d_in]."""
    frequency: Tensor
    """Probability that each feature is active on a token [n_features]: a power law scaled to sum to ``l0``, each
    capped at 1, so the sum falls short of ``l0`` where the first features' would pass 1 (7.5–7.9 at the grid's L0 8,
    27.1 at d_in 256 / 1,024 features / L0 32)."""
    offset: Tensor
    """The constant vector added to every row [d_in]."""
    correlation: float
    group_size: int
    magnitude_sigma: float
    noise_std: float
    """Per-dimension std of the isotropic Gaussian noise."""

    def sample(self, n: int, generator: torch.Generator, chunk: int = 8192) -> Tensor:
        """n rows [n, d_in]: Σ_i a_i·m_i·D_i + offset + noise, drawn in chunks to bound memory."""
        return torch.cat([self._chunk(min(chunk, n - start), generator) for start in range(0, n, chunk)])

    def codes(self, n: int, generator: torch.Generator) -> Tensor:
        """Sparse non-negative feature activations [n, n_features].

        Whether feature i fires is a Gaussian copula: z_i = √ρ·g + √(1 − ρ)·e_i with g shared by the features of
        one group, and i fires when z_i exceeds its (1 − p_i) quantile, so each feature keeps its frequency p_i
        while features of a group co-occur (correlation ρ of the latent Gaussians). Magnitudes are log-normal,
        scaled to mean 1.
        """
        n_features = len(self.frequency)
        groups = math.ceil(n_features / self.group_size)
        shared = torch.randn(n, groups, generator=generator).repeat_interleave(self.group_size, 1)[:, :n_features]
        z = math.sqrt(self.correlation) * shared + math.sqrt(1 - self.correlation) * torch.randn(
            n, n_features, generator=generator)
        threshold = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.frequency)
        s = self.magnitude_sigma
        magnitude = torch.exp(s * torch.randn(n, n_features, generator=generator) - s * s / 2)
        return (z > threshold) * magnitude

    def _chunk(self, n: int, generator: torch.Generator) -> Tensor:
        x = self.codes(n, generator) @ self.dictionary
        return x + self.offset + self.noise_std * torch.randn(x.shape, generator=generator)


def make_planted(d_in: int, n_features: int, l0: float, frequency_exponent: float, correlation: float,
                 group_size: int, magnitude_sigma: float, offset: float, noise: float, seed: int) -> PlantedData:
    """Draw a dictionary and its statistics. ``offset`` is ‖offset vector‖ in units of the signal's spread
    √E‖x − E x‖², ``noise`` the noise's share of that spread's energy (both measured on a sample)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(n_features, d_in, generator=g), dim=1)
    rank = torch.arange(1, n_features + 1, dtype=torch.float64)
    p = rank ** -frequency_exponent
    p = (p * l0 / p.sum()).clamp(max=1.0).float()
    p = p[torch.randperm(n_features, generator=g)]  # frequency unrelated to the group a feature is in
    data = PlantedData(dictionary, p, torch.zeros(d_in), correlation, group_size, magnitude_sigma, 0.0)
    signal = data.sample(8192, g)
    spread = (signal - signal.mean(0)).pow(2).sum(-1).mean().sqrt()
    data.offset = F.normalize(torch.randn(d_in, generator=g), dim=0) * offset * spread
    data.noise_std = float(spread * math.sqrt(noise / d_in))
    return data


# ----- the benchmark ---------------------------------------------------------------------------------------------


@dataclass
class Score:
    """One model's scores against the planted dictionary on fresh rows."""

    name: str
    mean_max_cos: float | None
    """Mean over true directions of the best cosine with a decoder row (None: PCA has no dictionary)."""
    recovered: float | None
    """Fraction of true directions with a decoder row at cosine > ``RECOVERED_COSINE``."""
    l0: float
    fvu: float
    pca_fvu: float
    """FVU of PCA with as many components as this model's L0 (rounded): what a dense code of that size gets."""


def write_cache(cfg: PlantedConfig, data: PlantedData, path: Path) -> Path:
    """The planted training rows as an ordinary activation cache (the store's own writer), so `sae train` reads
    them as it reads a harvest. A complete cache of the same settings is reused; other settings are refused."""
    contexts = math.ceil(cfg.tokens / CONTEXT_SIZE)
    per_shard = max(1, min(contexts, 65536 // CONTEXT_SIZE))
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "saes", "eval_tokens", "overwrite")}
    meta = {"model": PLANTED_MODEL, "hooks": {HOOK: cfg.d_in}, "dtype": "float32", "context_size": CONTEXT_SIZE,
            "exclude_first": False, "eval_fraction": 0.0, "max_contexts": contexts, "planted": settings}
    writer = CacheWriter(path, meta, contexts_per_shard=per_shard)
    try:
        if writer.complete:
            return path
        g = torch.Generator().manual_seed(cfg.seed + 1)
        done = writer.contexts_done
        for _ in range(done):  # a resumed write draws the same rows for the shards still to come
            data.sample(CONTEXT_SIZE, g)
        for start in range(done, contexts, per_shard):
            n = min(per_shard, contexts - start)
            rows = torch.cat([data.sample(CONTEXT_SIZE, g) for _ in range(n)])
            writer.add({HOOK: rows.view(n, CONTEXT_SIZE, cfg.d_in)},
                       torch.zeros(n, CONTEXT_SIZE, dtype=torch.long), first_pos=0)
        writer.finish(first_pos=0)
    finally:
        writer.close()
    return path


def max_cosines(dictionary: Tensor, W_dec: Tensor) -> Tensor:
    """For each true direction, its best cosine with any decoder row [n_features]."""
    return (dictionary @ F.normalize(W_dec.detach().float(), dim=1).T).max(1).values


def reference_topk(batches: Any, d_in: int, d_sae: int, k: int, steps: int, generator: torch.Generator,
                   lr: float = 1e-3, start: Tensor | None = None, freeze_start: bool = False,
                   batch_topk: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A textbook TopK SAE in plain PyTorch (Gao et al.'s architecture with none of its training recipe: no input
    normalisation, no AuxK, constant lr): what a naive implementation gets from the same batches. Its random
    decoder rows are drawn from ``generator`` (see ``REFERENCE_INIT_SEED``). Returns (W_dec, W_enc, b_enc, b_dec).

    start: decoder rows to begin from instead (the true dictionary, in ``scripts/planted_from_truth.py``, which asks
    whether the objective's minimum is the truth); the remaining rows stay random, with b_enc −10 so they start off.
    freeze_start: keep those rows fixed (Adam sees zero gradients for them), so the encoder and biases learn the best
    codes for the given dictionary: the loss the truth itself reaches under the objective.
    batch_topk: keep the k·batch largest pre-activations of the batch instead of k per row (BatchTopK's training
    objective, Bussmann et al. 2024)."""
    W_dec = F.normalize(torch.randn(d_sae, d_in, generator=generator), dim=1)
    b_enc = torch.zeros(d_sae)
    if start is not None:
        W_dec[:len(start)] = F.normalize(start.float(), dim=1)
        b_enc[len(start):] = -10.0
    W_dec.requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc.requires_grad_()
    b_dec = None
    for _ in range(steps):
        x = next(batches)[HOOK].float()
        if b_dec is None:
            b_dec = x.mean(0).requires_grad_()
            opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
        f = reference_codes((x - b_dec) @ W_enc + b_enc, k, batch_topk)
        loss = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        if freeze_start:
            W_dec.grad[:len(start)] = 0
        opt.step()
        with torch.no_grad():
            W_dec.copy_(F.normalize(W_dec, dim=1))
    return W_dec.detach(), W_enc.detach(), b_enc.detach(), b_dec.detach()


def reference_codes(pre: Tensor, k: int, batch_topk: bool = False) -> Tensor:
    """The reference loop's codes: the k largest pre-activations of each row (or k·rows of the batch), ReLU'd."""
    if batch_topk:
        top = pre.flatten().topk(k * len(pre))
        return torch.zeros(pre.numel()).scatter(0, top.indices, top.values.relu()).view_as(pre)
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def _score(name: str, dictionary: Tensor, W_dec: Tensor | None, x: Tensor, x_hat: Tensor, l0: float,
           pca_curve: Tensor) -> Score:
    cos = max_cosines(dictionary, W_dec) if W_dec is not None else None
    return Score(name, None if cos is None else float(cos.mean()),
                 None if cos is None else float((cos > RECOVERED_COSINE).float().mean()), l0, fvu(x, x_hat),
                 float(pca_curve[min(len(pca_curve) - 1, round(l0))]))


def run_planted(cfg: PlantedConfig) -> list[Score]:
    """Write the planted cache, train the SAEs on it with `sae train`, and score them (and PCA, and the reference
    loop) on fresh rows; the scores are also written to ``out/planted.json``."""
    out = check_output_folder(cfg.out)
    check_report_is_ours(out, "planted.json", {"config", "scores"}, "sae planted")
    with folder_lock(out, "sae planted"):
        return _run_planted(cfg, out)


@torch.no_grad()
def _run_planted(cfg: PlantedConfig, out: Path) -> list[Score]:
    data = cfg.data()
    cache = write_cache(cfg, data, out / "cache")
    print(describe_planted(cfg, data))
    specs = cfg.specs()
    with torch.enable_grad():
        try:
            paths = train(TrainConfig(cache=str(cache), out=str(out / "saes"), saes=specs, seed=cfg.seed,
                                      resume=not cfg.overwrite, overwrite=cfg.overwrite, wandb_mode="disabled"))
        except ResumeMismatch as err:
            raise ResumeMismatch(f"{err}; or train these SAEs in its place with `sae planted overwrite=true`") from None
    g = torch.Generator().manual_seed(cfg.seed + 2)
    x = data.sample(cfg.eval_tokens, g)
    pca_curve = pca_fvu_curve(fit_pca(data.sample(max(cfg.eval_tokens, 4 * cfg.d_in), g)), x)
    scores = []
    for path in paths:
        sae = SAE.load(path)  # the saved folder: mean and scale folded into the weights
        f = sae.encode(x)
        scores.append(_score(path.name, data.dictionary, sae.W_dec, x, sae.decode(f),
                             float((f > 0).sum(-1).float().mean()), pca_curve))
    store = ActivationStore(cache)
    batch = default_batch_size(store.n_train_rows)
    k = max(1, round(cfg.l0))
    init = torch.Generator().manual_seed(REFERENCE_INIT_SEED + cfg.seed)
    with torch.enable_grad():
        W_dec, W_enc, b_enc, b_dec = reference_topk(iter(store.shuffled([HOOK], batch, seed=cfg.seed)), cfg.d_in,
                                                    2 * cfg.n_features, k, store.n_train_rows // batch, init)
    f = reference_codes((x - b_dec) @ W_enc + b_enc, k)
    scores.append(_score(f"reference_topk_k{k}_plain_pytorch", data.dictionary, W_dec, x, f @ W_dec + b_dec,
                         float((f > 0).sum(-1).float().mean()), pca_curve))
    atomic_write_json(out / "planted.json", {"config": asdict(cfg), "scores": [asdict(s) for s in scores]})
    return scores


def describe_planted(cfg: PlantedConfig, data: PlantedData) -> str:
    """What the run plants, in one line before training (a new user's run said nothing of it). The mean number
    active is the frequencies' sum, below `l0` where the most frequent features' probabilities reach 1."""
    line = (f"planted: {cfg.n_features:,} true directions in d_in {cfg.d_in} ({cfg.n_features / cfg.d_in:g} per "
            f"dimension), {float(data.frequency.sum()):.2f} active per row on average (power-law frequencies, "
            f"exponent {cfg.frequency_exponent:g}); {cfg.tokens:,} training rows, {cfg.eval_tokens:,} fresh rows to "
            "score")
    if cfg.saes is None:
        line += (f"; the SAEs are {2 * cfg.n_features:,} wide (2 × n_features), so half their latents have no true "
                 "direction to learn: many may end dead, and a dead-latent warning is expected, not a failure")
    return line


def format_scores(scores: list[Score]) -> str:
    """The scores as a table: one row per SAE, then the reference loop, then what the columns mean."""
    width = max(len(s.name) for s in scores)
    lines = [f"{'model':<{width}}  mean max cos  recovered (cos > {RECOVERED_COSINE})     L0     FVU  PCA FVU at L0",
             *(f"{s.name:<{width}}  {s.mean_max_cos:12.3f}  {s.recovered:22.1%}  {s.l0:5.2f}  {s.fvu:6.3f}  "
               f"{s.pca_fvu:13.3f}" for s in scores),
             "",
             "mean max cos: each true feature's best cosine with a decoder row, averaged (1: all found)",
             "recovered: the share of true features above that cosine; L0, FVU: on fresh rows",
             "PCA FVU at L0: PCA keeping as many components as the model's L0, which an SAE should beat",
             "reference_topk_…: a plain PyTorch TopK loop trained on the same batches"]
    return "\n".join(lines)
