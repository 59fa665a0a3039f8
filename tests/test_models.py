"""Hook maps of every mapped model family, proved against transformers' own tiny random models: the self-check
`load_model` runs, `output_hidden_states`, the residual algebra, stop-early = full forward; post-norms (Gemma 2),
a wrong map caught, the inferred map of an unmapped model, and the families table in docs/harvest.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as T

from sae import tiny
from sae.data import model as model_lib
from sae.data.model import HOOK_KINDS, FAMILIES, ModelError, capture, hooks, load_model

# Tiny sizes: hidden 32, 3 layers, vocab 512 (sae.tiny's tokenizer), 4 experts; token ids the vocabulary holds.
_IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=1)
_BASE = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, **_IDS)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_DEEPSEEK = dict(_BASE, **_MOE, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                 first_k_dense_replace=1)


def _gemma3():
    text = T.Gemma3TextConfig(**_BASE, head_dim=8)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    return T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)


#: One tiny config per mapped family (and variants where a config flag changes the block), keyed by a test id.
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**_BASE),
    "mistral": lambda: T.MistralConfig(**_BASE),
    "qwen2": lambda: T.Qwen2Config(**_BASE),
    "qwen3": lambda: T.Qwen3Config(**_BASE, head_dim=8),
    "smollm3": lambda: T.SmolLM3Config(**_BASE),
    "phi3": lambda: T.Phi3Config(**_BASE),
    "olmo": lambda: T.OlmoConfig(**_BASE),
    "gemma": lambda: T.GemmaConfig(**_BASE, head_dim=8),
    "gemma2": lambda: T.Gemma2Config(**_BASE, head_dim=8),
    "gemma3_text": lambda: T.Gemma3TextConfig(**_BASE, head_dim=8),
    "gemma3": _gemma3,
    "olmo2": lambda: T.Olmo2Config(**_BASE),
    "olmo3": lambda: T.Olmo3Config(**_BASE),
    "granite": lambda: T.GraniteConfig(**_BASE, residual_multiplier=0.5, embedding_multiplier=3.0),
    "mixtral": lambda: T.MixtralConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_BASE, **_MOE, num_experts=4, shared_expert_intermediate_size=32),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_BASE, **_MOE, num_experts=4, head_dim=8),
    "olmoe": lambda: T.OlmoeConfig(**_BASE, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": lambda: T.DeepseekV2Config(**_DEEPSEEK, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=8),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_DEEPSEEK, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=8),
    "glm4_moe": lambda: T.Glm4MoeConfig(**_DEEPSEEK),
    "phimoe": lambda: T.PhimoeConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: T.GptOssConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "granitemoe": lambda: T.GraniteMoeConfig(**_BASE, num_local_experts=4, num_experts_per_tok=2,
                                             residual_multiplier=0.5),
    "gpt2": lambda: T.GPT2Config(vocab_size=512, n_embd=32, n_layer=3, n_head=4, n_positions=128, **_IDS),
    "gpt_neox": lambda: T.GPTNeoXConfig(**_BASE),
    "gpt_neox(sequential)": lambda: T.GPTNeoXConfig(**_BASE, use_parallel_residual=False),
    "phi": lambda: T.PhiConfig(**_BASE),
    "gptj": lambda: T.GPTJConfig(vocab_size=512, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_positions=128, **_IDS),
    "falcon": lambda: T.FalconConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, **_IDS),
    "falcon(new_decoder_architecture)": lambda: T.FalconConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3,
                                                               num_attention_heads=4, num_kv_heads=2,
                                                               new_decoder_architecture=True, **_IDS),
    "falcon(sequential)": lambda: T.FalconConfig(vocab_size=512, hidden_size=32, num_hidden_layers=3,
                                                 num_attention_heads=4, parallel_attn=False, **_IDS),
    "stablelm": lambda: T.StableLmConfig(**_BASE),
    "stablelm(parallel)": lambda: T.StableLmConfig(**_BASE, use_parallel_residual=True),
    "cohere": lambda: T.CohereConfig(**_BASE),
    "cohere2": lambda: T.Cohere2Config(**_BASE, head_dim=8),
}


def test_every_mapped_family_has_a_tiny_model_here():
    assert {name.split("(")[0] for name in CONFIGS} == set(FAMILIES)


@pytest.mark.parametrize("case", list(CONFIGS))
def test_family_hooks_pass_the_self_check_and_match_hidden_states(case, tmp_path, one_thread):
    """Loaded through `load_model` (which runs the self-check), all six hook kinds at two layers: resid_pre/post are
    `output_hidden_states`, resid_post = resid_pre + attn_out + mlp_out, hook_mlp_in is resid_mid (resid_pre in
    parallel blocks), and the stop-early capture equals the values of a full forward."""
    folder = tiny.save(tmp_path / "model", CONFIGS[case]())
    model, _ = load_model(str(folder), "cpu")
    assert model.config.model_type == case.split("(")[0]
    n = len(model_lib.layers(model))
    assert n == 3
    names = [f"blocks.{i}.{k}" for i in (0, 1) for k in HOOK_KINDS]
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(1))
    full: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with hooks(model, {name: (lambda t, name=name: full.__setitem__(name, t.clone())) for name in names}):
            hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
        calls = []
        last = model_lib.layers(model)[2].register_forward_pre_hook(lambda *_: calls.append(1))
        acts = capture(model, ids, names)
        last.remove()
    assert not calls, "the capture ran the layer after the deepest hook"
    parallel = model_lib.is_parallel(model)
    for i in (0, 1):
        a = {k: acts[f"blocks.{i}.{k}"] for k in HOOK_KINDS}
        for k in HOOK_KINDS:
            torch.testing.assert_close(a[k], full[f"blocks.{i}.{k}"], msg=f"{case} blocks.{i}.{k}: stop-early ≠ full")
        torch.testing.assert_close(a["hook_resid_pre"], hidden[i])
        torch.testing.assert_close(a["hook_resid_post"], hidden[i + 1])
        torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"],
                                   atol=1e-5, rtol=1e-5)
        mid = a["hook_resid_pre"] if parallel else a["hook_resid_pre"] + a["hook_attn_out"]
        torch.testing.assert_close(a["hook_mlp_in"], mid, atol=1e-5, rtol=1e-5)
        assert a["hook_mlp_out"].abs().max() > 0 and a["hook_attn_out"].abs().max() > 0


def _gemma2_with_norms(folder: Path) -> Path:
    """A tiny Gemma 2 whose norms are not the identity, as in a trained model: pre- and post-norm weights from
    N(0, 1) (so the tensors before and after a post-norm differ) and a final norm 21x (Gemma's norms scale by 1 + w)
    that sharpens the logits (so the loss depends on what a splice changes)."""
    tiny.save(folder, CONFIGS["gemma2"]())
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.manual_seed(2)
    for block in model.model.layers:
        for norm in (block.post_attention_layernorm, block.post_feedforward_layernorm, block.pre_feedforward_layernorm):
            norm.weight.data.normal_(0, 1.0)
    model.model.norm.weight.data.fill_(20.0)
    model.save_pretrained(folder)
    return folder


def test_gemma2_mlp_out_is_the_post_norm_output(tmp_path, one_thread):
    """With post-norm weights that are not 1, the MLP's raw output and the post-normed one differ: hook_mlp_out is
    the post-normed tensor, the one added to the residual stream (resid_post = resid_mid + hook_mlp_out)."""
    model, _ = load_model(str(_gemma2_with_norms(tmp_path / "model")), "cpu")  # the self-check passes with these too
    block = model_lib.layers(model)[1]
    assert block.post_feedforward_layernorm.weight.abs().min() > 0
    ids = torch.randint(3, 500, (2, 12))
    acts = capture(model, ids, [f"blocks.1.{k}" for k in HOOK_KINDS])
    a = {k: acts[f"blocks.1.{k}"] for k in HOOK_KINDS}
    with torch.no_grad():
        raw = block.mlp(a["ln2.hook_normalized"])
        torch.testing.assert_close(a["ln2.hook_normalized"], block.pre_feedforward_layernorm(a["hook_mlp_in"]))
        torch.testing.assert_close(a["hook_mlp_out"], block.post_feedforward_layernorm(raw))
    assert (a["hook_mlp_out"] - raw).abs().max() > 0.1 * raw.abs().max()
    resid_mid = a["hook_mlp_in"]
    torch.testing.assert_close(resid_mid, a["hook_resid_pre"] + a["hook_attn_out"])
    torch.testing.assert_close(a["hook_resid_post"], resid_mid + a["hook_mlp_out"])


@pytest.mark.parametrize("wrong, hook", [
    (dict(mlp="input_layernorm"), r"blocks\.0\.hook_resid_post ≠ hook_resid_pre \+ hook_attn_out \+ hook_mlp_out"),
    (dict(ln2="input_layernorm"), r"blocks\.0\.hook_mlp_in ≠ hook_resid_pre \+ hook_attn_out"),
    (dict(layers="model.layers", mlp="mlp.gate_proj"), r"blocks\.0\.hook_mlp_out has shape"),
])
def test_a_wrong_map_is_caught_by_the_self_check(wrong, hook, tiny_llama, monkeypatch):
    monkeypatch.setitem(FAMILIES, "llama", dict(FAMILIES["llama"], **wrong))
    with pytest.raises(ModelError) as err:
        load_model(str(tiny_llama), "cpu")
    message = str(err.value)
    assert "\n" not in message
    assert re.match(r"^the hook map of model type 'llama' fails its self-check: " + hook, message), message
    if "deviation" in message:
        assert re.search(r"max deviation \d", message)


@pytest.mark.parametrize("case, wrong", [
    ("gemma2", dict(attn_post=None, mlp_post=None)),  # the raw sublayer outputs are not what is added
    ("olmo2", dict(ln2="post_attention_layernorm")),  # OLMo 2 has no MLP pre-norm
    ("granite", dict(scale=None)),  # the outputs as the sublayers return them, not × residual_multiplier
    ("phi", dict(parallel=False)),  # hook_mlp_in is resid_pre in a parallel block
    ("falcon", dict(clone=False)),  # Falcon adds the attention's output into the MLP's in place
    ("qwen2_moe", dict(mlp="mlp.experts")),  # the routed experts alone, without the shared expert
])
def test_each_special_key_of_a_family_is_needed(case, wrong, tmp_path, monkeypatch, one_thread):
    """Without its post-norms, multiplier, parallel flag or clone, a family's map fails the self-check."""
    folder = tiny.save(tmp_path / "model", CONFIGS[case]())
    if case == "gemma2":  # post-norm weights not 1, as in a trained model
        model, _ = load_model(str(folder), "cpu")
        for block in model_lib.layers(model):
            block.post_attention_layernorm.weight.data.normal_(0, 1.0)
            block.post_feedforward_layernorm.weight.data.normal_(0, 1.0)
        model.save_pretrained(folder)
    monkeypatch.setitem(FAMILIES, case, dict(FAMILIES[case], **wrong))
    with pytest.raises(ModelError, match=rf"^the hook map of model type '{case}' fails its self-check: blocks\.0\."):
        load_model(str(folder), "cpu")


def test_an_unmapped_model_gets_a_verified_inferred_map(tmp_path, one_thread):
    """seed_oss is not in FAMILIES; its layer list, attention, MLP and norms sit under the usual names, so the
    probe verifies all six hook kinds."""
    assert "seed_oss" not in FAMILIES
    folder = tiny.save(tmp_path / "model", T.SeedOssConfig(**_BASE))
    model, _ = load_model(str(folder), "cpu")
    assert len(model_lib.hook_names(model)) == 3 * len(HOOK_KINDS)
    ids = torch.randint(3, 500, (1, 10))
    acts = capture(model, ids, ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "blocks.1.hook_resid_pre",
                                "blocks.1.hook_attn_out"])
    a = {k.split(".", 2)[2]: v for k, v in acts.items()}
    torch.testing.assert_close(a["hook_resid_post"], a["hook_resid_pre"] + a["hook_attn_out"] + a["hook_mlp_out"])


def test_an_unmapped_post_norm_model_keeps_only_what_the_probe_verifies(tmp_path, one_thread):
    """exaone4 norms its sublayer outputs (like OLMo 2); an inferred map would take the attention's post-norm for the
    MLP's pre-norm, which the probe refutes: the residual hooks work, the others are refused naming what to add."""
    assert "exaone4" not in FAMILIES
    folder = tiny.save(tmp_path / "model", T.Exaone4Config(**_BASE))
    model, _ = load_model(str(folder), "cpu")
    acts = capture(model, torch.randint(3, 500, (1, 10)), ["blocks.1.hook_resid_post"])
    assert acts["blocks.1.hook_resid_post"].shape == (1, 10, 32)
    with pytest.raises(ModelError) as err:
        model_lib.resolve_hook(model, "blocks.1.hook_mlp_out")
    message = str(err.value)
    assert "\n" not in message
    assert "add 'exaone4' to sae.data.model.FAMILIES" in message and "post_feedforward_layernorm" in message
    assert "blocks.0.hook_resid_post ≠ hook_resid_pre + hook_attn_out + hook_mlp_out (max deviation" in message
    with pytest.raises(ModelError, match=r"blocks\.\{0\.\.2\}\.\{hook_resid_pre,hook_resid_post\}"):
        model_lib.resolve_hook(model, "blocks.9.hook_resid_post")


def test_llama_without_its_entry_is_inferred_with_all_hooks(tiny_llama, monkeypatch):
    monkeypatch.setattr(model_lib, "FAMILIES", {k: v for k, v in FAMILIES.items() if k != "llama"})
    model, _ = load_model(str(tiny_llama), "cpu")
    fam = model_lib.family(model)
    assert (fam["layers"], fam["attn"], fam["mlp"], fam["ln2"], fam["final_norm"]) == (
        "model.layers", "self_attn", "mlp", "post_attention_layernorm", "model.norm")
    assert fam["parallel"] is False and fam.get("kinds", HOOK_KINDS) == HOOK_KINDS


def test_the_families_table_in_docs_is_generated_from_the_code():
    doc = (Path(__file__).parent.parent / "docs" / "harvest.md").read_text()
    table = re.search(r"<!-- families:begin.*?-->\n(.*?)\n<!-- families:end -->", doc, re.S)
    assert table, "docs/harvest.md lacks the <!-- families:begin --> ... <!-- families:end --> markers"
    assert table.group(1) == model_lib.family_table(), (
        "docs/harvest.md's families table is stale: regenerate it with "
        "python -c 'from sae.data.model import family_table; print(family_table())'")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert f"| model families | {len(FAMILIES)} families" in readme


# ----- a Gemma Scope user's path: harvest → train → SAELens folder → eval, steer --------------------------------------


def test_gemma2_harvest_eval_and_steer_of_a_saelens_folder_through_the_cli(tmp_path, text_dir, capsys, one_thread):
    """On a tiny Gemma 2: harvest `hook_mlp_out` (after the post-feedforward norm, as Gemma Scope's MLP SAEs read it),
    train a JumpReLU SAE, re-save it with SAELens itself as a plain SAELens JumpReLU folder (Gemma Scope's
    architecture and layout, apply_b_dec_to_input false, nothing of ours in it), then `sae eval` and `sae steer` it.
    The CE eval reports with the SAE spliced in equals the CE of plain transformers with the SAELens SAE put on the
    output of `post_feedforward_layernorm` by a PyTorch hook, and differs from the CE with it on the raw MLP output."""
    import sae_lens
    import torch.nn.functional as F

    from sae.cli import main, run_stage
    from sae.data.store import ActivationStore

    hook = "blocks.1.hook_mlp_out"
    folder = _gemma2_with_norms(tmp_path / "gemma2")
    cache, saes, gemma_scope = tmp_path / "cache", tmp_path / "saes", tmp_path / "saelens"
    assert main(["harvest", f"model={folder}", f"hooks=[{hook}]", f"dataset={text_dir}", "context_size=32",
                 "max_tokens=2400", "batch_size=8", "dtype=float32", "eval_fraction=0.25", f"out={cache}",
                 "device=cpu"]) == 0
    assert main(["train", f"cache={cache}", f"out={saes}", "total_tokens=6000", "device=cpu", "wandb_mode=disabled",
                 f"saes=[{{architecture: jumprelu, hook: {hook}, expansion_factor: 4}}]"]) == 0
    trained = sae_lens.SAE.load_from_disk(next(saes.glob("jumprelu*")))
    theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(
        d_in=32, d_sae=trained.cfg.d_sae, apply_b_dec_to_input=False,
        metadata=sae_lens.saes.sae.SAEMetadata(hook_name=hook, model_name=str(folder))))
    theirs.load_state_dict(trained.state_dict())
    theirs.save_model(gemma_scope)
    assert "sae_config" not in (gemma_scope / "cfg.json").read_text()

    capsys.readouterr()
    assert main(["eval", f"cache={cache}", f"saes=[{gemma_scope}]", f"out={tmp_path / 'eval'}", "lm_loss_contexts=8",
                 "max_tokens=600", "pca_fit_tokens=1000", "device=cpu"]) == 0
    assert hook in capsys.readouterr().out
    (result,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["saes"]
    assert result["hook"] == hook and result["architecture"] == "jumprelu"
    # A random model's loss barely depends on one MLP (CE recovered is noise there): the CE itself is checked below.
    assert result["fvu"] < 0.5 and isinstance(result["ce_recovered"], float) and result["ce_spliced"] > 0

    store = ActivationStore(cache)
    first, tokens = store.first_pos, store.context_tokens(store.holdout_seqs(8))
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    block = model.model.layers[1]

    def ce_with_sae_on(module: torch.nn.Module) -> float:
        def put(_module, _args, out):
            return torch.cat([out[:, :first], theirs(out)[:, first:]], dim=1)

        handle = module.register_forward_hook(put)
        try:
            with torch.no_grad():
                logits = model(input_ids=tokens, use_cache=False).logits[:, first:-1]
        finally:
            handle.remove()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, first + 1:].reshape(-1)).item()

    assert result["ce_spliced"] == pytest.approx(ce_with_sae_on(block.post_feedforward_layernorm), rel=1e-5)
    assert abs(result["ce_spliced"] - ce_with_sae_on(block.mlp)) > 0.05

    steered = run_stage("steer", None, [f"sae={gemma_scope}", "prompt=def main(args):", "features={0: 50, 1: 50}",
                                        "max_new_tokens=8", "device=cpu"])
    assert steered.steered != steered.plain


def test_gemma3_multimodal_wrapper_splices_and_evaluates(tmp_path, hand_sae, hook, one_thread):
    """Gemma 3's multimodal wrapper has no `hidden_size` of its own (its text config has): an SAE fits it, and the LM
    loss `sae eval` computes is the one of a model whose text layer's output the SAE's reconstruction replaced."""
    from sae.analysis.evaluate import lm_losses
    from sae.analysis.splice import check_fits

    folder = tiny.save(tmp_path / "gemma3", CONFIGS["gemma3"]())
    model, _ = load_model(str(folder), "cpu")
    assert not hasattr(model.config, "hidden_size") and model_lib.hidden_size(model) == 32
    eye = torch.eye(32)
    doubles = hand_sae(torch.cat([eye, -eye], 1), 2 * torch.cat([eye, -eye]))  # x̂ = 2x: relu(x) − relu(−x) = x
    check_fits(model, doubles)
    tokens = torch.randint(3, 500, (4, 16), generator=torch.Generator().manual_seed(3))
    loss = lm_losses(model, tokens, hook, {"doubles": doubles}, first=0, batch_size=2)["doubles"]
    layer = model_lib.layers(model)[int(hook.split(".")[1])]
    assert layer is model.model.language_model.layers[1]
    handle = layer.register_forward_hook(lambda _m, _a, out: (2 * out[0], *out[1:]) if isinstance(out, tuple) else 2 * out)
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens, use_cache=False).logits[:, :-1]
    finally:
        handle.remove()
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert loss.ce_spliced == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.ce_spliced - loss.ce_clean) > 1e-3 and loss.ce_zero != loss.ce_clean
