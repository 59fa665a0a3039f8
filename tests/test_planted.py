"""`sae planted`: the generator has the properties it promises, and the SAEs trained at their defaults through the
normal train path recover the planted dictionary (TopK fully; see RECOVERY_FLOOR for the others)."""

from __future__ import annotations

import json

import pytest
import torch

from sae.cli import main
from sae.planted import PlantedConfig


def test_planted_data_has_the_hard_properties():
    """Offset, power-law frequencies, co-occurring groups and noise, measured on a sample against the settings."""
    cfg = PlantedConfig(d_in=32, n_features=64, l0=3.0, frequency_exponent=1.0, correlation=0.6, group_size=4,
                        offset=5.0, noise=0.05, seed=3)
    data = cfg.data()
    g = torch.Generator().manual_seed(0)
    codes = data.codes(100_000, g)
    on = (codes > 0).float()
    assert torch.allclose(on.mean(0), data.frequency, atol=0.01)  # each feature keeps its own frequency
    assert on.sum(1).mean() == pytest.approx(3.0, rel=0.03)  # mean L0
    ranked = data.frequency.sort(descending=True).values
    assert ranked[0] / ranked[9] == pytest.approx(10.0, rel=1e-4)  # p ∝ rank^-1
    # Features of one group co-occur: P(both) / (P(a)·P(b)) well above 1 within a group, ≈ 1 across groups.
    lift = (on.T @ on / len(on)) / torch.outer(on.mean(0), on.mean(0)).clamp_min(1e-9)
    same = torch.arange(64)[:, None] // 4 == torch.arange(64)[None, :] // 4
    off_diag = ~torch.eye(64, dtype=torch.bool)
    assert lift[same & off_diag].median() > 2 and lift[~same].median() == pytest.approx(1.0, abs=0.2)
    assert (codes[codes > 0].mean()) == pytest.approx(1.0, rel=0.03)  # log-normal magnitudes of mean 1
    x = data.sample(50_000, g)
    centred = x - x.mean(0)
    spread = centred.pow(2).sum(-1).mean().sqrt()
    assert x.mean(0).norm() / spread == pytest.approx(5.0, rel=0.05)
    noise_energy = data.noise_std**2 * 32
    assert noise_energy / (spread**2 - noise_energy) == pytest.approx(0.05, rel=0.1)


def test_planted_settings_out_of_range_are_one_line_at_the_cli(tmp_path, capsys):
    assert main(["planted", f"out={tmp_path / 'p'}", "correlation=1.5", "tokens=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "correlation=1.5 must be in [0, 1)" in err and "tokens=0 must be > 0" in err
    assert not (tmp_path / "p").exists()


MODELS = ("topk", "batchtopk", "jumprelu", "relu_l1", "reference")
RECOVERY_FLOOR = {name: 0.95 for name in MODELS}
"""Mean max cosine each model must reach at defaults (issue 9). Measured at 400k tokens: TopK 0.976, BatchTopK 0.958
(with the TopK warm-up), JumpReLU 0.964, ReLU+L1 0.979 (centred, b_enc at √d_in × the lr), the plain reference loop
0.988; seeds 1 and 2 give ≥ 0.957."""


def _by_model(out) -> dict:
    """planted.json's scores keyed by the entry of MODELS each model's name starts with."""
    scores = json.loads((out / "planted.json").read_text())["scores"]
    return {next(k for k in MODELS if s["name"].startswith(k)): s for s in scores}


def test_planted_benchmark_at_defaults(tmp_path, capsys):
    """The hard configuration (offset 4× the spread, power-law frequencies, co-occurring groups, log-normal
    magnitudes, noise), small enough for CI, through `sae planted` → `sae train` at defaults, each SAE given only
    k / target L0 (relu_l1 its default λ)."""
    out = tmp_path / "p"
    args = ["planted", f"out={out}", "d_in=32", "n_features=128", "l0=3", "tokens=400000"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    scores = _by_model(out)
    assert sorted(scores) == sorted(MODELS)
    for name, floor in RECOVERY_FLOOR.items():
        s = scores[name]
        assert s["mean_max_cos"] >= floor, (name, s)
        assert f"{s['mean_max_cos']:.3f}" in printed
    for name in ("topk", "reference"):  # exactly k
        assert scores[name]["l0"] == pytest.approx(3, abs=0.01), scores[name]
    # k on average, through the inference threshold (a running average of the batch-wide threshold)
    assert scores["batchtopk"]["l0"] == pytest.approx(3, abs=0.2), scores["batchtopk"]
    assert scores["jumprelu"]["l0"] == pytest.approx(3, rel=0.5), scores["jumprelu"]  # the target, loosely held
    assert 1 < scores["relu_l1"]["l0"] < 12, scores["relu_l1"]  # alive, and sparse
    for name in ("topk", "reference", "batchtopk", "jumprelu", "relu_l1"):
        assert scores[name]["fvu"] < scores[name]["pca_fvu"], scores[name]  # beats PCA at its own L0
    assert scores["topk"]["recovered"] >= 0.9
    # A second run reuses the cache and the finished training (resume) and gives the same scores.
    assert main(args) == 0
    assert _by_model(out) == scores
