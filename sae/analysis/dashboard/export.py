"""Turn the statistics of one streaming pass (`sae.analysis.analyse.FeatureStats`) into the browser's data files.

Everything is gathered into whole-SAE tensors first and converted to Python lists in one go; the per-feature loop
only slices those lists. That keeps writing ~10k features to a few seconds, where a dict per example built from
tensor indexing took longer than the streaming pass itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from sae.analysis.analyse import HIST_EDGES, INTERVALS, AnalyseConfig, FeatureStats, RunningTopK
from sae.analysis.dashboard import FEATURES_PER_FILE, WINDOW_SCALE, mark_data, write_js


def significant(x: Tensor, digits: int) -> list:
    """`x` rounded to `digits` significant digits, as (nested) Python floats whose repr is short.

    Dividing an integer by an exact power of ten gives the double nearest the decimal, which prints as that decimal.
    """
    x = x.double()
    places = digits - 1 - x.abs().clamp_min(1e-30).log10().floor()
    up = 10.0 ** places.clamp_min(0)
    down = 10.0 ** (-places).clamp_min(0)
    return torch.where(places >= 0, (x * up).round() / up, (x / down).round() * down).tolist()


class Examples:
    """Examples of every feature from one running top-k, as lists ready to slice per feature (see sae.analysis.dashboard)."""

    def __init__(self, kept: RunningTopK, max_act: Tensor, cfg: AnalyseConfig, first_pos: int, context_size: int):
        self.seq, self.pos = kept.seq.tolist(), kept.pos.tolist()
        self.act = significant(kept.act, 4)
        scaled = (kept.window / max_act.clamp_min(1e-30)[:, None, None] * WINDOW_SCALE).nan_to_num(0.0)
        self.window = scaled.round().long().tolist()
        # The window holds positions pos - left .. pos + right; keep those in the cache and in the context.
        self.lo = (first_pos - kept.pos + cfg.window_left).clamp_min(0).tolist()
        self.hi = (context_size - kept.pos + cfg.window_left).clamp_max(kept.window.shape[2]).tolist()

    def rows(self, j: int, slots: list[int], extra: list | None = None) -> list[list]:
        """[seq, pos, act, (extra,) window] of feature j's entries in `slots`."""
        out = []
        for n, i in enumerate(slots):
            head = [self.seq[j][i], self.pos[j][i], self.act[j][i]]
            out.append([*head, *([extra[n]] if extra is not None else []), self.window[j][i][self.lo[j][i] : self.hi[j][i]]])
        return out


def interval_samples(reservoir: RunningTopK, max_act: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Which reservoir entries to show and their interval index: up to `n` per interval, strongest shown first.

    The reservoir is held in random-key order, so its first `n` entries inside an interval are a uniform sample.
    Returns (order [d_sae, R] of reservoir slots by descending activation with the chosen ones first, interval
    [d_sae, R], -1 where not chosen).
    """
    frac = reservoir.act / max_act.clamp_min(1e-30)[:, None]
    held = reservoir.key > -math.inf
    interval = torch.full(frac.shape, -1, dtype=torch.long)
    for i, (lo, hi) in enumerate(INTERVALS):
        inside = held & (frac > lo) & (frac <= hi)
        interval[inside & (inside.cumsum(1) <= n)] = i
    order = torch.where(interval >= 0, reservoir.act, -math.inf).sort(dim=1, descending=True, stable=True).indices
    return order, interval


def write_analysis(
    out: Path, source: Path, stats: FeatureStats, lens: tuple[Tensor, ...], sae, store, tokenizer, cfg: AnalyseConfig
) -> Path:
    """Write the browser data of the SAE loaded from `source` into `out/data`; `lens` has rows for live features only."""
    data = out / "data"
    mark_data(data)
    top, res = stats.top.to("cpu"), stats.reservoir.to("cpu")
    n_active = stats.n_active.cpu()
    live = (n_active > 0).nonzero().squeeze(1)
    max_act = top.act[:, 0]
    n_top = (top.act > 0).sum(1)
    order, interval = interval_samples(res, max_act, cfg.n_interval_samples)
    n_samples = (interval >= 0).sum(1)

    # Contexts of every example written, and the token at each top example (a feature's "fires on" tokens).
    seqs = torch.cat([top.seq[top.act > 0], res.seq[interval >= 0]]).unique()
    table = store.context_tokens(seqs)
    row_of = torch.zeros(store.n_contexts, dtype=torch.long)
    row_of[seqs] = torch.arange(len(seqs))
    hit = table[row_of[top.seq.clamp_min(0)], top.pos.clamp_min(0)].tolist() if len(seqs) else []  # none: all dead

    first_pos, context_size = store.first_pos, store.context_size
    tops = Examples(top, max_act, cfg, first_pos, context_size)
    samples = Examples(res, max_act, cfg, first_pos, context_size)
    order_l, interval_l = order.tolist(), interval.tolist()
    density = significant(n_active / max(stats.n_tokens, 1), 3)
    mean_act = significant(stats.act_sum.cpu() / n_active.clamp_min(1), 4)
    mean_top = significant(top.act.sum(1) / n_top.clamp_min(1), 4)
    max_l, n_active_l, n_top_l, n_samples_l = significant(max_act, 4), n_active.long().tolist(), n_top.tolist(), n_samples.tolist()
    hist = stats.hist.cpu()
    nz = hist > 0
    hist_lo = nz.int().argmax(1).tolist()
    hist_hi = (hist.shape[1] - nz.flip(1).int().argmax(1)).tolist()
    hist_l = hist.long().tolist()
    top_v, top_i, bot_v, bot_i = (significant(t.cpu(), 3) if t.is_floating_point() else t.cpu().tolist() for t in lens)

    rows, chunks = [], {}
    for n, j in enumerate(live.tolist()):
        promoted = [[i, v] for i, v in zip(top_i[n], top_v[n])]
        summary = {
            "id": j, "max_act": max_l[j], "mean_top_act": mean_top[j], "density": density[j], "mean_act": mean_act[j],
            "top_tokens": list(dict.fromkeys(hit[j][: n_top_l[j]]))[:3], "promoted": top_i[n][:3],
        }
        rows.append(summary)
        picked = order_l[j][: n_samples_l[j]]
        chunks.setdefault(j // FEATURES_PER_FILE, {})[j] = {
            **summary, "promoted": promoted, "n_active": n_active_l[j],
            "top": tops.rows(j, list(range(n_top_l[j]))),
            "samples": samples.rows(j, picked, [interval_l[j][i] for i in picked]),
            "histogram": [hist_lo[j], hist_l[j][hist_lo[j] : hist_hi[j]]],
            "suppressed": [[i, v] for i, v in zip(bot_i[n], bot_v[n])],
        }
    for c, features in chunks.items():
        write_js(data / "features" / f"{c}.js", "SAE_CHUNK", features)

    ids = torch.cat([table.flatten(), lens[1].flatten().cpu(), lens[3].flatten().cpu()]).unique().tolist()
    write_js(data / "tokens.js", "SAE_TOKENS", dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))))
    write_js(data / "contexts.js", "SAE_CONTEXTS", dict(zip(seqs.tolist(), table.tolist())))
    rows.sort(key=lambda r: -r["max_act"])
    index = {
        "sae": str(source), "hook": sae.cfg.hook_name, "architecture": sae.cfg.architecture, "model": store.model_name,
        "d_sae": len(n_active), "n_tokens": stats.n_tokens, "split": cfg.split,
        "window": [cfg.window_left, cfg.window_right], "first_pos": first_pos, "context_size": context_size,
        "features_per_file": FEATURES_PER_FILE, "window_scale": WINDOW_SCALE,
        "hist_edges": [round(e, 3) for e in HIST_EDGES.tolist()], "intervals": [list(i) for i in INTERVALS],
        "features": rows, "dead": (n_active == 0).nonzero().squeeze(1).tolist(),
    }
    write_js(data / "index.js", "SAE_INDEX", index)  # last: its presence marks a complete analysis
    return out
