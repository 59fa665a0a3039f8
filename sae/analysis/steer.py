"""Generate text with SAE features turned up or pinned, next to the plain generation from the same prompt and seed.

Two interventions, both applied at the SAE's hook at every position of the prompt and of the generated text:

* ``add``: x + α·d_j, the feature's decoder direction d_j scaled by α (activation addition, Turner et al. 2023,
  "Activation Addition: Steering Language Models Without Optimization"; with SAE features as the directions,
  Templeton et al. 2024, "Scaling Monosemanticity", §"Feature steering").
* ``clamp``: encode, set the feature's activation to a value, decode, and add back the SAE's own error x − x̂, so that
  nothing but that feature changes (Templeton et al. 2024 clamp features the same way, error term included).

Both are in the feature's own units: α = 1 moves the activation by as much as the feature firing at 1.0 would, and
a clamp value reads like the activations the feature browser lists. Positions before ``exclude_first`` are left as
they are: the harvest drops them (the BOS and the next token carry "massive activations" the SAE never saw).
"""

from __future__ import annotations

import itertools
import math
import textwrap
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sae.config import UserError
from sae.analysis.evaluate import DEMO_SAE
from sae.analysis.splice import FeatureEdit, check_first, check_fits, spliced

MODES = ("add", "clamp")


class SteerError(UserError):
    """A steering request that cannot run (unknown feature, mode, or generation length); the message says why."""


@dataclass
class SteerConfig:
    prompt: str
    """Text the model continues (the CLI passes it as prompt=...); a BOS token is put first, as in the cache."""
    features: dict[int, float]
    """{feature id: value}: α for mode add, the activation to pin for mode clamp, e.g. features="{123: 40}"."""
    sae: str = DEMO_SAE
    """One SAE folder (default: the demo's TopK SAE), hub id (owner/name/folder) or SAELens release/sae_id."""
    mode: str = "add"
    """"add" (x + α·decoder direction) or "clamp" (set the feature's activation, keep the SAE's error)."""
    model: str = ""
    """The model to steer; empty: the model the SAE was trained on (its cfg.json's model_name)."""
    max_new_tokens: int = 30
    """Tokens generated after the prompt (fewer if the model ends the text)."""
    temperature: float = 0.0
    """0: greedy; above 0: sampling from softmax(logits / temperature), seeded, the same seed for both texts."""
    seed: int = 0
    """Sampling seed; the plain and the steered generation use the same one."""
    exclude_first: int = 2
    """Leading positions left unsteered: harvest's exclude_first default, the positions the SAE never saw."""
    device: str = "auto"
    """"auto" (CUDA when present), "cpu", "cuda", ..."""


def check_features(features: dict[Any, Any], d_sae: int) -> dict[int, float]:
    """{id: value} with int ids inside the SAE and finite float values; anything else is a one-line error."""
    if not features:
        raise SteerError("name at least one feature: features=\"{123: 40}\" (feature id: α or clamp value)")
    out = {}
    for key, value in features.items():
        if isinstance(key, bool) or not isinstance(key, int):
            raise SteerError(f"feature id {key!r} is not an integer; features maps ids to values, e.g. {{123: 40}}")
        if not 0 <= key < d_sae:
            raise SteerError(f"feature {key} does not exist: this SAE has {d_sae} features (ids 0..{d_sae - 1})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SteerError(f"feature {key}'s value {value!r} is not a finite number")
        out[key] = float(value)
    return out


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise SteerError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")


def check_generation(max_new_tokens: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise SteerError(f"max_new_tokens={max_new_tokens} must be at least 1")
    if not temperature >= 0:
        raise SteerError(f"temperature={temperature} must be ≥ 0 (0: greedy)")


def feature_edit(features: dict[int, float], mode: str) -> FeatureEdit:
    """The edit of the dense features that `mode` means: add each value, or set each feature to it."""
    check_mode(mode)
    ids = torch.tensor(list(features))
    values = torch.tensor(list(features.values()))

    def edit(f: Tensor) -> Tensor:
        out = f.clone()
        v, j = values.to(f), ids.to(f.device)
        if mode == "add":
            out[..., j] += v
        else:
            out[..., j] = v
        return out

    return edit


def steering(model: nn.Module, sae: nn.Module, features: dict[int, float], mode: str = "add",
             first: int = 0) -> AbstractContextManager[None]:
    """While open, the model runs with the features steered (positions from `first` on; one `with` per sequence).
    The request is checked now, not when the context opens."""
    check_fits(model, sae)
    return spliced(model, sae, feature_edit(check_features(features, sae.cfg.d_sae), mode), first=first)


class _FiniteGuard:
    """While open, stops generation with a `SteerError` once the numbers overflow: a NaN/inf logit, or a final
    residual stream whose mean square is not finite (the final norm then scales it to 0 and every logit is 0). Greedy
    decoding or sampling would otherwise pick an arbitrary token — often a special one that decodes to nothing — and
    the empty or garbled text would be printed as the answer. Also a logits processor for `generate`."""

    def __init__(self, model: nn.Module, n_prompt: int, steered: bool):
        self.model, self.n_prompt, self.steered, self.handle = model, n_prompt, steered, None

    def fail(self, generated: int) -> None:
        why = (" with the features steered: the steering value(s) overflow this model's activations; use smaller ones"
               if self.steered else "; the model itself overflows on this prompt")
        raise SteerError(f"the model's activations or logits overflowed to NaN/inf at generated token {generated}{why}")

    def __enter__(self) -> _FiniteGuard:
        from sae.data.model import final_norm

        def check(module: nn.Module, args: tuple) -> None:
            self.calls += 1  # one forward per generated token (the first runs the prompt)
            if not torch.isfinite(args[0].float().pow(2).mean(-1)).all():
                self.fail(self.calls)

        self.calls = 0
        self.handle = final_norm(self.model).register_forward_pre_hook(check)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if not torch.isfinite(scores).all():
            self.fail(input_ids.shape[-1] - self.n_prompt + 1)
        return scores


@torch.no_grad()
def generate(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
             splice: AbstractContextManager[None] | None = None, eos_token_id: int | None = None) -> list[int]:
    """Continue `ids` by up to `max_new_tokens` tokens, greedy or sampled (all of softmax(logits / temperature), seeded
    without touching the caller's random state), inside `splice` (a `steering(...)` context, or none).

    Hugging Face's `generate` runs the prompt once and then one token per call (KV cache), which is how the splice
    counts positions."""
    from transformers import GenerationConfig, LogitsProcessorList

    check_generation(max_new_tokens, temperature)
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                              **sampling)
    prompt = torch.tensor([ids], device=device)
    guard = _FiniteGuard(model, len(ids), steered=splice is not None)
    with splice or nullcontext(), guard, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                             logits_processor=LogitsProcessorList([guard]))
    return out[0, len(ids):].tolist()


@dataclass
class Steered:
    """A prompt's plain and steered continuations, from the same seed."""

    prompt: str
    plain: str
    steered: str
    features: dict[int, float]
    mode: str

    def __str__(self) -> str:
        return format_steered(self)


def steer(model: nn.Module, tokenizer, sae: nn.Module, prompt: str, features: dict[int, float], mode: str = "add",
          max_new_tokens: int = 30, temperature: float = 0.0, seed: int = 0, exclude_first: int = 2) -> Steered:
    """Generate from `prompt` plainly and with `features` steered (see the module docstring for the modes)."""
    from sae.data.text import bos_token
    from sae.data.model import prompt_ids

    features = check_features(features, sae.cfg.d_sae)
    context = steering(model, sae, features, mode, first=exclude_first)  # checks the request before any generation
    ids = prompt_ids(tokenizer, prompt, bos_token(tokenizer))
    texts = [
        tokenizer.decode(generate(model, ids, max_new_tokens, temperature, seed, splice, tokenizer.eos_token_id),
                         skip_special_tokens=True)
        for splice in (None, context)
    ]
    return Steered(prompt, texts[0], texts[1], features, mode)


def run(cfg: SteerConfig) -> Steered:
    """Load the SAE and its model, and steer (`sae steer`)."""
    from sae.analysis.evaluate import load_model_of, load_sae
    from sae.data.model import pick_device

    device = pick_device(cfg.device)
    _, sae = load_sae(cfg.sae, device)
    check_features(cfg.features, sae.cfg.d_sae)  # the request first: the model takes longer to load
    check_mode(cfg.mode)
    check_generation(cfg.max_new_tokens, cfg.temperature)
    check_first(cfg.exclude_first)
    model, tokenizer = load_model_of(sae, cfg.model, device)
    return steer(model, tokenizer, sae, cfg.prompt, cfg.features, cfg.mode, cfg.max_new_tokens, cfg.temperature,
                 cfg.seed, cfg.exclude_first)


def format_steered(result: Steered, width: int = 80) -> str:
    """The prompt, then the plain and the steered continuation in two columns of a `width`-wide terminal."""
    column = (width - 3) // 2
    sign = "+" if result.mode == "add" else "="
    label = ", ".join(f"#{j} {sign}{v:g}" for j, v in result.features.items())

    def lines(text: str) -> list[str]:
        return [part for line in text.splitlines() or [""] for part in (textwrap.wrap(line, column) or [""])]

    rows = [f"prompt: {result.prompt!r}", "", f"{'plain':<{column}} | steered ({result.mode} {label})"[:width],
            f"{'-' * column}-+-{'-' * column}"]
    rows += [f"{a:<{column}} | {b}" for a, b in itertools.zip_longest(lines(result.plain), lines(result.steered),
                                                                        fillvalue="")]
    return "\n".join(rows)
