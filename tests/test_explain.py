"""sae.analysis.explain: prompts hold the contexts and their marks, scores computed by hand, resume counted in model calls,
non-activating windows checked against the cache, and a small run on the embedded SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae.analysis import explain as ex
from sae.analysis.analyse import AnalyseConfig
from sae.analysis.dashboard.build import analyse
from sae.cli import main as cli_main
from sae.analysis.dashboard import read_js
from sae.analysis.explain import Analysis, ExplainConfig, auroc, balanced_accuracy, explain, split_examples

# ----------------------------------------------------------------------------------------------- by hand


def hand_analysis() -> Analysis:
    """One context "<bos>def f(x):\n" with a window of 2 tokens left and 1 right, the BOS excluded from the cache."""
    tokens = {"0": "<bos>", "1": "def", "2": " f", "3": "(", "4": "x", "5": ")", "6": ":", "7": "\n"}
    index = {"window": [2, 1], "first_pos": 1, "context_size": 8, "window_scale": 1000}
    return Analysis(Path("."), index, tokens, {"9": [0, 1, 2, 3, 4, 5, 6, 7]})


def test_examples_show_their_window_with_activating_tokens_marked():
    a = hand_analysis()
    # Position 3 ("("): the window covers positions 1..4; thousandths of max act 0, 1000, 50, 300 there.
    example = [9, 3, 2.0, [0, 1000, 50, 300]]
    assert a.marked(example, 0.1) == "def<< f(x>>"  # "(" is the example's own token: marked though only at 5%
    assert a.marked(example, 0.5) == "def<< f(>>x"
    assert a.marked([9, 1, 1.0, [1000, 50]], 0.1) == "<<def>> f"  # window clipped at the excluded BOS
    assert a.marked([9, 7, 1.0, [0, 0, 1000]], 0.1) == "):<<\n>>"  # ... and at the context's end

    prompt = ex.explain_prompt([a.marked(example, 0.1), a.marked([9, 7, 1.0, [0, 0, 1000]], 0.1)])
    assert "Text 1:\ndef<< f(x>>\n\nText 2:\n):<<\n>>\n\n" in prompt and "<<like this>>" in prompt
    question = ex.judge_prompt("function names", "".join(a.text(9, 3)))
    assert question.startswith("A feature of a language model fires on function names.") and "Text:\ndef f(x\n" in question
    assert "<<" not in question


def test_prompt_and_held_out_examples_are_disjoint():
    top = [[i, 5, 10.0 - i, []] for i in range(6)]
    samples = [[100 + i, 5, 1.0, i % 3, []] for i in range(9)]  # intervals 0, 1, 2, 0, 1, 2, ...
    shown, held = split_examples({"top": top, "samples": samples}, n_top=2, n_samples=1, n_score=5)
    assert [e[0] for e in shown] == [0, 1, 100, 101, 102]  # 2 top, then the first sample of each interval
    assert [e[0] for e in held] == [2, 103, 3, 104, 4]  # alternating remaining top and remaining samples, in order
    _, held = split_examples({"top": top, "samples": []}, n_top=5, n_samples=1, n_score=5)
    assert [e[0] for e in held] == [5]


def test_explanation_is_the_first_phrase_without_marks():
    assert ex.first_phrase(' the "Over<<flowError>>" token. It also fires on x.\nText 2:') == 'the "OverflowError" token'
    assert ex.first_phrase("\n\n  numbers in version strings.") == "numbers in version strings"


def test_balanced_accuracy_and_auroc_by_hand():
    margins = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.2])
    labels = torch.tensor([True, True, True, False, False, False])
    # Hits 2/3 (2, 0.5 > 0), correct rejections 2/3 (-3, -0.2 <= 0): (2/3 + 2/3) / 2.
    assert balanced_accuracy(margins, labels) == pytest.approx(2 / 3)
    # Pairs won: 2 beats all 3 negatives, -1 beats -3, 0.5 beats -3 and -0.2: 6 of 9.
    assert auroc(margins, labels) == pytest.approx(6 / 9)
    # A margin of exactly 0 answers "No"; a tie between a positive and a negative counts half.
    margins, labels = torch.tensor([1.0, 0.0, 0.0, -1.0]), torch.tensor([True, True, False, False])
    assert balanced_accuracy(margins, labels) == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert auroc(margins, labels) == pytest.approx((2 + 0.5 + 1) / 4)
    # Unequal numbers: each class weighs half whatever its size.
    assert balanced_accuracy(torch.tensor([1.0, -1.0, -1.0, -1.0]), torch.tensor([True, False, False, False])) == 1.0
    assert balanced_accuracy(margins[:2], labels[:2]) is None and auroc(margins[:2], labels[:2]) is None


def test_silent_windows_by_hand():
    acts = torch.tensor([[float("nan"), 0, 0, 0, 2.0, 0, 0, 0]])  # position 0 not cached; active at 4
    silent = ex.silent_windows(acts, left=2, right=1, first_pos=1)
    # Window [p-2, p+1] must miss position 4: p + 1 < 4 or p - 2 > 4, i.e. p <= 2 (p >= 1: cached) or p >= 7.
    assert silent[0].tolist() == [False, True, True, False, False, False, False, True]
    places = ex.pick_silent(silent, [42], 5, torch.Generator().manual_seed(0))
    assert sorted(places) == [[42, 1], [42, 2], [42, 7]]


def test_baseline_partner_is_never_the_feature_itself():
    for n in (2, 3, 7):
        partners = ex.baseline_partners(list(range(10, 10 + n)), seed=n)
        assert sorted(partners) == sorted(partners.values()) == list(range(10, 10 + n))
        assert all(a != b for a, b in partners.items())
    assert ex.baseline_partners([5], 0) == {}


# ----------------------------------------------------------------------------------------------- on a real analysis


@pytest.fixture(scope="module")
def analysis(tiny_cache, tiny_llama, hand_sae, tmp_path_factory) -> Path:
    """A real analysis of a random ReLU SAE on the session's tiny-Llama cache (n_top 6: 3 shown, 3 held out)."""
    root = tmp_path_factory.mktemp("explain")
    torch.manual_seed(1)
    hand_sae(torch.randn(32, 16), torch.randn(16, 32) * 0.1, model=str(tiny_llama)).save(root / "sae")
    return analyse(AnalyseConfig(sae=str(root / "sae"), cache=str(tiny_cache), out=str(root / "an"), n_top=6,
                                 window_left=4, window_right=2, n_interval_samples=2, device="cpu"))


def copy_of(analysis: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(analysis, tmp_path / "an"))


class Counted:
    """Counts the explainer's loads and the prompts it is asked to complete and judge."""

    def __init__(self, monkeypatch):
        self.loads = self.completed = self.judged = 0
        load, complete, margins = ex.Explainer.load.__func__, ex.Explainer.complete, ex.Explainer.margins

        def counted_load(cls, cfg):
            self.loads += 1
            return load(cls, cfg)

        def counted_complete(explainer, prompts):
            self.completed += len(prompts)
            return complete(explainer, prompts)

        def counted_margins(explainer, prompts):
            self.judged += len(prompts)
            return margins(explainer, prompts)

        monkeypatch.setattr(ex.Explainer, "load", classmethod(counted_load))
        monkeypatch.setattr(ex.Explainer, "complete", counted_complete)
        monkeypatch.setattr(ex.Explainer, "margins", counted_margins)


def test_a_second_run_skips_saved_features_and_a_changed_one_is_refused(analysis, tiny_cache, tiny_llama, tmp_path,
                                                                         monkeypatch, one_thread):
    folder = copy_of(analysis, tmp_path)
    live = [f["id"] for f in read_js(folder / "data" / "index.js")["features"]]
    cfg = dict(analysis=str(folder), cache=str(tiny_cache), model=str(tiny_llama), n_explain_top=3,
               n_explain_samples=1, n_score=3, max_new_tokens=4, device="cpu", batch_size=2)
    calls = Counted(monkeypatch)
    explain(ExplainConfig(**cfg, features=live[:3]))
    saved = json.loads((folder / "explanations.json").read_text())
    assert (calls.loads, calls.completed) == (1, 3)
    # Each feature: its held-out positives and as many negatives, judged with its own and its partner's explanation.
    assert calls.judged == sum(2 * (len(f["score"]["positive"]) + len(f["score"]["negative"]))
                               for f in saved["features"].values()) > 0
    assert saved == read_js(folder / "data" / "explanations.js")  # the browser's copy

    before = (folder / "explanations.json").read_bytes()
    explain(ExplainConfig(**cfg, features=live[:3]))
    assert (calls.loads, calls.completed) == (1, 3)  # nothing left to do: the model was not even loaded
    assert json.loads((folder / "explanations.json").read_text())["features"] == json.loads(before)["features"]

    judged = calls.judged
    explain(ExplainConfig(**cfg, features=live[:4]))  # one more feature: only it is explained and scored
    assert (calls.loads, calls.completed) == (2, 4)
    new = json.loads((folder / "explanations.json").read_text())["features"][str(live[3])]["score"]
    assert calls.judged - judged == 2 * (len(new["positive"]) + len(new["negative"]))

    with pytest.raises(ex.ExplainError, match="n_score=3.*overwrite=true"):
        explain(ExplainConfig(**{**cfg, "n_score": 2}, features=live[:3]))
    explain(ExplainConfig(**{**cfg, "n_score": 2}, features=live[:1], overwrite=True))
    assert list(json.loads((folder / "explanations.json").read_text())["features"]) == [str(live[0])]


@pytest.mark.slow
def test_explain_and_score_with_the_embedded_model(analysis, tiny_cache, hook, tmp_path, one_thread):
    """Two features end to end on SmolLM2: held-out contexts really activate (or are really silent on) the feature,
    never repeat what the prompt showed, and batched judging equals one prompt at a time (left padding is right)."""
    from sae.saes import SAE
    from sae.data.store import ActivationStore

    folder = copy_of(analysis, tmp_path)
    index = read_js(folder / "data" / "index.js")
    ids = [index["features"][0]["id"], index["features"][-1]["id"]]
    cfg = ExplainConfig(analysis=str(folder), cache=str(tiny_cache), features=ids, n_explain_top=2, n_explain_samples=1,
                        n_score=2, max_new_tokens=8, device="cpu", negative_contexts=16)
    explain(cfg)
    saved = ex.read_explanations(folder)
    assert saved["settings"]["model"] == "smollm2" and saved["summary"]["n_scored"] == 2

    store, sae = ActivationStore(tiny_cache), SAE.load(Path(index["sae"]))
    rows = list(store.iter_ordered([hook]))
    F = sae.encode(torch.cat([r.acts[hook] for r in rows])).detach()
    place = {(s, p): i for i, (s, p) in enumerate(zip(torch.cat([r.seq for r in rows]).tolist(),
                                                       torch.cat([r.pos for r in rows]).tolist()))}
    for j in ids:
        f = saved["features"][str(j)]
        assert isinstance(f["explanation"], str) and f["explanation"]
        s = f["score"]
        assert 0 <= s["balanced_accuracy"] <= 1 and 0 <= s["auroc"] <= 1 and s["baseline_feature"] == (set(ids) - {j}).pop()
        assert len(s["positive"]) == len(s["negative"]) == 2
        assert not {tuple(p) for p in s["positive"]} & {tuple(p) for p in f["shown"]}
        for seq, pos in s["positive"]:
            assert F[place[seq, pos], j] > 0
        for seq, pos in s["negative"]:  # zero on every cached token of the window shown
            window = [place[seq, p] for p in range(max(1, pos - 4), min(32, pos + 3))]
            assert (F[window, j] == 0).all()

    explainer = ex.Explainer.load(cfg)
    prompts = [explainer.question(ex.judge_prompt(saved["features"][str(ids[0])]["explanation"], t))
               for t in ("def f(x):", "import os\nprint(os.sep)")]
    together = explainer.margins(prompts)
    alone = torch.cat([explainer.margins([p]) for p in prompts])
    assert torch.allclose(together, alone, atol=1e-4)


# ----------------------------------------------------------------------------------------------- the command line


def test_cli_says_what_to_do(analysis, tiny_cache, tiny_llama, tmp_path, capsys, monkeypatch):
    from sae.analysis.dashboard import write_js

    assert cli_main(["explain", f"analysis={tmp_path / 'nothing'}"]) == 2
    assert "run `sae analyse` first" in capsys.readouterr().err
    index = read_js(analysis / "data" / "index.js")
    assert cli_main(["explain", f"analysis={analysis}", f"cache={tiny_cache}", "features=[999]"]) == 2
    assert f"cannot explain feature(s) 999 (not in 0..{index['d_sae'] - 1})" in capsys.readouterr().err

    assert cli_main(["explain", f"analysis={analysis}", "n_score=0", "mark_fraction=2"]) == 2
    assert "n_score=0 (at least 1), mark_fraction=2.0 (a fraction of the maximum, 0 to 1)" in capsys.readouterr().err

    calls = Counted(monkeypatch)
    other = copy_of(analysis, tmp_path)  # an analysis whose contexts are not the cache's
    contexts = read_js(other / "data" / "contexts.js")
    first = min(contexts, key=int)
    write_js(other / "data" / "contexts.js", "SAE_CONTEXTS", {**contexts, first: contexts[first][::-1]})
    assert cli_main(["explain", f"analysis={other}", f"cache={tiny_cache}", f"model={tiny_llama}", "device=cpu"]) == 2
    assert "does not hold the contexts the analysis" in capsys.readouterr().err
    write_js(other / "data" / "index.js", "SAE_INDEX", {**index, "sae": str(tmp_path / "moved")})
    assert cli_main(["explain", f"analysis={other}", f"cache={tiny_cache}", f"model={tiny_llama}", "device=cpu"]) == 2
    assert f"{tmp_path / 'moved'}, is missing" in capsys.readouterr().err
    assert calls.loads == 0 and not (other / "explanations.json").exists()  # stopped before any model time


def test_the_settings_a_saved_file_must_match_are_config_keys():
    from dataclasses import fields

    assert set(ex.SETTINGS) <= {f.name for f in fields(ExplainConfig)}  # (tests/test_config.py checks their docs)


def test_an_explainer_needs_no_hook_map(tmp_path, one_thread, monkeypatch):
    """Any causal LM can explain: the load-time hook self-check runs only for a model that will be hooked, so a
    family whose map cannot be verified is refused for hooks but still loads as explainer."""
    from transformers import OPTConfig

    from sae import tiny
    from sae.data import model as model_lib
    from sae.data.model import ModelError, load_model

    def refuse(model):
        raise ModelError("model type 'opt' has no hook map the probe could verify")

    monkeypatch.setattr(model_lib, "check_hooks", refuse)
    folder = tiny.save(tmp_path / "opt", OPTConfig(vocab_size=512, hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                                                   num_attention_heads=2, word_embed_proj_dim=16))
    with pytest.raises(ModelError, match="no hook map"):
        load_model(str(folder), "cpu")
    explainer = ex.Explainer.load(ExplainConfig(model=str(folder), device="cpu", max_new_tokens=3, batch_size=2))
    completions = explainer.complete([explainer.prompt("x", ex.LEAD), explainer.prompt("a longer request", ex.LEAD)])
    assert len(completions) == 2 and explainer.margins([explainer.question("y")]).shape == (1,)


def test_an_analysis_of_a_hub_sae_scores_with_it(analysis, tiny_cache, tmp_path, monkeypatch):
    """`sae analyse sae=owner/repo/folder` records that hub name as the analysis's SAE: scoring loads it from the hub
    (here its local cache, offline) like every other command that takes an SAE name."""
    import shutil

    import huggingface_hub.constants as constants

    from sae.analysis.explain import Analysis, ExplainConfig, negative_places

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    local = Analysis.read(analysis)
    shutil.copytree(local.index["sae"], repo / "snapshots" / commit / "layer")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    hub = Analysis(local.folder, {**local.index, "sae": "someone/saes/layer"}, local.tokens, local.contexts)
    cfg = ExplainConfig(analysis=str(analysis), cache=str(tiny_cache), device="cpu")
    ids = [int(j) for j in list(local.index.get("live", []))[:2]] or [0, 1]
    assert negative_places(hub, cfg, ids, {j: 2 for j in ids}) == negative_places(local, cfg, ids, {j: 2 for j in ids})


def test_an_analysis_of_an_sae_under_home_scores_with_it(analysis, tiny_cache, tmp_path, monkeypatch):
    """`sae analyse` expands ~ in its SAE's name (a YAML config keeps it), so scoring must too."""
    import shutil

    from sae.analysis.explain import Analysis, ExplainConfig, negative_places

    local = Analysis.read(analysis)
    shutil.copytree(local.index["sae"], tmp_path / "s")
    monkeypatch.setenv("HOME", str(tmp_path))
    home = Analysis(local.folder, {**local.index, "sae": "~/s"}, local.tokens, local.contexts)
    cfg = ExplainConfig(analysis=str(analysis), cache=str(tiny_cache), device="cpu")
    assert negative_places(home, cfg, [0, 1], {0: 2, 1: 2}) == negative_places(local, cfg, [0, 1], {0: 2, 1: 2})


def test_a_damaged_explanations_file_is_a_one_line_error_and_overwrite_replaces_it(analysis, tiny_cache, tmp_path,
                                                                                     capsys):
    """A truncated or hand-broken explanations.json stops the run in one line (nothing is lost: it is left as it is);
    overwrite=true, which starts over anyway, does not need to read it."""
    folder = copy_of(analysis, tmp_path)
    (folder / "explanations.json").write_text('{"format": 1, "feat')
    live = [f["id"] for f in read_js(folder / "data" / "index.js")["features"]]
    assert cli_main(["explain", f"analysis={folder}", f"cache={tiny_cache}", f"features=[{live[0]}]"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "is not valid JSON" in err[0] and "overwrite=true" in err[0], err
    assert (folder / "explanations.json").read_text() == '{"format": 1, "feat'
    cfg = ExplainConfig(analysis=str(folder), cache=str(tiny_cache), overwrite=True)
    assert ex.start_state(folder, ex.Analysis.read(folder), cfg)["features"] == {}
    # A JSON file of the user's under that name is refused, overwrite=true or not (it was replaced).
    (folder / "explanations.json").write_text('{"my": "notes"}')
    for extra in ([], ["overwrite=true"]):
        assert cli_main(["explain", f"analysis={folder}", f"cache={tiny_cache}", f"features=[{live[0]}]", *extra]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].endswith("is not one `sae explain` wrote, and explaining would replace it; "
                                                 "move it aside (nothing was changed)"), err
    assert (folder / "explanations.json").read_text() == '{"my": "notes"}'
