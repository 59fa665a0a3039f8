"""Describe every SAE feature from the activation cache, and score tokens by how badly the SAE reconstructs them.

Per feature: its top-activating tokens with context, random examples from weaker activation intervals (the top
examples alone overstate how specific a feature is), density, an activation histogram, and the vocabulary tokens its
decoder direction promotes and suppresses (logit lens). Everything comes from one streaming pass over the cache, so
the model is never re-run for contexts and memory stays bounded by d_sae x (examples kept per feature).

The output folder (`index.json` + `features/<id>.json`) is what `sae.dashboard` and the notebook read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from sae.evaluate import ROW_CHUNK, reconstruct, sae_dirs, write_json

#: Activation histogram bins: fixed log10 edges shared by all features, so counts can be accumulated in one pass
#: before any feature's range is known (8 bins per decade from 1e-4 to 1e4; values outside land in the end bins).
HIST_EDGES = torch.linspace(-4.0, 4.0, 65)
#: Interval sampling: random active examples are grouped by activation as a fraction of the feature's maximum.
INTERVALS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75))


@dataclass
class AnalyseConfig:
    sae: str
    cache: str = "runs/demo/cache"
    out: str = "runs/demo/analysis"
    n_top: int = 20
    n_interval_samples: int = 4
    reservoir: int = 48
    window_left: int = 12
    window_right: int = 4
    logit_tokens: int = 10
    batch_rows: int = 4096
    split: str = "all"
    device: str = "auto"


# --------------------------------------------------------------------------------------------- streaming pass


class RunningTopK:
    """Per feature, the k entries with the largest keys seen so far, with their activation, place and window.

    Each batch contributes its own top-k per feature (`segment_topk` over the active entries); merging that with the
    running k keeps memory at d_sae x k however long the cache is.
    """

    def __init__(self, n_features: int, k: int, window: int, device: torch.device):
        self.k = k
        self.key = torch.full((n_features, k), -math.inf, device=device)
        self.act = torch.zeros(n_features, k, device=device)
        self.seq = torch.full((n_features, k), -1, dtype=torch.long, device=device)
        self.pos = torch.full((n_features, k), -1, dtype=torch.long, device=device)
        self.window = torch.zeros(n_features, k, window, device=device)

    def update(self, key: Tensor, act: Tensor, seq: Tensor, pos: Tensor, window: Tensor) -> None:
        """Merge candidates ([d_sae, m] each, window [d_sae, m, W]) into the running top k."""
        key = torch.cat([self.key, key], 1)
        keep = key.topk(self.k, dim=1).indices
        self.key = key.gather(1, keep)
        self.act = torch.cat([self.act, act], 1).gather(1, keep)
        self.seq = torch.cat([self.seq, seq], 1).gather(1, keep)
        self.pos = torch.cat([self.pos, pos], 1).gather(1, keep)
        window = torch.cat([self.window, window], 1)
        self.window = window.gather(1, keep[..., None].expand(-1, -1, window.shape[2]))


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

    def __init__(self, d_sae: int, cfg: AnalyseConfig, device: torch.device):
        self.offsets = torch.arange(-cfg.window_left, cfg.window_right + 1, device=device)
        width = len(self.offsets)
        self.top = RunningTopK(d_sae, cfg.n_top, width, device)
        # Reservoir sampling as a top-k on random keys: the k smallest of i.i.d. uniforms are a uniform sample.
        self.reservoir = RunningTopK(d_sae, cfg.reservoir, width, device)
        self.n_active = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.hist = torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.float64, device=device)
        self.edges = HIST_EDGES.to(device)
        self.n_tokens = 0

    def update(self, f: Tensor, halo: Halo) -> None:
        """Add rows [halo.start, halo.end) given the features `f` [len(halo.acts), d_sae] of the whole buffer.

        Works on the active (row, feature) entries only: with L0 in the tens out of thousands of features, that is
        a few hundred thousand entries per batch instead of a dense [rows, d_sae] sort.
        """
        new = f[halo.start : halo.end]
        self.n_tokens += new.shape[0]
        rows, feats = (new > 0).nonzero(as_tuple=True)
        acts = new[rows, feats]
        rows = rows + halo.start
        self.n_active.index_add_(0, feats, torch.ones_like(acts, dtype=self.n_active.dtype))
        self.act_sum.index_add_(0, feats, acts.double())
        bins = (torch.bucketize(acts.log10(), self.edges) - 1).clamp(0, self.hist.shape[1] - 1)
        self.hist.view(-1).index_add_(0, feats * self.hist.shape[1] + bins, torch.ones_like(bins, dtype=self.hist.dtype))

        self._merge(self.top, acts, rows, feats, acts, f, halo)
        self._merge(self.reservoir, -torch.rand_like(acts), rows, feats, acts, f, halo)

    def _merge(self, target: RunningTopK, key: Tensor, rows: Tensor, feats: Tensor, acts: Tensor, f: Tensor, halo: Halo) -> None:
        """Per feature, the `target.k` active entries with the largest keys (ties: earlier rows first), merged in."""
        pick = segment_topk(feats, key, target.k, f.shape[1])  # [d_sae, k] entry indices, -1 where none
        have = pick >= 0
        pick = pick.clamp_min(0)
        row, feat = rows[pick], feats[pick]
        near = row[..., None] + self.offsets
        valid = (near >= 0) & (near < f.shape[0])
        near = near.clamp(0, f.shape[0] - 1)
        same_context = (halo.seq[near] == halo.seq[row][..., None]) & (halo.pos[near] == halo.pos[row][..., None] + self.offsets)
        window = f[near, feat[..., None]].masked_fill(~(valid & same_context), math.nan)
        target.update(
            key[pick].masked_fill(~have, -math.inf), acts[pick].masked_fill(~have, 0.0),
            halo.seq[row], halo.pos[row], window,
        )


def segment_topk(groups: Tensor, keys: Tensor, k: int, n_groups: int) -> Tensor:
    """Indices [n_groups, k] of the k largest `keys` within each group (-1 pads groups with fewer entries).

    Two stable sorts (by key, then by group) put each group's entries in key order, ties in input order.
    """
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    sorted_groups = groups[order]
    counts = torch.bincount(sorted_groups, minlength=n_groups)
    rank = torch.arange(len(order), device=keys.device) - (counts.cumsum(0) - counts)[sorted_groups]
    keep = rank < k
    out = torch.full((n_groups, k), -1, dtype=torch.long, device=keys.device)
    out[sorted_groups[keep], rank[keep]] = order[keep]
    return out


@torch.no_grad()
def stream_features(store, sae, cfg: AnalyseConfig) -> FeatureStats:
    """One ordered pass over the cache: encode every row once (plus a few halo rows per batch) and accumulate."""
    device = sae.W_dec.device
    hook = sae.cfg.hook_name
    stats = FeatureStats(sae.W_dec.shape[0], cfg, device)
    batches = (
        (rows.acts[hook].to(device), rows.seq.to(device), rows.pos.to(device))
        for rows in store.iter_ordered([hook], split=cfg.split, batch_rows=cfg.batch_rows)
    )
    for halo in with_halo(batches, cfg.window_left, cfg.window_right):
        f = torch.cat([sae.encode(chunk.to(sae.W_dec.dtype)) for chunk in halo.acts.split(ROW_CHUNK)]).float()
        stats.update(f, halo)
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
def normalised_error(sae, acts: Tensor) -> Tensor:
    """Per-row ‖x − x̂‖² / ‖x‖²: scale-free, so rows with large norms are not flagged for their size alone."""
    acts = acts.to(sae.W_dec.device)
    errors = [
        ((c.double() - reconstruct(sae, c).double()) ** 2).sum(-1) / (c.double() ** 2).sum(-1).clamp_min(1e-12)
        for c in acts.reshape(-1, acts.shape[-1]).split(ROW_CHUNK)
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
    sae: str
    text: str
    cache: str = "runs/demo/cache"
    threshold: float = 3.0  # flag tokens with z-score above this
    reference_tokens: int = 20_000
    device: str = "auto"


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
    from sae.evaluate import load_saes
    from sae.model import capture, load_model, pick_device
    from sae.store import ActivationStore

    store = ActivationStore(cfg.cache)
    device = pick_device(cfg.device)
    (sae,) = load_saes([cfg.sae], device).values()
    hook = sae.cfg.hook_name
    model, tokenizer = load_model(store.model_name, str(device))
    reference = normalised_error(sae, store.holdout([hook], cfg.reference_tokens)[hook])
    ids = tokenizer(cfg.text, add_special_tokens=False)["input_ids"]
    if store.bos_token_id is not None:
        ids = [store.bos_token_id, *ids]
    acts = capture(model, torch.tensor([ids], device=device), [hook])[hook][0]
    return token_scores(sae, acts, reference, [tokenizer.decode([i]) for i in ids], store.exclude_first, cfg.threshold)


def token_scores(
    sae, acts: Tensor, reference: Tensor, tokens: list[str], skip_first: bool, threshold: float
) -> list[TokenScore]:
    """Scores for one sequence's activations [T, d_in]; position 0 is reported unscored when the cache dropped it."""
    errors = normalised_error(sae, acts)
    z = z_scores(errors, reference)
    pct = percentile(errors, reference)
    out = []
    for i, (tok, e, zi, p) in enumerate(zip(tokens, errors.tolist(), z.tolist(), pct.tolist())):
        scored = not (skip_first and i == 0)
        out.append(TokenScore(tok, e, zi, p, flagged=scored and zi > threshold, scored=scored))
    return out


def format_scores(scores: list[TokenScore]) -> str:
    lines = [f"{'token':<20} {'error':>8} {'z':>7} {'pctile':>7}"]
    for s in scores:
        mark = "  <-- anomalous" if s.flagged else ("  (not scored: BOS position)" if not s.scored else "")
        lines.append(f"{s.token!r:<20} {s.error:>8.4f} {s.z:>7.2f} {s.percentile:>7.1%}{mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- writing


class TokenText:
    """Token id -> display string, decoded once per id (decoding a single id is the slow part of writing)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _examples(
    acts: list[float], seqs: list[int], poss: list[int], windows: list[list[float]], contexts: dict[int, list[int]],
    text: TokenText, left: int,
) -> list[dict]:
    """JSON for examples of one feature: window tokens, the feature's activation on each, and which one is the hit."""
    out = []
    for act, seq, pos, window in zip(acts, seqs, poss, windows):
        if act <= 0:
            continue
        ids = contexts[seq]
        lo, hi = max(0, pos - left), min(len(ids), pos + len(window) - left)
        out.append(
            {
                "act": round(act, 4),
                "seq": seq,
                "pos": pos,
                "at": pos - lo,
                "tokens": [text(t) for t in ids[lo:hi]],
                "acts": [_round(a) for a in window[lo - pos + left : hi - pos + left]],
            }
        )
    return out


def _interval_samples(res: dict[str, list], max_act: float, n: int) -> list[dict]:
    """Up to `n` reservoir examples per activation interval (fraction of the feature's max), strongest first."""
    picked = []
    for lo, hi in INTERVALS:
        inside = [i for i, a in enumerate(res["act"]) if lo * max_act < a <= hi * max_act][:n]
        picked += [{**res_ex, "interval": f"{lo:.0%}-{hi:.0%}"} for res_ex in (res["examples"][i] for i in inside)]
    return sorted(picked, key=lambda e: -e["act"])


def _histogram(counts: list[float]) -> dict:
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return {"log10_edges": [], "counts": []}
    lo, hi = nz[0], nz[-1] + 1
    return {"log10_edges": [round(e, 3) for e in HIST_EDGES[lo : hi + 1].tolist()], "counts": [int(c) for c in counts[lo:hi]]}


def write_analysis(stats: FeatureStats, sae, store, tokenizer, lens: tuple[Tensor, ...], cfg: AnalyseConfig) -> Path:
    """Write `features/<id>.json` for every live feature, then `index.json` (last, atomically: it marks completion)."""
    out = Path(cfg.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    text = TokenText(tokenizer)
    top_ok = stats.top.act > 0
    res_ok = stats.reservoir.key > -math.inf
    seqs = torch.cat([stats.top.seq[top_ok], stats.reservoir.seq[res_ok]]).unique().cpu()
    contexts = dict(zip(seqs.tolist(), store.context_tokens(seqs).tolist())) if len(seqs) else {}

    n = max(stats.n_tokens, 1)
    density = (stats.n_active / n).tolist()
    mean_act = (stats.act_sum / stats.n_active.clamp_min(1)).tolist()
    top = {k: getattr(stats.top, k).cpu().tolist() for k in ("act", "seq", "pos", "window")}
    res = {k: getattr(stats.reservoir, k).cpu().tolist() for k in ("act", "seq", "pos", "window")}
    hist = stats.hist.cpu().tolist()
    lens_lists = [t.cpu().tolist() for t in lens]

    rows, dead = [], []
    for j in range(len(density)):
        if density[j] == 0:
            dead.append(j)
            continue
        examples = _examples(top["act"][j], top["seq"][j], top["pos"][j], top["window"][j], contexts, text, cfg.window_left)
        acts = [e["act"] for e in examples]
        max_act = acts[0]
        reservoir = _examples(res["act"][j], res["seq"][j], res["pos"][j], res["window"][j], contexts, text, cfg.window_left)
        samples = _interval_samples({"act": [e["act"] for e in reservoir], "examples": reservoir}, max_act, cfg.n_interval_samples)
        promoted = [[text(t), round(v, 4)] for t, v in zip(lens_lists[1][j], lens_lists[0][j])]
        suppressed = [[text(t), round(v, 4)] for t, v in zip(lens_lists[3][j], lens_lists[2][j])]
        summary = {
            "id": j,
            "max_act": max_act,
            "mean_top_act": round(sum(acts) / len(acts), 4),
            "density": density[j],
            "mean_act": round(mean_act[j], 4),
            "top_tokens": list(dict.fromkeys(e["tokens"][e["at"]] for e in examples))[:3],
            "promoted": [t for t, _ in promoted[:3]],
        }
        rows.append(summary)
        feature = {**summary, "n_active": int(stats.n_active[j]), "top": examples, "samples": samples,
                   "histogram": _histogram(hist[j]), "promoted": promoted, "suppressed": suppressed}
        (out / "features" / f"{j}.json").write_text(json.dumps(feature, separators=(",", ":")))

    rows.sort(key=lambda r: -r["max_act"])
    index = {
        "sae": str(cfg.sae),
        "hook": sae.cfg.hook_name,
        "model": store.model_name,
        "d_sae": len(density),
        "n_tokens": stats.n_tokens,
        "split": cfg.split,
        "window": [cfg.window_left, cfg.window_right],
        "features": rows,
        "dead": dead,
    }
    write_json(out / "index.json", index)
    return out


def analyse(cfg: AnalyseConfig) -> Path:
    """Stream the cache through the SAE, compute the logit lens, and write the analysis folder; returns its path."""
    from sae.evaluate import load_saes
    from sae.model import final_norm, load_model, pick_device
    from sae.store import ActivationStore

    if len(sae_dirs([cfg.sae])) != 1:
        raise ValueError(f"{cfg.sae} holds several SAEs; analyse one folder at a time: {sae_dirs([cfg.sae])}")
    store = ActivationStore(cfg.cache)
    device = pick_device(cfg.device)
    (sae,) = load_saes([cfg.sae], device).values()
    model, tokenizer = load_model(store.model_name, str(device))
    lens = logit_lens(sae.W_dec, final_norm(model), model.get_output_embeddings().weight, cfg.logit_tokens)
    stats = stream_features(store, sae, cfg)
    return write_analysis(stats, sae, store, tokenizer, lens, cfg)
