"""Find SAEs by name: a local folder, a hub repo (or a folder in one), or a SAELens ``release/sae_id``.

Wherever an SAE folder is asked for (``SAE.from_pretrained``, ``sae eval saes=...``, ``sae analyse sae=...``,
``sae score sae=...``) any of these names works:

* a local folder in one of the layouts we read, or a folder of such folders (a sweep, a downloaded repo);
* ``owner/repo`` or ``owner/repo/sub/folder`` on the Hugging Face hub, downloaded with ``snapshot_download``
  (only the named sub-folder's files), e.g. ``EleutherAI/sae-llama-3-8b-32x/layers.10``;
* ``release/sae_id`` of SAELens's pretrained registry when sae-lens is installed, e.g.
  ``gpt2-small-res-jb/blocks.8.hook_resid_pre``, which the registry maps to a hub repo and a folder in it.

Layouts read (see ``layout``): ours and SAELens 6's, ``cfg.json`` + ``sae_weights.safetensors`` (we write that
layout, with our full config under ``metadata.sae_config``); and EleutherAI sparsify's, ``cfg.json`` +
``sae.safetensors`` per hookpoint, converted here by ``read_sparsify``.

This module knows file layouts and names only; ``sae.saes`` builds the models (it imports us, never the reverse).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from typing import Any, Iterable

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sae.config import UserError
from sae.data.text import hub_offline

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
"""Ours and SAELens's weights file."""
SPARSIFY_WEIGHTS_FILENAME = "sae.safetensors"
LAYOUTS = {WEIGHTS_FILENAME: "saelens", SPARSIFY_WEIGHTS_FILENAME: "sparsify"}
ACCEPTED = (f"ours or SAELens's ({CFG_FILENAME} + {WEIGHTS_FILENAME}) or EleutherAI sparsify's "
            f"({CFG_FILENAME} + {SPARSIFY_WEIGHTS_FILENAME})")


class SAEFormatError(UserError):
    """An SAE config or folder this toolkit cannot build, read or find; the message names what is wrong."""


def read_cfg(folder: Path) -> dict[str, Any]:
    """The JSON object in `folder`'s cfg.json; a file that is not one is named with what is wrong, where a bare
    JSONDecodeError would name neither the file nor the folder."""
    path = folder / CFG_FILENAME
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SAEFormatError(f"{path} is not valid JSON ({err}); restore it from where the SAE came from") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{path} holds a JSON {type(raw).__name__}, not the object of an SAE's settings")
    return raw


def load_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt one is named (safetensors' own error names
    neither the file nor what to do)."""
    try:
        return load_file(path)
    except SafetensorError as err:
        raise SAEFormatError(f"{path} is not a readable safetensors file ({err}); restore it from where the SAE "
                             "came from") from None


#: What SAELens does at run time for each ``normalize_activations`` of a cfg.json, when a loaded folder cannot.
_NORMALISATIONS = {
    # SAELens's trainer folds its estimated scale (or whitening) into the weights before the final save and sets
    # "none"; a folder still naming one is a mid-training checkpoint (or an upload whose registry entry holds the
    # factor, see ``_check_registry_scale``), and SAELens's own loader applies nothing at run time for either.
    "expected_average_only_in": None,
    "covariance_whitening": None,
    "constant_norm_rescale": "scales each input to norm √d_in and the output back by the same factor at run time in "
                             "SAELens: a factor per input, which no fixed weights hold, so it cannot be folded; use it "
                             "with sae_lens",
    "layer_norm": "subtracts each input's mean and divides by its standard deviation at run time in SAELens (undone "
                  "on the output): per input, which no fixed weights hold, so it cannot be folded; use it with sae_lens",
}


def normalisation_problem(value: Any) -> str | None:
    """Why a folder with ``normalize_activations: value`` cannot be read as SAELens reads it, or None when it can
    (none, and the values SAELens's loader itself ignores)."""
    if value in (None, False, "none"):
        return None
    if value not in _NORMALISATIONS:
        return f"is not one SAELens knows ({', '.join(['none', *_NORMALISATIONS])})"
    return _NORMALISATIONS[value]


# --------------------------------------------------------------------------------------------- local layouts


def layout(folder: Path) -> str | None:
    """"saelens" (ours included), "sparsify", or None for a folder that is not an SAE in a layout we read."""
    if not (folder / CFG_FILENAME).is_file():
        return None
    return next((name for file, name in LAYOUTS.items() if (folder / file).is_file()), None)


def check_layout(folder: Path) -> str:
    """``layout(folder)``, or one line naming the layouts we read."""
    found = layout(folder)
    if found is None and folder.is_file():
        raise SAEFormatError(f"{folder} is a file; pass the SAE folder that holds it ({folder.parent})")
    if found is None and not folder.is_dir():
        raise SAEFormatError(f"{folder} does not exist; pass an SAE folder (or a folder of them), a hub repo id "
                             "owner/name[/folder] or a SAELens release/sae_id")
    if found is None:
        held = sorted(p.name for p in folder.iterdir())
        what = f"holds {', '.join(held[:6])}{', ...' if len(held) > 6 else ''}" if held else "is empty"
        raise SAEFormatError(f"{folder} is not an SAE folder in a layout we read (it {what}); "
                             f"layouts read: {ACCEPTED}")
    return found


#: sparsify names hookpoints by module path; the hook names of `sae.data.model` (TransformerLens's) for the ones it knows.
_SPARSIFY_HOOKS = (
    (re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$"), "blocks.{}.hook_resid_post"),
    (re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.mlp$"), "blocks.{}.hook_mlp_out"),
    (re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)$"), "blocks.{}.hook_attn_out"),
)


def sparsify_hook(hookpoint: str) -> str:
    """Our hook name of a sparsify hookpoint (its folder name): ``layers.10`` is the output of block 10, i.e.
    ``blocks.10.hook_resid_post`` (as SAELens's sparsify loader reads it too); unknown ones are kept as they are."""
    for pattern, hook in _SPARSIFY_HOOKS:
        match = pattern.search(hookpoint)
        if match:
            return hook.format(match.group(1))
    return hookpoint


def read_sparsify(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A sparsify folder as (SAEConfig fields, tensors in our names).

    sparsify's SparseCoder encodes ``topk(relu(encoder(x − b_dec)), k)`` and decodes ``Σ acts·W_dec[idx] + b_dec``
    (sparsify/sparse_coder.py and fused_encoder.py), with ``encoder.weight`` [d_sae, d_in] and ``W_dec`` [d_sae, d_in].
    ReLU then top-k equals our TopK's top-k then ReLU (the same latents survive, the rest are zero), so it is our
    ``TopKSAE`` with ``W_enc = encoder.weightᵀ`` and b_dec subtracted from the input. What that cannot express is
    refused: a skip connection (x·W_skipᵀ added to the output), a transcoder (it predicts another hookpoint), the
    GroupMax activation, and older sparsify's ``signed`` latents (top-k by |pre-activation|, no ReLU).
    """
    raw = read_cfg(folder)
    where = f"{folder} (sparsify layout)"
    if raw.get("transcode"):
        raise SAEFormatError(f"{where} is a transcoder (transcode: true), not an SAE; load SAEs only")
    if raw.get("signed"):
        raise SAEFormatError(f"{where} has signed latents (top-k by absolute value, no ReLU), which our SAEs do not "
                             "model; use an SAE trained with signed: false")
    if raw.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{where} uses the {raw['activation']!r} activation; only sparsify's topk is supported")
    tensors = load_weights(folder / SPARSIFY_WEIGHTS_FILENAME)
    if raw.get("skip_connection") or "W_skip" in tensors:
        raise SAEFormatError(f"{where} has a skip connection (W_skip), which our SAEs do not model; "
                             "use an SAE trained without skip_connection")
    missing = sorted({"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(tensors))
    if missing:
        raise SAEFormatError(f"{where}: {SPARSIFY_WEIGHTS_FILENAME} lacks {', '.join(missing)}")
    d_sae, d_in = tensors["encoder.weight"].shape
    parent = folder.parent / "config.json"  # sparsify's training config, beside the hookpoint folders
    model = json.loads(parent.read_text()).get("model", "") if parent.is_file() else ""
    cfg = {
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": raw["k"], "apply_b_dec_to_input": True,
        "hook_name": sparsify_hook(folder.name), "model_name": model,
        "dtype": str(tensors["encoder.weight"].dtype).removeprefix("torch."),
    }
    ours = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
            "b_dec": tensors["b_dec"]}
    return cfg, ours


# --------------------------------------------------------------------------------------------- names → folders


def is_local(spec: str | Path) -> bool:
    """A name meant as a local path: a ``Path``, one that exists, an explicit one (./, /, ~), one without a slash, or
    one under a folder that exists here (``runs/demo/saes`` before training is a missing folder, not the hub repo
    ``runs/demo``)."""
    if isinstance(spec, Path):
        return True
    return (spec.startswith((".", "/", "~")) or "/" not in spec or Path(spec.split("/")[0]).expanduser().is_dir()
            or Path(spec).exists())


@cache
def _saelens_registry() -> dict[str, Any]:
    """SAELens's pretrained registry (release → repo_id, conversion, and each sae_id's folder), or {} without sae-lens.

    The registry file is read directly: importing sae_lens to call its own reader costs seconds of imports.
    """
    import yaml

    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(list(spec.submodule_search_locations)[0]) / "pretrained_saes.yaml"
    if not path.is_file():
        return {}
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}


def _release_folder(release: str, sae_id: str) -> str:
    """``repo_id/folder`` of a SAELens registry entry, refusing the releases stored in formats we do not read."""
    entry = _saelens_registry()[release]
    paths = {str(s["id"]): str(s["path"]) for s in entry["saes"]}
    if sae_id not in paths:
        ids = list(paths)
        raise SAEFormatError(f"SAELens release {release!r} has no sae_id {sae_id!r}; it has {len(ids)}, e.g. "
                             f"{', '.join(ids[:3])}")
    if entry.get("conversion_func"):
        raise SAEFormatError(f"SAELens release {release!r} is stored in the {entry['conversion_func']!r} format, which "
                             f"needs SAELens's converter; layouts read: {ACCEPTED} (load it with sae_lens and save it "
                             "with save_model, then pass that folder)")
    # SAELens applies a release's config_overrides over each folder's cfg.json at load time; the one that changes
    # the numbers is an input normalisation, which the folder alone does not show.
    norm = (entry.get("config_overrides") or {}).get("normalize_activations")
    problem = normalisation_problem(norm)
    if problem:
        raise SAEFormatError(f"SAELens release {release!r} sets normalize_activations={norm!r} for its SAEs, which "
                             f"{problem}")
    return f"{entry['repo_id']}/{paths[sae_id]}"


def _download(repo_id: str, patterns: list[str] | None, head: str) -> Path:
    """``snapshot_download`` of a hub repo (only `patterns`), or one line, starting with `head`, saying why not. With
    HF_HUB_OFFLINE set only the local hub cache is read, so an uncached repo fails at once instead of after retries."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=hub_offline()))
    except HFValidationError:
        raise SAEFormatError(f"{head}{repo_id!r} is not a valid hub repo id (owner/name[/folder])") from None
    except RepositoryNotFoundError:
        raise SAEFormatError(f"{head}the hub has no repo {repo_id!r} you can read (misspelt, private or gated?)") from None
    except LocalEntryNotFoundError as err:
        if hub_offline():
            raise SAEFormatError(f"{head}hub repo {repo_id!r} is not in the local cache and HF_HUB_OFFLINE is set; "
                                 "unset HF_HUB_OFFLINE to download it, or pass a local folder") from None
        raise SAEFormatError(f"{head}cannot reach the hub for repo {repo_id!r} and it is not in the local cache "
                             f"({type(err.__cause__ or err).__name__}); check the network, or pass a local folder") from None


def _from_hub(path: str, spec: str, single: bool) -> Path:
    """The local copy of hub `path` = ``owner/repo[/folder]``, which the user's `spec` names: only the folder's files
    are fetched. A whole repo with no SAE at its root is fetched whole (a folder of SAEs), unless `single`: then its
    configs alone show which SAEs it holds."""
    owner, name, *sub = path.split("/")
    repo_id, folder = f"{owner}/{name}", "/".join(sub)
    # A plain hub id might have been meant as a local path (`runs/x/saes` before training): say it is neither.
    head = f"{spec}: " if path != spec else f"{spec}: no such local folder, and "
    if folder:
        # config.json beside the folders is sparsify's run config: it names the model (see read_sparsify).
        local = _download(repo_id, [f"{folder}/*", "config.json"], head) / folder
        if not local.is_dir():
            raise SAEFormatError(f"{head}hub repo {repo_id!r} has no folder {folder!r} (or it is not in the local cache)")
        return _cached_whole(local, repo_id, folder, head)
    root = _download(repo_id, ["*.json"], head)
    if single and not (root / CFG_FILENAME).is_file():
        names = sorted(p.parent.name for p in root.glob(f"*/{CFG_FILENAME}"))
        raise SAEFormatError(f"{spec} holds {len(names)} SAEs ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})"
                             f"; name one, e.g. {spec}/{names[0] if names else '<folder>'}")
    return _cached_whole(_download(repo_id, None, head), repo_id, "", head)


def _cached_whole(local: Path, repo_id: str, folder: str, head: str) -> Path:
    """`local`, unless HF_HUB_OFFLINE is set and the cache holds an SAE's config without its weights: offline,
    snapshot_download returns whatever part of a repo is cached (e.g. only the configs that an earlier name of the
    whole repo fetched to list its SAEs), which would otherwise read as a folder in a layout we do not read."""
    configs = [local / CFG_FILENAME, *local.glob(f"*/{CFG_FILENAME}")]
    partial = [c.parent for c in configs if c.is_file() and layout(c.parent) is None]
    if partial and hub_offline():
        where = "/".join(filter(None, (folder, partial[0].relative_to(local).as_posix().strip(".")))) or "its root"
        raise SAEFormatError(f"{head}the local cache holds hub repo {repo_id!r} only in part ({where} has {CFG_FILENAME} "
                             "but no weights) and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download the rest")
    return local


def resolve(spec: str | Path, sae_id: str | None = None, single: bool = False) -> Path:
    """The local folder a name stands for (see the module doc), downloading it if need be.

    `sae_id` names a SAE of the SAELens release `spec` (the same as ``f"{spec}/{sae_id}"``). The folder returned may
    be one SAE or a folder of SAEs; `single` asks for one SAE, so that a hub repo of many is refused before its
    weights are downloaded. A local folder is returned as it is, existing or not: callers check its layout.
    """
    if is_local(spec) and sae_id is None:
        return Path(spec).expanduser()
    spec = str(spec)
    if sae_id is not None:
        if spec not in _saelens_registry():
            raise SAEFormatError(f"{spec!r} is not a release in SAELens's registry"
                                 f"{'' if _saelens_registry() else ' (sae-lens is not installed)'}")
        return _registry_sae(spec, sae_id, f"{spec}/{sae_id}", single)
    release, _, rest = spec.partition("/")
    if release in _saelens_registry():
        return _registry_sae(release, rest, spec, single)
    return _from_hub(spec, spec, single)


def _registry_sae(release: str, sae_id: str, spec: str, single: bool) -> Path:
    """The local copy of SAE `sae_id` of SAELens release `release` (which the user's `spec` names), refused where
    SAELens's ``from_pretrained`` would scale it: for a folder whose normalize_activations (its own, or the release's
    override) is expected_average_only_in it folds the registry's ``norm_scaling_factor`` into the weights, which
    the folder alone does not show."""
    folder = _from_hub(_release_folder(release, sae_id), spec, single)
    entry = _saelens_registry()[release]
    factor = next((s.get("norm_scaling_factor") for s in entry["saes"] if str(s["id"]) == sae_id), None)
    if factor is None:
        return folder
    overrides = entry.get("config_overrides") or {}
    if overrides.get("normalize_activations", read_cfg(folder).get("normalize_activations")) == "expected_average_only_in":
        raise SAEFormatError(f"{spec}: SAELens's from_pretrained multiplies its inputs by the registry's "
                             f"norm_scaling_factor {factor} (normalize_activations='expected_average_only_in'), which "
                             "the folder does not hold; load it with sae_lens.SAE.from_pretrained and save_model it "
                             "(the factor is then folded in), then pass that folder")
    return folder


def find_sae(spec: str | Path, sae_id: str | None = None) -> tuple[str, Path]:
    """The one SAE `spec` names (with `sae_id`: a SAELens release's SAE) and its name, for a caller that takes one;
    a folder of several is an error naming them (a hub repo of several is refused before it is downloaded)."""
    found = find_saes([spec if sae_id is None else resolve(spec, sae_id, single=True)], single=True)
    if len(found) > 1:
        names = list(found)
        raise SAEFormatError(f"{spec} holds {len(names)} SAEs ({', '.join(names[:5])}); name one, "
                             f"e.g. {Path(spec, names[0])}")
    return next(iter(found.items()))


def find_saes(specs: Iterable[str | Path], single: bool = False) -> dict[str, Path]:
    """Name → local folder of every SAE named, directly or as a folder of SAE folders one level down.

    Names are folder names (a hub or registry name's last part), which must be unique: results are keyed by them.
    `single` (for a caller that takes one SAE) refuses a hub repo of several before its weights are downloaded.
    """
    found: list[tuple[str, Path]] = []
    for spec in specs:
        folder = resolve(spec, single=single)
        if layout(folder):
            found.append((folder.resolve().name if is_local(spec) else Path(spec).name, folder))
            continue
        children = sorted(p for p in folder.iterdir() if layout(p)) if folder.is_dir() else []
        if not children:
            check_layout(folder)  # says what the folder holds and which layouts we read
        found.extend((p.name, p) for p in children)
    names = [n for n, _ in found]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise SAEFormatError(f"several SAE folders share the name(s) {clashes}; results are keyed by folder name, "
                             "so evaluate them separately or rename one")
    return dict(found)
