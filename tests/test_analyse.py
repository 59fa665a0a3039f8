"""sae.analyse against brute force on the whole cache, the model's own norm and unembedding, and known anomalies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae.analyse import (
    AnalyseConfig, ScoreConfig, analyse, logit_lens, normalised_error, percentile, score, score_text, stream_features,
)
from sae.store import ActivationStore, CacheWriter
from test_evaluate import HOOK, hand_sae, harvest_tiny


def synthetic_cache(path: Path, acts: torch.Tensor, tokens: torch.Tensor, first_pos: int) -> ActivationStore:
    """A real cache holding the given activations [n_ctx, T - first_pos, d] and tokens [n_ctx, T]."""
    n_ctx, T = tokens.shape
    meta = {"model": "synthetic", "hooks": {HOOK: acts.shape[-1]}, "dtype": "float32", "context_size": T,
            "exclude_first": bool(first_pos), "bos_token_id": 0, "eval_fraction": 0.25}
    writer = CacheWriter(path, meta, contexts_per_shard=n_ctx)
    writer.add({HOOK: acts}, tokens, first_pos)
    writer.finish(first_pos)
    writer.close()
    return ActivationStore(path)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Small integer activations (many ties, many zeros) through an SAE with f = ReLU(x), and every row's features."""
    torch.manual_seed(0)
    n_ctx, T, d = 9, 11, 5
    acts = torch.randint(-3, 5, (n_ctx, T - 1, d)).float()
    acts[:, :, 4] = -1.0  # a dead feature
    acts[2, 3, 4] = 2.0  # ... brought to life by exactly one token
    store = synthetic_cache(tmp_path_factory.mktemp("tied") / "cache", acts, torch.randint(1, 50, (n_ctx, T)), 1)
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
    for j in range(d):
        kept = big.key[j] > -math.inf
        assert set(zip(big.seq[j][kept].tolist(), big.pos[j][kept].tolist())) == active[j]
        kept = small.key[j] > -math.inf
        places = set(zip(small.seq[j][kept].tolist(), small.pos[j][kept].tolist()))
        assert len(places) == min(5, len(active[j])) and places <= active[j]
        assert all(F[s, p - 1, j] == a for s, p, a in zip(small.seq[j][kept].tolist(), small.pos[j][kept].tolist(), small.act[j][kept].tolist()))


def test_logit_lens_equals_the_models_own_norm_and_unembedding(tiny_llama, tiny_gpt2):
    """The lens is the direction pushed through the final norm and unembedding, up to a positive scale per direction."""
    from sae.model import final_norm, load_model

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
        assert torch.allclose(top_v, by_hand.topk(10).values, atol=1e-5)
        assert torch.equal(top_i, by_hand.topk(10).indices)
        assert torch.equal(bot_i, by_hand.topk(10, largest=False).indices)
        assert torch.allclose(bot_v, by_hand.topk(10, largest=False).values, atol=1e-5)
        with torch.no_grad():  # what the model itself does to the direction, minus what it does to nothing
            through_model = model.get_output_embeddings()(norm(W_dec)) - model.get_output_embeddings()(norm(0 * W_dec))
        assert torch.equal(top_i, through_model.topk(10).indices)


def subspace_data(n: int, generator: torch.Generator) -> torch.Tensor:
    """Sparse non-negative codes (at least one active) on 8 orthonormal directions of R^16, plus a little noise."""
    codes = torch.rand(n, 8, generator=generator) * (torch.rand(n, 8, generator=generator) < 0.3)
    codes[torch.arange(n), torch.randint(0, 8, (n,), generator=generator)] = 0.5 + torch.rand(n, generator=generator)
    return codes @ DIRECTIONS + 0.01 * torch.randn(n, 16, generator=generator)


DIRECTIONS = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(5)))[0].T  # [8, 16]


def test_off_distribution_activations_score_higher_than_held_out_ones():
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
def real(tiny_llama, text_dir, tmp_path_factory):
    """A harvested tiny-Llama cache and a random ReLU SAE on it (one feature dead), saved to disk."""
    root = tmp_path_factory.mktemp("real")
    cache = harvest_tiny(tiny_llama, text_dir, root / "cache")
    torch.manual_seed(3)
    b_enc = torch.zeros(24)
    b_enc[5] = -1e4
    hand_sae(torch.randn(32, 24), torch.randn(24, 32) * 0.1, b_enc, model=str(tiny_llama)).save(root / "sae")
    return cache, root / "sae"


def test_analyse_writes_what_the_cache_says(real, tiny_llama, tmp_path):
    from sae.model import load_model
    from sae.sae import SAE

    cache, sae_dir = real
    out = analyse(AnalyseConfig(sae=str(sae_dir), cache=str(cache), out=str(tmp_path / "an"), n_top=5, device="cpu",
                                window_left=4, window_right=2, batch_rows=300))
    index = json.loads((out / "index.json").read_text())
    assert index["dead"] == [5] and index["d_sae"] == 24
    assert [r["max_act"] for r in index["features"]] == sorted((r["max_act"] for r in index["features"]), reverse=True)
    assert {r["id"] for r in index["features"]} == set(range(24)) - {5}
    assert not (out / "features" / "5.json").exists()

    store, sae = ActivationStore(cache), SAE.load(sae_dir)
    rows = list(store.iter_ordered([HOOK]))
    F = sae.encode(torch.cat([r.acts[HOOK] for r in rows])).detach()
    seq, pos = torch.cat([r.seq for r in rows]), torch.cat([r.pos for r in rows])
    _, tokenizer = load_model(str(tiny_llama), "cpu")
    for summary in index["features"][:4] + index["features"][-2:]:
        j = summary["id"]
        feature = json.loads((out / "features" / f"{j}.json").read_text())
        assert feature["density"] == pytest.approx(float((F[:, j] > 0).float().mean()))
        assert feature["mean_act"] == pytest.approx(float(F[:, j][F[:, j] > 0].mean()), rel=1e-3)
        top = F[:, j].topk(5).values
        assert [e["act"] for e in feature["top"]] == pytest.approx(top[top > 0].tolist(), abs=1e-4)
        assert feature["mean_top_act"] == pytest.approx(float(top[top > 0].mean()), abs=1e-3)
        assert sum(feature["histogram"]["counts"]) == int((F[:, j] > 0).sum())
        for example in feature["top"] + feature["samples"]:
            context = store.context_tokens(torch.tensor([example["seq"]]))[0].tolist()
            lo = max(0, example["pos"] - 4)
            assert example["tokens"] == [tokenizer.decode([t]) for t in context[lo : example["pos"] + 3]]
            assert example["acts"][example["at"]] == pytest.approx(example["act"], abs=1e-4)
            row = int(((seq == example["seq"]) & (pos == example["pos"])).nonzero())
            assert example["act"] == pytest.approx(float(F[row, j]), abs=1e-4)
            if example["pos"] - 4 <= 0:  # position 0 is not in the cache: no activation to show
                assert example["acts"][0 - lo] is None
        for sample in feature["samples"]:
            lo, hi = (float(x.rstrip("%")) / 100 for x in sample["interval"].split("-"))
            assert lo * feature["max_act"] < sample["act"] <= hi * feature["max_act"]


def test_score_text_flags_against_held_out_errors(real, tiny_llama):
    from sae.model import capture, load_model
    from sae.sae import SAE

    cache, sae_dir = real
    scores = score_text(ScoreConfig(sae=str(sae_dir), text="def add(a, b):\n    return a + b", cache=str(cache),
                                    device="cpu", reference_tokens=400))
    model, tokenizer = load_model(str(tiny_llama), "cpu")
    ids = [tokenizer.bos_token_id, *tokenizer("def add(a, b):\n    return a + b", add_special_tokens=False)["input_ids"]]
    assert [s.token for s in scores] == [tokenizer.decode([i]) for i in ids]
    assert not scores[0].scored and not scores[0].flagged and all(s.scored for s in scores[1:])
    sae = SAE.load(sae_dir)
    acts = capture(model, torch.tensor([ids]), [HOOK])[HOOK][0]
    assert [s.error for s in scores] == pytest.approx(normalised_error(sae, acts).tolist(), rel=1e-5)
    reference = normalised_error(sae, ActivationStore(cache).holdout([HOOK], 400)[HOOK])
    assert [s.z for s in scores] == pytest.approx(score(sae, acts, reference).tolist(), rel=1e-4, abs=1e-5)
    assert [s.flagged for s in scores[1:]] == [s.z > 3 for s in scores[1:]]
