"""Transcoders: an SAE config with `hook_name_out` reads one hook and predicts another (Dunefsky et al. 2024), with an
optional linear skip (Paulo et al. 2025). Ground truth on a planted sparse map, the formulas by hand, SAELens's
transcoder layouts, the splice into the language model, and SmolLM2's layer-15 MLP against the linear baseline."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train import make_cache, mean_max_cos

from sae.analysis.evaluate import EvalConfig, evaluate_saes, fit_linear, linear_fvu_curve, lm_losses
from sae.saes import SAE, SAE_CLASSES, SAEConfig, SAEFormatError, create_sae
from sae.training.train import SAESpec, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_map(n: int, *, dense: float = 0.0, seed: int = 0, d_in: int = 64, d_out: int = 48, n_true: int = 256):
    """x = c·E, y = c·D: sparse non-negative codes c (~4 active of `n_true`) written into the input through one unit
    dictionary E and into the output through another, D (the truth a transcoder must find). With `dense` > 0, x gets
    16 more dimensions of dense Gaussian ε (std `dense`) that reach the output linearly, y += ε·A (what a skip path is
    for). The maps are fixed; `seed` draws the rows."""
    maps = torch.Generator().manual_seed(1)
    E = F.normalize(torch.randn(n_true, d_in, generator=maps), dim=1)
    D = F.normalize(torch.randn(n_true, d_out, generator=maps), dim=1)
    A = torch.randn(16, d_out, generator=maps) / 4
    g = torch.Generator().manual_seed(100 + seed)
    c = (torch.rand(n, n_true, generator=g) < 4 / n_true) * (torch.rand(n, n_true, generator=g) * 1.5 + 0.5)
    x, y = c @ E + 0.01 * torch.randn(n, d_in, generator=g), c @ D
    if dense:
        eps = dense * torch.randn(n, 16, generator=g)
        x, y = torch.cat([x, eps], 1), y + eps @ A
    return x, y, D


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def _train_planted(tmp_path, dense: float, skips: tuple[bool, ...], steps: int) -> tuple[SAE, ...]:
    """TopK transcoders (with and without a skip path) from hook "x" to hook "y" of a cache of the planted map,
    trained by `train` itself."""
    x, y, D = planted_map(100_000, dense=dense)
    cache = make_cache(tmp_path / "cache", {"x": x, "y": y})
    specs = [SAESpec(hook="x", hook_out="y", d_sae=512, k=4, skip=skip) for skip in skips]
    paths = train(TrainConfig(cache=str(cache), out=str(tmp_path / "saes"), saes=specs, batch_size=512,
                              total_tokens=steps * 512, lr=3e-3, dead_window_tokens=512 * 50, wandb_mode="disabled"))
    return tuple(SAE.load(p) for p in paths)


def test_transcoder_recovers_a_planted_sparse_map(tmp_path):
    """Trained by `train` on (x, y) pairs, a TopK transcoder's decoder rows are the true output directions, and its
    held-out FVU beats the best linear map of rank L0 (least squares on the training rows)."""
    (plain,) = _train_planted(tmp_path, dense=0.0, skips=(False,), steps=400)
    assert plain.cfg.hook_name_out == "y" and plain.cfg.d_out == 48
    assert mean_max_cos(planted_map(1)[2], plain.W_dec) >= 0.95  # 0.98 when written
    x, y, _ = planted_map(20_000, seed=1)  # held out
    fit_x, fit_y, _ = planted_map(20_000, seed=2)
    linear = linear_fvu_curve(fit_linear(fit_x, fit_y), x, y)
    with torch.no_grad():
        got = fvu(y, plain(x))
        l0 = float((plain.encode(x) > 0).sum(-1).float().mean())
    print(f"planted: cos {mean_max_cos(planted_map(1)[2], plain.W_dec):.3f} FVU {got:.3f} L0 {l0:.2f} "
          f"linear rank-4 FVU {float(linear[4]):.3f}")
    assert l0 <= 4
    assert got < 0.3 and got < 0.5 * float(linear[4]), (got, float(linear[4]))  # 0.23 vs 0.94 when written


DENSE = 0.4
"""Std of the dense input part: its share of y's variance (0.16 per dimension) is about that of the sparse part
(~4 codes of mean square 1.75 over 48 dimensions: 0.15)."""


def test_skip_transcoder_learns_the_dense_linear_part(tmp_path):
    """With a dense part that reaches the output linearly, the skip path (Paulo et al. 2025) takes it: FVU well
    below the same transcoder without it, and below the full-rank least-squares map."""
    plain, skip = _train_planted(tmp_path, dense=DENSE, skips=(False, True), steps=300)
    assert skip.cfg.skip and not plain.cfg.skip
    x, y, _ = planted_map(20_000, dense=DENSE, seed=1)
    fit_x, fit_y, _ = planted_map(20_000, dense=DENSE, seed=2)
    full_rank = float(linear_fvu_curve(fit_linear(fit_x, fit_y), x, y)[-1])
    with torch.no_grad():
        plain_fvu, skip_fvu = fvu(y, plain(x)), fvu(y, skip(x))
    print(f"dense part: FVU skip {skip_fvu:.3f} plain {plain_fvu:.3f} full-rank linear {full_rank:.3f}")
    assert skip_fvu < 0.6 * plain_fvu and skip_fvu < full_rank, (skip_fvu, plain_fvu, full_rank)


# ----- formulas by hand ------------------------------------------------------------------------------------------


def _transcoder(arch: str, skip: bool = False, d_in: int = 16, d_out: int = 12, d_sae: int = 64, **kw):
    torch.manual_seed(0)
    x = torch.randn(64, d_in, dtype=torch.float64) * 3 + 0.5
    y = torch.randn(64, d_out, dtype=torch.float64) * 5 - 1.0
    sae = create_sae(SAEConfig(arch, d_in, d_sae, k=4, aux_k=6, hook_name="a", hook_name_out="b", d_out=d_out,
                               skip=skip, **kw)).double()
    sae.initialise_from_data(x, y)
    if skip:
        with torch.no_grad():
            sae.W_skip.normal_()
    return sae, x, y


def test_output_scale_and_forward_by_hand():
    sae, x, y = _transcoder("relu_l1", skip=True)
    assert torch.isclose((y * sae.scale_out).pow(2).sum(-1).mean(), torch.tensor(12.0, dtype=torch.float64))
    assert torch.allclose(sae.b_dec, y.mean(0) * sae.scale_out) and not sae.cfg.apply_b_dec_to_input
    x_n = x * sae.scale
    f = torch.relu(x_n @ sae.W_enc + sae.b_enc)
    y_hat_n = f @ sae.W_dec + sae.b_dec + x_n @ sae.W_skip.T
    assert torch.allclose(sae(x), y_hat_n / sae.scale_out)
    out = sae.train_forward(x, y, penalty_scale=0.5)
    l1 = (f * sae.W_dec.norm(dim=1)).sum(1).mean()
    mse = (y_hat_n - y * sae.scale_out).pow(2).sum(1).mean()
    assert torch.allclose(out.loss, mse + 0.5 * sae.cfg.l1_coefficient * l1) and torch.allclose(out.x_hat, y_hat_n / sae.scale_out)
    with pytest.raises(ValueError, match=r"depends on its input: call decode\(f, x\)"):
        sae.decode(f)
    with pytest.raises(ValueError, match=r"\(x, target\) pairs"):
        sae.train_forward(x)


def test_topk_transcoder_sparse_path_matches_dense_reference():
    """TopK keeps its sparse encoder/decoder path: loss (AuxK on the target's residual) and every gradient equal a
    dense implementation."""
    sae, x, y = _transcoder("topk", skip=True)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae.train_forward(x, y, dead_mask=dead)
    out.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    x_n, y_n = x * sae.scale, y * sae.scale_out
    pre = x_n @ sae.W_enc + sae.b_enc  # no b_dec subtracted: it is the output's bias
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(4).indices, True)
    f = torch.where(chosen, pre, 0).relu()
    y_hat = f @ sae.W_dec + sae.b_dec + x_n @ sae.W_skip.T
    aux_idx = pre.masked_fill(~dead, -torch.inf).topk(6, dim=-1).indices
    f_aux = torch.where(torch.zeros_like(chosen).scatter_(-1, aux_idx, True), pre, 0).relu()
    resid = (y_n - y_hat).detach()
    loss = (y_hat - y_n).pow(2).sum(-1).mean() + (f_aux @ sae.W_dec - resid).pow(2).sum() / resid.pow(2).sum() * 12 / 32
    loss.backward()
    assert torch.allclose(out.loss, loss)
    for name, p in sae.named_parameters():
        assert torch.allclose(sparse_grads[name], p.grad, atol=1e-12), name


@pytest.mark.parametrize("kw, message", [
    (dict(skip=True), "skip and d_out are transcoder settings: also name the hook to predict"),
    (dict(d_out=8), "skip and d_out are transcoder settings"),
    (dict(hook_name_out="b", apply_b_dec_to_input=True), "apply_b_dec_to_input must be false for a transcoder"),
])
def test_invalid_transcoder_settings_are_named(kw, message):
    with pytest.raises(SAEFormatError, match=message):
        SAEConfig("topk", 4, 8, k=2, **kw)


def test_bad_transcoder_specs_are_one_line_at_the_cli(tmp_path, capsys):
    from sae.cli import main

    x, y, _ = planted_map(2048)
    cache = make_cache(tmp_path / "cache", {"x": x, "y": y})
    for spec, message in (("{hook: x, hook_out: z}", "'z'"),
                          ("{hook: x, skip: true}", "skip and d_out are transcoder settings: also name the hook to predict (hook_out"),
                          ("{hook: x, hook_out: y, apply_b_dec_to_input: true}", "must be false for a transcoder")):
        assert main(["train", f"cache={cache}", f"out={tmp_path / 'o'}", "wandb_mode=disabled", f"saes=[{spec}]"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


# ----- files: ours and SAELens's ---------------------------------------------------------------------------------

SAELENS_CLASS = {("relu_l1", False): "Transcoder", ("relu_l1", True): "SkipTranscoder",
                 ("jumprelu", False): "JumpReLUTranscoder", ("jumprelu", True): "JumpReLUSkipTranscoder",
                 ("batchtopk", False): "JumpReLUTranscoder", ("batchtopk", True): "JumpReLUSkipTranscoder",
                 ("matryoshka_batchtopk", False): "JumpReLUTranscoder",
                 ("matryoshka_batchtopk", True): "JumpReLUSkipTranscoder",
                 ("topk", False): "TopKSAE"}


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
@pytest.mark.parametrize("skip", [False, True])
def test_save_folds_both_scales_and_saelens_loads_it(arch, skip, tmp_path):
    """Saved with both scales folded, a transcoder reloads here to the same output, and SAELens's loader builds its
    matching transcoder class (TopK: its TopK SAE, which computes the same output) with the same features and output."""
    import sae_lens

    sae, x, y = _transcoder(arch, skip=skip, d_in=16, d_out=16)
    sae, x = sae.float(), x.float()
    if arch.endswith("batchtopk"):
        sae.threshold.fill_(0.5)
    f, y_hat = sae.encode(x), sae(x)
    assert (f > 0).any() and (f == 0).any()
    sae.save(tmp_path / "t")
    ours = SAE.load(tmp_path / "t")
    assert ours.scale == 1 and ours.scale_out == 1 and ours.cfg.hook_name_out == "b"
    assert torch.allclose(ours(x), y_hat, atol=1e-4) and torch.allclose(ours.encode(x), f, atol=1e-4)
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name_out"] == "b" and cfg["d_out"] == 16
    if (arch, skip) not in SAELENS_CLASS:  # SAELens has no TopK transcoder with a skip path
        return
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "t"))
    assert type(theirs).__name__ == SAELENS_CLASS[arch, skip]
    assert theirs.cfg.metadata.hook_name_out == "b"
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x), f, atol=1e-4)
        assert torch.allclose(theirs(x), y_hat, atol=1e-4)


@pytest.mark.parametrize("name", ["Transcoder", "SkipTranscoder", "JumpReLUTranscoder", "JumpReLUSkipTranscoder"])
def test_load_transcoder_written_by_saelens(name, tmp_path):
    import sae_lens

    torch.manual_seed(0)
    cls, cfg_cls = getattr(sae_lens, name), getattr(sae_lens, name + "Config")
    theirs = cls(cfg_cls(d_in=16, d_sae=64, d_out=12, apply_b_dec_to_input=False))
    theirs.cfg.metadata.hook_name, theirs.cfg.metadata.hook_name_out = "a", "b"
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if "JumpReLU" in name:
            theirs.threshold.copy_(torch.rand(64) * 0.5)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert (ours.cfg.hook_name, ours.cfg.hook_name_out, ours.cfg.d_out, ours.cfg.skip) == ("a", "b", 12, "Skip" in name)
    x = torch.randn(50, 16)
    with torch.no_grad():
        assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)


# ----- the language model ----------------------------------------------------------------------------------------


def test_splice_replaces_the_mlp_output(tiny_llama, text_dir, tmp_path):
    """CE with the transcoder spliced in: a transcoder whose output is 0 is exactly the zero-ablated MLP (CE
    recovered 0), and one whose skip path copies its input (the MLP's residual input, hook_mlp_in) gives the same
    loss as a forward that adds that input in the MLP's place."""
    from sae.data.harvest import HarvestConfig, harvest
    from sae.data.model import hooks, load_model
    from sae.data.store import ActivationStore

    hook_in, hook_out = "blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"
    cache = harvest(HarvestConfig(model=str(tiny_llama), hooks=[hook_in, hook_out], dataset=str(text_dir),
                                  context_size=32, max_tokens=1200, batch_size=8, dtype="float32", eval_fraction=0.25,
                                  out=str(tmp_path / "cache")))
    store = ActivationStore(cache)
    model, _ = load_model(str(tiny_llama), "cpu")
    d = model.config.hidden_size
    zero = create_sae(SAEConfig("relu_l1", d, 8, hook_name=hook_in, hook_name_out=hook_out)).eval()
    copy = create_sae(SAEConfig("relu_l1", d, 8, hook_name=hook_in, hook_name_out=hook_out, skip=True)).eval()
    with torch.no_grad():
        for t in (zero, copy):
            t.W_dec.zero_()
        copy.W_skip.copy_(torch.eye(d))
    tokens = store.context_tokens(store.holdout_seqs(4))
    first = store.first_pos
    got = lm_losses(model, tokens, hook_out, {"zero": zero, "copy": copy}, first, batch_size=2)
    assert got["zero"].ce_spliced == pytest.approx(got["zero"].ce_zero, rel=1e-6) and got["zero"].ce_recovered == 0
    seen = {}
    with torch.no_grad(), hooks(model, {hook_in: lambda a: seen.update(x=a),
                                        hook_out: lambda a: torch.cat([a[:, :first], seen["x"][:, first:]], 1)}):
        logits = model(input_ids=tokens, use_cache=False).logits[:, first:-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, first + 1:].reshape(-1))
    assert got["copy"].ce_spliced == pytest.approx(float(ce), rel=1e-5)
    assert abs(got["copy"].ce_spliced - got["copy"].ce_clean) > 1e-3  # the splice changed something


@pytest.mark.slow
def test_smollm2_layer15_mlp_transcoder_beats_the_linear_map(tmp_path):
    """SmolLM2's layer-15 MLP (ln2.hook_normalized → hook_mlp_out): a TopK transcoder trained on a small cache beats
    the least-squares linear map of rank L0 on held-out FVU, and recovers most of the CE loss when it replaces the
    MLP; the analysis ranks its features by their input tokens."""
    from sae.analysis.analyse import AnalyseConfig
    from sae.analysis.dashboard import read_js
    from sae.analysis.dashboard.build import analyse
    from sae.data.harvest import HarvestConfig, harvest
    from sae.data.model import load_model
    from sae.data.store import ActivationStore

    hook_in, hook_out = "blocks.15.ln2.hook_normalized", "blocks.15.hook_mlp_out"
    cache = harvest(HarvestConfig(hooks=[hook_in, hook_out], context_size=128, max_tokens=24_000, batch_size=8,
                                  out=str(tmp_path / "cache")))
    specs = [SAESpec(hook=hook_in, hook_out=hook_out, expansion_factor=4, k=32, **extra)
             for extra in ({}, {"skip": True})]
    paths = train(TrainConfig(cache=str(cache), out=str(tmp_path / "saes"), saes=specs, wandb_mode="disabled"))
    store = ActivationStore(cache)
    model, _ = load_model("smollm2", "cpu")
    saes = {p.name: SAE.load(p).eval() for p in paths}
    results = evaluate_saes(EvalConfig(cache=str(cache), out=str(tmp_path / "eval"), lm_loss_contexts=4,
                                       pca_fit_tokens=20_000), store, saes, model)
    print(json.dumps([{k: r[k] for k in ("name", "l0", "fvu", "pca_fvu_at_l0", "pca_fvu_at_quarter", "ce_recovered",
                                          "dead_fraction")} for r in results["saes"]], indent=1))
    for r in results["saes"]:
        assert r["transcoder"] and r["hook_out"] == hook_out
        assert r["beats_pca_at_l0"] and r["fvu"] < r["pca_fvu_at_l0"] - 0.05, r
        assert r["ce_recovered"] > 0.5, r
    out = analyse(AnalyseConfig(cache=str(cache), sae=str(paths[0]), out=str(tmp_path / "analysis"), n_top=5))
    features = read_js(out / "data" / "index.js")["features"]
    x = torch.cat([rows.acts[hook_in] for rows in store.iter_ordered([hook_in])]).float()
    with torch.no_grad():
        f = saes[paths[0].name].encode(x)
    assert features[0]["max_act"] == pytest.approx(float(f.max()), rel=1e-3)  # ranked by activation on input tokens


def test_steering_a_transcoder_feature_adds_its_direction_at_the_output_hook(tiny_llama):
    """`sae steer` on a transcoder edits its features from the input hook and changes the output hook by exactly
    α × the feature's raw decoder direction (its error kept); α = 0 leaves the logits bit for bit."""
    from sae.data.model import hooks, load_model
    from sae.analysis.steer import steering

    hook_in, hook_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    model, _ = load_model(str(tiny_llama), "cpu")
    d = model.config.hidden_size
    torch.manual_seed(0)
    tc = create_sae(SAEConfig("relu_l1", d, 16, hook_name=hook_in, hook_name_out=hook_out, scale_out=0.5)).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        clean = model(input_ids=ids, use_cache=False).logits
        with steering(model, tc, {3: 0.0}):
            assert torch.equal(model(input_ids=ids, use_cache=False).logits, clean)
        with steering(model, tc, {3: 2.0}, first=2):
            steered = model(input_ids=ids, use_cache=False).logits
        direction = tc.decode(torch.eye(16)[3]) - tc.decode(torch.zeros(16))  # raw-space decoder row of feature 3
        with hooks(model, {hook_out: lambda a: torch.cat([a[:, :2], a[:, 2:] + 2.0 * direction], 1)}):
            by_hand = model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(steered, by_hand, atol=1e-5) and not torch.allclose(steered, clean, atol=1e-3)
