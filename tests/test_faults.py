"""Faults a user meets — bad settings, broken caches, NaN rows, a full disk, no network — driven through the CLI:
each must end in one line on stderr (exit 2) that says what is wrong, and leave nothing half-written behind."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from sae.cli import main as cli_main
from sae.store import ActivationStore, CacheError


def refused(capsys, *argv: str) -> str:
    """Run `sae argv...`; it must exit 2 with exactly one line on stderr, which is returned."""
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"sae {argv[0]}: error: "), err
    return err


# ----- SAE settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("architecture: topk, expansion_factor: 2, k: 0",
     r"SAE topk_k0_x2_\S+: invalid topk SAE settings: k=0 must be between 1 and d_sae=64$"),
    ("architecture: topk, expansion_factor: 2, k: 65", r"k=65 must be between 1 and d_sae=64$"),
    ("architecture: relu_l1, l1_coefficient: -1", r"l1_coefficient=-1.0 must be ≥ 0$"),
    ("architecture: topk, expansion_factor: 0", r"expansion_factor=0 must be > 0"),
    ("architecture: topk, d_sae: 0", r"d_sae=0 must be > 0$"),
])
def test_train_refuses_bad_sae_settings(spec, message, tiny_cache, hook, tmp_path, capsys):
    err = refused(capsys, "train", f"cache={tiny_cache}", f"out={tmp_path / 'saes'}", f"saes=[{{{spec}, hook: {hook}}}]")
    assert re.search(message, err.strip()), err


# ----- a damaged manifest ---------------------------------------------------------------------------------------


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    """A writable copy of the session's tiny cache."""
    return Path(shutil.copytree(tiny_cache, tmp_path / "cache"))


def edit_manifest(cache: Path, edit) -> None:
    file = cache / "manifest.json"
    manifest = json.loads(file.read_text())
    edit(manifest)
    file.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("context_size"), "key 'context_size' is missing"),
    (lambda m: m.update(eval_fraction="0.25"), "'eval_fraction' should be int or float, not '0.25'"),
    (lambda m: m.update(dtype="float8"), "'dtype' 'float8' is not one of float16, bfloat16, float32"),
    (lambda m: m["shards"][1].pop("sha256"), "shards\\[1\\]: key 'sha256' is missing"),
    (lambda m: m["hooks"].update({"blocks.1.hook_resid_post": 48}),
     r"hooks\['blocks.1.hook_resid_post'\] says d_model 48 but shard_00000.safetensors holds blocks.1.hook_resid_post of shape \[\d+, 32\]"),
    (lambda m: m["hooks"].update({"blocks.2.hook_mlp_out": 32}), "hook 'blocks.2.hook_mlp_out' is listed but shard_00000.safetensors holds no such tensor"),
])
def test_damaged_manifest_is_named_on_open(edit, message, cache_copy):
    edit_manifest(cache_copy, edit)
    with pytest.raises(CacheError, match=f"{re.escape(str(cache_copy / 'manifest.json'))} is damaged: {message}; restore it"):
        ActivationStore(cache_copy)


@pytest.mark.parametrize("stage", ["train", "eval", "analyse"])
def test_every_stage_refuses_a_manifest_whose_width_disagrees_with_its_shards(stage, cache_copy, hand_sae, tmp_path, capsys):
    import torch

    hand_sae(torch.eye(32), torch.eye(32)).save(tmp_path / "sae")
    edit_manifest(cache_copy, lambda m: m["hooks"].update({"blocks.1.hook_resid_post": 48}))
    sae_key = {"train": "saes=[{architecture: topk, hook: blocks.1.hook_resid_post, k: 4}]", "eval": f"saes=[{tmp_path / 'sae'}]",
               "analyse": f"sae={tmp_path / 'sae'}"}[stage]
    err = refused(capsys, stage, f"cache={cache_copy}", f"out={tmp_path / 'out'}", sae_key)
    assert f"{cache_copy / 'manifest.json'} is damaged: hooks['blocks.1.hook_resid_post'] says d_model 48" in err
