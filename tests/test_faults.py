"""Faults a user meets — bad settings, broken caches, NaN rows, a full disk, no network — driven through the CLI:
each must end in one line on stderr (exit 2) that says what is wrong, and leave nothing half-written behind."""

from __future__ import annotations

import re

import pytest

from sae.cli import main as cli_main


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
