"""sae.analysis.analyse against brute force on the whole cache, the model's own norm and unembedding, and known anomalies."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from sae.analysis.analyse import (
    AnalyseConfig, ScoreConfig, logit_lens, normalised_error, percentile, score, score_text, stream_features,
)
from sae.analysis.dashboard.build import analyse
from sae.analysis.dashboard import read_js, write_dashboard
from sae.data.store import ActivationStore, CacheWriter


def synthetic_cache(path: Path, hook: str, acts: torch.Tensor, tokens: torch.Tensor, first_pos: int) -> ActivationStore:
    """A real cache holding the given activations [n_ctx, T - first_pos, d] and tokens [n_ctx, T]."""
    n_ctx, T = tokens.shape
    meta = {"model": "synthetic", "hooks": {hook: acts.shape[-1]}, "dtype": "float32", "context_size": T,
            "exclude_first": bool(first_pos), "bos_token_id": 0, "eval_fraction": 0.25}
    writer = CacheWriter(path, meta, contexts_per_shard=n_ctx)
    writer.add({hook: acts}, tokens, first_pos)
    writer.finish(first_pos)
    writer.close()
    return ActivationStore(path)


@pytest.fixture(scope="module")
def tied(tmp_path_factory, hand_sae, hook):
    """Small integer activations (many ties, many zeros) through an SAE with f = ReLU(x), and every row's features."""
    torch.manual_seed(0)
    n_ctx, T, d = 9, 11, 5
    acts = torch.randint(-3, 5, (n_ctx, T - 1, d)).float()
    acts[:, :, 4] = -1.0  # a dead feature
    acts[2, 3, 4] = 2.0  # ... brought to life by exactly one token
    store = synthetic_cache(tmp_path_factory.mktemp("tied") / "cache", hook, acts, torch.randint(1, 50, (n_ctx, T)), 1)
    sae = hand_sae(torch.eye(d), torch.eye(d))
    return store, sae, torch.relu(acts)  # features indexed [seq, pos - 1, feature]


def test_top_examples_and_windows_equal_brute_force(tied):
    store, sae, F = tied
    n_ctx, rows, d = F.shape
    cfg = AnalyseConfig(sae="", n_top=6, reservoir=4, window_left=3, window_right=2, batch_rows=7)
    stats = stream_features(store, sae, cfg)  # 7-row batches: windows straddle batches and contexts

    assert stats.n_tokens == n_ctx * rows
    flat = F.reshape(-1, d)
    assert torch.equal(stats.n_active.float(), (flat > 0).sum(0).float())
    assert torch.allclose(stats.act_sum.float(), flat.sum(0))
    assert torch.equal(stats.hist.sum(1).float(), (flat > 0).sum(0).float())
    for j in range(d):
        expected = flat[:, j].sort(descending=True).values[: cfg.n_top]
        expected = expected[expected > 0]
        got = stats.top.act[j][stats.top.act[j] > 0]
        assert torch.equal(got, expected), j  # same values in the same (descending) order, ties included
        places = list(zip(stats.top.seq[j].tolist(), stats.top.pos[j].tolist()))[: len(got)]
        assert len(set(places)) == len(places)  # a tied value never repeats one token
        for (seq, pos), act, window in zip(places, got.tolist(), stats.top.window[j]):
            assert F[seq, pos - 1, j] == act
            for o, w in zip(range(-3, 3), window.tolist()):
                p = pos + o
                if 1 <= p < 11:
                    assert w == F[seq, p - 1, j], (j, seq, pos, o)
                else:  # before the first cached position (the excluded BOS) or past the end of the context
                    assert math.isnan(w), (j, seq, pos, o)
    assert stats.top.act[4].tolist()[:2] == [2.0, 0.0]
    assert (stats.top.seq[4, 0].item(), stats.top.pos[4, 0].item()) == (2, 4)


def test_reservoir_holds_only_active_tokens_and_all_of_them_when_it_can(tied):
    store, sae, F = tied
    n_ctx, rows, d = F.shape
    active = {j: {(s, p + 1) for s, p in (F[:, :, j] > 0).nonzero().tolist()} for j in range(d)}
    big = stream_features(store, sae, AnalyseConfig(sae="", reservoir=n_ctx * rows, batch_rows=13)).reservoir
    small = stream_features(store, sae, AnalyseConfig(sae="", reservoir=5, batch_rows=13)).reservoir
    again = stream_features(store, sae, AnalyseConfig(sae="", reservoir=5, batch_rows=13)).reservoir
    assert torch.equal(small.seq, again.seq) and torch.equal(small.pos, again.pos)  # seeded: the same browser each run
    for j in range(d):
        kept = big.key[j] > -math.inf
        assert set(zip(big.seq[j][kept].tolist(), big.pos[j][kept].tolist())) == active[j]
        kept = small.key[j] > -math.inf
        places = set(zip(small.seq[j][kept].tolist(), small.pos[j][kept].tolist()))
        assert len(places) == min(5, len(active[j])) and places <= active[j]
        assert all(F[s, p - 1, j] == a for s, p, a in zip(small.seq[j][kept].tolist(), small.pos[j][kept].tolist(), small.act[j][kept].tolist()))


def test_logit_lens_equals_the_models_own_norm_and_unembedding(tiny_llama, tiny_gpt2):
    """The lens is the direction pushed through the final norm and unembedding, up to a positive scale per direction."""
    from sae.data.model import final_norm, load_model

    torch.manual_seed(0)
    for folder in (tiny_llama, tiny_gpt2):
        model, _ = load_model(str(folder), "cpu")
        norm, W_U = final_norm(model), model.get_output_embeddings().weight
        with torch.no_grad():
            norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)  # a non-trivial weight, so ignoring it would show
            if getattr(norm, "bias", None) is not None:
                norm.bias.normal_()
        W_dec = torch.randn(7, W_U.shape[1])
        top_v, top_i, bot_v, bot_i = logit_lens(W_dec, norm, W_U, k=10)

        centred = W_dec - W_dec.mean(1, keepdim=True) if isinstance(norm, torch.nn.LayerNorm) else W_dec
        by_hand = (centred * norm.weight.detach()) @ W_U.detach().T
        # Indices are compared by what they pick: two orders of float sums may swap a near tie, never a real rank.
        assert torch.allclose(top_v, by_hand.topk(10).values, atol=1e-5)
        assert torch.allclose(by_hand.gather(1, top_i), by_hand.topk(10).values, atol=1e-5)
        assert torch.allclose(by_hand.gather(1, bot_i), by_hand.topk(10, largest=False).values, atol=1e-5)
        assert torch.allclose(bot_v, by_hand.topk(10, largest=False).values, atol=1e-5)
        with torch.no_grad():  # what the model itself does to the direction, minus what it does to nothing
            through_model = model.get_output_embeddings()(norm(W_dec)) - model.get_output_embeddings()(norm(0 * W_dec))
        assert torch.allclose(through_model.gather(1, top_i), through_model.topk(10).values, rtol=1e-5, atol=1e-5)


def subspace_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """Sparse non-negative codes (at least one active) on 8 orthonormal directions of R^16, plus a little noise."""
    codes = torch.rand(n, 8, generator=generator) * (torch.rand(n, 8, generator=generator) < 0.3)
    codes[torch.arange(n), torch.randint(0, 8, (n,), generator=generator)] = 0.5 + torch.rand(n, generator=generator)
    return codes @ DIRECTIONS + 0.01 * torch.randn(n, 16, generator=generator)


DIRECTIONS = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(5)))[0].T  # [8, 16]


def test_off_distribution_activations_score_higher_than_held_out_ones(hand_sae):
    g = torch.Generator().manual_seed(0)
    sae = hand_sae(DIRECTIONS.T.contiguous(), DIRECTIONS.clone())  # exact on the data's subspace
    reference = normalised_error(sae, subspace_data(2000, g))
    held_out = subspace_data(500, g)
    random = torch.randn(500, 16, generator=g) * held_out.norm(dim=1).mean()

    z_in, z_out = score(sae, held_out, reference), score(sae, random, reference)
    assert (z_in > 3).float().mean() < 0.02
    assert (z_out > 3).float().mean() > 0.98
    assert z_out.median() > z_in.median() + 3
    assert percentile(normalised_error(sae, random), reference).min() > 0.95
    # By hand: the error of a row is its squared distance from the subspace over its squared norm.
    x = random[:3]
    residual = x - (x @ DIRECTIONS.T).clamp_min(0) @ DIRECTIONS
    assert torch.allclose(normalised_error(sae, x), (residual**2).sum(1) / (x**2).sum(1), rtol=1e-5)


@pytest.fixture(scope="module")
def real(tiny_cache, tiny_llama, hand_sae, tmp_path_factory):
    """The session's tiny-Llama cache and a random ReLU SAE on it (one feature dead), saved to disk."""
    root = tmp_path_factory.mktemp("real")
    torch.manual_seed(3)
    b_enc = torch.zeros(24)
    b_enc[5] = -1e4
    hand_sae(torch.randn(32, 24), torch.randn(24, 32) * 0.1, b_enc, model=str(tiny_llama)).save(root / "sae")
    return tiny_cache, root / "sae"


def shown(index: dict, contexts: dict, example: list) -> tuple[list[int], list[float | None], int]:
    """What the browser shows for an example [seq, pos, act, (interval,) window]: token ids of the context around
    it, the activation on each (None where the cache has none, i.e. the excluded BOS) in thousandths of max_act,
    and the index of the hit token. The same arithmetic as context() in app.js."""
    seq, pos, window = example[0], example[1], example[-1]
    left, right = index["window"]
    lo, lo_act = max(0, pos - left), max(index["first_pos"], pos - left)
    ids = contexts[str(seq)][lo : min(index["context_size"], pos + right + 1)]
    return ids, [None] * (lo_act - lo) + window, pos - lo


def test_analyse_writes_what_the_cache_says(real, tiny_llama, hook, tmp_path):
    from sae.data.model import load_model
    from sae.saes import SAE

    cache, sae_dir = real
    out = analyse(AnalyseConfig(sae=str(sae_dir), cache=str(cache), out=str(tmp_path / "an"), n_top=5, device="cpu",
                                window_left=4, window_right=2, batch_rows=300))
    data = out / "data"
    index = read_js(data / "index.js")
    tokens, contexts = read_js(data / "tokens.js"), read_js(data / "contexts.js")
    assert index["dead"] == [5] and index["d_sae"] == 24 and index["first_pos"] == 1
    assert [r["max_act"] for r in index["features"]] == sorted((r["max_act"] for r in index["features"]), reverse=True)
    assert {r["id"] for r in index["features"]} == set(range(24)) - {5}
    chunk = read_js(data / "features" / "0.js")  # 24 features fit in one file
    assert set(chunk) == {str(j) for j in range(24)} - {"5"}

    store, sae = ActivationStore(cache), SAE.load(sae_dir)
    rows = list(store.iter_ordered([hook]))
    F = sae.encode(torch.cat([r.acts[hook] for r in rows])).detach()
    seq, pos = torch.cat([r.seq for r in rows]), torch.cat([r.pos for r in rows])
    _, tokenizer = load_model(str(tiny_llama), "cpu")
    assert all(text == tokenizer.decode([int(i)]) for i, text in tokens.items())
    for summary in index["features"][:4] + index["features"][-2:]:
        j = summary["id"]
        feature = chunk[str(j)]
        top = F[:, j].topk(5).values
        top = top[top > 0]
        assert feature["density"] == pytest.approx(float((F[:, j] > 0).float().mean()), rel=1e-2)
        assert feature["mean_act"] == pytest.approx(float(F[:, j][F[:, j] > 0].mean()), rel=1e-3)
        assert [e[2] for e in feature["top"]] == pytest.approx(top.tolist(), rel=1e-3)
        assert feature["max_act"] == summary["max_act"] == pytest.approx(float(top[0]), rel=1e-3)
        assert feature["mean_top_act"] == pytest.approx(float(top.mean()), rel=1e-3)
        assert feature["n_active"] == int((F[:, j] > 0).sum()) == sum(feature["histogram"][1])
        first_bin, counts = feature["histogram"]  # bins of 1/8 decade from 1e-4; values outside go to the end bins
        by_hand = torch.bincount(((F[:, j][F[:, j] > 0].log10() + 4) * 8).floor().long().clamp(0, 63), minlength=64)
        assert index["hist_edges"][:2] == [-4.0, -3.875] and len(index["hist_edges"]) == 65
        assert by_hand.nonzero().min() == first_bin and by_hand[first_bin : first_bin + len(counts)].tolist() == counts
        hits = [contexts[str(e[0])][e[1]] for e in feature["top"]]
        assert summary["top_tokens"] == list(dict.fromkeys(hits))[:3]
        for example in feature["top"] + feature["samples"]:
            ids, acts, at = shown(index, contexts, example)
            context = store.context_tokens(torch.tensor([example[0]]))[0].tolist()
            lo = max(0, example[1] - 4)
            assert ids == context[lo : example[1] + 3] and at == example[1] - lo
            for offset, shade in enumerate(acts):  # the window against the dense features of the whole cache
                p = lo + offset
                if shade is None:
                    assert p == 0  # only the excluded BOS has no activation
                    continue
                row = int(((seq == example[0]) & (pos == p)).nonzero())
                assert shade == pytest.approx(float(F[row, j]) / feature["max_act"] * 1000, abs=1)  # max_act: 4 digits
            row = int(((seq == example[0]) & (pos == example[1])).nonzero())
            assert example[2] == pytest.approx(float(F[row, j]), rel=1e-3)
        for sample in feature["samples"]:
            lo_frac, hi_frac = index["intervals"][sample[3]]
            assert lo_frac * feature["max_act"] < sample[2] <= hi_frac * feature["max_act"] * (1 + 1e-3)
        assert [s[2] for s in feature["samples"]] == sorted((s[2] for s in feature["samples"]), reverse=True)


def test_a_folder_of_saes_gets_one_browser_each_and_an_index(real, tiny_llama, hand_sae, tmp_path):
    cache, sae_dir = real
    saes = tmp_path / "saes"
    shutil.copytree(sae_dir, saes / "random")
    hand_sae(torch.eye(32), torch.eye(32), model=str(tiny_llama)).save(saes / "identity")
    out = analyse(AnalyseConfig(sae=str(saes), cache=str(cache), out=str(tmp_path / "an"), n_top=3, device="cpu"))
    page = write_dashboard(out)

    assert page == out / "index.html"
    html = page.read_text()
    assert 'href="identity/index.html"' in html and 'href="random/index.html"' in html
    for name, d_sae, dead in (("identity", 32, None), ("random", 24, [5])):
        index = read_js(out / name / "data" / "index.js")
        assert index["d_sae"] == d_sae and (out / name / "index.html").is_file() and (out / name / "app.js").is_file()
        assert dead is None or index["dead"] == dead
        assert index["sae"] == str(saes / name)
        assert f"<td>{name}" not in html and f">{name}</a></td><td class=\"num\">{d_sae}</td>" in html


def test_score_text_flags_against_held_out_errors(real, tiny_llama, hook):
    from sae.data.model import capture, load_model
    from sae.saes import SAE

    cache, sae_dir = real
    scores = score_text(ScoreConfig(sae=str(sae_dir), text="def add(a, b):\n    return a + b", cache=str(cache),
                                    device="cpu", reference_tokens=400))
    model, tokenizer = load_model(str(tiny_llama), "cpu")
    ids = [tokenizer.bos_token_id, *tokenizer("def add(a, b):\n    return a + b", add_special_tokens=False)["input_ids"]]
    assert [s.token for s in scores] == [tokenizer.decode([i]) for i in ids]
    assert not scores[0].scored and not scores[0].flagged and all(s.scored for s in scores[1:])
    sae = SAE.load(sae_dir)
    acts = capture(model, torch.tensor([ids]), [hook])[hook][0]
    assert [s.error for s in scores] == pytest.approx(normalised_error(sae, acts).tolist(), rel=1e-5)
    reference = normalised_error(sae, ActivationStore(cache).holdout([hook], 400)[hook])
    assert [s.z for s in scores] == pytest.approx(score(sae, acts, reference).tolist(), rel=1e-4, abs=1e-5)
    assert [s.flagged for s in scores[1:]] == [s.z > 3 for s in scores[1:]]


def test_every_config_field_is_documented_and_has_a_demo_default():
    from dataclasses import MISSING, fields

    from sae.config import field_docs

    for cls, required in ((AnalyseConfig, set()), (ScoreConfig, {"text"})):
        assert set(field_docs(cls)) == {f.name for f in fields(cls)}, cls
        assert {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING} == required
    assert AnalyseConfig().sae == "runs/demo/saes" and ScoreConfig(text="x").sae.startswith("runs/demo/saes/topk")
