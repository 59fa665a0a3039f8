"""Steering: adding a decoder direction raises its logit-lens tokens on the real model; a null intervention changes
nothing; the CLI shows both generations and refuses bad requests in one line."""

from __future__ import annotations

import pytest
import torch

from sae.analysis.analyse import logit_lens
from sae.cli import main as cli_main
from sae.data.model import capture, final_norm
from sae.analysis.steer import Steered, format_steered, steer, steering

PROMPT = "def parse(text):\n    return"


def _ids(tokenizer, text: str = PROMPT) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def _logits(model, ids: list[int], context=None) -> torch.Tensor:
    with torch.no_grad(), context or torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]


# ------------------------------------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_adding_a_feature_raises_its_logit_lens_tokens(smollm2, smollm2_sae):
    """For three features, α·d_j at every position (α·‖d_j‖ = 3 × the mean residual norm) raises the mean next-token
    log-probability of d_j's own top-10 logit-lens tokens, relative to the vocabulary's, by over 1 nat, and by more
    than a push of the same norm in any of 3 random directions does: the rise comes from d_j's direction, not from any large push. (Another feature's
    direction may raise them more: decoder directions are not orthogonal, and the lens reads the last layer only.)"""
    from sae.data.model import hooks

    model, tokenizer = smollm2
    sae = smollm2_sae
    ids = _ids(tokenizer)
    features = [0, 1, 2]
    _, lens_ids, _, _ = logit_lens(sae.W_dec[features], final_norm(model), model.get_output_embeddings().weight, 10)
    x = capture(model, torch.tensor([ids]), [sae.cfg.hook_name])[sae.cfg.hook_name][0, 2:]
    push = 3 * float(x.norm(dim=-1).mean())

    def lens_logprob(logits: torch.Tensor) -> torch.Tensor:
        """[features]: mean log-prob of each feature's lens tokens above the vocabulary's mean log-prob (a large push
        in any direction flattens the distribution, which alone lifts every unlikely token)."""
        lp = logits[-1].log_softmax(-1)
        return lp[lens_ids].mean(1) - lp.mean()

    plain = lens_logprob(_logits(model, ids))
    random = torch.nn.functional.normalize(torch.randn(3, x.shape[-1], generator=torch.Generator().manual_seed(0)), dim=1)
    by_chance = torch.stack([  # [random direction, feature]
        lens_logprob(_logits(model, ids, hooks(model, {sae.cfg.hook_name: lambda a, u=u: torch.cat(
            [a[:, :2], a[:, 2:] + push * u], 1)}))) - plain for u in random]).max(0).values
    for n, j in enumerate(features):
        alpha = push / float(sae.W_dec[j].detach().norm())
        rise = lens_logprob(_logits(model, ids, steering(model, sae, {j: alpha}, "add", first=2))) - plain
        assert rise[n] > 1.0 and rise[n] > by_chance[n], (j, rise.tolist(), by_chance.tolist())


@pytest.mark.slow
def test_null_interventions_leave_the_logits_unchanged(smollm2, smollm2_sae, within_ulp):
    """α = 0 and a clamp of a feature to its own activation give the clean logits (to one float32 ulp); clamping it
    to 0 instead moves them, so the comparison can fail."""
    model, tokenizer = smollm2
    sae = smollm2_sae
    ids = _ids(tokenizer)
    clean = _logits(model, ids)
    within_ulp(_logits(model, ids, steering(model, sae, {0: 0.0, 7: 0.0, 100: 0.0}, "add", first=2)), clean,
               torch.float32)
    last = len(ids) - 1  # splice the last position only, where one value is the feature's own activation
    # encoded as the splice encodes it (the whole sequence at once: one row alone may round apart)
    f = sae.encode(capture(model, torch.tensor([ids]), [sae.cfg.hook_name])[sae.cfg.hook_name])[0, last]
    j = int(f.argmax())
    assert f[j] > 0
    within_ulp(_logits(model, ids, steering(model, sae, {j: float(f[j])}, "clamp", first=last)), clean, torch.float32)
    ablated = _logits(model, ids, steering(model, sae, {j: 0.0}, "clamp", first=last))
    assert torch.equal(ablated[:last], clean[:last]) and (ablated[last] - clean[last]).abs().max() > 1e-2


@pytest.mark.slow
def test_generation_uses_one_seed_for_both_texts(smollm2, smollm2_sae):
    """Sampled at temperature 1, α = 0 reproduces the plain text token for token; a large α changes the text."""
    model, tokenizer = smollm2
    same = steer(model, tokenizer, smollm2_sae, PROMPT, {5: 0.0}, max_new_tokens=6, temperature=1.0, seed=3)
    assert same.plain == same.steered and same.plain.strip()
    moved = steer(model, tokenizer, smollm2_sae, PROMPT, {5: 200.0}, max_new_tokens=6)
    assert moved.steered != moved.plain


# ------------------------------------------------------------------------------------------------ the CLI (tiny model)


@pytest.fixture
def tiny_sae_dir(hand_sae, tiny_llama, tmp_path):
    torch.manual_seed(0)
    return hand_sae(torch.randn(32, 48), torch.randn(48, 32), model=str(tiny_llama)).save(tmp_path / "sae")


def test_cli_prints_the_plain_and_the_steered_text_side_by_side(tiny_sae_dir, capsys):
    args = ["steer", f"sae={tiny_sae_dir}", "prompt=def f(x):", "features={3: 50}", "max_new_tokens=6", "device=cpu"]
    assert cli_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "prompt: 'def f(x):'" in out and "| steered (add #3 +50)" in out
    assert max(map(len, out.splitlines())) <= 80


def test_format_wraps_each_text_into_its_column():
    text = "word " * 40 + "\nsecond line"
    lines = format_steered(Steered("p", text, "short", {1: 2.0, 9: -1.0}, "clamp")).splitlines()
    assert "steered (clamp #1 =2, #9 =-1)" in lines[2] and all(len(line) <= 80 for line in lines)
    assert sum(line.split(" | ")[0].count("word") for line in lines[4:]) == 40 and "second line" in "".join(lines)


@pytest.mark.parametrize("override, message", [
    ("features={999: 1}", "feature 999 does not exist: this SAE has 48 features (ids 0..47)"),
    ("features={}", "name at least one feature"),
    ("features={a: 1}", "feature id 'a' is not an integer"),
    ("features={3: .nan}", "feature 3's value nan is not a finite number"),
    ("mode=scale", "unknown steering mode 'scale'; use one of add, clamp"),
    ("max_new_tokens=0", "max_new_tokens=0 must be at least 1"),
    ("exclude_first=-1", "exclude_first=-1 must be ≥ 0"),
    ("prompt=", "prompt is empty"),
    ("sae=MISSING", "nothing does not exist; pass an SAE folder"),
])
def test_cli_refuses_bad_requests_in_one_line(override, message, tiny_sae_dir, tmp_path, capsys):
    args = ["steer", f"sae={tiny_sae_dir}", "prompt=def", "features={3: 1}", "device=cpu", override.replace(
        "MISSING", str(tmp_path / "nothing"))]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sae steer: error: ") and message in err[-1], err
    assert len(err) == 1 or override == "prompt=", err  # refused before the model loads, except what needs its tokenizer


def test_cli_refuses_an_sae_of_another_width_or_without_its_model(hand_sae, tiny_llama, tmp_path, capsys):
    narrow = hand_sae(torch.randn(16, 8), torch.randn(8, 16), model=str(tiny_llama)).save(tmp_path / "narrow")
    assert cli_main(["steer", f"sae={narrow}", "prompt=def", "features={3: 1}", "device=cpu"]) == 2
    assert "reads 16-wide activations at blocks.1.hook_resid_post but this model's are 32 wide" in capsys.readouterr().err
    anonymous = hand_sae(torch.randn(32, 8), torch.randn(8, 32)).save(tmp_path / "anonymous")
    assert cli_main(["steer", f"sae={anonymous}", "prompt=def", "features={3: 1}", "device=cpu"]) == 2
    assert "does not record its model; pass model=" in capsys.readouterr().err
    assert cli_main(["steer", f"sae={anonymous}", f"model={tiny_llama}", "prompt=def", "features={3: 1}",
                     "max_new_tokens=2", "device=cpu"]) == 0
