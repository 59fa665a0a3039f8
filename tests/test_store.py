"""The shuffled reader: the exact stream it serves, how well it mixes rows, and the checksums it verifies on the way."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
import xxhash

from sae.data.store import ActivationStore, CacheError, CacheWriter, is_holdout

HOOKS = {"ids": 2, "x": 8}


def identity_cache(path: Path, contexts: int = 30, contexts_per_shard: int = 4, context_size: int = 16) -> ActivationStore:
    """A float16 cache whose hook "ids" holds each row's (context, position), so a batch says where its rows came
    from; hook "x" is random, so a gather that mixes up hooks or rows shows."""
    meta = {"model": "identity", "hooks": HOOKS, "dtype": "float16", "context_size": context_size,
            "exclude_first": False, "eval_fraction": 0.2}
    writer = CacheWriter(path, meta, contexts_per_shard=contexts_per_shard)
    seq = torch.arange(contexts).view(-1, 1, 1).expand(contexts, context_size, 1)
    pos = torch.arange(context_size).view(1, -1, 1).expand(contexts, context_size, 1)
    x = torch.randn(contexts, context_size, HOOKS["x"], generator=torch.Generator().manual_seed(0))
    writer.add({"ids": torch.cat([seq, pos], -1).half(), "x": x.half()},
               torch.zeros(contexts, context_size, dtype=torch.long), first_pos=0)
    writer.finish(first_pos=0)
    writer.close()
    return ActivationStore(path)


def stream_digest(store: ActivationStore, **kw) -> str:
    reader = store.shuffled(list(HOOKS), 40, seed=7, shuffle_rows=150, **kw)
    h = hashlib.sha256()
    for _ in range(50):
        batch = next(reader)
        for hook in HOOKS:
            h.update(batch[hook].numpy().tobytes())
    reader.close()
    return h.hexdigest()


def test_the_stream_is_the_one_the_reader_served_before_it_was_made_faster(tmp_path):
    """The threaded reader (commit after 6c81f02) serves byte for byte the batches the one-thread reader of 6c81f02
    served, for one rank and for rank 1 of 2 resumed mid-epoch: so the shuffle's statistics are unchanged, and a run
    checkpointed before the change resumes on the very batches it would have read. (Digests taken from 6c81f02's
    store.py on this cache; torch.randperm's CPU stream is part of what they pin.)"""
    store = identity_cache(tmp_path)
    assert stream_digest(store) == "92520cb0f8e2729c6ed839be3a59319b8f04fcef42efeadf5c90762fc8ae108c"
    assert stream_digest(store, rank=1, world_size=2, position=9 * 40) == (
        "385b59f19944987ba74104d64a0637f146f57ae568693048248212e8620a6a64")


def test_an_epoch_serves_every_training_row_once(tmp_path):
    store = identity_cache(tmp_path)
    reader = store.shuffled(list(HOOKS), 40, seed=1, shuffle_rows=150)
    epoch = torch.cat([next(reader)["ids"] for _ in range(-(-store.n_train_rows // 40))])[: store.n_train_rows]
    reader.close()
    train = [(s, p) for rows in store.iter_ordered(["ids"], "train") for s, p in zip(rows.seq.tolist(), rows.pos.tolist())]
    assert sorted(map(tuple, epoch.long().tolist())) == sorted(train)



def test_a_batch_longer_than_several_epochs_serves_whole_epochs(tmp_path):
    """A cache smaller than one batch (`sae planted tokens=10` is one context): the batch spans several epochs, and
    each of them is every training row once (it ended in a KeyError: the epochs' plans were dropped while in use)."""
    store = identity_cache(tmp_path, contexts=2, contexts_per_shard=1)
    rows = store.n_train_rows
    reader = store.shuffled(["ids"], 5 * rows, seed=1, shuffle_rows=16)
    batch = next(reader)["ids"].long()
    reader.close()
    train = sorted(map(tuple, batch[:rows].tolist()))
    assert len(set(train)) == rows
    for epoch in range(5):
        assert sorted(map(tuple, batch[epoch * rows : (epoch + 1) * rows].tolist())) == train

def mixing(batches: list[torch.Tensor], shard_of: torch.Tensor) -> dict[str, float]:
    """How mixed consecutive batches of context ids are: distinct contexts per batch, contexts shared by one batch
    and the next, and the lag-1 correlation of the batches' mean shard index."""
    sets = [set(b.tolist()) for b in batches]
    means = torch.tensor([shard_of[b].float().mean().item() for b in batches])
    return {"distinct": sum(map(len, sets)) / len(sets),
            "shared_with_next": sum(len(a & b) for a, b in itertools.pairwise(sets)) / (len(sets) - 1),
            "shard_lag1_corr": torch.corrcoef(torch.stack([means[:-1], means[1:]]))[0, 1].item()}


def test_consecutive_batches_are_as_mixed_as_independent_draws_from_the_window(tmp_path):
    """The reader's batches against batches drawn independently at random from the same shuffle window (the ideal a
    windowed shuffle can reach): as many distinct contexts per batch, no more contexts shared with the next batch,
    and no more correlation between one batch's shards and the next's than the window itself brings (0.70 here, as
    consecutive batches share their window's shards). A reader that served a window in file order would have 2
    contexts per batch instead of ~12."""
    store = identity_cache(tmp_path, contexts=64, contexts_per_shard=4)  # 16 shards of 64 rows
    batch, window = 32, 256  # windows of 4 shards
    reader = store.shuffled(["ids"], batch, seed=3, shuffle_rows=window)
    shard_of = torch.arange(64) // 4
    g = torch.Generator().manual_seed(0)
    served, ideal = [], []
    for step in range(600):  # ~25 epochs
        key, offset, size = reader._locate(reader.position)
        seqs = next(reader)["ids"][:, 0].long()
        if offset + batch > size:
            continue  # spans two windows
        seqs_in_window = torch.cat([store.shard_seqs(i) for i in reader._plan(key[0])[key[1]][0]])
        window_rows = seqs_in_window[~is_holdout(seqs_in_window, store.eval_fraction)].repeat_interleave(16)
        served.append(seqs)
        ideal.append(window_rows[torch.randperm(len(window_rows), generator=g)[:batch]])
    reader.close()
    got, want = mixing(served, shard_of), mixing(ideal, shard_of)
    assert abs(got["distinct"] / want["distinct"] - 1) < 0.05, (got, want)
    assert got["shared_with_next"] < 1.1 * want["shared_with_next"], (got, want)
    assert abs(got["shard_lag1_corr"] - want["shard_lag1_corr"]) < 0.1, (got, want)


# ------------------------------------------------------------------------------------------------ checksums
def flip_byte(file: Path, at: int) -> None:
    data = bytearray(file.read_bytes())
    data[at] ^= 1
    file.write_bytes(bytes(data))


def test_new_shards_record_xxh3_beside_sha256(tmp_path):
    store = identity_cache(tmp_path)
    for shard in store.shards:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
        assert shard["xxh3_64"] == xxhash.xxh3_64(data).hexdigest()


@pytest.mark.parametrize("checksums", ["both", "sha256 only"])
@pytest.mark.parametrize("where", [-5, 20, "truncated"])  # a hook's bytes, the header, the file's end
def test_the_reader_stops_at_a_corrupt_shard_and_says_so_again(tmp_path, checksums, where):
    identity_cache(tmp_path)
    if checksums == "sha256 only":  # a cache harvested before xxh3_64 was recorded
        manifest = json.loads((tmp_path / "manifest.json").read_text())
        for shard in manifest["shards"]:
            del shard["xxh3_64"]
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    file = tmp_path / "shard_00003.safetensors"
    if where == "truncated":
        file.write_bytes(file.read_bytes()[:-300])
    else:
        flip_byte(file, where)
    reader = ActivationStore(tmp_path).shuffled(list(HOOKS), 40, shuffle_rows=10**6)  # one window: every shard read
    for _ in range(2):  # the error stays at the head of the stream
        with pytest.raises(CacheError, match=rf"shard {file} is corrupt \(checksum mismatch\); run `sae harvest` again"):
            next(reader)
    assert reader.position == 0
    reader.close()


def test_a_stale_xxh3_is_settled_by_sha256(tmp_path):
    """A tool that rewrites a shard and updates sha256 alone (as the NaN-poisoning test helper does) leaves a stale
    xxh3_64: the file is read again under sha256, the reference, and served."""
    store = identity_cache(tmp_path)
    expected = stream_digest(store)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][2]["xxh3_64"] = "0" * 16
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    fresh = ActivationStore(tmp_path)
    assert stream_digest(fresh) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_finite_reads_nan_and_inf_from_the_exponent_bits(dtype):
    """The trainer's per-batch check (``all_finite``, bit test in numpy) agrees with ``torch.isfinite`` on NaN, ±inf
    and the largest finite value, in every storage dtype, and on a non-contiguous view."""
    from sae.data.store import all_finite

    t = torch.randn(64, 48).to(dtype)
    t[3, 4] = torch.finfo(dtype).max
    assert all_finite(t) and all_finite(t[:, ::2])
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[17, 29] = bad
        assert not all_finite(u) and not all_finite(u[:, 1::2]) and all_finite(u[:, ::2])
