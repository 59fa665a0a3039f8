"""Explain SAE features in words with a language model, and score each explanation by detection, offline.

**Explain** (Bills et al. 2023, "Language models can explain neurons in language models"; EleutherAI's delphi,
Paulo et al. 2024, "Automatically interpreting millions of features in large language models"): an instruct model
reads a feature's top-activating contexts from `sae analyse`, plus a few from its weaker activation intervals (top
examples alone make a feature look narrower than it is), with the tokens where the feature fires marked
`<<like this>>`, and completes "The feature fires on ...". Generation is greedy and batched (left padding).

**Score by detection** (Paulo et al. 2024): the same model is shown the explanation and one held-out context at a time
— half of them contexts where the feature fires (examples the prompt did not show), half windows of the same length
where it is zero on every token (checked by encoding the cache) — and asked whether the feature fires there. Rather
than generating an answer, the log-probabilities of the answer tokens "Yes" and "No" are compared: cheap,
deterministic, and a margin per context. Two scores: balanced accuracy of "Yes > No" (the mean of the hit rate on
activating contexts and the correct-rejection rate on the others; 0.5 is chance) and the AUROC of the margin, which a
small model's bias towards one answer cannot move. Both are reported beside a **baseline**: the same contexts judged
with another explained feature's explanation (a seeded cyclic shift of a shuffled order, so never the feature's own).

Cost is bounded: by default only the features with the largest maximum activation plus a seeded random sample of
the rest are explained; results are saved after every batch, and a run started again skips what is saved.

Output, per analysis folder — the file other tools (the browser, `sae attribute`) read::

    <analysis>/explanations.json     written atomically after every batch; `read_explanations(folder)` loads it
    {
      "format": 1,
      "analysis": sha256 of the data/index.js explained (a changed analysis is refused, not mixed in),
      "sae": the SAE folder analysed, "hook": its hook name,
      "settings": {model, n_explain_top, n_explain_samples, n_score, mark_fraction, negative_contexts,
                   max_new_tokens, seed},
      "features": {"<feature id>": {
          "explanation": what the feature fires on (the completion of "The feature fires on ..."),
          "shown": [[context, position], ...] the examples the prompt showed,
          "score": absent until scored; null if the analysis holds no held-out example to score with; else
                   {"balanced_accuracy", "auroc", "baseline_balanced_accuracy", "baseline_auroc",
                    "baseline_feature", "positive": [[context, position], ...], "negative": [[context, position], ...]}
      }},
      "summary": {"n_explained", "n_scored", "balanced_accuracy", "baseline_balanced_accuracy", "auroc",
                  "baseline_auroc"} (means over the scored features; null when none)
    }
    <analysis>/data/explanations.js  the same object as window.SAE_EXPLANATIONS, for the feature browser

Contexts are cache context indices and positions are token positions within them, as everywhere in `sae.analysis.dashboard`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor
from tqdm import tqdm

from sae.config import HelpSections, UserError
from sae.analysis.dashboard import is_analysis, read_js, write_js
from sae.data.store import atomic_write_json

FORMAT = 1
FILE = "explanations.json"
MARKS = ("<<", ">>")
#: The explainer completes this sentence; the judge is told the whole sentence.
LEAD = "The feature fires on"
#: Settings that change what is written: a saved file made with other values is refused rather than extended.
SETTINGS = ("model", "n_explain_top", "n_explain_samples", "n_score", "mark_fraction", "negative_contexts",
            "max_new_tokens", "seed")


class ExplainError(UserError):
    """An analysis that cannot be explained, or saved explanations that do not match it; the message says what to do."""


@dataclass
class ExplainConfig:
    """The `explain:` section: which analysed features to explain in words with a language model, and how the
    explanations are scored (detection of held-out activating contexts against silent ones)."""

    help_sections: ClassVar[HelpSections] = (
        ("what to explain", ("analysis", "cache", "model", "n_top_features", "n_random_features", "features")),
        ("prompts and scoring", ("n_explain_top", "n_explain_samples", "n_score", "mark_fraction", "negative_contexts",
                                 "max_new_tokens")),
        ("running", ("batch_size", "seed", "overwrite", "device", "dtype")),
    )
    """`--help` groups, most used first (``sae.config.describe``)."""

    analysis: str = "runs/demo/analysis"
    """A `sae analyse` output folder (or a folder of them); explanations.json is written into each."""
    cache: str = "runs/demo/cache"
    """The cache the analysis was made from: non-activating contexts for scoring are checked against it."""
    model: str = "smollm2"
    """Explainer and judge: "smollm2" (embedded), a local folder, a .gguf file or a hub id (an instruct model
    with a chat template answers best; bigger is better, on a GPU)."""
    n_top_features: int = 10
    """Explain the features with the largest maximum activation, this many ..."""
    n_random_features: int = 10
    """... plus this many drawn at random (seeded) from the other live features."""
    features: list[int] = field(default_factory=list)
    """Explain exactly these feature ids instead (e.g. [3, 17])."""
    n_explain_top: int = 10
    """Top-activating examples shown in the prompt (the analysis keeps n_top; the rest are held out for scoring)."""
    n_explain_samples: int = 1
    """Examples shown from each weaker activation interval (the rest are held out for scoring)."""
    n_score: int = 6
    """Held-out activating contexts judged per feature, and as many non-activating ones."""
    mark_fraction: float = 0.1
    """Tokens marked <<like this>> in the prompt: the example's own token and any whose activation is at least this
    fraction of the feature's maximum."""
    negative_contexts: int = 64
    """Non-activating windows are drawn from this many of the analysis's contexts (encoded once with the SAE)."""
    max_new_tokens: int = 32
    """Length limit of an explanation, in tokens."""
    batch_size: int = 8
    """Prompts run through the model at once."""
    seed: int = 0
    """Seeds the random features, the non-activating windows and the baseline pairing."""
    overwrite: bool = False
    """Start over when explanations.json was made with other settings or from another analysis."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""
    dtype: str = "auto"
    """Explainer dtype: "auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16", ..."""

    def __post_init__(self) -> None:
        at_least = {"n_explain_top": 1, "n_score": 1, "negative_contexts": 1, "max_new_tokens": 1, "batch_size": 1,
                    "n_top_features": 0, "n_random_features": 0, "n_explain_samples": 0}
        low = [f"{k}={getattr(self, k)} (at least {n})" for k, n in at_least.items() if getattr(self, k) < n]
        if not 0 <= self.mark_fraction <= 1:
            low.append(f"mark_fraction={self.mark_fraction} (a fraction of the maximum, 0 to 1)")
        if low:
            raise ExplainError(f"explain settings out of range: {', '.join(low)}")


# --------------------------------------------------------------------------------------------- contexts and prompts


def marked_text(tokens: list[str], marked: list[bool]) -> str:
    """The tokens joined, with each run of marked tokens wrapped in one pair of marks: `a<<b c>>d`."""
    out = []
    for on, run in itertools.groupby(zip(tokens, marked), key=lambda t: t[1]):
        text = "".join(t for t, _ in run)
        out.append(f"{MARKS[0]}{text}{MARKS[1]}" if on else text)
    return "".join(out)


@dataclass
class Analysis:
    """What `sae analyse` wrote into one folder, and how to read an example's window from it."""

    folder: Path
    index: dict[str, Any]
    tokens: dict[str, str]
    contexts: dict[str, list[int]]

    @classmethod
    def read(cls, folder: Path) -> Analysis:
        data = folder / "data"
        return cls(folder, read_js(data / "index.js"), read_js(data / "tokens.js"), read_js(data / "contexts.js"))

    def span(self, seq: int, pos: int) -> tuple[int, int]:
        """Cached positions [lo, hi) of the window around (seq, pos): the positions an example's window covers."""
        left, right = self.index["window"]
        return max(self.index["first_pos"], pos - left), min(self.index["context_size"], pos + right + 1)

    def text(self, seq: int, pos: int) -> list[str]:
        lo, hi = self.span(seq, pos)
        return [self.tokens[str(i)] for i in self.contexts[str(seq)][lo:hi]]

    def marked(self, example: list, mark_fraction: float) -> str:
        """An example [seq, pos, act, (interval,) window] as text, its activating tokens marked."""
        seq, pos, window = example[0], example[1], example[-1]
        lo, _ = self.span(seq, pos)
        level = mark_fraction * self.index["window_scale"]
        on = [lo + i == pos or w >= level for i, w in enumerate(window)]
        return marked_text(self.text(seq, pos), on)

    def details(self, ids: list[int]) -> dict[int, dict]:
        """The browser's per-feature data (top examples, samples, ...) of features `ids`."""
        per_file = self.index["features_per_file"]
        out = {}
        for c in sorted({j // per_file for j in ids}):
            chunk = read_js(self.folder / "data" / "features" / f"{c}.js")
            out.update({j: chunk[str(j)] for j in ids if j // per_file == c})
        return out


def split_examples(feature: dict, n_top: int, n_samples: int, n_score: int) -> tuple[list[list], list[list]]:
    """(examples for the prompt, held-out activating examples for scoring), disjoint.

    The prompt gets the first `n_top` top examples and the first `n_samples` of each interval (the analysis lists
    samples strongest first, each a uniform draw within its interval); scoring takes the rest, alternating between the
    remaining top examples and the remaining samples, so it tests the weaker activations as well as the strongest.
    """
    seen: dict[int, int] = {}
    shown_samples, rest_samples = [], []
    for s in feature["samples"]:  # in the analysis's order (strongest first)
        seen[s[3]] = seen.get(s[3], 0) + 1
        (shown_samples if seen[s[3]] <= n_samples else rest_samples).append(s)
    shown = feature["top"][:n_top] + shown_samples
    pairs = itertools.zip_longest(feature["top"][n_top:], rest_samples)
    held = [e for pair in pairs for e in pair if e is not None][:n_score]
    return shown, held


def explain_prompt(examples: list[str]) -> str:
    """The explainer's request: every example with its activating tokens marked."""
    texts = "\n\n".join(f"Text {i + 1}:\n{t}" for i, t in enumerate(examples))
    return (f"A feature of a language model fires on certain tokens. Below are texts where it fires; the tokens where "
            f"it fires are marked {MARKS[0]}like this{MARKS[1]}.\n\n{texts}\n\nIn a short phrase, what does the feature "
            "fire on?")


def judge_prompt(explanation: str, text: str) -> str:
    """The judge's question about one unmarked context."""
    return (f"A feature of a language model fires on {explanation}.\n\nText:\n{text}\n\n"
            "Does the feature fire on any token of this text? Answer Yes or No.")


def first_phrase(completion: str) -> str:
    """The explanation in a completion of `LEAD`: its first line up to the first full stop, the marks the model
    copied from the prompt removed (the judge sees unmarked text)."""
    line = next((line for line in completion.strip().splitlines() if line.strip()), "")
    for mark in MARKS:
        line = line.replace(mark, "")
    return line.split(". ")[0].strip().rstrip(".").strip()


# --------------------------------------------------------------------------------------------- scores


def balanced_accuracy(margins: Tensor, labels: Tensor) -> float | None:
    """Mean of the hit rate on positives and the correct-rejection rate on negatives, answering "yes" when the
    margin is above 0; None without both kinds."""
    pos, neg = margins[labels], margins[~labels]
    if not len(pos) or not len(neg):
        return None
    return 0.5 * (float((pos > 0).float().mean()) + float((neg <= 0).float().mean()))


def auroc(margins: Tensor, labels: Tensor) -> float | None:
    """P(a positive's margin > a negative's), ties counting half: the Mann-Whitney statistic over all pairs."""
    pos, neg = margins[labels], margins[~labels]
    if not len(pos) or not len(neg):
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------- the language model


class Explainer:
    """An instruct model that completes explanations and answers yes/no questions, in batches."""

    def __init__(self, model, tokenizer, batch_size: int, max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.chat = tokenizer.chat_template is not None
        # After a chat template's assistant header the answer starts a line; after "Answer:" it follows a space.
        # Tokens the two answers share (a lone space, in some vocabularies) go into the prompt; the next one decides.
        yes, no = (tokenizer(a if self.chat else f" {a}", add_special_tokens=False)["input_ids"] for a in ("Yes", "No"))
        shared = next(i for i, (a, b) in enumerate(zip([*yes, None], [*no, None])) if a != b)
        if shared >= min(len(yes), len(no)):
            raise ExplainError("the model's tokenizer cannot tell 'Yes' from 'No' by their tokens; pick another model")
        self.answer_lead = tokenizer.decode(yes[:shared])
        self.answers = (yes[shared], no[shared])

    @classmethod
    def load(cls, cfg: ExplainConfig) -> Explainer:
        from sae.data.model import load_model

        model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype, hooked=False)
        return cls(model, tokenizer, cfg.batch_size, cfg.max_new_tokens)

    def prompt(self, user: str, lead: str = "") -> str:
        """`user` as the model expects a request (its chat template, if it has one), then `lead` as the answer's start."""
        if self.chat:
            head = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                      add_generation_prompt=True)
            return head + lead
        bos = self.tokenizer.bos_token or ""
        return f"{bos}{user}\n\nAnswer:{' ' + lead if lead else ''}"

    def _encode(self, prompts: list[str]):
        # The prompt text already holds the special tokens (the template's, or the BOS added above).
        return self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)

    @torch.no_grad()
    def complete(self, prompts: list[str]) -> list[str]:
        """Greedy completions of `prompts`, at most max_new_tokens each."""
        from transformers import GenerationConfig

        eos = self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=eos,
                                  pad_token_id=self.tokenizer.pad_token_id)
        out = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size])
            ids = self.model.generate(**enc, generation_config=config)
            out += self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return out

    def question(self, user: str) -> str:
        """A yes/no question as a prompt for `margins`."""
        return self.prompt(user) + self.answer_lead

    @torch.no_grad()
    def margins(self, prompts: list[str]) -> Tensor:
        """log p("Yes") - log p("No") as the next token after each prompt (made by `question`)."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            enc = self._encode(prompts[start : start + self.batch_size])
            # Left padding shifts each row; positions count real tokens only, as they would unpadded.
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            logits = self.model(**enc, position_ids=positions, use_cache=False, logits_to_keep=1).logits[:, -1]
            logp = logits.float().log_softmax(-1)
            out.append((logp[:, self.answers[0]] - logp[:, self.answers[1]]).cpu())
        return torch.cat(out) if out else torch.zeros(0)


# --------------------------------------------------------------------------------------------- non-activating windows


@torch.no_grad()
def pool_activations(store, sae, feats: list[int], seqs: list[int], batch_rows: int = 4096) -> Tensor:
    """[len(seqs), context_size, len(feats)] activations of features `feats` on every cached position of contexts
    `seqs` (NaN at positions the cache dropped), from one ordered pass that stops after the last of them."""
    hook = sae.cfg.hook_name
    want = torch.tensor(sorted(seqs))
    row = torch.full((store.n_contexts,), -1, dtype=torch.long)
    row[want] = torch.arange(len(want))
    out = torch.full((len(want), store.context_size, len(feats)), math.nan)
    cols = torch.tensor(feats, device=sae.W_dec.device)
    for rows in store.iter_ordered([hook], batch_rows=batch_rows):
        keep = row[rows.seq] >= 0
        if keep.any():
            acts = rows.acts[hook][keep].to(sae.W_dec.device, sae.W_dec.dtype)
            out[row[rows.seq[keep]], rows.pos[keep]] = sae.encode(acts)[:, cols].float().cpu()
        if int(rows.seq.min()) > int(want.max()):
            break
    return out


def silent_windows(acts: Tensor, left: int, right: int, first_pos: int) -> Tensor:
    """[n_ctx, T] True where the window [pos - left, pos + right] of a cached position holds no activation above 0.

    `acts` is one feature's [n_ctx, T] activations (NaN where not cached, which counts as silent: such positions
    are not shown)."""
    active = torch.nan_to_num(acts, nan=0.0) > 0
    counts = torch.nn.functional.pad(active.long().cumsum(1), (1, 0))
    T = acts.shape[1]
    pos = torch.arange(T)
    lo, hi = (pos - left).clamp_min(0), (pos + right + 1).clamp_max(T)
    silent = (counts[:, hi] - counts[:, lo]) == 0
    return silent & (pos >= first_pos)


def pick_silent(silent: Tensor, seqs: list[int], n: int, generator: torch.Generator) -> list[list[int]]:
    """Up to `n` random [seq, pos] places from the True cells of `silent`, from distinct contexts while they last."""
    cells = silent.nonzero()
    cells = cells[torch.randperm(len(cells), generator=generator)]
    first = torch.ones(len(cells), dtype=torch.bool)
    seen: set[int] = set()
    for i, c in enumerate(cells[:, 0].tolist()):
        first[i] = c not in seen
        seen.add(c)
    ordered = torch.cat([cells[first], cells[~first]])[:n]
    return [[seqs[c], p] for c, p in ordered.tolist()]


# --------------------------------------------------------------------------------------------- the run


def read_explanations(analysis: str | Path) -> dict[str, Any] | None:
    """The explanations.json of an analysis folder (format in the module docstring), or None if it has none."""
    path = Path(analysis) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def analysis_folders(root: Path) -> list[Path]:
    if is_analysis(root):
        return [root]
    children = sorted(p for p in root.iterdir() if is_analysis(p)) if root.is_dir() else []
    if not children:
        raise ExplainError(f"{root} holds no analysis (data/index.js): run `sae analyse` first, or pass "
                           "analysis=<its out folder>")
    return children


def select_features(index: dict[str, Any], cfg: ExplainConfig) -> list[int]:
    """The named features, or the top `n_top_features` by maximum activation plus a seeded random sample."""
    live = [f["id"] for f in index["features"]]  # sorted by max activation, largest first
    if cfg.features:
        dead, top = set(index["dead"]), index["d_sae"] - 1
        bad = [j for j in cfg.features if j not in set(live)]
        if bad:
            why = ", ".join(f"{j} ({'dead' if j in dead else f'not in 0..{top}'})" for j in bad)
            raise ExplainError(f"cannot explain feature(s) {why}; name live features, or leave features empty")
        return list(dict.fromkeys(cfg.features))
    top, rest = live[: cfg.n_top_features], live[cfg.n_top_features :]
    g = torch.Generator().manual_seed(cfg.seed)
    sample = [rest[i] for i in torch.randperm(len(rest), generator=g)[: cfg.n_random_features].tolist()]
    return top + sorted(sample)


def baseline_partners(ids: list[int], seed: int) -> dict[int, int]:
    """Each feature's baseline partner: the next one in a seeded shuffle, cyclically (never itself; none if alone)."""
    if len(ids) < 2:
        return {}
    order = [sorted(ids)[i] for i in torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()]
    return {a: b for a, b in zip(order, order[1:] + order[:1])}


def fingerprint(folder: Path) -> str:
    return hashlib.sha256((folder / "data" / "index.js").read_bytes()).hexdigest()


def start_state(folder: Path, analysis: Analysis, cfg: ExplainConfig) -> dict[str, Any]:
    """The saved explanations to continue, or a fresh record; saved ones from other settings are refused."""
    settings = {k: getattr(cfg, k) for k in SETTINGS}
    fresh = {"format": FORMAT, "analysis": fingerprint(folder), "sae": analysis.index["sae"],
             "hook": analysis.index["hook"], "settings": settings, "features": {}}
    try:
        saved = read_explanations(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if cfg.overwrite:  # starts over: what is saved need not even be readable (a write cut off mid-way)
            return fresh
        raise ExplainError(f"{folder / FILE} is not valid JSON ({err}); move it aside, or pass overwrite=true to "
                           "start over") from err
    if saved is None:
        return fresh
    if not isinstance(saved, dict) or not {"format", "features", "settings"} <= set(saved):
        raise ExplainError(f"{folder / FILE} is not one `sae explain` wrote, and explaining would replace it; move it "
                           "aside (nothing was changed)")
    if cfg.overwrite:
        return fresh
    if saved.get("analysis") != fresh["analysis"]:
        raise ExplainError(f"{folder / FILE} explains an earlier analysis (data/index.js has changed since); pass "
                           "overwrite=true to explain this one")
    changed = [f"{k}={saved['settings'].get(k)!r}" for k in SETTINGS if saved["settings"].get(k) != settings[k]]
    if changed:
        raise ExplainError(f"{folder / FILE} was made with {', '.join(changed)}; run with those settings to continue "
                           "it, or pass overwrite=true to start over")
    return saved


def save(folder: Path, state: dict[str, Any]) -> None:
    """explanations.json, then the browser's copy; both atomic, so an interrupted run keeps every finished batch."""
    scores = [f["score"] for f in state["features"].values() if f.get("score")]
    state["summary"] = {
        "n_explained": len(state["features"]), "n_scored": len(scores),
        **{k: mean([s[k] for s in scores]) for k in ("balanced_accuracy", "baseline_balanced_accuracy", "auroc",
                                                     "baseline_auroc")},
    }
    atomic_write_json(folder / FILE, state)
    write_js(folder / "data" / "explanations.js", "SAE_EXPLANATIONS", state)


def restore_browser_copy(folder: Path) -> None:
    """After `sae analyse` rewrote `folder`, put back data/explanations.js (which the new analysis removed with its
    other data files) from explanations.json when that explains this very analysis: same data/index.js, as a rerun
    with the same settings writes. Explanations of another analysis stay out of the browser (their features may be
    others), as `sae explain` refuses to continue them."""
    try:
        saved = read_explanations(folder)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # `sae explain` names the damaged file when it next runs
    if saved is not None and saved.get("analysis") == fingerprint(folder):
        write_js(folder / "data" / "explanations.js", "SAE_EXPLANATIONS", saved)


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def explain_folder(folder: Path, cfg: ExplainConfig, explainer: Callable[[], Explainer]) -> dict[str, Any]:
    """Explain and score the selected features of one analysis folder; returns its explanations.json content."""
    analysis = Analysis.read(folder)
    state = start_state(folder, analysis, cfg)
    done = state["features"]
    ids = select_features(analysis.index, cfg)
    details = analysis.details(ids)
    split = {j: split_examples(details[j], cfg.n_explain_top, cfg.n_explain_samples, cfg.n_score) for j in ids}
    # Non-activating windows first: a wrong cache or a missing SAE should stop the run before any model time is spent.
    unscored = [j for j in ids if "score" not in done.get(str(j), {})]
    negatives = negative_places(analysis, cfg, unscored, {j: len(split[j][1]) for j in unscored}) if unscored else {}

    todo = [j for j in ids if str(j) not in done]
    with tqdm(total=len(todo), desc=f"explain {folder.name}", unit="feature", disable=not todo) as bar:
        for group in batches(todo, cfg.batch_size):
            prompts = [explainer().prompt(explain_prompt([analysis.marked(e, cfg.mark_fraction) for e in split[j][0]]),
                                          LEAD) for j in group]
            for j, completion in zip(group, explainer().complete(prompts)):
                done[str(j)] = {"explanation": first_phrase(completion), "shown": [e[:2] for e in split[j][0]]}
            save(folder, state)
            bar.update(len(group))

    partners = baseline_partners(ids, cfg.seed)
    # One feature's own and baseline judgements (4 x n_score prompts) are batched together; saved per feature.
    for j in tqdm(unscored, desc=f"score {folder.name}", unit="feature", disable=not unscored):
        done[str(j)]["score"] = score_feature(analysis, explainer(), done, j, split[j][1], negatives[j],
                                              partners.get(j))
        save(folder, state)
    save(folder, state)  # the browser's copy, even when everything was already saved
    return state


def negative_places(analysis: Analysis, cfg: ExplainConfig, ids: list[int], counts: dict[int, int]) -> dict[int, list]:
    """Per feature, `counts[j]` windows of the analysis's contexts where feature j is zero on every token."""
    from sae.analysis.evaluate import check_matches, load_saes
    from sae.data.model import pick_device
    from sae.data.store import ActivationStore

    from sae.saes.pretrained import is_local

    sae_name = analysis.index["sae"]  # a folder, or a hub or SAELens name (`sae analyse` takes those too)
    if is_local(sae_name) and not Path(sae_name).expanduser().exists():
        raise ExplainError(f"the SAE this analysis was made from, {sae_name}, is missing (scoring encodes the cache "
                           "with it); run from the folder `sae analyse` ran in")
    store = ActivationStore(cfg.cache)
    ((name, sae),) = load_saes([sae_name], pick_device(cfg.device), single=True).items()
    check_matches(sae, store, name)
    seqs = sorted(int(s) for s in analysis.contexts)[: cfg.negative_contexts]
    if store.context_tokens(torch.tensor(seqs)).tolist() != [analysis.contexts[str(s)] for s in seqs]:
        raise ExplainError(f"the cache {cfg.cache} does not hold the contexts the analysis in {analysis.folder} shows; "
                           "pass cache=<the cache `sae analyse` read>")
    acts = pool_activations(store, sae, ids, seqs)
    left, right = analysis.index["window"]
    out = {}
    for c, j in enumerate(ids):
        silent = silent_windows(acts[:, :, c], left, right, analysis.index["first_pos"])
        out[j] = pick_silent(silent, seqs, counts[j], torch.Generator().manual_seed(cfg.seed * 1_000_003 + j))
    return out


def score_feature(analysis: Analysis, explainer: Explainer, done: dict[str, dict], j: int, positive: list[list],
                  negative: list[list], partner: int | None) -> dict[str, Any] | None:
    """Detection scores of feature j's explanation (and of its partner's, as the baseline) on the same contexts."""
    if not positive or not negative:
        return None
    texts = ["".join(analysis.text(seq, pos)) for seq, pos, *_ in positive + negative]
    labels = torch.tensor([True] * len(positive) + [False] * len(negative))
    judged = [done[str(j)]["explanation"]] + ([done[str(partner)]["explanation"]] if partner is not None else [])
    margins = explainer.margins([explainer.question(judge_prompt(e, t)) for e in judged for t in texts])
    own, base = margins[: len(texts)], margins[len(texts) :]
    return {
        "balanced_accuracy": balanced_accuracy(own, labels), "auroc": auroc(own, labels),
        "baseline_balanced_accuracy": balanced_accuracy(base, labels) if partner is not None else None,
        "baseline_auroc": auroc(base, labels) if partner is not None else None, "baseline_feature": partner,
        "positive": [e[:2] for e in positive], "negative": negative,
    }


def explain(cfg: ExplainConfig) -> list[Path]:
    """Explain and score features of each analysis under `cfg.analysis`; returns the folders written.

    The model loads only when something is left to do, so a finished run started again costs no model time."""
    from sae.data.store import folder_lock

    folders = analysis_folders(Path(cfg.analysis))
    loaded: list[Explainer] = []

    def explainer() -> Explainer:
        if not loaded:
            loaded.append(Explainer.load(cfg))
        return loaded[0]

    with folder_lock(cfg.analysis, "sae explain"):  # the folder `sae analyse` holds while it writes
        for folder in folders:
            explain_folder(folder, cfg, explainer)
    return folders


def format_summary(folder: Path) -> str:
    s = read_explanations(folder)["summary"]
    num = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return (f"{folder}: {s['n_explained']} features explained, {s['n_scored']} scored; detection balanced accuracy "
            f"{num(s['balanced_accuracy'])} (baseline {num(s['baseline_balanced_accuracy'])}), AUROC "
            f"{num(s['auroc'])} (baseline {num(s['baseline_auroc'])})")
