"""Interop with the installed SAELens (its own classes write and read the folders) and sparsify's layout: every
direction and architecture computes the same features and output, measured here, and the table of those
measurements in docs/api.md is the one this run produces. Also the cases that once differed silently: a folder
SAELens re-saved after a change (issue 17 item 13), JumpReLU thresholds below 0 (item 14), TopK transcoders no
SAELens class computes (item 15), hook_z SAEs and normalize_activations (item 16)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

import pytest
import torch
from sae_lens.saes.sae import SAEMetadata
from test_pretrained import D_IN, D_SAE, K, sparsify_forward, write_sparsify

from sae.saes import SAE, SAE_CLASSES, SAEConfig, SAEFormatError, create_sae

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
D_OUT = 12
Measure = Callable[[Path], float]


def _x(d: int = D_IN, *shape: int) -> torch.Tensor:
    return torch.randn(200, *(shape or (d,)), generator=torch.Generator().manual_seed(1)) * 2


def _diff(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Max abs difference over (ours, theirs) pairs; the first pair is the features, which must mix active and
    inactive latents, or the comparison would say little."""
    f = pairs[0][1]
    assert (f > 0).any() and (f == 0).any()
    return max(float((a - b).abs().max()) for a, b in pairs)


# ----- builders: ours and theirs --------------------------------------------------------------------------------


def ours(arch: str, hook_out: str | None = None, skip: bool = False, d_out: int | None = None) -> SAE:
    """One of our SAEs (a transcoder with `hook_out`) with fitted scales and trained-looking biases and thresholds,
    JumpReLU's partly below 0."""
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(arch, D_IN, D_SAE, k=K, hook_name="blocks.1.hook_resid_post", hook_name_out=hook_out,
                               d_out=d_out, skip=skip))
    x = torch.randn(256, D_IN) * 2 + 0.3
    sae.initialise_from_data(x, None if hook_out is None else torch.randn(256, sae.cfg.d_out) * 3 - 1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        if skip:
            sae.W_skip.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(-0.5, 0.7)
        elif arch.endswith("batchtopk"):
            sae.threshold.fill_(0.5)
    return sae.eval()


def theirs(name: str, **cfg) -> torch.nn.Module:
    """SAELens's class `name` with random weights (thresholds partly below 0), built from its own config class."""
    import sae_lens

    torch.manual_seed(0)
    model = getattr(sae_lens, name)(getattr(sae_lens, name + "Config")(d_in=cfg.pop("d_in", D_IN), d_sae=D_SAE, **cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if hasattr(model, "threshold"):
            model.threshold.copy_(torch.rand(D_SAE) - 0.4)
    return model


def ours_to_saelens(sae: SAE) -> Measure:
    def measure(tmp: Path) -> float:
        import sae_lens

        sae.save(tmp / "ours")
        loaded = sae_lens.SAE.load_from_disk(str(tmp / "ours"))
        x = _x()
        with torch.no_grad():
            return _diff([(sae.encode(x), loaded.encode(x)), (sae(x), loaded(x))])
    return measure


def saelens_to_ours(model: torch.nn.Module, x: torch.Tensor | None = None) -> Measure:
    def measure(tmp: Path) -> float:
        model.save_model(tmp / "theirs")
        return _against_saelens(tmp / "theirs", model, _x() if x is None else x)
    return measure


def _against_saelens(folder: Path, model: torch.nn.Module, x: torch.Tensor) -> float:
    loaded = SAE.load(folder)
    with torch.no_grad():
        return _diff([(loaded.encode(x), model.encode(x)), (loaded(x), model(x))])


def sparsify_to_ours(tmp: Path) -> float:
    tensors = write_sparsify(tmp / "layers.0")
    loaded, x = SAE.load(tmp / "layers.0"), _x()
    f, out = sparsify_forward(tensors, x)
    with torch.no_grad():
        return _diff([(loaded.encode(x), f), (loaded(x), out)])


def resaved_by_saelens(sae: SAE, edit: Callable[[torch.nn.Module], None]) -> Measure:
    """Our folder loaded by SAELens, edited there (k, thresholds) and saved by SAELens again, read back here."""
    def measure(tmp: Path) -> float:
        import sae_lens

        sae.save(tmp / "ours")
        model = sae_lens.SAE.load_from_disk(str(tmp / "ours"))
        edit(model)
        model.save_model(tmp / "resaved")
        return _against_saelens(tmp / "resaved", sae_lens.SAE.load_from_disk(str(tmp / "resaved")), _x())
    return measure


def _set_k(model: torch.nn.Module) -> None:
    """k edited in the config that SAELens saves (its loaded module keeps computing with the k it was built with)."""
    model.cfg.k = 2


def _per_latent_thresholds(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.threshold.copy_(torch.rand(D_SAE))


CASES: list[tuple[str, str, Measure]] = [
    *[("ours → SAELens", arch + (", thresholds partly < 0" if arch == "jumprelu" else ""), ours_to_saelens(ours(arch)))
      for arch in sorted(SAE_CLASSES)],
    *[("ours → SAELens", f"{arch} transcoder{' + skip' if skip else ''}",
       ours_to_saelens(ours(arch, "blocks.1.hook_mlp_out", skip))) for arch in ("relu_l1", "jumprelu", "batchtopk")
      for skip in (False, True)],
    ("ours → SAELens", "topk transcoder, d_out = d_in, no skip", ours_to_saelens(ours("topk", "blocks.1.hook_mlp_out"))),
    ("ours → SAELens → ours", "topk, k changed in SAELens", resaved_by_saelens(ours("topk"), _set_k)),
    ("ours → SAELens → ours", "batchtopk, per-latent thresholds set in SAELens",
     resaved_by_saelens(ours("batchtopk"), _per_latent_thresholds)),
    *[("SAELens → ours", label, saelens_to_ours(theirs(label.split(",")[0], **cfg))) for label, cfg in (
        ("StandardSAE", {}), ("TopKSAE", {"k": K}),
        ("TopKSAE, rescale_acts_by_decoder_norm", {"k": K, "rescale_acts_by_decoder_norm": True}),
        ("JumpReLUSAE, thresholds partly < 0", {}))],
    *[("SAELens → ours", f"{name}, d_out ≠ d_in", saelens_to_ours(theirs(name, d_out=D_OUT, apply_b_dec_to_input=False)))
      for name in ("Transcoder", "SkipTranscoder", "JumpReLUTranscoder", "JumpReLUSkipTranscoder")],
    ("SAELens → ours", "StandardSAE, reshape_activations: hook_z",
     saelens_to_ours(theirs("StandardSAE", reshape_activations="hook_z",
                            metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z")),
                     _x(D_IN, 4, D_IN // 4))),
    *[("SAELens → ours", f"StandardSAE, normalize_activations: {norm}",
       saelens_to_ours(theirs("StandardSAE", normalize_activations=norm)))
      for norm in ("expected_average_only_in", "covariance_whitening")],
    ("sparsify → ours", "topk (sparsify's forward as in its source)", sparsify_to_ours),
]


def _bound(diff: float) -> str:
    """A measured difference as the power of ten it stays under: stable from run to run, unlike its digits."""
    return "0 (exact)" if diff == 0 else f"< 1e{math.floor(math.log10(diff)) + 1}"


@pytest.mark.parametrize("direction, arch, measure", CASES, ids=[f"{d}: {a}" for d, a, _ in CASES])
def test_each_direction_and_architecture_matches(direction, arch, measure, tmp_path):
    assert measure(tmp_path) < 1e-4


def test_the_interop_table_in_the_docs_is_measured(tmp_path_factory):
    """The table in docs/api.md is what this run measures (a difference rounded up to its power of ten)."""
    rows = [f"| {d} | {a} | {_bound(m(tmp_path_factory.mktemp('case')))} |" for d, a, m in CASES]
    table = "\n".join(["| direction | architecture | max abs difference (features and output) |", "|---|---|---|", *rows])
    assert table in (ROOT / "docs" / "api.md").read_text(), f"docs/api.md should hold this table:\n{table}"


# ----- item 13: a folder SAELens re-saved computes as SAELens reads it ---------------------------------------------


def test_saelens_resave_with_another_k_loads_with_that_k(tmp_path):
    """SAELens keeps our metadata.sae_config verbatim when it re-saves a folder; k=16 there used to win over its k."""
    import sae_lens

    ours("topk").save(tmp_path / "ours")
    model = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    _set_k(model)
    model.save_model(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "cfg.json").read_text())["metadata"]["sae_config"]["k"] == K
    loaded, reread = SAE.load(tmp_path / "resaved"), sae_lens.SAE.load_from_disk(str(tmp_path / "resaved"))
    assert loaded.cfg.k == 2 and loaded.cfg.hook_name == "blocks.1.hook_resid_post"
    x = _x()
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).count_nonzero(-1).max(), torch.tensor(2))
        torch.testing.assert_close(loaded.encode(x), reread.encode(x), rtol=1e-5, atol=1e-5)


def test_saelens_resave_with_per_latent_thresholds_loads_them(tmp_path):
    """Our BatchTopK saves as SAELens's jumprelu with its one threshold broadcast; thresholds set per latent in
    SAELens cannot be held by a BatchTopK, so the folder loads as the JumpReLU SAELens reads."""
    import sae_lens

    ours("batchtopk").save(tmp_path / "ours")
    model = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    _per_latent_thresholds(model)
    model.save_model(tmp_path / "resaved")
    loaded = SAE.load(tmp_path / "resaved")
    assert loaded.cfg.architecture == "jumprelu"
    torch.testing.assert_close(loaded.threshold, model.threshold)
    assert SAE.load(tmp_path / "ours").cfg.architecture == "batchtopk"  # unedited, our settings still hold


def test_our_settings_copied_onto_another_saelens_sae_give_way_to_its_weights(tmp_path):
    """Our Matryoshka's metadata carried onto a different SAELens JumpReLU (per-latent thresholds, partly < 0): the
    weights are not a Matryoshka's, so the folder loads as the JumpReLU SAELens reads."""
    sae = ours("matryoshka_batchtopk")
    sae.save(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    model = theirs("JumpReLUSAE", d_in=D_IN)
    model.cfg.metadata = SAEMetadata(**cfg["metadata"])  # our copy, now for another SAE
    model.save_model(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "cfg.json").read_text())["metadata"]["sae_config"]["architecture"] == \
        "matryoshka_batchtopk"
    assert SAE.load(tmp_path / "resaved").cfg.architecture == "jumprelu"


# ----- item 14: JumpReLU with thresholds below 0 -------------------------------------------------------------------


@pytest.mark.parametrize("transcoder", [False, True])
def test_negative_jumprelu_thresholds_compute_as_saelens_both_ways(transcoder, tmp_path):
    """SAELens's JumpReLU is ReLU(pre)·1[pre > θ]: a θ below 0 lets no negative pre-activation through (pre·1[pre > θ]
    differed by up to 0.5 on random folders)."""
    import sae_lens

    name = "JumpReLUTranscoder" if transcoder else "JumpReLUSAE"
    model = theirs(name, **({"d_out": D_OUT, "apply_b_dec_to_input": False} if transcoder else {}))
    assert (model.threshold < 0).sum() > 5
    model.save_model(tmp_path / "theirs")
    loaded, x = SAE.load(tmp_path / "theirs"), _x()
    with torch.no_grad():
        f = loaded.encode(x)
        assert (f >= 0).all()
        torch.testing.assert_close(f, model.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    loaded.save(tmp_path / "ours")  # and back: SAELens reads our folder to the same features
    with torch.no_grad():
        torch.testing.assert_close(sae_lens.SAE.load_from_disk(str(tmp_path / "ours")).encode(x), f, rtol=1e-5, atol=1e-5)


def test_jumprelu_training_forward_acts_as_inference_and_keeps_its_gradients():
    """Training's forward uses the same max(θ, 0) as inference; θ = 0 exactly (where projection leaves a threshold
    that wants to go below 0) still gets its pseudo-derivative, and θ < 0 gets none (its jump has height 0)."""
    sae = ours("jumprelu").train()
    with torch.no_grad():
        sae.threshold[:4] = 0.0
    x = _x()
    out = sae.train_forward(x)
    with torch.no_grad():
        torch.testing.assert_close(out.x_hat, sae(x), rtol=1e-5, atol=1e-5)
    out.loss.backward()
    grad = sae.threshold.grad
    assert (grad[sae.threshold < 0] == 0).all() and (grad[:4] != 0).any()


# ----- item 15: TopK transcoders SAELens has no class for -----------------------------------------------------------


@pytest.mark.parametrize("skip, d_out, label", [(True, None, "topk_skip_transcoder"), (False, D_OUT, "topk_transcoder")])
def test_topk_transcoders_no_saelens_class_computes_are_saved_under_our_label(skip, d_out, label, tmp_path):
    """SAELens's TopK SAE computes a TopK transcoder only without skip and with d_out = d_in; the others were saved
    under its topk label and failed in its loader on W_skip or a shape. Now they carry a label of ours, which
    SAELens's loader refuses by name, and which we read back exactly."""
    import sae_lens

    sae = ours("topk", "blocks.1.hook_mlp_out", skip, d_out)
    sae.save(tmp_path / "t")
    assert json.loads((tmp_path / "t" / "cfg.json").read_text())["architecture"] == label
    with pytest.raises(KeyError, match=label):
        sae_lens.SAE.load_from_disk(str(tmp_path / "t"))
    loaded, x = SAE.load(tmp_path / "t"), _x()
    assert (loaded.cfg.skip, loaded.cfg.d_out, loaded.cfg.k) == (skip, d_out or D_IN, K)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)


# ----- item 16: hook_z and normalize_activations ------------------------------------------------------------------


def test_hook_z_saes_take_per_head_input_as_saelens_does(tmp_path):
    """TransformerLens's attention hook_z is [..., n_heads, d_head]; SAELens flattens it (reshape_activations: hook_z)
    and returns the output in that shape. Flat input works too, and the setting survives our save."""
    model = theirs("StandardSAE", reshape_activations="hook_z", metadata=SAEMetadata(hook_name="blocks.0.attn.hook_z"))
    model.save_model(tmp_path / "z")
    loaded, x = SAE.load(tmp_path / "z"), _x(D_IN, 2, 4, D_IN // 4)
    with torch.no_grad():
        out = loaded(x)
        assert out.shape == x.shape and loaded.encode(x).shape == (200, 2, D_SAE)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode(x.flatten(-2)), loaded.encode(x), rtol=0, atol=0)
    loaded.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "cfg.json").read_text())["reshape_activations"] == "hook_z"


@pytest.mark.parametrize("norm, message", [
    ("constant_norm_rescale", r"scales each input to norm √d_in and the output back by the same factor"),
    ("layer_norm", r"subtracts each input's mean and divides by its standard deviation"),
    ("per_token", r"is not one SAELens knows \(none, expected_average_only_in, covariance_whitening"),
])
def test_per_input_normalisations_are_refused_each_with_its_reason(norm, message, tmp_path):
    """SAELens applies these per input at run time, which no fixed weights hold (the one refusal for every value
    used to advise folding them into the weights); the values SAELens's loader ignores load (CASES above)."""
    theirs("StandardSAE").save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": norm}))
    with pytest.raises(SAEFormatError, match=rf"cfg.json: normalize_activations='{norm}' {message}"):
        SAE.load(tmp_path / "s")


def test_a_reshape_saelens_refuses_is_refused(tmp_path):
    theirs("StandardSAE").save_model(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "reshape_activations": "hook_z"}))
    with pytest.raises(SAEFormatError, match=re.escape("reshape_activations='hook_z' is not SAELens's 'none', or "
                                                       "'hook_z' on a hook_z hook (its hook is '')")):
        SAE.load(tmp_path / "s")
