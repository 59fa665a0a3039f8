"""`sae planted`: the generator has the properties it promises, and the SAEs trained at their defaults through the
normal train path recover the planted dictionary (TopK fully; see RECOVERY_FLOOR for the others)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sae.cli import main
from sae.planted import PlantedConfig, run_planted


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
    assert "tokens=0 must be at least" not in err  # said once
    assert not (tmp_path / "p").exists()
    assert main(["planted", f"out={tmp_path / 'p'}", "tokens=100"]) == 2
    assert "tokens=100 must be at least 256 (one training batch)" in capsys.readouterr().err


def test_planted_changes_its_saes_in_an_existing_out_with_overwrite(tmp_path, capsys):
    """`sae planted` resumes the run in `out`, so other `saes` there were refused with no way but deleting the whole
    folder, cache included (a new user's trial): the refusal now names overwrite=true, which trains the new SAEs in
    the old ones' place and keeps the cache."""
    out = tmp_path / "p"
    base = ["planted", f"out={out}", "d_in=16", "n_features=32", "l0=2", "tokens=2048", "eval_tokens=512"]
    assert main([*base, "saes=[{architecture: topk, k: 2, d_sae: 64}]"]) == 0
    cache_files = sorted(p.stat().st_mtime_ns for p in (out / "cache").iterdir())
    capsys.readouterr()
    assert main([*base, "saes=[{architecture: batchtopk, k: 2, d_sae: 64}]"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.rstrip().endswith("or train these SAEs in its place with `sae planted "
                                                           "overwrite=true`"), err
    assert main([*base, "saes=[{architecture: batchtopk, k: 2, d_sae: 64}]", "overwrite=true"]) == 0
    names = [s["name"] for s in json.loads((out / "planted.json").read_text())["scores"]]
    assert names[0].startswith("batchtopk") and len(names) == 2, names  # the new SAE, then the reference loop
    assert sorted(p.name for p in (out / "saes").iterdir()) == ["batchtopk_k2_d64_planted", "checkpoints"]
    assert sorted(p.stat().st_mtime_ns for p in (out / "cache").iterdir()) == cache_files  # reused, not rewritten


MODELS = ("topk", "batchtopk", "jumprelu", "relu_l1", "reference")
RECOVERY_FLOOR = {"topk": 0.95, "batchtopk": 0.94, "jumprelu": 0.95, "relu_l1": 0.95, "reference": 0.88}
"""Mean max cosine each model must reach at defaults (issue 9). Measured at 400k tokens (1,562 steps of 256 since
``train.MIN_STEPS`` became 4,000; 781 of 512 before): TopK 0.980 (0.977), BatchTopK 0.953 (seed 1: 0.955) since its
hand-over from the TopK warm-up, which shortened its per-row phase for real activations (``sae.saes.BatchTopKSAE``;
0.966 with the abrupt switch, 0.958 before issue 18's d_in-scaled lr), so its floor is 0.94 (a margin for other CPUs'
rounding, as the others have); JumpReLU 0.969 (0.971; 0.964 before its b_enc started at 0), ReLU+L1
0.977 (0.979; centred, b_enc at √d_in × the lr), the plain reference loop 0.931 (0.870 at 781 steps; seeds 1 and 2:
0.890, 0.887) from an initialisation of its own (``sae.planted.REFERENCE_INIT_SEED``; it reached 0.988 while it started
at the dictionary itself); seeds 1 and 2 gave ≥ 0.957 for the SAEs before issue 18."""


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
    assert printed.startswith("planted: 128 true directions in d_in 32 (4 per dimension), 3.00 active per row on "
                              "average"), printed  # what was planted, before the plan
    assert "the SAEs are 256 wide (2 × n_features)" in printed.splitlines()[0]
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
    # the target, held by JumpReLU's L0 controller (2.66–2.71 without it, measured)
    assert scores["jumprelu"]["l0"] == pytest.approx(3, rel=0.05), scores["jumprelu"]
    assert 1 < scores["relu_l1"]["l0"] < 12, scores["relu_l1"]  # alive, and sparse
    for name in ("topk", "reference", "batchtopk", "jumprelu", "relu_l1"):
        assert scores[name]["fvu"] < scores[name]["pca_fvu"], scores[name]  # beats PCA at its own L0
    assert scores["topk"]["recovered"] >= 0.9
    # A second run reuses the cache and the finished training (resume) and gives the same scores.
    assert main(args) == 0
    assert _by_model(out) == scores
    # The planted cache has no model to evaluate or analyse on: said at once (a hub lookup of "planted" retried).
    capsys.readouterr()
    for stage, saes in (("eval", f"saes=[{out / 'saes'}]"), ("analyse", f"sae={out / 'saes'}")):
        assert main([stage, f"cache={out / 'cache'}", saes, f"out={tmp_path / stage}", "device=cpu"]) == 2
        assert capsys.readouterr().err == (f"sae {stage}: error: the cache at {out / 'cache'} was written by `sae "
                                           "planted`: it has no language model or held-out rows to evaluate or "
                                           "analyse on; its SAEs' scores against the true dictionary are in the "
                                           "planted.json beside it\n")


INIT_CEILING = 0.6
"""Mean max cosine a decoder may have with the planted dictionary before training: 2048 random rows in 64
dimensions reach ≈ 0.42 against 1024 random directions; the dictionary itself is 1.0."""


def test_no_model_starts_at_the_planted_dictionary(tmp_path):
    """Every decoder, ours and the reference loop's, starts as a random dictionary, scored after one step of 256
    rows. The reference loop once drew its init from the seed that drew the dictionary, so its first n_features
    rows were the dictionary: 1.0 before training, 0.982 after at this shape and 2M tokens, against 0.687 from an
    independent init (``sae.planted.REFERENCE_INIT_SEED``)."""
    out = tmp_path / "p"
    run_planted(PlantedConfig(out=str(out), d_in=64, n_features=1024, l0=8, tokens=256, eval_tokens=1024))
    scores = _by_model(out)
    assert sorted(scores) == sorted(MODELS)
    for name, s in scores.items():
        assert s["mean_max_cos"] < INIT_CEILING, (name, s)


SUPERPOSITION_TOKENS = 1_024_000
"""2,000 tokens per true feature (``scripts/bench_planted.py``'s budget): 4,000 steps of 256."""
SUPERPOSITION_FLOOR = {"topk": 0.82, "batchtopk": 0.82, "jumprelu": 0.82, "relu_l1": 0.82, "reference": 0.66}
"""Mean max cosine at d_in 32, 512 features, L0 8 (seed 0), measured: TopK 0.857, BatchTopK 0.857, JumpReLU 0.855,
ReLU+L1 0.857, the reference loop 0.713 (at 500 steps of 2048, before ``train.MIN_STEPS`` became 4,000: 0.843, 0.870,
0.860, 0.839 and 0.571). Before TopK's lr was scaled with d_in (``TopKFamily.paper_d_in``), TopK reached 0.696 and
BatchTopK 0.752 here (a run with those lrs given explicitly: 0.851 and 0.868 with the factor); before JumpReLU's b_enc
started at 0 for its TopK warm-up (``JumpReLUSAE``), JumpReLU reached 0.696."""


def test_planted_superposition_at_defaults(tmp_path):
    """The regime where TopK fell behind the reference loop while the CI point passed (issue 18): n_features =
    16·d_in, L0 8, every SAE at its defaults. ReLU+L1 does not beat PCA here (FVU 0.494 against 0.480 at its L0
    10.7), so it is held to its recovery only."""
    out = tmp_path / "p"
    run_planted(PlantedConfig(out=str(out), d_in=32, n_features=512, l0=8, tokens=SUPERPOSITION_TOKENS))
    scores = _by_model(out)
    for name, floor in SUPERPOSITION_FLOOR.items():
        assert scores[name]["mean_max_cos"] >= floor, (name, scores[name])
    for name in ("topk", "batchtopk", "jumprelu", "reference"):
        assert scores[name]["fvu"] < scores[name]["pca_fvu"], (name, scores[name])
    # JumpReLU's target L0 (8.10 measured; 8.26 before λ joined its L0 controller, 7.15 before the controller)
    assert scores["jumprelu"]["l0"] == pytest.approx(8, rel=0.08), scores["jumprelu"]
    for name in ("topk", "batchtopk"):  # well ahead of the plain loop on the same batches (by 0.144 measured)
        assert scores[name]["mean_max_cos"] >= scores["reference"]["mean_max_cos"] + 0.1, scores


@pytest.mark.slow
def test_at_a_quarter_of_d_in_active_the_objective_leaves_the_truth():
    """Why the TopK family stops near 0.90 at d_in 32, 128 features, L0 8 (docs/planted.md): ``scripts/
    planted_from_truth.py`` starts BatchTopK's objective at the true dictionary, and training moves it away (0.946
    after 3,000 steps of 512) to a lower FVU (0.119) than the truth reaches with its decoder held (0.140, the encoder
    trained as long). The frozen run must keep the truth (a freeze that leaked would not)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "planted_from_truth.py"
    done = subprocess.run([sys.executable, str(script), "--points", "32,128,8", "--steps", "3000", "--batch", "512",
                           "--objectives", "batchtopk"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    trained, frozen = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("JSON "))["results"]
    assert not trained["frozen"] and frozen["frozen"]
    assert frozen["mean_max_cos"] > 0.999, frozen
    assert trained["mean_max_cos"] < 0.97 and trained["fvu"] < frozen["fvu"] - 0.01, (trained, frozen)


def test_planted_from_truth_refuses_bad_input_in_one_line():
    """The script answers an empty run or a zero batch with argparse's one-line error, not a traceback."""
    for bad in (["--steps", "0"], ["--batch", "0"], ["--points", "32,128"]):
        _refused_in_one_line("planted_from_truth.py", bad)


def test_loop_budget_script_finds_where_the_loop_stops_gaining():
    """``scripts/planted_loop_budget.py`` (issue 18's budgets "where the reference loop converges"): the loop
    recovers more from 40× the tokens at the CI point, and a budget counts as converged only once doubling it gains
    less than ``CONVERGED_GAIN``; bad multiples are one line."""
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    done = subprocess.run([sys.executable, str(scripts / "planted_loop_budget.py"), "--points", "32,128,3",
                           "--multiples", "0.01", "0.4", "--threads", "1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    (point,) = json.loads(done.stdout.strip().splitlines()[-1].removeprefix("JSON "))["points"]
    short, long = point["runs"]
    assert (short["tokens"], long["tokens"]) == (4_000, 160_000) and short["steps"] < long["steps"], point
    assert long["mean_max_cos"] > short["mean_max_cos"] + 0.1, point
    assert point["converged_multiple"] is None, point  # it gained far more than 0.01 per doubling
    sys.path.insert(0, str(scripts))
    try:
        from planted_loop_budget import CONVERGED_GAIN, converged_multiple
    finally:
        sys.path.remove(str(scripts))
    assert converged_multiple([1, 2, 4, 16], [0.90, 0.93, 0.935, 0.95]) == 2  # +0.005, then +0.0075 per doubling
    assert converged_multiple([1, 4, 8], [0.90, 0.915, 0.94]) is None  # +0.0075 per doubling, then +0.025
    assert converged_multiple([1, 4, 8], [0.90, 0.915, 0.92]) == 1  # gains per doubling, not per step: +0.0075
    assert converged_multiple([1, 4], [0.90, 0.90 + 2.5 * CONVERGED_GAIN]) is None  # 1.25× the gain per doubling
    for bad in (["--multiples", "0"], ["--multiples", "nan"], ["--multiples", "1e-7"], ["--points", "32,512,-3"],
                ["--threads", "-1"]):
        _refused_in_one_line("planted_loop_budget.py", bad)
    for bad in (["--tokens", "1000", "--budget-multiple", "2"], ["--budget-multiple", "inf"], ["--tokens", "0"],
                ["--quick", "--points", "32,128,3"], ["--threads", "0"], ["--points", "0,128,3"]):
        _refused_in_one_line("bench_planted.py", bad)


def _refused_in_one_line(script: str, args: list[str]) -> None:
    """scripts/`script` answers `args` with argparse's one-line error, not a traceback."""
    path = Path(__file__).resolve().parent.parent / "scripts" / script
    done = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
    assert done.stderr.strip().splitlines()[-1].startswith(f"{script}: error:"), (args, done.stderr)
