"""Which SAE features drove a next-token prediction: each feature's activation × gradient of the target's logit.

The SAE is spliced in at its hook with its error kept (`sae.analysis.splice`), so the model computes what it computes without
it, and the activation at each position t is decomposed as x_t = Σ_j f_tj·d_j + b + e_t (features, decoder bias, SAE
error). The attribution of feature j is Σ_t f_tj·∂logit/∂f_tj: the first-order estimate of how much the target's
logit drops when the feature is zero-ablated at every position (attribution patching, Nanda 2023; Syed et al. 2023;
with SAE features and the error as nodes, Marks et al. 2024, "Sparse Feature Circuits", §2). Where the model is linear
after the hook the estimate is exact; elsewhere it is the linear term of the ablation's effect, at the cost of one
forward and one backward pass for all features at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sae.config import UserError
from sae.analysis.evaluate import DEMO_SAE

class AttributionError(UserError):
    """An attribution request that cannot run (a target that is not one token, ...); the message says why."""


@dataclass
class AttributeConfig:
    prompt: str
    """Text whose next-token prediction is explained (the CLI passes it as prompt=...); a BOS is put first."""
    target: str = ""
    """The next token whose logit is attributed, as text (e.g. target=" Paris"); empty: the model's top prediction."""
    sae: str = DEMO_SAE
    """One SAE folder (default: the demo's TopK SAE), hub id (owner/name/folder) or SAELens release/sae_id."""
    model: str = ""
    """The model; empty: the model the SAE was trained on (its cfg.json's model_name)."""
    analysis: str = f"runs/demo/analysis/{Path(DEMO_SAE).name}"
    """The SAE's `sae analyse` folder: its explanations.json (from `sae explain`) is shown when there is one (one
    written for another SAE is refused); empty: no explanations."""
    n_features: int = 10
    """Features listed for, and against, the target."""
    logit_tokens: int = 5
    """Tokens shown per feature: the ones its decoder direction promotes most (logit lens)."""
    exclude_first: int = 2
    """Leading positions left without the SAE (and unattributed): the positions the cache dropped, which it never saw."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""


@dataclass
class Attribution:
    """Attributions of one target logit, per position and feature; positions before `first` are zero."""

    target: int
    """Vocabulary id of the attributed token."""
    logit: float
    """Its logit at the last position (the model with the SAE spliced in and its error kept: the clean logit)."""
    probability: float
    """Its next-token probability."""
    activations: Tensor
    """[T, d_sae] feature activations at the hook."""
    per_position: Tensor
    """[T, d_sae] f_tj · ∂logit/∂f_tj."""
    error: float
    """Σ_t e_t · ∂logit/∂x_t: the SAE error's share."""
    bias: float
    """Σ_t b · ∂logit/∂x_t: the decoder bias's share."""

    @property
    def features(self) -> Tensor:
        """[d_sae] each feature's attribution summed over positions."""
        return self.per_position.sum(0)


def attribute_logit(model: nn.Module, sae: nn.Module, ids: list[int], target: int | None = None,
                    first: int = 0) -> Attribution:
    """Activation × gradient of the `target` logit after `ids` (None: the model's top prediction) for every feature of
    `sae` at every position ≥ first. One forward and one backward pass; the model's parameters collect no gradient."""
    from sae.data.model import hooks
    from sae.analysis.splice import check_fits, keep_first, splice_fn

    if sae.cfg.is_transcoder:
        raise AttributionError("sae attribute reads SAEs, not transcoders (attributing a transcoder's features is not "
                        "supported yet): pass an SAE")
    check_fits(model, sae)
    device = next(model.parameters()).device
    kept: dict[str, Tensor] = {}

    def edit(f: Tensor) -> Tensor:
        kept["f"] = f.detach().requires_grad_(True)
        return kept["f"]

    fn = splice_fn(sae, edit)
    splice = keep_first(first, lambda a: fn(a, a))

    def hook(a: Tensor) -> Tensor:
        kept["x"], kept["out"] = a.detach(), splice(a)
        return kept["out"]

    with torch.enable_grad(), hooks(model, {sae.cfg.hook_name: hook}):
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        target = int(logits.argmax()) if target is None else target
        grad_f, grad_out = torch.autograd.grad(logits[target], [kept["f"], kept["out"]], materialize_grads=True)
    f, g, x = kept["f"].detach()[0], grad_out[0].to(sae.W_dec.dtype), kept["x"][0].to(sae.W_dec.dtype)
    with torch.no_grad():
        spliced_at = (torch.arange(len(f), device=f.device) >= first)[:, None]
        bias = sae.decode(torch.zeros_like(f[:1]))  # what the decoder adds with no feature active
        error = (x - sae.decode(f)) * spliced_at
        return Attribution(target=target, logit=float(logits[target]),
                           probability=float(logits.float().softmax(-1)[target]), activations=f,
                           per_position=f * grad_f[0], error=float((error * g).sum()),
                           bias=float((bias * g * spliced_at).sum()))


def explanations_of(analysis: str | Path, sae: str | Path | None = None) -> dict[int, str]:
    """{feature id: explanation} from an analysis folder's explanations.json (`sae explain`), or {} without one (or
    with `analysis` empty). With `sae` (the SAE being attributed), explanations that `sae explain` wrote for another
    SAE are refused: they would label these features with another dictionary's meanings."""
    from sae.analysis.explain import read_explanations
    from sae.saes.pretrained import is_local

    if not str(analysis):
        return {}
    path = Path(analysis) / "explanations.json"
    try:
        saved = read_explanations(analysis) or {}
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AttributionError(f"{path} is not valid JSON ({err}); run `sae explain` again, or pass analysis= (empty) "
                               "to show no explanations") from err

    def same(name: str | Path) -> str:
        return str(Path(name).expanduser().resolve()) if is_local(str(name)) else str(name).rstrip("/")

    if sae is not None and saved.get("sae") and same(saved["sae"]) != same(sae):
        raise AttributionError(f"{path} explains the features of {saved['sae']}, not of {sae}; pass analysis=<the "
                               "`sae analyse` folder of this SAE>, or analysis= (empty) to show no explanations")
    return {int(j): f["explanation"] for j, f in saved.get("features", {}).items() if f.get("explanation")}


@dataclass
class FeatureRow:
    feature: int
    attribution: float
    activation: float
    """Its largest activation on the prompt, at the positions the SAE is spliced into (from exclude_first on)."""
    token: str
    """The prompt token where it contributes most."""
    top_tokens: list[str]
    explanation: str | None


@dataclass
class AttributionReport:
    prompt: str
    hook: str
    target: str
    logit: float
    probability: float
    features_total: float
    error: float
    bias: float
    n_active: int
    supporting: list[FeatureRow]
    opposing: list[FeatureRow]

    def __str__(self) -> str:
        return format_report(self)


def report(model: nn.Module, tokenizer, sae: nn.Module, prompt: str, target: str = "", n_features: int = 10,
           logit_tokens: int = 5, exclude_first: int = 2, explanations: dict[int, str] | None = None
           ) -> AttributionReport:
    """Attribute the target's logit after `prompt` and describe the features most for and against it."""
    from sae.analysis.analyse import logit_lens
    from sae.data.text import bos_token
    from sae.data.model import final_norm, prompt_ids

    if n_features < 1 or logit_tokens < 1:
        raise AttributionError(f"n_features={n_features} and logit_tokens={logit_tokens} must both be at least 1")
    ids = prompt_ids(tokenizer, prompt, bos_token(tokenizer))
    if len(ids) <= exclude_first:
        raise AttributionError(f"the prompt has {len(ids)} tokens with the BOS, all before exclude_first={exclude_first}, "
                              "so no position carries the SAE; give a longer prompt")
    result = attribute_logit(model, sae, ids, target_token(tokenizer, target) if target else None, exclude_first)
    totals = result.features
    tokens = [tokenizer.decode([i]) for i in ids]
    explanations = explanations or {}

    def rows(order: Tensor, sign: int) -> list[FeatureRow]:
        chosen = [int(j) for j in order[:n_features] if totals[j] * sign > 0]  # a side lists only its own sign
        if not chosen:
            return []
        lens = logit_lens(sae.W_dec[chosen], final_norm(model), model.get_output_embeddings().weight, logit_tokens)[1]
        return [FeatureRow(j, float(totals[j]), float(result.activations[exclude_first:, j].max()),
                           tokens[int(result.per_position[:, j].abs().argmax())],
                           [tokenizer.decode([int(i)]) for i in lens[n]], explanations.get(j))
                for n, j in enumerate(chosen)]

    return AttributionReport(
        prompt=prompt, hook=sae.cfg.hook_name, target=tokenizer.decode([result.target]), logit=result.logit,
        probability=result.probability, features_total=float(totals.sum()), error=result.error,
        bias=result.bias, n_active=int((result.activations[exclude_first:] > 0).any(0).sum()),
        supporting=rows(totals.argsort(descending=True), 1), opposing=rows(totals.argsort(), -1))


def target_token(tokenizer, text: str) -> int:
    """The vocabulary id of `text`, which must be exactly one token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise AttributionError(f"target {text!r} is {len(ids)} tokens {pieces}, not one; give a single token, e.g. "
                              f"target={pieces[0] if pieces else ' the'!r} (a leading space is part of a token)")
    return ids[0]


def run(cfg: AttributeConfig) -> AttributionReport:
    """Load the SAE and its model, and attribute (`sae attribute`)."""
    from sae.analysis.evaluate import load_model_of, load_sae
    from sae.data.model import pick_device
    from sae.analysis.splice import check_first

    device = pick_device(cfg.device)
    _, sae = load_sae(cfg.sae, device)
    explanations = explanations_of(cfg.analysis, cfg.sae)  # before the model, which takes longer to load
    check_first(cfg.exclude_first)
    model, tokenizer = load_model_of(sae, cfg.model, device)
    return report(model, tokenizer, sae, cfg.prompt, cfg.target, cfg.n_features, cfg.logit_tokens, cfg.exclude_first,
                  explanations)


def format_report(r: AttributionReport) -> str:
    """The target, the split of its logit into features, SAE error and decoder bias, and the features for and against."""
    lines = [
        f"prompt: {r.prompt!r}",
        f"target: {r.target!r}  logit {r.logit:.3f}  p {r.probability:.3f}",
        f"activation × gradient at {r.hook}: features {r.features_total:+.3f} ({r.n_active} active), "
        f"SAE error {r.error:+.3f}, decoder bias {r.bias:+.3f}",
    ]
    for title, group in (("for", r.supporting), ("against", r.opposing)):
        lines += ["", f"features {title} {r.target!r}:", f"  {'feature':>8} {'attr':>8} {'max act':>8}  {'at token':<14} top tokens"]
        for row in group:
            lines.append(f"  {'#' + str(row.feature):>8} {row.attribution:>+8.3f} {row.activation:>8.2f}  "
                         f"{row.token!r:<14} {' '.join(repr(t) for t in row.top_tokens)}")
            if row.explanation:
                lines.append(f"  {'':>8} {row.explanation}")
        if not group:
            lines.append("  (none)")
    return "\n".join(lines)
