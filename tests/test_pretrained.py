"""Pretrained SAEs by name (sae.saes.pretrained, SAE.from_pretrained): folders in our, SAELens's (written by sae-lens itself)
and sparsify's layouts, hub repos and SAELens releases read from a local hub cache, offline errors at the CLI; the
public sparse encode; and one-way imports across the package."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae.cli import main as cli_main
from sae.saes.pretrained import SAEFormatError, find_saes
from sae.saes import SAE, SAE_CLASSES, SAEConfig, TopKSAE, create_sae

pytestmark = pytest.mark.usefixtures("one_thread")

D_IN, D_SAE, K = 16, 64, 4


# ----- fixtures: one folder per layout ------------------------------------------------------------------------------


def write_sparsify(folder: Path, seed: int = 0, **cfg) -> dict[str, torch.Tensor]:
    """A hookpoint folder as sparsify's SparseCoder.save_to_disk writes it: cfg.json (its SparseCoderConfig plus d_in)
    and sae.safetensors with the module's parameter names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g) * 0.5,
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g) * 0.5,
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if cfg.get("skip_connection"):
        tensors["W_skip"] = torch.randn(D_IN, D_IN, generator=g)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "activation": "topk", "expansion_factor": D_SAE // D_IN, "normalize_decoder": True, "num_latents": 0, "k": K,
        "multi_topk": False, "skip_connection": False, "transcode": False, **cfg, "d_in": D_IN,
    }))
    return tensors


def sparsify_forward(t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's own inference, written from its source (sparse_coder.py, fused_encoder.py, utils.eager_decode):
    relu(encoder(x − b_dec)), top-k, then embedding_bag over W_dec plus b_dec. Returns (dense latents, output)."""
    pre = F.relu(F.linear(x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    values, indices = pre.topk(K, dim=-1, sorted=False)
    out = F.embedding_bag(indices, t["W_dec"], per_sample_weights=values, mode="sum") + t["b_dec"]
    return torch.zeros_like(pre).scatter_(-1, indices, values), out


def write_saelens(folder: Path, seed: int = 0):
    """A TopK SAE saved by SAELens itself (save_model), weights random but with a mix of active and inactive latents."""
    import sae_lens

    torch.manual_seed(seed)
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    theirs.save_model(folder)
    return theirs


def trained_ours(arch: str, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    sae = create_sae(SAEConfig(arch, D_IN, D_SAE, k=K, hook_name="blocks.1.hook_resid_post"))
    sae.initialise_from_data(torch.randn(256, D_IN) * 2 + 0.3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.5)
    return sae


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """snapshot(repo_id) → the snapshot folder of `repo_id` in a private hub cache, which is read offline (no network
    in tests): what snapshot_download left there on an earlier, online run."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"

    def snapshot(repo_id: str) -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return snapshot


# ----- local folders ------------------------------------------------------------------------------------------------


def test_sparsify_folder_is_sparsify_topk_exactly(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))  # sparsify's run config
    tensors = write_sparsify(tmp_path / "layers.3")
    sae = SAE.from_pretrained(tmp_path / "layers.3")
    assert type(sae) is TopKSAE and not sae.training
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (D_IN, D_SAE, K)
    assert sae.cfg.hook_name == "blocks.3.hook_resid_post" and sae.cfg.model_name == "EleutherAI/pythia-70m"
    x = torch.randn(200, D_IN) * 2
    f_ref, out_ref = sparsify_forward(tensors, x)
    assert (f_ref > 0).sum(1).float().mean() > K - 1  # most rows have k positive latents: a real top-k test
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), out_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cfg, message", [
    ({"skip_connection": True}, "has a skip connection"),
    ({"transcode": True}, "is a transcoder"),
    ({"activation": "groupmax"}, "uses the 'groupmax' activation"),
    ({"signed": True}, "has signed latents"),
])
def test_sparsify_features_we_do_not_model_are_refused(cfg, message, tmp_path):
    write_sparsify(tmp_path / "layers.0", **cfg)
    with pytest.raises(SAEFormatError, match=message):
        SAE.from_pretrained(tmp_path / "layers.0")


def test_saelens_folder_written_by_saelens(tmp_path):
    theirs = write_saelens(tmp_path / "s")
    ours = SAE.from_pretrained(str(tmp_path / "s"))
    assert type(ours) is TopKSAE and not ours.training
    x = torch.randn(100, D_IN)
    with torch.no_grad():
        f = theirs.encode(x)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs.decode(f), rtol=1e-5, atol=1e-4)


def test_pre_6_saelens_folder(tmp_path):
    """The older SAELens config keys (hook_point, activation_fn_str topk, dtype "torch.float32", normalize_activations
    false) and its finetuning scaling_factor, which multiplies the latents before the decoder."""
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(D_IN, D_SAE, generator=g), "b_enc": torch.randn(D_SAE, generator=g),
         "W_dec": torch.randn(D_SAE, D_IN, generator=g), "b_dec": torch.randn(D_IN, generator=g),
         "scaling_factor": torch.rand(D_SAE, generator=g) + 0.5}
    tmp_path.joinpath("s").mkdir()
    save_file(t, str(tmp_path / "s" / "sae_weights.safetensors"))
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "hook_point": "blocks.8.hook_resid_pre",
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "normalize_activations": False,
        "apply_b_dec_to_input": True, "finetuning_scaling_factor": True, "model_name": "gpt2-small",
    }))
    sae = SAE.from_pretrained(tmp_path / "s")
    assert type(sae) is TopKSAE and sae.cfg.k == K and sae.cfg.hook_name == "blocks.8.hook_resid_pre"
    x = torch.randn(40, D_IN)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    top = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), (f * t["scaling_factor"]) @ t["W_dec"] + t["b_dec"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_our_folders_load_in_eval_mode(arch, tmp_path):
    sae = trained_ours(arch).train()
    sae.save(tmp_path / arch)
    loaded = SAE.from_pretrained(tmp_path / arch)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(50, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-4, atol=1e-4)
    if arch == "batchtopk":  # eval mode matters here: a training-mode encode would move the threshold
        loaded.train_forward(x)
        assert float(loaded.threshold) == pytest.approx(0.5)


def test_a_folder_of_several_saes_names_them(tmp_path):
    write_sparsify(tmp_path / "run" / "layers.0")
    write_sparsify(tmp_path / "run" / "layers.1", seed=1)
    assert list(find_saes([tmp_path / "run"])) == ["layers.0", "layers.1"]
    with pytest.raises(SAEFormatError, match=r"holds 2 SAEs \(layers.0, layers.1\); name one, e.g. .*run/layers.0$"):
        SAE.from_pretrained(tmp_path / "run")


def test_unreadable_layout_lists_the_layouts_read(tmp_path, capsys):
    folder = tmp_path / "gemma-scope"
    folder.mkdir()
    (folder / "params.npz").write_bytes(b"")
    with pytest.raises(SAEFormatError, match=r"not an SAE folder in a layout we read \(it holds params.npz\); layouts "
                                              r"read: .*sae_weights.safetensors.*sparsify's \(cfg.json \+ sae.safetensors\)"):
        SAE.from_pretrained(folder)
    with pytest.raises(SAEFormatError, match=r"does not exist; pass an SAE folder"):
        SAE.from_pretrained(tmp_path / "missing")


# ----- hub repos and SAELens releases (from a local hub cache) --------------------------------------------------------


def test_hub_repo_folder_and_whole_repo(hub):
    snap = hub("EleutherAI/sae-tiny-32x")
    (snap).mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"model": "tiny"}))
    t0 = write_sparsify(snap / "layers.0")
    write_sparsify(snap / "layers.1", seed=1)
    sae = SAE.from_pretrained("EleutherAI/sae-tiny-32x/layers.0")
    x = torch.randn(20, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sparsify_forward(t0, x)[0], rtol=1e-5, atol=1e-5)
    assert sae.cfg.model_name == "tiny" and not sae.training
    with pytest.raises(SAEFormatError, match=r"EleutherAI/sae-tiny-32x holds 2 SAEs \(layers.0, layers.1\); name one, "
                                              r"e.g. EleutherAI/sae-tiny-32x/layers.0$"):
        SAE.from_pretrained("EleutherAI/sae-tiny-32x")
    assert list(find_saes(["EleutherAI/sae-tiny-32x"])) == ["layers.0", "layers.1"]
    with pytest.raises(SAEFormatError, match=r"hub repo 'EleutherAI/sae-tiny-32x' has no folder 'layers.7'"):
        SAE.from_pretrained("EleutherAI/sae-tiny-32x/layers.7")


def test_saelens_release_and_sae_id_through_the_registry(hub):
    """gpt2-small-res-jb/blocks.8.hook_resid_pre is, per SAELens's registry, the folder blocks.8.hook_resid_pre of
    jbloom/GPT2-Small-SAEs-Reformatted."""
    theirs = write_saelens(hub("jbloom/GPT2-Small-SAEs-Reformatted") / "blocks.8.hook_resid_pre")
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        f = theirs.encode(x)
    for args in (("gpt2-small-res-jb/blocks.8.hook_resid_pre",), ("gpt2-small-res-jb", "blocks.8.hook_resid_pre")):
        sae = SAE.from_pretrained(*args)
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    assert list(find_saes(["gpt2-small-res-jb/blocks.8.hook_resid_pre"])) == ["blocks.8.hook_resid_pre"]
    with pytest.raises(SAEFormatError, match=r"release 'gpt2-small-res-jb' has no sae_id 'blocks.99.x'; it has 13, e.g."):
        SAE.from_pretrained("gpt2-small-res-jb/blocks.99.x")
    with pytest.raises(SAEFormatError, match=r"stored in the 'gemma_2' format, which needs SAELens's converter"):
        SAE.from_pretrained("gemma-scope-2b-pt-res-canonical", "layer_0/width_16k/canonical")


def test_saelens_release_whose_registry_entry_normalises_is_refused(hub):
    """mistral-7b-res-wg's registry entry overrides its cfg.json with normalize_activations: constant_norm_rescale,
    which SAELens applies at load time: read from the folder alone, its SAEs would be fed unnormalised input."""
    write_saelens(hub("JoshEngels/Mistral-7B-Residual-Stream-SAEs") / "mistral_7b_layer_8")
    with pytest.raises(SAEFormatError, match=r"'mistral-7b-res-wg' sets normalize_activations='constant_norm_rescale'"):
        SAE.from_pretrained("mistral-7b-res-wg/blocks.8.hook_resid_pre")


def test_saelens_release_that_scales_by_its_registry_factor_is_refused_and_others_load(hub):
    """gemma-2b-res-jb's blocks.12 folder says normalize_activations: expected_average_only_in and the registry holds
    its norm_scaling_factor, which SAELens's from_pretrained folds into the weights: read from the folder alone its
    outputs would differ, so it is refused naming the factor. The same folder without a registry factor (blocks.0)
    loads as SAELens's loader reads it, unscaled."""
    def normalised_folder(sae_path: str) -> None:
        folder = hub("jbloom/Gemma-2b-Residual-Stream-SAEs") / sae_path
        write_saelens(folder)
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))

    normalised_folder("gemma_2b_blocks.12.hook_resid_post_16384")
    with pytest.raises(SAEFormatError, match=r"^gemma-2b-res-jb/blocks.12.hook_resid_post: SAELens's from_pretrained "
                                              r"multiplies its inputs by the registry's norm_scaling_factor 0.2138"):
        SAE.from_pretrained("gemma-2b-res-jb/blocks.12.hook_resid_post")
    normalised_folder("gemma_2b_blocks.0.hook_resid_post_16384_anthropic")
    assert SAE.from_pretrained("gemma-2b-res-jb", "blocks.0.hook_resid_post").cfg.k == K


def _no_network():
    from huggingface_hub.errors import LocalEntryNotFoundError

    return LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub")


def _no_repo():
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx2.Request("GET", "https://hub.invalid/api/models/someone/saes")  # built only, never sent
    return RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))


@pytest.mark.parametrize("error, message", [
    (_no_network, "cannot reach the hub for repo 'someone/saes' and it is not in the local cache"),
    (_no_repo, r"the hub has no repo 'someone/saes' you can read \(misspelt, private or gated\?\)$"),
])
def test_unreachable_hub_or_unknown_repo_is_one_line(error, message, monkeypatch):
    import huggingface_hub

    def download(*a, **k):
        raise error()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(SAEFormatError, match=rf"^someone/saes/layers.0: no such local folder, and {message}"):
        SAE.from_pretrained("someone/saes/layers.0")


@pytest.mark.parametrize("stage, setting", [("eval", "saes=[{}]"), ("analyse", "sae={}"), ("score", "sae={}")])
def test_offline_hub_sae_at_the_cli_is_one_line_at_once(stage, setting, tiny_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    extra = ["text=hello"] if stage == "score" else [f"out={tmp_path / 'out'}"]
    code = cli_main([stage, f"cache={tiny_cache}", setting.format("nobody/no-such-saes/layers.0"), "device=cpu", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and time.monotonic() - start < 10, err
    assert err == (f"sae {stage}: error: nobody/no-such-saes/layers.0: no such local folder, and hub repo "
                   "'nobody/no-such-saes' is not in the local cache and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to "
                   "download it, or pass a local folder")
    assert not (tmp_path / "out").exists()


def test_unreadable_folder_at_the_cli_lists_the_layouts(tiny_cache, tmp_path, capsys):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "ae.pt").write_bytes(b"")
    assert cli_main(["eval", f"cache={tiny_cache}", f"saes=[{tmp_path / 'odd'}]", f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("(it holds ae.pt); layouts read: ours or SAELens's (cfg.json + "
                                           "sae_weights.safetensors) or EleutherAI sparsify's (cfg.json + sae.safetensors)")


# ----- sparse encode ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(SAE_CLASSES))
def test_encode_sparse_equals_dense_encode(arch):
    sae = trained_ours(arch).eval()
    x = torch.randn(3, 40, D_IN) * 2  # leading dims are flattened: rows index x.reshape(-1, d_in)
    with torch.no_grad():
        dense = sae.encode(x).reshape(-1, D_SAE)
        acts = sae.encode_sparse(x)
    assert 0 < len(acts.values) < dense.numel()  # a mix of active and inactive latents
    assert (acts.values > 0).all() and bool((acts.rows.diff() >= 0).all())
    torch.testing.assert_close(acts.to_dense(120, D_SAE), dense, rtol=0, atol=0)


def test_topk_encode_sparse_never_builds_dense_activations(monkeypatch):
    sae = trained_ours("topk").eval()

    def dense(*a, **k):
        raise AssertionError("the dense encoder ran")

    monkeypatch.setattr(sae, "encode_normalised", dense)
    acts = sae.encode_sparse(torch.randn(10, D_IN))
    assert len(acts.rows) == len(acts.features) == len(acts.values) and len(acts.values) <= 10 * K


def test_saelens_topk_that_rescales_by_decoder_norm(tmp_path):
    """SAELens's TopK with rescale_acts_by_decoder_norm (its training default) selects the top k of pre·‖W_dec‖ and
    decodes acts/‖W_dec‖: a folder saved that way loads with the norms folded in, so the same latents fire."""
    import sae_lens

    torch.manual_seed(0)
    theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, apply_b_dec_to_input=True,
                                                     rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        theirs.W_dec.mul_(torch.rand(D_SAE, 1) * 4 + 0.1)  # very unequal decoder norms change which latents win
    theirs.save_model(tmp_path / "s")
    ours = SAE.from_pretrained(tmp_path / "s")
    x = torch.randn(100, D_IN)
    with torch.no_grad():
        f = theirs.encode(x)
        torch.testing.assert_close(ours.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs.decode(f), rtol=1e-5, atol=1e-4)


def test_score_names_the_saes_of_a_hub_repo_before_downloading_them(hub, tiny_cache, capsys, monkeypatch):
    """`sae score` takes one SAE: a hub repo of several is refused from its configs alone, not after a download of
    every SAE in it (a sparsify repo is tens of GB)."""
    import huggingface_hub

    snap = hub("EleutherAI/sae-tiny-32x")
    write_sparsify(snap / "layers.0")
    write_sparsify(snap / "layers.1", seed=1)
    patterns = []
    real = huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **k: patterns.append(k.get("allow_patterns")) or real(repo, **k))
    assert cli_main(["score", f"cache={tiny_cache}", "sae=EleutherAI/sae-tiny-32x", "text=hello", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("sae score: error: EleutherAI/sae-tiny-32x holds 2 SAEs (layers.0, layers.1); name one, e.g. "
                   "EleutherAI/sae-tiny-32x/layers.0")
    assert None not in patterns  # only the configs were fetched


def test_a_path_object_is_a_local_folder_never_a_hub_id(tmp_path, monkeypatch):
    """`Path("runs/x")` is a local path whatever its shape: a missing one says so, without asking the hub."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    with pytest.raises(SAEFormatError, match=r"^runs/x does not exist; pass an SAE folder"):
        SAE.from_pretrained(Path("runs/x"))
    with pytest.raises(SAEFormatError, match=r"^runs/x does not exist; pass an SAE folder"):
        find_saes([Path("runs/x")])


def test_a_weights_file_instead_of_its_folder_says_so(tmp_path):
    trained_ours("topk").save(tmp_path / "s")
    weights = tmp_path / "s" / "sae_weights.safetensors"
    with pytest.raises(SAEFormatError, match=rf"^{weights} is a file; pass the SAE folder that holds it \({tmp_path / 's'}\)"):
        SAE.from_pretrained(weights)


def test_eval_refuses_an_sae_of_another_hook_before_loading_the_model(tiny_cache, tmp_path, capsys, monkeypatch):
    """A downloaded sparsify repo holds every layer's SAE; one whose hook the cache lacks is named before the model
    (minutes for a large one) is loaded."""
    import sae.data.model

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sae.data.model, "load_model", no_model)
    root = tmp_path / "sparsify"
    write_sparsify(root / "layers.0")
    assert cli_main(["eval", f"cache={tiny_cache}", f"saes=[{root}]", f"out={tmp_path / 'out'}", "device=cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "sae eval: error: hook(s) ['blocks.0.hook_resid_post'] are not in the cache")


def test_offline_hub_folder_cached_without_its_weights_says_so(hub):
    """Naming a whole repo fetches only its configs (to list its SAEs); offline, one of them named next is in the
    cache without weights, which is said as such rather than as a folder in an unknown layout."""
    snap = hub("EleutherAI/sae-tiny-32x")
    write_sparsify(snap / "layers.0")
    (snap / "layers.0" / "sae.safetensors").unlink()
    message = (r"the local cache holds hub repo 'EleutherAI/sae-tiny-32x' only in part \(layers.0 has cfg.json but no "
               r"weights\) and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download the rest$")
    with pytest.raises(SAEFormatError, match=r"^EleutherAI/sae-tiny-32x/layers.0: no such local folder, and " + message):
        SAE.from_pretrained("EleutherAI/sae-tiny-32x/layers.0")
    with pytest.raises(SAEFormatError, match=r"^EleutherAI/sae-tiny-32x: no such local folder, and " + message):
        find_saes(["EleutherAI/sae-tiny-32x"])
