"""Describe every SAE feature from the activation cache, and score tokens by how badly the SAE reconstructs them.

Per feature: its top-activating tokens with context, random examples from weaker activation intervals (the top
examples alone overstate how specific a feature is), density, an activation histogram, and the vocabulary tokens its
decoder direction promotes and suppresses (logit lens). Everything comes from one streaming pass over the cache, so
the model is never re-run for contexts and memory stays bounded by d_sae x (examples kept per feature).

Its statistics become the feature browser's data (see `sae.analysis.dashboard` for the format, which the notebook also reads):
`sae.analysis.dashboard.export` writes them and `sae.analysis.dashboard.build` drives the `sae analyse` stage, so imports run one way,
dashboard → analyse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator

import torch
from torch import Tensor, nn

from sae.config import HelpSections, UserError
from sae.analysis.evaluate import (DEMO_SAE, ROW_CHUNK, check_matches, load_cache_model, load_sae, output_hook,
                                   reconstruct, sae_hooks)
from sae.data.store import check_finite

#: Activation histogram bins: fixed log10 edges shared by all features, so counts can be accumulated in one pass
#: before any feature's range is known (8 bins per decade from 1e-4 to 1e4; values outside land in the end bins).
HIST_EDGES = torch.linspace(-4.0, 4.0, 65)
#: Interval sampling: random active examples are grouped by activation as a fraction of the feature's maximum.
INTERVALS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))


@dataclass
class AnalyseConfig:
    """The `analyse:` section: which SAE(s) to analyse on which cache, how many top examples and logit-lens tokens
    each feature keeps, and where the feature browser goes."""

    help_sections: ClassVar[HelpSections] = (
        ("what to analyse", ("sae", "cache", "out", "split")),
        ("what each feature page shows", ("n_top", "n_interval_samples", "reservoir", "window_left", "window_right",
                                          "logit_tokens")),
        ("running", ("batch_rows", "device")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    sae: str = "runs/demo/saes"
    """An SAE folder, or a folder of SAE folders (a `sae train` output): each is analysed into `<out>/<its name>/`.
    Hub ids (owner/name[/folder]) and SAELens release/sae_id names work too."""
    cache: str = "runs/demo/cache"
    """Activation cache the SAE was trained on (it must hold the SAE's hook)."""
    out: str = "runs/demo/analysis"
    """Output folder: the feature browser (open index.html) and its data."""
    n_top: int = 20
    """Top-activating examples kept per feature."""
    n_interval_samples: int = 4
    """Random examples shown per activation interval (0-25%, 25-50%, 50-75% of the feature's maximum)."""
    reservoir: int = 48
    """Uniform random sample of active tokens kept per feature, from which the interval examples are drawn."""
    window_left: int = 12
    """Tokens of context shown before each example."""
    window_right: int = 4
    """Tokens of context shown after each example."""
    logit_tokens: int = 10
    """Vocabulary tokens listed per feature as most promoted and most suppressed by its decoder direction."""
    batch_rows: int = 4096
    """Cache rows encoded at once; memory grows with batch_rows x d_sae."""
    split: str = "all"
    """Cache rows to analyse: "all", "train" or "eval" (held out)."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)} must be ≥ 1" for k in ("n_top", "reservoir", "logit_tokens", "batch_rows")
               if getattr(self, k) < 1]
        bad += [f"{k}={getattr(self, k)} must be ≥ 0" for k in ("n_interval_samples", "window_left", "window_right")
                if getattr(self, k) < 0]
        if self.split not in ("all", "train", "eval"):
            bad.append(f"split={self.split!r} must be all, train or eval")
        if bad:
            raise UserError(f"analyse: {'; '.join(bad)}")

    def stats_bytes(self, d_sae: int) -> int:
        """About the memory the streaming pass holds for an SAE of `d_sae` latents: each feature's top and reservoir
        slots (key, activation, place and window: 24 + 4·W bytes each, ``RunningTopK.empty``) and a batch of codes
        with its temporaries (≈ 3 floats per code)."""
        width = self.window_left + 1 + self.window_right
        return d_sae * ((self.n_top + self.reservoir) * (24 + 4 * width) + 12 * self.batch_rows)


# --------------------------------------------------------------------------------------------- streaming pass


@dataclass
class RunningTopK:
    """Per feature, the k entries with the largest keys seen so far, with their activation, place and window.

    Entries sit in fixed slots: a newcomer takes the slot of the entry it pushes out, so a batch writes only its
    newcomers (after the first batches, few) instead of re-sorting every feature's k windows. `ranked` puts each
    feature's entries in descending key order at the end.
    """

    key: Tensor
    """[d_sae, k] the ranking key (-inf in empty slots)."""
    act: Tensor
    """[d_sae, k] activation of the feature on the entry's token (0 in empty slots)."""
    seq: Tensor
    """[d_sae, k] context index of the entry (-1 in empty slots)."""
    pos: Tensor
    """[d_sae, k] position of the entry in its context (-1 in empty slots)."""
    window: Tensor
    """[d_sae, k, W] the feature's activations around the entry; NaN outside its context or the cache."""

    @classmethod
    def empty(cls, n_features: int, k: int, window: int, device: torch.device) -> RunningTopK:
        return cls(
            key=torch.full((n_features, k), -math.inf, device=device),
            act=torch.zeros(n_features, k, device=device),
            seq=torch.full((n_features, k), -1, dtype=torch.long, device=device),
            pos=torch.full((n_features, k), -1, dtype=torch.long, device=device),
            window=torch.zeros(n_features, k, window, device=device),
        )

    @property
    def k(self) -> int:
        return self.key.shape[1]

    def to(self, device: torch.device | str) -> RunningTopK:
        return RunningTopK(*(t.to(device) for t in (self.key, self.act, self.seq, self.pos, self.window)))

    def ranked(self) -> RunningTopK:
        """The same entries with each feature's in descending key order (empty slots last)."""
        order = self.key.argsort(dim=1, descending=True, stable=True)
        return RunningTopK(
            *(t.gather(1, order) for t in (self.key, self.act, self.seq, self.pos)),
            self.window.gather(1, order[..., None].expand_as(self.window)),
        )

    def select(self, feats: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Entries that would enter: (indices sorted by feature then descending key, rank within their feature).

        Only keys strictly above a feature's current k-th are candidates, so a tie goes to the row seen first; of
        those at most k per feature are returned (stable sorts keep earlier rows first among equal keys).
        """
        idx = (keys > self.key.min(1).values[feats]).nonzero().squeeze(1)
        idx = idx[torch.argsort(keys[idx], descending=True, stable=True)]
        idx = idx[torch.argsort(feats[idx], stable=True)]
        groups = feats[idx]
        counts = torch.bincount(groups, minlength=self.key.shape[0])
        rank = torch.arange(len(idx), device=keys.device) - (counts.cumsum(0) - counts)[groups]
        keep = rank < self.k
        return idx[keep], rank[keep]

    def merge(self, feats: Tensor, rank: Tensor, key: Tensor, act: Tensor, seq: Tensor, pos: Tensor, window: Tensor) -> None:
        """Merge candidates from `select` (flat, with their windows [n, W]) into the features they belong to."""
        if not len(feats):
            return
        touched, row = torch.unique_consecutive(feats, return_inverse=True)
        source = torch.full((len(touched), int(rank.max()) + 1), -1, dtype=torch.long, device=feats.device)
        source[row, rank] = torch.arange(len(feats), device=feats.device)
        keys = torch.cat([self.key[touched], torch.where(source >= 0, key[source], -math.inf)], 1)
        kept = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, keys.topk(self.k, dim=1).indices, True)
        # Each feature admits as many newcomers as it drops, so in row-major order the i-th dropped slot and the
        # i-th admitted candidate belong to the same feature. (An empty slot may "admit" padding: skipped.)
        out_row, slot = (~kept[:, : self.k]).nonzero(as_tuple=True)
        in_row, column = kept[:, self.k :].nonzero(as_tuple=True)
        new = source[in_row, column]
        real = new >= 0
        feat, slot, new = touched[out_row[real]], slot[real], new[real]
        for name, values in (("key", key), ("act", act), ("seq", seq), ("pos", pos), ("window", window)):
            getattr(self, name)[feat, slot] = values[new]


@dataclass
class Halo:
    """A batch of rows with neighbours attached: rows [start, end) are new; the rest only give their windows context."""

    acts: Tensor
    seq: Tensor
    pos: Tensor
    start: int
    end: int


def with_halo(batches: Iterable[tuple[Tensor, Tensor, Tensor]], left: int, right: int) -> Iterator[Halo]:
    """Re-batch ordered rows so every new row has its `left`/`right` neighbours in the same buffer.

    The last `right` rows of a batch wait for the next one (their right context is there); `left` processed rows are
    carried along as left context. Each row is new in exactly one Halo.
    """
    carry: tuple[Tensor, Tensor, Tensor] | None = None
    start = 0
    for acts, seq, pos in batches:
        if carry is not None:
            acts, seq, pos = (torch.cat([c, b]) for c, b in zip(carry, (acts, seq, pos)))
        end = max(start, len(acts) - right)
        yield Halo(acts, seq, pos, start, end)
        c0 = max(0, end - left)
        carry, start = (acts[c0:], seq[c0:], pos[c0:]), end - c0
    if carry is not None and start < len(carry[0]):
        yield Halo(*carry, start, len(carry[0]))


class FeatureStats:
    """Everything the pass accumulates: counts, sums, histograms, top examples and a uniform reservoir."""

    def __init__(self, d_sae: int, cfg: AnalyseConfig, device: torch.device, first_pos: int, context_size: int):
        self.first_pos, self.context_size = first_pos, context_size
        self.offsets = torch.arange(-cfg.window_left, cfg.window_right + 1, device=device)
        width = len(self.offsets)
        self.top = RunningTopK.empty(d_sae, cfg.n_top, width, device)
        # Reservoir sampling as a top-k on random keys: the k largest of i.i.d. uniforms are a uniform sample.
        self.reservoir = RunningTopK.empty(d_sae, cfg.reservoir, width, device)
        self.n_active = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.float64, device=device)
        self.edges = HIST_EDGES.to(device)
        self.n_tokens = 0
        self.generator = torch.Generator(device).manual_seed(0)  # the same reservoir, so the same browser, every run

    def update(self, f: Tensor, halo: Halo) -> None:
        """Add rows [halo.start, halo.end) given the features `f` [len(halo.acts), d_sae] of the whole buffer.

        Works on the active (row, feature) entries only: with L0 in the tens out of thousands of features, that is
        a few hundred thousand entries per batch instead of a dense [rows, d_sae] sort.
        """
        new = f[halo.start : halo.end]
        self.n_tokens += new.shape[0]
        # Activations are never negative (every architecture ends in a ReLU or a step), so nonzero is "active";
        # that saves a [rows, d_sae] comparison. Row-major order: earlier rows first.
        rows, feats = new.nonzero(as_tuple=True)
        acts = new[rows, feats]
        rows = rows + halo.start
        self.n_active += torch.bincount(feats, minlength=len(self.n_active))
        self.act_sum.index_add_(0, feats, acts.double())
        bins = (torch.bucketize(acts.log10(), self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feats * self.hist.shape[1] + bins, torch.ones_like(bins, dtype=self.hist.dtype))
        for target, key in ((self.top, acts), (self.reservoir, torch.rand(acts.shape, generator=self.generator, device=acts.device))):
            pick, rank = target.select(feats, key)
            row, feat = rows[pick], feats[pick]
            target.merge(feat, rank, key[pick], acts[pick], halo.seq[row], halo.pos[row], self._windows(f, halo, row, feat))

    def _windows(self, f: Tensor, halo: Halo, row: Tensor, feat: Tensor) -> Tensor:
        """Activations [n, W] of each entry's feature on the rows around it; NaN outside its context or the cache.

        Contexts are cached whole and in order, and `with_halo` puts every cached neighbour of a new row in the
        buffer, so the neighbour at offset o is row + o exactly when position pos + o is a cached one.
        """
        place = halo.pos[row][:, None] + self.offsets
        cached = (place >= self.first_pos) & (place < self.context_size)
        near = (row[:, None] + self.offsets).clamp(0, f.shape[0] - 1)
        return f.take(near * f.shape[1] + feat[:, None]).masked_fill_(~cached, math.nan)


@torch.no_grad()
def stream_features(store, sae, cfg: AnalyseConfig) -> FeatureStats:
    """One ordered pass over the cache: encode every row once (plus a few halo rows per batch) and accumulate."""
    device = sae.W_dec.device
    hook = sae.cfg.hook_name
    stats = FeatureStats(sae.W_dec.shape[0], cfg, device, store.first_pos, store.context_size)
    batches = (
        (rows.acts[hook].to(device), rows.seq.to(device), rows.pos.to(device))
        for rows in store.iter_ordered([hook], split=cfg.split, batch_rows=cfg.batch_rows)
    )
    threads = torch.get_num_threads()
    for halo in with_halo(batches, cfg.window_left, cfg.window_right):
        check_finite(halo.acts, f"{hook} in {store.path} (a batch of the analysis pass)")
        f = sae.encode(halo.acts.to(sae.W_dec.dtype)).float()  # batch_rows bounds this dense [rows, d_sae]
        # The bookkeeping is many small ops: on a busy 2-core CPU a second thread costs more in hand-offs than it
        # gives (3-4x slower measured), while the encoder's matmul wants every thread.
        torch.set_num_threads(1)
        try:
            stats.update(f, halo)
        finally:
            torch.set_num_threads(threads)
    stats.top, stats.reservoir = stats.top.ranked(), stats.reservoir.ranked()
    return stats


# --------------------------------------------------------------------------------------------- logit lens


def norm_scale(norm: nn.Module) -> tuple[Tensor, bool]:
    """The elementwise scale a direction picks up in the final norm, and whether the norm centres its input.

    The division by the input's norm is one positive factor for the whole vocabulary, so it cannot change which tokens
    a direction ranks highest and is left out. RMSNorm then only multiplies by its weight (Gemma stores weight - 1).
    LayerNorm also subtracts the mean across dimensions, which is linear, so the direction is centred the same way;
    its bias is the same for every feature (a fixed logit offset), not part of any feature's effect, so it is dropped.
    """
    weight = norm.weight.detach().float()
    if type(norm).__name__.startswith("Gemma"):
        weight = weight + 1
    return weight, isinstance(norm, nn.LayerNorm)


@torch.no_grad()
def logit_lens(W_dec: Tensor, norm: nn.Module, W_U: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top and bottom k vocabulary logits of each decoder direction: (top values, top ids, bottom values, bottom ids)."""
    scale, centre = norm_scale(norm)
    directions = W_dec.float().to(scale.device)
    if centre:
        directions = directions - directions.mean(1, keepdim=True)
    directions = directions * scale
    W_U = W_U.detach().float().to(scale.device)
    parts = []
    for chunk in directions.split(512):  # [512, vocab] logits at a time
        logits = chunk @ W_U.T
        top, bottom = logits.topk(k, dim=1), logits.topk(k, dim=1, largest=False)
        parts.append((top.values, top.indices, bottom.values, bottom.indices))
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- anomaly scores


@torch.no_grad()
def normalised_error(sae, acts: Tensor, target: Tensor | None = None) -> Tensor:
    """Per-row ‖y − ŷ‖² / ‖y‖² of the SAE's output ŷ for rows `acts`, y = `target` (a transcoder's output hook) or
    `acts` itself: scale-free, so rows with large norms are not flagged for their size alone."""
    acts = acts.to(sae.W_dec.device)
    target = acts if target is None else target.to(acts.device)
    errors = [
        ((y.double() - reconstruct(sae, c).double()) ** 2).sum(-1) / (y.double() ** 2).sum(-1).clamp_min(1e-12)
        for c, y in zip(acts.reshape(-1, acts.shape[-1]).split(ROW_CHUNK), target.reshape(-1, target.shape[-1]).split(ROW_CHUNK))
    ]
    return torch.cat(errors).float().view(acts.shape[:-1]).cpu()


def z_scores(errors: Tensor, reference_errors: Tensor) -> Tensor:
    """Anomaly z-score of each error against the held-out rows' errors, both in log space.

    Errors are positive and right-skewed, so the z-score is taken in log space where the held-out distribution is
    close to symmetric; z = 3 then means "far above what the SAE usually gets wrong", whatever the SAE's overall FVU.
    """
    ref = reference_errors.double().clamp_min(1e-12).log()
    err = errors.double().clamp_min(1e-12).log()
    return ((err - ref.mean()) / ref.std().clamp_min(1e-12)).float()


def score(sae, acts: Tensor, reference_errors: Tensor) -> Tensor:
    """Anomaly z-score of each row of `acts` [..., d_in]; see `z_scores`."""
    return z_scores(normalised_error(sae, acts), reference_errors)


def percentile(errors: Tensor, reference_errors: Tensor) -> Tensor:
    """Fraction of held-out rows whose error is below each of `errors`."""
    ref = reference_errors.sort().values
    return torch.searchsorted(ref, errors.contiguous()).float() / len(ref)


@dataclass
class ScoreConfig:
    text: str
    """The text to score (the CLI passes it as text=...)."""
    sae: str = DEMO_SAE
    """One SAE folder (default: the demo's TopK SAE), hub id (owner/name/folder) or SAELens release/sae_id."""
    cache: str = "runs/demo/cache"
    """Cache the SAE was trained on: its held-out rows give the reference error distribution."""
    threshold: float = 3.0
    """Flag tokens whose error z-score (against the held-out rows, in log space) is above this."""
    reference_tokens: int = 20_000
    """Held-out rows whose reconstruction errors make the reference distribution."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""

    def __post_init__(self) -> None:
        if self.reference_tokens < 2:  # a z-score needs a spread
            raise UserError(f"score: reference_tokens={self.reference_tokens} must be ≥ 2")


@dataclass
class TokenScore:
    token: str
    error: float
    z: float
    percentile: float
    flagged: bool
    scored: bool  # False for a leading position the cache excluded (BOS), which the SAE never saw


@torch.no_grad()
def score_text(cfg: ScoreConfig) -> list[TokenScore]:
    """Run the model on `cfg.text` to the SAE's hook and score every token against the held-out error distribution."""
    from sae.data.model import capture, pick_device, prompt_ids
    from sae.data.store import ActivationStore

    store = ActivationStore(cfg.cache)
    device = pick_device(cfg.device)
    name, sae = load_sae(cfg.sae, device)
    check_matches(sae, store, name)
    hook, hooks = sae.cfg.hook_name, sae_hooks(sae)
    model, tokenizer = load_cache_model(store, device)
    held = store.holdout(hooks, cfg.reference_tokens)
    for h in hooks:
        check_finite(held[h], f"the held-out rows of {h} in {store.path}")
    reference = normalised_error(sae, held[hook], held[output_hook(sae)])
    ids = prompt_ids(tokenizer, cfg.text, store.bos_token_id, key="text")
    if len(ids) <= store.first_pos:  # all of it before the cache's first position: nothing the SAE ever saw
        raise UserError(f"text={cfg.text!r} is {len(ids)} token(s), and the cache (so the SAE) starts at position "
                        f"{store.first_pos}; give a longer text")
    acts = capture(model, torch.tensor([ids], device=device), hooks)
    return token_scores(sae, acts[hook][0], reference, [tokenizer.decode([i]) for i in ids], store.first_pos,
                        cfg.threshold, acts[output_hook(sae)][0])


def token_scores(
    sae, acts: Tensor, reference: Tensor, tokens: list[str], first_pos: int, threshold: float,
    target: Tensor | None = None,
) -> list[TokenScore]:
    """Scores for one sequence's activations [T, d_in] (and a transcoder's targets [T, d_out]); positions the cache
    dropped (< first_pos) are reported unscored."""
    errors = normalised_error(sae, acts, target)
    z = z_scores(errors, reference)
    pct = percentile(errors, reference)
    out = []
    for i, (tok, e, zi, p) in enumerate(zip(tokens, errors.tolist(), z.tolist(), pct.tolist())):
        scored = i >= first_pos
        out.append(TokenScore(tok, e, zi, p, flagged=scored and zi > threshold, scored=scored))
    return out


def format_scores(scores: list[TokenScore]) -> str:
    lines = [f"{'token':<20} {'error':>8} {'z':>7} {'pctile':>7}"]
    for s in scores:
        mark = "  <-- anomalous" if s.flagged else ("  (not scored: a leading position the cache dropped)" if not s.scored else "")
        lines.append(f"{s.token!r:<20} {s.error:>8.4f} {s.z:>7.2f} {s.percentile:>7.1%}{mark}")
    return "\n".join(lines)
