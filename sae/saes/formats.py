"""One SAE's folder in SAELens 6's layout (``cfg.json`` + ``sae_weights.safetensors``), which is also ours: written
so that ``sae_lens.SAE.load_from_disk`` reads it, and read back from ours or SAELens's own. Config fields travel as
plain dicts, so this module needs no SAE class (``sae.saes.base`` builds the config and the model from them);
sparsify's layout is read in ``sae.saes.pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save as save_bytes
from torch import Tensor

from sae.data.store import atomic_folder
from sae.saes.pretrained import CFG_FILENAME, WEIGHTS_FILENAME, SAEFormatError, load_weights, normalisation_problem, read_cfg

TRANSCODER_LAYOUTS = ["jumprelu_skip_transcoder", "jumprelu_transcoder", "skip_transcoder", "transcoder"]
"""SAELens's transcoder architectures, which load as our relu_l1 / jumprelu with ``hook_name_out`` set."""
TOPK_TRANSCODER_LAYOUTS = ["topk_skip_transcoder", "topk_transcoder"]
"""Our labels for the TopK transcoders that no SAELens class computes (see ``saelens_architecture``): SAELens's loader
refuses them as unknown architectures, ours reads them."""

# SAELens 6 decides how to parse cfg.json from metadata.sae_lens_version: anything older
# than 6.0 goes through its legacy-key conversion. We write the 6.x layout, so we say so.
SAELENS_FORMAT_VERSION = "6.0.0"


def per_head_hook(hook_name: str) -> bool:
    """Whether `hook_name` is TransformerLens's attention ``hook_z``, whose activations are [..., n_heads, d_head]: the
    hook SAELens's ``reshape_activations: hook_z`` is for, which we apply to every SAE of it (``SAE.encode``)."""
    return hook_name.endswith("hook_z")


def saelens_architecture(name: str, transcoder: bool, skip: bool, same_width: bool = True) -> str:
    """SAELens's architecture label for a variant whose SAE class SAELens calls `name`: its transcoder classes for
    ReLU and JumpReLU (BatchTopK saves as JumpReLU). SAELens has no TopK transcoder: its TopK SAE computes the same
    output as one without skip whose output is as wide as its input (b_dec is not subtracted from a transcoder's
    input), so that is what such a transcoder is saved as; any other (skip, or d_out ≠ d_in) has no SAELens class
    that computes it, and is saved under our own ``topk_(skip_)transcoder`` label, which SAELens's loader refuses
    by name rather than failing on the weights' shapes."""
    if not transcoder or (name == "topk" and same_width and not skip):
        return name
    return {"standard": "", "jumprelu": "jumprelu_", "topk": "topk_"}[name] + ("skip_transcoder" if skip else "transcoder")


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
        "reshape_activations": "hook_z" if per_head_hook(fields["hook_name"]) else "none",
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
    if architecture.startswith("topk"):
        cfg_json["k"] = fields["k"]
    return cfg_json


def write_saelens(path: Path, cfg_json: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write the folder whole or not at all (a crash never pairs new weights with an old cfg), replacing an SAE folder
    already there and refusing any other."""
    check_replaceable(path)
    with atomic_folder(path) as tmp:
        (tmp / WEIGHTS_FILENAME).write_bytes(save_bytes(tensors))
        (tmp / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2))
    return path


def read_saelens_config(path: Path, labels: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``SAEConfig`` fields, SAELens's own reading of them) of a SAELens-layout folder; `labels` maps our
    architectures to SAELens's labels.

    SAELens's keys come first: they are what SAELens computes with, and what it writes when it re-saves one of our
    folders after a user changed k or the thresholds, while it keeps our own config (``metadata.sae_config``)
    verbatim. Ours fills in what SAELens has no key for (training settings, BatchTopK behind the ``jumprelu``
    label) only when it describes the same SAE: the same label and widths. The second dict is SAELens's reading
    alone, for a folder whose weights the first cannot hold (``SAE.load``)."""
    raw = read_cfg(path)
    where = f"{path / CFG_FILENAME}"
    norm = raw.get("normalize_activations")
    problem = normalisation_problem(norm)
    if problem:
        raise SAEFormatError(f"{where}: normalize_activations={norm!r} {problem}")
    try:
        theirs = _saelens_fields(raw, where, {label: name for name, label in labels.items()})
    except KeyError as err:
        raise SAEFormatError(f"{where} lacks the key {err}, which SAELens's layout needs") from None
    ours = (raw.get("metadata") or {}).get("sae_config")
    if not isinstance(ours, dict) or ours.get("architecture") not in labels:
        return theirs, theirs
    label = saelens_architecture(labels[ours["architecture"]], ours.get("hook_name_out") is not None,
                                 bool(ours.get("skip")), ours.get("d_out") in (None, ours.get("d_in")))
    same = label == raw.get("architecture") and all(ours.get(k) == theirs[k] for k in ("d_in", "d_sae"))
    if not same:
        return theirs, theirs
    # What SAELens keeps a value of: not the label (checked above), not k under a label without one, and not the
    # output hook and width of a TopK transcoder saved under SAELens's TopK SAE label.
    own = {k: v for k, v in theirs.items() if k != "architecture" and v is not None and (k != "k" or "k" in raw)}
    return {**ours, **own}, theirs


def _saelens_fields(raw: dict[str, Any], where: str, by_saelens: dict[str, str]) -> dict[str, Any]:
    """``SAEConfig`` fields from SAELens 6's keys (and the pre-6 names SAELens itself still reads: hook_point,
    activation_fn_str/activation_fn_kwargs for topk, and hook_z reshaping implied by the hook's name)."""
    meta = raw.get("metadata") or {}
    legacy_k = (raw.get("activation_fn_kwargs") or {}).get("k")
    legacy_topk = (raw.get("activation_fn_str") or raw.get("activation_fn")) == "topk" and legacy_k
    saved = "topk" if legacy_topk else raw.get("architecture", "standard")
    transcoder = saved.endswith("transcoder")  # SAELens's (jumprelu_)(skip_)transcoder, our topk_(skip_)transcoder
    arch = saved.removesuffix("transcoder").removesuffix("skip_").removesuffix("_") or "standard" if transcoder else saved
    if arch not in by_saelens:
        raise SAEFormatError(f"{where}: unsupported SAELens architecture {saved!r}; supported: "
                             f"{sorted(by_saelens) + TRANSCODER_LAYOUTS + TOPK_TRANSCODER_LAYOUTS}")
    hook_name = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point") or ""
    reshape = raw.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z") or (reshape == "hook_z" and not per_head_hook(hook_name)):
        raise SAEFormatError(f"{where}: reshape_activations={reshape!r} is not SAELens's 'none', or 'hook_z' on a "
                             f"hook_z hook (its hook is {hook_name!r}); SAELens refuses it too")
    return dict(
        architecture=by_saelens[arch],
        hook_name_out=(meta.get("hook_name_out") or raw.get("hook_name_out") or "") if transcoder else None,
        d_out=raw.get("d_out"),
        skip=saved.endswith("skip_transcoder"),
        d_in=raw["d_in"],
        d_sae=raw["d_sae"],
        hook_name=hook_name,
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
    tensors = load_weights(path / WEIGHTS_FILENAME)
    if "scaling_factor" in tensors:
        tensors["W_dec"] = tensors["W_dec"] * tensors["scaling_factor"][:, None]
    if read_cfg(path).get("rescale_acts_by_decoder_norm"):
        norms = tensors["W_dec"].norm(dim=1)
        tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
        tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
    return tensors


def check_replaceable(path: Path) -> None:
    """Saving replaces the whole folder, so refuse one that holds anything besides an SAE's own files, or a cfg.json
    that is not an SAE's settings (a user's own file of that name; `sae train` checks its folders before any work)."""
    if path.exists() and not path.is_dir():
        raise SAEFormatError(f"cannot save an SAE to {path}: it is a file; name a folder")
    others = sorted(p.name for p in path.iterdir() if p.name not in (CFG_FILENAME, WEIGHTS_FILENAME)) if path.is_dir() else []
    if (path / CFG_FILENAME).is_file():
        try:
            an_sae = {"d_in", "d_sae"} <= set(read_cfg(path))
        except SAEFormatError:
            an_sae = False
        others += [] if an_sae else [f"a {CFG_FILENAME} that is not an SAE's"]
    if others:
        raise SAEFormatError(f"cannot save an SAE to {path}: saving replaces the folder, and it holds other files "
                             f"({', '.join(others[:5])}); save to a new or empty folder")
