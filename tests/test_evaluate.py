"""sae.analysis.evaluate against hand computations, torch.linalg.svd, and a tiny random Llama with exact SAEs spliced in.

The tiny cache and hand-built SAEs come from fixtures in conftest.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sae.analysis.evaluate import (EvalConfig, cache_model_dtype, evaluate, fit_pca, format_table, pca_fvu_curve,
                                   reconstruction_metrics)
from sae.saes import SAE, failure_signs

def identity_sae(hand_sae, d: int, model: str = "") -> SAE:
    """ReLU(x) − ReLU(−x) = x exactly: features ±e_i, so decode(encode(x)) == x bit for bit."""
    eye = torch.eye(d)
    return hand_sae(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), model=model)


def zero_sae(hand_sae, d: int, model: str = "") -> SAE:
    """An SAE whose reconstruction is always 0: splicing it in equals zero-ablation."""
    return hand_sae(torch.eye(d), torch.zeros(d, d), model=model)


def hand_losses(model_dir: Path, cache: Path, hook: str, n_contexts: int, first: int) -> tuple[float, float, float]:
    """Clean CE, CE with positions >= first zeroed at `hook`, and KL(clean || zeroed), on the first held-out contexts."""
    from sae.data.model import hooks, load_model
    from sae.data.store import ActivationStore

    store = ActivationStore(cache)
    model, _ = load_model(str(model_dir), "cpu")
    ids = store.context_tokens(store.holdout_seqs(n_contexts))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with hooks(model, {hook: lambda a: torch.cat([a[:, :first], torch.zeros_like(a[:, first:])], 1)}):
            ablated = model(input_ids=ids).logits
    targets = ids[:, first + 1 :].reshape(-1)
    clean_lp, ablated_lp = (t[:, first:-1].log_softmax(-1).reshape(-1, t.shape[-1]) for t in (logits, ablated))
    kl = (clean_lp.exp() * (clean_lp - ablated_lp)).sum(-1).mean()
    ce = [float(torch.nn.functional.nll_loss(lp, targets)) for lp in (clean_lp, ablated_lp)]
    return ce[0], ce[1], float(kl)


def test_reconstruction_metrics_by_hand(hand_sae):
    torch.manual_seed(0)
    x = torch.randn(300, 8) + 2.0
    W_enc, W_dec = torch.randn(8, 12), torch.randn(12, 8) * 0.3
    b_enc = torch.randn(12) * 0.5
    b_enc[3], b_enc[7] = -1e4, 1e4  # feature 3 never fires, feature 7 always does
    sae = hand_sae(W_enc, W_dec, b_enc)
    got = reconstruction_metrics(sae, x, dense_threshold=0.1)

    f = torch.relu(x @ W_enc + b_enc)
    x_hat = f @ W_dec
    density = (f > 0).float().mean(0)
    assert got.l0 == pytest.approx(float((f > 0).sum(1).float().mean()), rel=1e-6)
    assert got.fvu == pytest.approx(float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-5)
    assert got.mse == pytest.approx(float(((x - x_hat) ** 2).mean()), rel=1e-5)
    assert torch.allclose(got.density, density)
    assert got.dead_fraction == pytest.approx(float((density == 0).float().mean()))
    assert got.dense_fraction == pytest.approx(float((density > 0.1).float().mean()))
    assert got.density[3] == 0 and got.density[7] == 1
    assert 1 / 12 <= got.dead_fraction and 1 / 12 <= got.dense_fraction < 1


def test_pca_fvu_curve_matches_svd():
    torch.manual_seed(1)
    mix = torch.randn(16, 16) * torch.logspace(0, -2, 16)[:, None]  # strongly anisotropic
    train, test = torch.randn(400, 16) @ mix + 3.0, torch.randn(150, 16) @ mix + 3.0
    curve = pca_fvu_curve(fit_pca(train), test)

    mu = train.double().mean(0)
    _, _, Vh = torch.linalg.svd(train.double() - mu, full_matrices=False)
    y = test.double()
    total = ((y - y.mean(0)) ** 2).sum()
    for r in (0, 1, 3, 8, 16):
        V = Vh[:r].T
        recon = mu + (y - mu) @ V @ V.T
        assert curve[r].item() == pytest.approx(float(((y - recon) ** 2).sum() / total), rel=1e-4, abs=1e-6)
    assert curve[16].item() == pytest.approx(0.0, abs=1e-6)
    assert bool((curve[1:] <= curve[:-1] + 1e-6).all())  # more components never hurt


def test_ce_recovered_is_one_for_identity_and_zero_for_zeros(tiny_cache, tiny_llama, hand_sae, hook, tmp_path,
                                                            monkeypatch, capsys):
    cache = tiny_cache
    saes = tmp_path / "saes"
    identity_sae(hand_sae, 32, str(tiny_llama)).save(saes / "identity")
    zero_sae(hand_sae, 32, str(tiny_llama)).save(saes / "zeros")
    cfg = EvalConfig(cache=str(cache), saes=[str(saes)], out=str(tmp_path / "eval"), max_tokens=2000,
                     lm_loss_contexts=6, batch_size=4, device="cpu", pca_fit_tokens=1500)
    results = evaluate(cfg)

    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    rows = {r["name"]: r for r in results["saes"]}
    ident, zeros = rows["identity"], rows["zeros"]
    assert ident["ce_clean"] < ident["ce_zero"]  # zero-ablating the residual stream must hurt
    assert ident["ce_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl"] == pytest.approx(0.0, abs=1e-6)
    assert ident["fvu"] == 0 and ident["l0"] == pytest.approx(32 * (1 - ident["dead_fraction"]), abs=1.0)
    assert zeros["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert zeros["ce_spliced"] == pytest.approx(zeros["ce_zero"], rel=1e-6)
    assert results["position_0_spliced"] is False

    # Hand computation: the scored predictions are those made from spliced positions 1..T-2.
    clean, zero, kl = hand_losses(tiny_llama, cache, hook, n_contexts=6, first=1)
    assert ident["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert zeros["ce_zero"] == pytest.approx(zero, rel=1e-5)
    assert zeros["kl"] == pytest.approx(kl, rel=1e-4) and kl > 1e-4

    # The PCA baseline of the same cache, and the loud flag on the SAE that PCA beats.
    assert zeros["fvu"] > 1 and zeros["pca_rank_at_l0"] == round(zeros["l0"]) and zeros["beats_pca_at_l0"] is False
    assert ident["beats_pca_at_l0"] is True and ident["pca_rank_quarter"] == 8
    assert ident["pca_fvu_at_quarter"] == pytest.approx(results["pca"][hook]["fvu"][8])
    table = format_table(results)
    assert "zeros" in table and "BROKEN" in table and table.count("BROKEN") == 1
    assert "position 0 spliced: False" in table.replace("\n", " ")  # why the first positions are not scored
    assert max(map(len, table.splitlines())) <= 80
    (zero_line,) = [line for line in table.splitlines() if line.startswith("! zeros ")]  # the broken one is marked
    assert f"{zeros['fvu']:.3f}" in zero_line and any(line.startswith("  identity ") for line in table.splitlines())
    for png in ("pareto.png", "density_identity.png", "density_zeros.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 5000

    # lm_loss_contexts=0: the same reconstruction metrics, CE and KL null, and no model loaded at all.
    from sae.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sae.data.model.load_model", no_model)
    assert main(["eval", f"cache={cache}", f"saes=[{saes}]", f"out={tmp_path / 'eval0'}", "max_tokens=2000",
                 "pca_fit_tokens=1500", "lm_loss_contexts=0", "device=cpu"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    without = {r["name"]: r for r in json.loads((tmp_path / "eval0" / "eval.json").read_text())["saes"]}
    for name, r in without.items():
        assert r["fvu"] == rows[name]["fvu"] and r["l0"] == rows[name]["l0"] and r["lm_loss_contexts"] == 0
        assert all(r[key] is None for key in ("ce_clean", "ce_zero", "ce_spliced", "ce_recovered", "kl"))
    assert any(line.startswith("  identity ") and line.endswith("n/a     n/a") for line in printed.splitlines())
    assert "spliced" not in printed  # nothing was spliced: no note about which positions were


def test_silent_and_mostly_dead_saes_are_flagged_in_the_table(tiny_cache, tiny_llama, hand_sae, tmp_path, capsys):
    """An SAE with L0 = 0 (encoder biases far below every pre-activation) and one with 2/3 of its latents dead (the
    identity's ±e_i plus 128 all-zero encoder columns, which can never fire) are flagged in eval.json and marked in
    the printed table, though the second reconstructs perfectly and beats PCA; the identity SAE is not flagged."""
    from sae.cli import main

    d, eye = 32, torch.eye(32)
    saes = tmp_path / "saes"
    identity_sae(hand_sae, d, str(tiny_llama)).save(saes / "identity")
    hand_sae(eye, eye, b_enc=torch.full((d,), -1e6), model=str(tiny_llama)).save(saes / "silent")
    hand_sae(torch.cat([eye, -eye, torch.zeros(d, 128)], 1), torch.cat([eye, -eye, torch.zeros(128, d)], 0),
             model=str(tiny_llama)).save(saes / "mostly_dead")
    assert main(["eval", f"cache={tiny_cache}", f"saes=[{saes}]", f"out={tmp_path / 'eval'}", "max_tokens=2000",
                 "lm_loss_contexts=2", "device=cpu", "pca_fit_tokens=1500"]) == 0
    table = capsys.readouterr().out
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval" / "eval.json").read_text())["saes"]}
    silent, dead, ident = rows["silent"], rows["mostly_dead"], rows["identity"]
    assert silent["l0"] == 0 and silent["dead_fraction"] == 1
    assert dead["dead_fraction"] == pytest.approx(128 / 192, abs=1e-6) and dead["fvu"] == 0 and dead["beats_pca_at_l0"]
    assert ident["failures"] == [] and ident["dead_fraction"] == 0
    assert silent["failures"] == [failure_signs(0, 1)[0]] and "L0 = 0" in silent["failures"][0]
    assert dead["failures"] == [failure_signs(dead["l0"], dead["dead_fraction"])[0]] and "67% of its latents dead" in dead["failures"][0]
    # Too few tokens to tell a dead latent from a rare one (here 10 firings per latent): the dead fraction is not judged.
    assert failure_signs(dead["l0"], dead["dead_fraction"], fires_per_latent=10) == []
    lines = table.splitlines()
    marked = [line.split()[1] for line in lines if line.startswith("! ") and not line.split()[1].endswith(":")]
    assert marked == ["mostly_dead", "silent"]  # the rows; notes start "! BROKEN:" or "! FAILED:"
    assert any(line.startswith("  identity ") for line in lines)
    notes = " ".join(table.split("! FAILED: ")[1:])
    n = f"{silent['n_tokens']:,}"
    assert f"silent on {n} held-out rows: L0 = 0" in notes and f"mostly_dead on {n} held-out rows: 67% of" in notes


def test_an_eval_of_other_saes_into_the_same_out_removes_the_earlier_evals_plots(tiny_cache, tiny_llama, hand_sae,
                                                                                 tmp_path, capsys):
    """Run again on other SAEs, `sae eval` replaced eval.json and pareto.png but left the density plot of an SAE it no
    longer scored; only plots its earlier eval.json listed go (a user's density_mine.png stays)."""
    from sae.cli import main

    d = 32
    for name in ("a", "b"):
        identity_sae(hand_sae, d, str(tiny_llama)).save(tmp_path / name)
    out = tmp_path / "eval"
    args = ["eval", f"cache={tiny_cache}", f"out={out}", "max_tokens=500", "lm_loss_contexts=0", "device=cpu",
            "pca_fit_tokens=500"]
    assert main([*args, f"saes=[{tmp_path / 'a'}, {tmp_path / 'b'}]"]) == 0
    assert {p.name for p in out.glob("density_*.png")} == {"density_a.png", "density_b.png"}
    (out / "density_mine.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main([*args, f"saes=[{tmp_path / 'a'}]"]) == 0
    assert "removed the earlier eval's density plots of SAEs not scored now: density_b.png" in capsys.readouterr().out
    assert {p.name for p in out.glob("density_*.png")} == {"density_a.png", "density_mine.png"}
    results = json.loads((out / "eval.json").read_text())
    assert [r["name"] for r in results["saes"]] == ["a"]
    # A trial's 248 held-out rows showed 52% of a width-1152 SAE's latents dead, without a word on what that rests on.
    row = results["saes"][0]
    row.update(dead_fraction=0.6, fires_per_latent=12.4)
    assert ("a's dead fraction is from 500 held-out rows, where an average latent fires 12 times: too few to tell a "
            "dead latent from a rare one") in " ".join(format_table(results).split())
    row.update(fires_per_latent=50.0)  # rows enough
    assert "too few to tell" not in format_table(results)
    row.update(l0=0.0, fires_per_latent=0.0)  # nothing fires: L0 = 0 has its own verdict
    assert "too few to tell" not in format_table(results)
    row.update(l0=1.0)
    del row["fires_per_latent"]  # an eval.json from before the key
    assert "too few to tell" not in format_table(results)


def test_lm_loss_splices_every_position_when_cache_kept_position_0(tiny_llama, text_dir, harvest_tiny, hand_sae, hook,
                                                                  tmp_path):
    cache = harvest_tiny(tiny_llama, text_dir, tmp_path / "cache", exclude_first=False)
    zero_sae(hand_sae, 32, str(tiny_llama)).save(tmp_path / "zeros")
    cfg = EvalConfig(cache=str(cache), saes=[str(tmp_path / "zeros")], out=str(tmp_path / "eval"), max_tokens=500,
                     lm_loss_contexts=3, device="cpu", pca_fit_tokens=500)
    results = evaluate(cfg)
    assert results["position_0_spliced"] is True
    (row,) = results["saes"]
    assert row["ce_recovered"] == pytest.approx(0.0, abs=1e-6)
    clean, zero, kl = hand_losses(tiny_llama, cache, hook, n_contexts=3, first=0)
    assert (row["ce_clean"], row["ce_zero"], row["kl"]) == pytest.approx((clean, zero, kl), rel=1e-4)


def test_every_config_field_is_documented_and_has_a_demo_default():
    from dataclasses import fields

    from sae.config import field_docs

    assert set(field_docs(EvalConfig)) == {f.name for f in fields(EvalConfig)}
    assert EvalConfig().saes == ["runs/demo/saes"] and EvalConfig().cache == "runs/demo/cache"


def test_the_model_runs_in_the_dtype_the_cache_was_harvested_in():
    """eval and analyse load the model as the harvest ran it (bf16 on a GPU); caches from before the manifest
    recorded it keep float32."""
    assert cache_model_dtype(SimpleNamespace(manifest={"model_dtype": "bfloat16"})) == "bfloat16"
    assert cache_model_dtype(SimpleNamespace(manifest={})) == "float32"


def test_eval_settings_out_of_range_are_one_line_at_the_cli(tmp_path, capsys):
    """Each was a traceback deep in the run (lm_loss_contexts=0 reached the model with an empty batch; it now means
    no LM loss)."""
    from sae.cli import main

    out = tmp_path / "eval"
    assert main(["eval", f"out={out}", "lm_loss_contexts=-1", "dense_threshold=2", "max_tokens=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for said in ("lm_loss_contexts=-1 must be ≥ 0 (0: no LM loss)", "dense_threshold=2.0 must be in (0, 1]",
                 "max_tokens=-1 must be ≥ 1"):
        assert said in err, err
    assert not out.exists()


def test_eval_refuses_an_out_folder_holding_files_it_did_not_write(tmp_path, capsys):
    """An eval.json (or plot) of the user's own in out= would be replaced: refused before any work, files intact."""
    from sae.cli import main

    out = tmp_path / "mine"
    out.mkdir()
    (out / "eval.json").write_text("my notes")
    (out / "pareto.png").write_text("my plot")
    assert main(["eval", f"out={out}", f"cache={tmp_path / 'no_cache'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.json, pareto.png that `sae eval` did not write" in err, err
    assert (out / "eval.json").read_text() == "my notes" and (out / "pareto.png").read_text() == "my plot"
    # An eval.json of ours (a finished eval) is no obstacle: the same check passes it.
    (out / "eval.json").write_text(json.dumps({"cache": "c", "saes": [], "pca": {}}))
    assert main(["eval", f"out={out}", f"cache={tmp_path / 'no_cache'}"]) == 2
    assert "did not write" not in capsys.readouterr().err
