"""One SAE's folder in SAELens 6's layout (``cfg.json`` + ``sae_weights.safetensors``), which is also ours: written
so that ``sae_lens.SAE.load_from_disk`` reads it, and read back from ours or SAELens's own. Config fields travel as
plain dicts, so this module needs no SAE class (``sae.saes.base`` builds the config and the model from them);
sparsify's layout is read in ``sae.saes.pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor

from sae.data.store import atomic_folder
from sae.saes.pretrained import CFG_FILENAME, WEIGHTS_FILENAME, SAEFormatError

TRANSCODER_LAYOUTS = ["jumprelu_skip_transcoder", "jumprelu_transcoder", "skip_transcoder", "transcoder"]
"""SAELens's transcoder architectures, which load as our relu_l1 / jumprelu with ``hook_name_out`` set."""

# SAELens 6 decides how to parse cfg.json from metadata.sae_lens_version: anything older
# than 6.0 goes through its legacy-key conversion. We write the 6.x layout, so we say so.
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_architecture(name: str, transcoder: bool, skip: bool) -> str:
    """SAELens's architecture label for a variant whose SAE class SAELens calls `name`: its transcoder classes for
    ReLU and JumpReLU (BatchTopK saves as JumpReLU). SAELens has no TopK transcoder; its TopK SAE computes the same
    output when d_out = d_in and there is no skip (b_dec is not subtracted from a transcoder's input), so that is what
    a TopK transcoder is saved as."""
    if not transcoder or name == "topk":
        return name
    return {"standard": "", "jumprelu": "jumprelu_"}[name] + ("skip_transcoder" if skip else "transcoder")


def saelens_cfg_json(fields: dict[str, Any], architecture: str, fitted_scale: float,
                     fitted_scale_out: float | None) -> dict[str, Any]:
    """SAELens 6's cfg.json for an SAE with config `fields` (``SAEConfig`` as a dict, scales already folded) saved
    under `architecture`; our own config rides along in ``metadata.sae_config``."""
    cfg_json: dict[str, Any] = {
        "architecture": architecture,
        "d_in": fields["d_in"],
        "d_sae": fields["d_sae"],
        "dtype": fields["dtype"],
        "device": "cpu",
        "apply_b_dec_to_input": fields["apply_b_dec_to_input"],
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "hook_name": fields["hook_name"],
            "model_name": fields["model_name"],
            "fitted_scale": fitted_scale,
            "sae_config": fields,
        },
    }
    if fields["hook_name_out"] is not None:
        cfg_json["d_out"] = fields["d_out"]
        cfg_json["metadata"].update(hook_name_out=fields["hook_name_out"], fitted_scale_out=fitted_scale_out)
    if architecture == "topk":
        cfg_json["k"] = fields["k"]
    return cfg_json


def write_saelens(path: Path, cfg_json: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write the folder whole or not at all (a crash never pairs new weights with an old cfg), replacing an SAE folder
    already there and refusing any other."""
    _check_replaceable(path)
    with atomic_folder(path) as tmp:
        (tmp / WEIGHTS_FILENAME).write_bytes(save_bytes(tensors))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
    return path


def read_saelens_config(path: Path, by_saelens: dict[str, str]) -> dict[str, Any]:
    """``SAEConfig`` fields from a SAELens-layout cfg.json: ours verbatim from its metadata, else SAELens 6's keys (and
    the pre-6 names SAELens itself still reads: hook_point, activation_fn_str/activation_fn_kwargs for topk).
    `by_saelens` maps SAELens's architecture labels to ours."""
    raw = json.loads((path / CFG_FILENAME).read_text())
    meta = raw.get("metadata") or {}
    if raw.get("normalize_activations") not in (None, False, "none"):
        raise SAEFormatError(
            f"{path}: normalize_activations={raw['normalize_activations']!r} is not "
            "supported; fold the normalisation into the weights first"
        )
    if "sae_config" in meta:
        return meta["sae_config"]
    legacy_k = (raw.get("activation_fn_kwargs") or {}).get("k")
    legacy_topk = (raw.get("activation_fn_str") or raw.get("activation_fn")) == "topk" and legacy_k
    saved = "topk" if legacy_topk else raw.get("architecture", "standard")
    transcoder = saved.endswith("transcoder")  # SAELens's (jumprelu_)(skip_)transcoder
    arch = saved.removesuffix("transcoder").removesuffix("skip_").removesuffix("_") or "standard" if transcoder else saved
    if arch not in by_saelens:
        raise SAEFormatError(f"{path}: unsupported SAELens architecture {saved!r}; supported: "
                             f"{sorted(by_saelens) + TRANSCODER_LAYOUTS}")
    return dict(
        architecture=by_saelens[arch],
        hook_name_out=(meta.get("hook_name_out") or raw.get("hook_name_out") or "") if transcoder else None,
        d_out=raw.get("d_out"),
        skip=saved.endswith("skip_transcoder"),
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        hook_name=meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or "",
        model_name=meta.get("model_name") or raw.get("model_name") or "",
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
        apply_b_dec_to_input=raw.get("apply_b_dec_to_input", not transcoder),
        k=raw.get("k") or legacy_k or 32,
    )


def read_saelens_tensors(path: Path) -> dict[str, Tensor]:
    """The weights of a SAELens-layout folder with what SAELens applies at run time folded in, so our forward matches:
    older SAELens's finetuning ``scaling_factor`` s (latents times s before decoding: W_dec·diag(s)), and TopK's
    ``rescale_acts_by_decoder_norm`` (its training default: top k of pre·‖W_dec‖, decoded as acts/‖W_dec‖), which is
    SAELens's own ``fold_W_dec_norm``: W_enc and b_enc times n, W_dec over n, n the decoder row norms."""
    tensors = load_file(path / WEIGHTS_FILENAME)
    if "scaling_factor" in tensors:
        tensors["W_dec"] = tensors["W_dec"] * tensors["scaling_factor"][:, None]
    if json.loads((path / CFG_FILENAME).read_text()).get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    return tensors


def _check_replaceable(path: Path) -> None:
    """Saving replaces the whole folder, so refuse one that holds anything besides an SAE's own files."""
    if path.exists() and not path.is_dir():
        raise SAEFormatError(f"cannot save an SAE to {path}: it is a file; name a folder")
    others = sorted(p.name for p in path.iterdir() if p.name not in (CFG_FILENAME, WEIGHTS_FILENAME)) if path.is_dir() else []
    if others:
        raise SAEFormatError(f"cannot save an SAE to {path}: saving replaces the folder, and it holds other files "
                             f"({', '.join(others[:5])}); save to a new or empty folder")
