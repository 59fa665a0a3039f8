"""Harvest stage: hook points against ground truth, the cache round trip, resume after kill -9, clear errors."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from sae.data import model as model_lib
from sae.cli import main as cli_main
from sae.config import ConfigError
from sae.data.text import DataError, load_texts, pack
from sae.data.ahead import ahead
from sae.data.harvest import HarvestConfig, batch_size, forward_rows, harvest, harvest_with
from sae.data.store import ActivationStore, CacheError, CacheWriter, is_holdout


def small_cfg(model: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(model=str(model), hooks=["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"], context_size=32,
                max_tokens=6000, batch_size=4, shard_tokens=1000, out=str(out))
    return HarvestConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------ hook points
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_neox"])
def test_hooks_match_hidden_states_and_residual_algebra(fixture, request):
    """resid_pre/post equal HF hidden_states; resid_post = resid_pre + attn_out + mlp_out, and mlp_out = MLP(ln2(mlp_in))
    in every family."""
    model, _ = model_lib.load_model(str(request.getfixturevalue(fixture)), "cpu")
    ids = torch.randint(3, 500, (2, 16))
    names = [f"blocks.{i}.{k}" for i in range(2) for k in model_lib.HOOK_KINDS]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        acts = model_lib.capture(model, ids, names)
    for i in range(2):
        pre, post = acts[f"blocks.{i}.hook_resid_pre"], acts[f"blocks.{i}.hook_resid_post"]
        torch.testing.assert_close(pre, hidden[i])
        if i + 1 < len(model_lib.layers(model)):  # the last entry of hidden_states is final-normed
            torch.testing.assert_close(post, hidden[i + 1])
        parts = pre + acts[f"blocks.{i}.hook_attn_out"] + acts[f"blocks.{i}.hook_mlp_out"]
        torch.testing.assert_close(post, parts, atol=1e-5, rtol=1e-5)
        # hook_mlp_in is the MLP sublayer's residual input (resid_pre in NeoX's parallel blocks), and
        # ln2.hook_normalized its norm's output, which the MLP turns into hook_mlp_out.
        mid = pre if getattr(model.config, "use_parallel_residual", False) else pre + acts[f"blocks.{i}.hook_attn_out"]
        torch.testing.assert_close(acts[f"blocks.{i}.hook_mlp_in"], mid, atol=1e-5, rtol=1e-5)
        block = model_lib.layers(model)[i]
        fam = model_lib.family(model)
        with torch.no_grad():
            normed = getattr(block, fam["ln2"])(acts[f"blocks.{i}.hook_mlp_in"])
            torch.testing.assert_close(acts[f"blocks.{i}.ln2.hook_normalized"], normed)
            torch.testing.assert_close(acts[f"blocks.{i}.hook_mlp_out"], getattr(block, fam["mlp"])(normed))


def test_forward_stops_after_deepest_hook(tiny_llama):
    model, _ = model_lib.load_model(str(tiny_llama), "cpu")
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(model_lib.layers(model))]
    model_lib.capture(model, torch.randint(3, 500, (1, 8)), ["blocks.0.hook_mlp_out", "blocks.1.hook_attn_out"])
    for h in handles:
        h.remove()
    assert calls == [0]  # layer 1 started (its attention ran) but never finished; layer 2 never ran


def test_splicing_hook_replaces_activation(tiny_llama):
    model, _ = model_lib.load_model(str(tiny_llama), "cpu")
    ids = torch.randint(3, 500, (1, 8))
    with torch.no_grad():
        clean = model(ids).logits
        with model_lib.hooks(model, {"blocks.1.hook_resid_pre": lambda t: t}):
            same = model(ids).logits
        with model_lib.hooks(model, {"blocks.1.hook_resid_pre": torch.zeros_like}):
            zeroed = model(ids).logits
    torch.testing.assert_close(clean, same)
    assert (clean - zeroed).abs().max() > 1e-3


def test_unknown_hook_lists_valid_names(tiny_llama):
    model, _ = model_lib.load_model(str(tiny_llama), "cpu")
    with pytest.raises(model_lib.ModelError, match=r"blocks\.\{0\.\.2\}.*hook_resid_post"):
        model_lib.resolve_hook(model, "blocks.7.hook_resid_post")
    with pytest.raises(model_lib.ModelError, match="unknown hook"):
        model_lib.resolve_hook(model, "blocks.0.resid")


def test_bad_devices_are_clear_errors():
    with pytest.raises(model_lib.ModelError, match="unknown device 'gpu'"):
        model_lib.pick_device("gpu")
    with pytest.raises(model_lib.ModelError, match="not available here"):
        model_lib.pick_device(f"cuda:{torch.cuda.device_count()}")  # one past the last GPU, on any machine
    assert model_lib.pick_device("cpu") == torch.device("cpu")


#: Accelerate's disk offload of the tiny Llama: the embedding, layers 1-2 and the unembedding on "disk" (their
#: weights on "meta", read from the checkpoint at each forward), the rest on the CPU.
SPREAD = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "disk"}


def test_a_model_spread_over_cpu_and_disk_harvests_exactly_what_a_plain_load_does(tiny_llama, text_dir, tmp_path,
                                                                                 monkeypatch):
    """`device_map` through accelerate's real dispatch (no GPU needed: disk offload is the same hooks on the same
    path): the self-check passes, the forward still stops after the deepest hook (layer 1, offloaded; layer 2 never
    runs) and the cache is byte-identical to the one of the model loaded whole."""
    cfg = small_cfg(tiny_llama, tmp_path / "plain", hooks=["blocks.0.hook_mlp_out", "blocks.1.ln2.hook_normalized",
                                                            "blocks.1.hook_resid_post"],
                    dataset=str(text_dir), max_tokens=600, shard_tokens=300, dtype="float32", device="cpu")
    plain = ActivationStore(harvest(cfg))
    load, ran = model_lib.load_model, []

    def spread_load(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        assert set(model.hf_device_map.values()) == {"cpu", "disk"}
        assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # offloaded, not loaded whole
        model_lib.layers(model)[2].register_forward_pre_hook(lambda *_: ran.append(1))
        return model, tokenizer

    monkeypatch.setattr(model_lib, "load_model", spread_load)
    spread = ActivationStore(harvest(dataclasses.replace(cfg, device_map=SPREAD, out=str(tmp_path / "spread"))))
    assert not ran, "the harvest ran the layer after the deepest hook"
    assert spread.complete and len(plain.shards) == 2
    assert [s["sha256"] for s in spread.shards] == [s["sha256"] for s in plain.shards]


def test_a_device_map_naming_a_missing_device_is_one_line(tiny_llama):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(model_lib.ModelError, match=rf"^device_map names '{missing}', which is not a device here"):
        model_lib.load_model(str(tiny_llama), "cpu", device_map={**SPREAD, "model.layers.2": missing})


def test_bad_model_paths():
    with pytest.raises(model_lib.ModelError, match="does not exist"):
        model_lib.load_model("./no/such/model", "cpu")
    with pytest.raises(model_lib.ModelError, match="does not exist"):
        model_lib.load_model("/tmp/none.gguf", "cpu")


# ------------------------------------------------------------------------------------------------ data
def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    rows = [{"body": "json one"}, {"body": "json two"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert list(load_texts(str(tmp_path / "a.txt"))) == ["first document"]
    assert list(load_texts(str(tmp_path / "b.jsonl"), text_column="body")) == ["json one", "json two"]
    with pytest.raises(DataError, match="no column 'text'.*body"):
        list(load_texts(str(tmp_path / "b.jsonl")))
    with pytest.raises(DataError, match="does not exist"):
        load_texts("./missing_folder")


def test_pack_is_exact_and_bos_first(tiny_llama):
    _, tok = model_lib.load_model(str(tiny_llama), "cpu")
    texts = ["alpha beta gamma " * 20, "delta epsilon " * 30]
    contexts = list(pack(texts, tok, 16))
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all(len(c) == 16 and c[0] == tok.bos_token_id for c in contexts)
    assert [t for c in contexts for t in c[1:]] == stream[: 15 * len(contexts)]
    assert len(stream) - 15 * len(contexts) < 15


def test_pack_tokenises_little_ahead_of_what_is_taken(tiny_llama):
    """The first context tokenises one document, not `docs_per_call` of them (a short harvest paid for ~20x the
    tokens it used); the calls grow to `docs_per_call`, and the stream is the same whatever the grouping."""
    _, tok = model_lib.load_model(str(tiny_llama), "cpu")
    texts = [f"document {i} " + "word " * (i % 7 + 5) for i in range(300)]
    seen = []

    def counted():
        for t in texts:
            seen.append(t)
            yield t

    first = next(pack(counted(), tok, 8, docs_per_call=64))
    assert len(seen) == 1
    grouped = list(pack(texts, tok, 8, docs_per_call=64))
    assert grouped[0] == first and grouped == list(pack(texts, tok, 8, docs_per_call=1))
    assert len(grouped) > 300  # several calls of 64 documents were made


# ------------------------------------------------------------------------------------------------ cache
def test_cache_round_trip(tiny_llama, text_dir, tmp_path):
    cfg = small_cfg(tiny_llama, tmp_path / "cache", dataset=str(text_dir))
    harvest(cfg)
    store = ActivationStore(cfg.out)
    model, tok = model_lib.load_model(str(tiny_llama), "cpu")
    contexts = torch.tensor(list(itertools.islice(pack(load_texts(str(text_dir)), tok, 32), store.n_contexts)))
    assert store.complete and store.n_contexts == -(-6000 // 30) and store.n_rows == store.n_contexts * 30
    with torch.no_grad():
        want = model_lib.capture(model, contexts, cfg.hooks)
    got = {h: [] for h in cfg.hooks}
    tokens, seqs, poss = [], [], []
    for rows in store.iter_ordered(cfg.hooks, batch_rows=700):
        for h in cfg.hooks:
            got[h].append(rows.acts[h])
        tokens.append(rows.tokens), seqs.append(rows.seq), poss.append(rows.pos)
    seq, pos = torch.cat(seqs), torch.cat(poss)
    assert torch.equal(torch.cat(tokens), contexts[seq, pos])
    assert pos.min() == 2 and pos.max() == 31  # positions 0 and 1 excluded by default
    for h in cfg.hooks:
        torch.testing.assert_close(torch.cat(got[h]), want[h][seq, pos].half().float())
    assert torch.equal(store.context_tokens(torch.tensor([5, 0, store.n_contexts - 1])), contexts[[5, 0, -1]])
    # held-out rows are exactly the hashed contexts, disjoint from training rows
    ev = torch.cat([r.seq for r in store.iter_ordered(cfg.hooks[:1], split="eval")])
    tr = torch.cat([r.seq for r in store.iter_ordered(cfg.hooks[:1], split="train")])
    assert is_holdout(ev, 0.05).all() and not is_holdout(tr, 0.05).any()
    assert len(ev) + len(tr) == store.n_rows and len(ev) == store.n_eval_rows > 0
    # size on disk is the activations plus ~16 bytes/token of ids and places
    size = sum((store.path / s["file"]).stat().st_size for s in store.shards)
    assert size / store.n_rows / (2 * 32 * 2) < 1.2


def test_shuffled_reader_epochs_and_resume(tiny_llama, text_dir, tmp_path):
    cfg = small_cfg(tiny_llama, tmp_path / "cache", dataset=str(text_dir), hooks=["blocks.1.hook_resid_post"])
    harvest(cfg)
    store = ActivationStore(cfg.out)
    hook = cfg.hooks[0]
    train = torch.cat([r.acts[hook] for r in store.iter_ordered([hook], split="train")])
    n = len(train)
    reader = store.shuffled([hook], 256, seed=3, shuffle_rows=2000)
    assert reader.group_shards * store.contexts_per_shard * store.rows_per_context <= 2000  # bounded memory
    epoch = torch.cat([next(reader)[hook] for _ in range(-(-n // 256))])[:n]
    # one epoch is a permutation of the training rows: same rows, different order
    rows_a, counts_a = torch.unique(epoch, dim=0, return_counts=True)  # rows sorted lexicographically
    rows_b, counts_b = torch.unique(train, dim=0, return_counts=True)
    assert torch.equal(rows_a, rows_b) and torch.equal(counts_a, counts_b)
    assert not torch.equal(epoch, train)
    # resuming from a position continues the same stream exactly, across epoch boundaries
    a = store.shuffled([hook], 256, seed=3, shuffle_rows=2000)
    stream = [next(a)[hook] for _ in range(40)]
    b = store.shuffled([hook], 256, seed=3, shuffle_rows=2000, position=17 * 256)
    for i in range(17, 40):
        assert torch.equal(next(b)[hook], stream[i])
    assert b.epoch > 1


def test_reader_windows_are_huge_page_aligned_tensors_of_their_own():
    """The shuffle windows sit on 2 MiB boundaries (where the kernel may back them with huge pages), hold what is
    written to them, and keep their memory alive on their own."""
    from sae.data.store import HUGE_PAGE, huge_page_empty

    for dtype in (torch.float16, torch.float32):
        t = huge_page_empty(1000, 576, dtype)
        assert t.shape == (1000, 576) and t.dtype == dtype and t.is_contiguous()
        assert t.data_ptr() % HUGE_PAGE == 0
        src = torch.randn(1000, 576).to(dtype)
        t.copy_(src)
        gc.collect()
        assert torch.equal(t, src)


def test_resume_after_kill_9_matches_clean_run(tiny_llama, text_dir, tmp_path):
    """A harvest killed mid-run and restarted produces exactly the shards of an uninterrupted run."""
    clean = small_cfg(tiny_llama, tmp_path / "clean", dataset=str(text_dir), max_tokens=12000)
    harvest(clean)
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch, sae.data.model as m
        from sae.data.harvest import HarvestConfig, harvest
        orig = m.capture
        def slow(*a, **k):
            import time; time.sleep(0.05)
            return orig(*a, **k)
        m.capture = slow
        harvest(HarvestConfig(**{dict(vars(clean), out=str(killed))!r}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = killed / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = json.loads((killed / "manifest.json").read_text())
    assert not partial["complete"] and 3 <= len(partial["shards"])
    harvest(HarvestConfig(**dict(vars(clean), out=str(killed))))
    a, b = ActivationStore(clean.out), ActivationStore(killed)
    assert b.complete and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in Path(clean.out).iterdir())


def test_a_cache_resumes_on_a_device_with_another_default_batch_and_dtype(tiny_llama, text_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """Unset, `batch_size` is 128 contexts per forward on CUDA and 16 on the CPU, and `model_dtype` bfloat16 and
    float32: a harvest stopped on one and resumed on the other keeps the cache's shard boundaries and dtype instead of
    refusing it as made with other settings; so does one resumed with a `batch_size` set to suit the new device."""
    import sae.data.harvest as harvest_module

    cfg = small_cfg(tiny_llama, tmp_path / "cache", dataset=str(text_dir), batch_size=None, max_tokens=4000)
    monkeypatch.setattr(harvest_module, "CPU_BATCH", 4)  # the device it started on, where "auto" gave bfloat16
    on_gpu = dataclasses.replace(cfg, model_dtype="bfloat16")
    whole = ActivationStore(harvest(on_gpu))
    ref = ActivationStore(harvest(dataclasses.replace(on_gpu, out=str(tmp_path / "ref"))))
    manifest = json.loads((whole.path / "manifest.json").read_text())
    assert len(manifest["shards"]) >= 4 and manifest["contexts_per_shard"] % 4 == 0
    for shard in manifest["shards"][2:]:  # stopped after two shards
        (whole.path / shard["file"]).unlink()
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    (whole.path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(harvest_module, "CPU_BATCH", 5)  # resumed where the default batch is another
    fresh = dataclasses.replace(cfg, out=str(tmp_path / "fresh"))  # one a fresh cache would shard otherwise
    assert harvest_module._contexts_per_shard(fresh, whole.rows_per_context, 5) != manifest["contexts_per_shard"]
    capsys.readouterr()
    resumed = ActivationStore(harvest(cfg))  # model_dtype "auto", float32 on this device
    out = capsys.readouterr().out
    assert "with its model_dtype bfloat16" in out and f"at its own {manifest['contexts_per_shard']} contexts" in out
    (resumed.path / resumed.shards[-1]["file"]).unlink()  # stopped again, resumed with a batch_size given
    manifest = json.loads((whole.path / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:-1], False
    (whole.path / "manifest.json").write_text(json.dumps(manifest))
    resumed = ActivationStore(harvest(dataclasses.replace(cfg, batch_size=7)))
    out = capsys.readouterr().out
    assert "with its model_dtype bfloat16" in out and f"at its own {manifest['contexts_per_shard']} contexts" in out
    assert resumed.complete and resumed.contexts_per_shard == ref.contexts_per_shard
    assert [s["contexts"] for s in resumed.shards] == [s["contexts"] for s in ref.shards]
    for a, b in zip(ref.iter_ordered(cfg.hooks), resumed.iter_ordered(cfg.hooks), strict=True):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.seq, b.seq)
        for hook in cfg.hooks:  # float16 storage; only the batches' composition differs
            torch.testing.assert_close(a.acts[hook], b.acts[hook], atol=2e-3, rtol=2e-3)


def test_ahead_produces_on_a_worker_and_stops_with_its_consumer():
    """Tokenising ahead: items come from the worker thread, at most `depth` (+1 in hand) beyond what was taken;
    closing the stream ends the worker; an error in the worker reaches the consumer where the items stop."""
    made: list[str] = []

    def items():
        for i in range(1000):
            made.append(threading.current_thread().name)
            yield i

    stream = ahead(items(), depth=2, name="sae-tokenise")
    assert list(itertools.islice(stream, 3)) == [0, 1, 2]
    stream.close()
    assert set(made) == {"sae-tokenise"} and len(made) <= 3 + 2 + 1
    assert not any(t.name == "sae-tokenise" for t in threading.enumerate())

    def failing():
        yield 1
        raise DataError("the text ran dry")

    stream = ahead(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(DataError, match="the text ran dry"):
        next(stream)


def test_default_batch_is_larger_on_cuda():
    cfg = HarvestConfig(context_size=128)
    assert batch_size(cfg, torch.device("cpu")) == 16
    assert batch_size(cfg, torch.device("cuda")) == 128
    assert batch_size(dataclasses.replace(cfg, context_size=1024), torch.device("cuda")) == 16
    assert batch_size(dataclasses.replace(cfg, batch_size=8), torch.device("cuda")) == 8


def test_float16_overflow_is_one_flag_per_batch_naming_the_hook(tiny_llama):
    """The range check is a device tensor of one flag per hook, read once when the batch's rows are taken."""
    model, _ = model_lib.load_model(str(tiny_llama), "cpu")
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
    ids = torch.randint(3, 500, (2, 16))
    with torch.inference_mode():
        assert forward_rows(model, ids, hooks, 1, torch.float32).overflow is None
        fine = forward_rows(model, ids, hooks, 1, torch.float16)
        assert fine.overflow.shape == (2,) and fine.to_host().checked().keys() == set(hooks)
        model.get_input_embeddings().weight.mul_(1e9)  # the residual overflows, not the MLP's output of its norm
        rows = forward_rows(model, ids, hooks, 1, torch.float16)
    assert rows.overflow.tolist() == [True, False]
    with pytest.raises(CacheError, match="at blocks.1.hook_resid_post exceed the float16 range"):
        rows.to_host().checked()


# ------------------------------------------------------------------------------------------------ errors
def test_corrupt_and_truncated_shards_name_the_file(tiny_llama, text_dir, tmp_path):
    cfg = small_cfg(tiny_llama, tmp_path / "cache", dataset=str(text_dir))
    harvest(cfg)
    shard = Path(cfg.out) / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard_00001.safetensors is corrupt"):
        list(ActivationStore(cfg.out).iter_ordered(cfg.hooks))
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CacheError, match="shard_00001.safetensors"):
        list(ActivationStore(cfg.out).iter_ordered(cfg.hooks))
    with pytest.raises(CacheError, match="not in the cache.*blocks.1.hook_resid_post"):
        ActivationStore(cfg.out).holdout(["blocks.2.hook_resid_post"], 10)


def _hub_error(code: str, repo_id: str, filename: str) -> Exception:
    """The error huggingface_hub raises for a 401 whose X-Error-Code is `code`, made by its own
    `hf_raise_for_status` from a real response (GatedRepo → GatedRepoError, RepoNotFound → RepositoryNotFoundError)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    try:
        hf_raise_for_status(httpx2.Response(401, headers={"X-Error-Code": code}, request=httpx2.Request("GET", url)))
    except Exception as err:
        return err
    raise AssertionError(f"hf_raise_for_status raised nothing for {code}")


@pytest.mark.parametrize("code, error, says", [
    ("GatedRepo", "GatedRepoError", "it is a gated repo on the Hugging Face hub; accept its terms at "
                                    "https://huggingface.co/google/gemma-2-2b"),
    ("RepoNotFound", "RepositoryNotFoundError", "the Hugging Face hub has no repo 'google/gemma-2-2b' you can read"),
])
def test_a_gated_or_private_hub_model_without_a_token_says_how_to_log_in(code, error, says, text_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """transformers turns the hub's error into several lines with the advice in the middle; the CLI says it in one."""
    import transformers.utils.hub

    def download(repo_id, filename, **_):  # the one hub call transformers makes for a model's config
        raise _hub_error(code, repo_id, filename)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", download)
    assert type(_hub_error(code, "a/b", "config.json")).__name__ == error
    assert cli_main(["harvest", "model=google/gemma-2-2b", f"dataset={text_dir}", f"out={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err
    *_, line = err.rstrip("\n").split("\n")
    assert line.startswith(f"sae harvest: error: could not load model 'google/gemma-2-2b': {says}"), err
    assert "`hf auth login`" in line and "HF_TOKEN" in line and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_cache_with_other_settings_is_refused_naming_the_users_settings(tiny_llama, text_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """The refusal named the manifest's own keys (`max_contexts: 33 → 134` for a changed max_tokens, each hook's
    width as `576 → None`, `dataset.split`), came after the model had loaded, and was preceded by a "resuming" line.
    A context_size alone changes the whole contexts max_tokens is rounded to, which is no change of max_tokens."""
    cfg = small_cfg(tiny_llama, tmp_path / "cache", dataset=str(text_dir), max_tokens=1000)
    harvest(cfg)
    files = {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()}
    with pytest.raises(CacheError, match="other settings.*hooks: "):  # the API, with the model loaded by the caller
        harvest_with(HarvestConfig(**dict(vars(cfg), hooks=["blocks.2.hook_resid_post"])),
                     *model_lib.load_model(str(tiny_llama), "cpu"))
    capsys.readouterr()
    monkeypatch.setattr(model_lib, "load_model", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    args = ["harvest", f"model={tiny_llama}", f"dataset={text_dir}", f"out={tmp_path / 'cache'}", "batch_size=4",
            "shard_tokens=1000", "hooks=[blocks.1.hook_resid_post, blocks.2.hook_resid_post]"]
    assert cli_main([*args, "context_size=16", "max_tokens=2000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resuming" not in err, err
    assert err == (f"sae harvest: error: the cache at {tmp_path / 'cache'} was made with other settings "
                   "(context_size: 32 → 16; hooks: ['blocks.1.hook_resid_post', 'blocks.0.hook_mlp_out'] → "
                   "['blocks.1.hook_resid_post', 'blocks.2.hook_resid_post']; max_tokens: 1,020 → 2,002 (in whole "
                   "contexts)); rerun with its settings, use another `out` folder, or delete it\n"), err
    args[-1] = "hooks=[blocks.1.hook_resid_post, blocks.0.hook_mlp_out]"
    assert cli_main([*args, "context_size=16", "max_tokens=1000", "dataset_split=test", "prepend_bos=false",
                     "model_dtype=half"]) == 2
    assert ("other settings (context_size: 32 → 16; prepend_bos: true → false; model_dtype: 'float32' → 'float16'; "
            "dataset_split: 'train' → 'test'); rerun") in capsys.readouterr().err
    assert cli_main([*args, "context_size=32", "max_tokens=1000"]) == 0  # complete: said so, the model not loaded
    cache = tmp_path / "cache"
    assert capsys.readouterr().out == f"cache at {cache} is already complete (34 contexts)\n{cache}\n"
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "cache").iterdir()} == files
    with pytest.raises(CacheError, match="no activation cache"):
        ActivationStore(tmp_path / "nowhere")


def test_empty_dataset_is_an_error(tiny_llama, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "tiny.txt").write_text("too short")
    with pytest.raises(DataError, match="fewer than 32 tokens"):
        harvest(small_cfg(tiny_llama, tmp_path / "cache", dataset=str(tmp_path / "texts")))


def test_cli_overrides_typos_and_help(tiny_llama, text_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"harvest:\n  model: {tiny_llama}\n  hooks: [blocks.0.hook_resid_post]\n  context_size: 16\n")
    out = tmp_path / "cache"
    assert cli_main(["harvest", "--config", str(config), f"out={out}", "max_tokens=300", f"dataset={text_dir}"]) == 0
    assert ActivationStore(out).n_rows == 22 * 14  # ⌈300 / 14⌉ contexts of 16 tokens, 2 leading ones dropped
    assert cli_main(["harvest", "--config", str(config), "max_tokns=300"]) == 2
    assert "unknown config key 'harvest.max_tokns'. Did you mean 'max_tokens'?" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected int"):
        from sae.cli import stage_config

        stage_config("harvest", str(config), ["context_size=big"])
    with pytest.raises(SystemExit):
        cli_main(["harvest", "--help"])
    assert "exclude_first: int = 2" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.slow
def test_real_smollm2_layer15_matches_hidden_states(tmp_path, within_ulp):
    """The embedded SmolLM2: harvested blocks.15.hook_resid_post == output_hidden_states[16] of a plain forward."""
    cfg = HarvestConfig(hooks=["blocks.15.hook_resid_post"], context_size=64, max_tokens=4 * 62, batch_size=2, out=str(tmp_path / "c"))
    harvest(cfg)
    store = ActivationStore(cfg.out)
    model, _ = model_lib.load_model("smollm2", "cpu")
    assert model.config.hidden_size == 576 and len(model_lib.layers(model)) == 30
    ids = store.context_tokens(torch.arange(store.n_contexts))
    with torch.no_grad():  # in harvest's batches of 2, so most sums take the same kernels
        hidden = torch.cat([model(pair, output_hidden_states=True).hidden_states[16] for pair in ids.split(2)])
    rows = list(store.iter_ordered(cfg.hooks))
    acts = torch.cat([r.acts[cfg.hooks[0]] for r in rows])
    seq, pos = torch.cat([r.seq for r in rows]), torch.cat([r.pos for r in rows])
    within_ulp(acts, hidden[seq, pos], torch.float16, row_scale=True)
    assert torch.equal(torch.cat([r.tokens for r in rows]), ids[seq, pos])
    norm = acts.norm(dim=-1).mean()
    assert 100 < norm < 300, norm  # mid-depth residual (≈175 on Python source)
    # positions 0 and 1 (dropped by default) carry norms up to ~25,000; every later row is ordinary
    assert acts.norm(dim=-1).max() < 3 * norm


def test_shuffled_reader_ranks_slice_the_global_batch(tmp_path):
    """world_size ranks' batches, concatenated in rank order, are the one-rank batch; resume works per rank."""
    hooks = {"a": 8, "b": 12}
    meta = {"model": "random", "hooks": hooks, "dtype": "float16", "context_size": 16, "exclude_first": False,
            "eval_fraction": 0.2}
    writer = CacheWriter(tmp_path, meta, contexts_per_shard=3)  # 7 shards, the last one short
    g = torch.Generator().manual_seed(0)
    writer.add({h: torch.randn(20, 16, d, generator=g).half() for h, d in hooks.items()},
               torch.zeros(20, 16, dtype=torch.long), first_pos=0)
    writer.finish(first_pos=0)
    writer.close()
    store = ActivationStore(tmp_path)

    def batches(n: int, **kw) -> list[dict[str, torch.Tensor]]:
        reader = store.shuffled(list(hooks), 24, seed=5, shuffle_rows=100, **kw)  # groups of 2 shards
        return [next(reader) for _ in range(n)]

    whole = batches(40)  # several groups and epochs
    assert sum(len(b["a"]) for b in whole) > 2 * store.n_train_rows and store.n_train_rows < store.n_rows
    ranks = [batches(40, rank=r, world_size=2) for r in range(2)]
    for i, batch in enumerate(whole):
        for h, d in hooks.items():
            assert ranks[0][i][h].shape == (12, d) and ranks[0][i][h].dtype == store.dtype
            assert torch.equal(torch.cat([ranks[0][i][h], ranks[1][i][h]]), batch[h])
    resumed = store.shuffled(list(hooks), 24, seed=5, shuffle_rows=100, position=13 * 24, rank=1, world_size=2)
    for i in range(13, 40):
        assert torch.equal(next(resumed)["b"], ranks[1][i]["b"])
    assert resumed.position == 40 * 24
    with pytest.raises(CacheError, match="not divisible by world_size 5"):
        store.shuffled(list(hooks), 24, world_size=5)
