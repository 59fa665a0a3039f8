"""Attribution: exact on a model that is linear after the hook, predictive of ablations on the real model, and a CLI
that lists features with their tokens and explanations and refuses bad requests in one line."""

from __future__ import annotations

import json

import pytest
import torch

from sae.analysis.attribute import attribute_logit, explanations_of
from sae.cli import main as cli_main
from sae.data.model import load_model
from sae.analysis.steer import steering

LAST_HOOK = "blocks.2.hook_resid_post"  # the tiny Llama's last layer


def _logit(model, ids: list[int], target: int, context) -> float:
    with torch.no_grad(), context:
        return float(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1, target])


def test_on_a_linear_toy_attributions_are_exact(tiny_llama, hand_sae):
    """With the final norm removed, the logits are linear in the last layer's output, so activation × gradient is
    exact: the attributions sum to the logit change when every feature is zero-ablated, each one is its own
    ablation's effect, and features + SAE error + decoder bias make up the whole logit."""
    model, _ = load_model(str(tiny_llama), "cpu")
    model.model.norm = torch.nn.Identity()
    torch.manual_seed(0)
    sae = hand_sae(torch.randn(32, 48) * 10, torch.randn(48, 32) * 0.02, b_enc=torch.full((48,), -0.5))
    sae.cfg.hook_name = LAST_HOOK
    with torch.no_grad():
        sae.b_dec.normal_(std=0.02)
    ids = torch.randint(3, 512, (10,)).tolist()
    a = attribute_logit(model, sae, ids, target=None, first=2)
    active = (a.activations[2:] > 0).any(0).nonzero().squeeze(1).tolist()
    assert 5 < len(active) < 48 and torch.equal(a.per_position[:2], torch.zeros(2, 48))

    def ablated(features) -> float:
        return _logit(model, ids, a.target, steering(model, sae, {j: 0.0 for j in features}, "clamp", first=2))

    scale = float(a.per_position.abs().sum()) + abs(a.logit)
    tol = 1e-6 * scale  # float32 sums of ~50 terms of this size
    assert float(a.features.sum()) == pytest.approx(a.logit - ablated(range(48)), abs=tol)
    for j in active[:5]:
        assert float(a.features[j]) == pytest.approx(a.logit - ablated([j]), abs=tol)
    assert float(a.features.sum()) + a.error + a.bias == pytest.approx(a.logit, abs=tol)
    assert abs(a.error) > 100 * tol and abs(a.bias) > 100 * tol  # both terms are really there


@pytest.mark.slow
def test_top_attributed_features_matter_more_than_random_active_ones(smollm2, smollm2_sae):
    """On SmolLM2, zero-ablating the 5 features with the largest attribution lowers the predicted token's logit more
    than zero-ablating 5 active features drawn at random (10 seeded draws), on two prompts."""
    model, tokenizer = smollm2
    sae = smollm2_sae
    for prompt in ("def parse(text):\n    return", "import os\nimport"):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        a = attribute_logit(model, sae, ids, first=2)

        def drop(features) -> float:
            context = steering(model, sae, {int(j): 0.0 for j in features}, "clamp", first=2)
            return a.logit - _logit(model, ids, a.target, context)

        top = drop(a.features.topk(5).indices)
        active = (a.activations[2:] > 0).any(0).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(0)
        random = [drop(active[torch.randperm(len(active), generator=g)[:5]]) for _ in range(10)]
        assert top > 0 and top > max(random), (prompt, top, random)


# ------------------------------------------------------------------------------------------------ the CLI (tiny model)


@pytest.fixture
def tiny_sae_dir(hand_sae, tiny_llama, tmp_path):
    torch.manual_seed(0)
    return hand_sae(torch.randn(32, 48), torch.randn(48, 32), model=str(tiny_llama)).save(tmp_path / "sae")


def test_cli_lists_features_with_tokens_and_explanations(tiny_sae_dir, tmp_path, capsys):
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    features = {str(j): {"explanation": f"explained {j}.", "shown": []} for j in range(48)}
    (analysis / "explanations.json").write_text(json.dumps({"format": 1, "features": features}))  # as `sae explain`
    args = ["attribute", f"sae={tiny_sae_dir}", "prompt=def f(x):\n    return x", f"analysis={analysis}",
            "n_features=3", "device=cpu"]
    assert cli_main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "activation × gradient at blocks.1.hook_resid_post" in out and "features for" in out
    rows = [line.split()[0] for line in out.splitlines() if line.strip().startswith("#")]
    assert len(rows) == 6 and all(f"explained {row[1:]}." in out for row in rows)
    assert cli_main([*args[:-1], f"analysis={tmp_path / 'none'}", "device=cpu"]) == 0  # no explanations: tokens only
    assert "explained" not in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("target=def f(x)", "is 5 tokens"),
    ("prompt=x", "the prompt has 2 tokens with the BOS, all before exclude_first=2"),
    ("n_features=0", "n_features=0 and logit_tokens=5 must both be at least 1"),
    ("exclude_first=-1", "exclude_first=-1 must be ≥ 0"),
    ("analysis=BAD", "is not valid JSON"),
])
def test_cli_refuses_bad_requests_in_one_line(override, message, tiny_sae_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "explanations.json").write_text("{not json")
    args = ["attribute", f"sae={tiny_sae_dir}", "prompt=def f(x):", "device=cpu", override.replace("BAD", str(bad))]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sae attribute: error: ") and message in err[-1], err


def test_explanations_are_read_from_sae_explains_file(tmp_path):
    assert explanations_of(tmp_path) == {}
    features = {"3": {"explanation": "a", "score": None}, "5": {"explanation": "b"}, "8": {"explanation": ""}}
    (tmp_path / "explanations.json").write_text(json.dumps({"format": 1, "features": features}))
    assert explanations_of(tmp_path) == {3: "a", 5: "b"}


def test_explanations_of_another_sae_are_refused_not_shown(tiny_sae_dir, tmp_path, capsys):
    """An analysis folder whose explanations.json explains another SAE (e.g. the demo's default analysis= with another
    sae=) would label these features with that SAE's explanations: refused in one line; analysis= (empty) shows none."""
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    features = {str(j): {"explanation": f"explained {j}.", "shown": []} for j in range(48)}
    saved = {"format": 1, "sae": str(tmp_path / "other_sae"), "hook": "blocks.1.hook_resid_post", "features": features}
    (analysis / "explanations.json").write_text(json.dumps(saved))
    args = ["attribute", f"sae={tiny_sae_dir}", "prompt=def f(x):\n    return x", "n_features=3", "device=cpu"]
    assert cli_main([*args, f"analysis={analysis}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "explains the features of" in err[0] and "other_sae" in err[0], err
    saved["sae"] = str(tiny_sae_dir)  # the same SAE, named as `sae analyse` was given it: shown
    (analysis / "explanations.json").write_text(json.dumps(saved))
    assert cli_main([*args, f"analysis={analysis}"]) == 0 and "explained" in capsys.readouterr().out
    assert cli_main([*args, "analysis="]) == 0 and "explained" not in capsys.readouterr().out


def test_features_for_the_target_have_positive_attributions_and_against_negative(tiny_sae_dir):
    """With more rows asked for than features of one sign, a list must not fill up with features of the other sign
    (listed "for" the token while they lower its logit): every nonzero feature appears once, on the side of its sign."""
    from sae.analysis.attribute import report
    from sae.saes import SAE

    sae = SAE.load(tiny_sae_dir)
    model, tokenizer = load_model(sae.cfg.model_name, "cpu")
    r = report(model, tokenizer, sae, "def f(x):\n    return x", n_features=sae.cfg.d_sae, logit_tokens=1)
    assert r.supporting and r.opposing
    assert all(row.attribution > 0 for row in r.supporting) and all(row.attribution < 0 for row in r.opposing)
    listed = [row.feature for row in r.supporting + r.opposing]
    assert len(listed) == len(set(listed))
    assert sum(row.attribution for row in r.supporting + r.opposing) == pytest.approx(r.features_total, abs=1e-4)


def test_a_features_max_activation_is_over_the_attributed_positions_only(tiny_sae_dir):
    """"max act" is read at the positions the SAE is spliced into, not at the leading ones left out (the BOS's massive
    activations would show there): with only the last position spliced it is the activation there."""
    from sae.analysis.attribute import report
    from sae.data.model import capture
    from sae.saes import SAE

    sae = SAE.load(tiny_sae_dir)
    model, tokenizer = load_model(sae.cfg.model_name, "cpu")
    prompt = "def f(x):\n    return x"
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    f = sae.encode(capture(model, torch.tensor([ids]), [sae.cfg.hook_name])[sae.cfg.hook_name][0]).detach()
    r = report(model, tokenizer, sae, prompt, n_features=sae.cfg.d_sae, logit_tokens=1, exclude_first=len(ids) - 1)
    rows = r.supporting + r.opposing
    assert rows and any(f[:, row.feature].max() > f[-1, row.feature] + 1e-3 for row in rows)  # the test can fail
    for row in rows:
        assert row.activation == pytest.approx(float(f[-1, row.feature]), rel=1e-4, abs=1e-5)
