"""Shared fixtures: tiny random models (`sae.tiny`: a real small tokenizer, saved as HF folders), tiny caches and
hand-built SAEs."""

from __future__ import annotations

import os
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from sae import tiny

# Keep conversions of the embedded model in one place per test session (reused between runs on one machine).
os.environ.setdefault("SAE_CACHE_DIR", str(Path.home() / ".cache" / "sae"))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def one_thread():
    """Tiny tensors run fastest (and steadiest on a shared 2-core box) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny.llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return tiny.save(tmp_path_factory.mktemp("tiny_gpt2"), cfg)


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> Path:
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    return tiny.save(tmp_path_factory.mktemp("tiny_neox"), cfg)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of real text files (a slice of the standard library) as a local dataset."""
    folder = tmp_path_factory.mktemp("texts")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py"))[40:70]:
        (folder / (p.stem + ".txt")).write_text(p.read_text(errors="replace"))
    return folder


# ------------------------------------------------------------------------------------------------ SAE test helpers
# Shared by test_evaluate, test_analyse, test_dashboard and test_notebook.

TINY_HOOK = "blocks.1.hook_resid_post"


def _harvest_tiny(model_dir: Path, texts: Path, out: Path, exclude_first: bool = True) -> Path:
    from sae.data.harvest import HarvestConfig, harvest

    cfg = HarvestConfig(model=str(model_dir), hooks=[TINY_HOOK], dataset=str(texts), context_size=32, max_tokens=2400,
                        batch_size=8, shard_tokens=600, dtype="float32", eval_fraction=0.25,
                        exclude_first=exclude_first, out=str(out))
    return harvest(cfg)


def _hand_sae(W_enc: torch.Tensor, W_dec: torch.Tensor, b_enc: torch.Tensor | None = None, model: str = ""):
    from sae.saes import SAEConfig, create_sae

    d_in, d_sae = W_enc.shape
    sae = create_sae(SAEConfig("relu_l1", d_in=d_in, d_sae=d_sae, hook_name=TINY_HOOK, model_name=model,
                               apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_enc.copy_(torch.zeros(d_sae) if b_enc is None else b_enc)
        sae.b_dec.zero_()
    return sae.eval()


def _within_ulp(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, row_scale: bool = False) -> None:
    """Values stored in `dtype` that two code paths (other batch shapes, other kernels) round on their own may land
    on neighbouring representable values: allow one step of `dtype` at the expected value, and no more.

    row_scale: the values are a network's outputs, each a float32 sum of terms as large as its row, so two kernels
    round it apart by float32 steps at the row's scale, not its own: on another x86 CPU in CI, 119 of 142,848
    SmolLM2 values (rows of RMS ≈ 7) moved by up to 96 float16 steps at their own, smaller size. Then the step is
    taken at max(|value|, row RMS), which still fails SmolLM2's layer 15 for 16 by 2,771 steps and a one-position
    shift by 20,647."""
    e = expected.to(dtype)
    at = e.abs()
    if row_scale:
        at = torch.maximum(at, e.float().pow(2).mean(-1, keepdim=True).sqrt().to(dtype))
    ulp = (torch.nextafter(at, torch.tensor(float("inf"), dtype=dtype)) - at).float()
    gap = (actual.float() - e.float()).abs()
    bad = gap > ulp
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} values differ by more than one {dtype} ulp; "
                           f"worst {float((gap / ulp).max()):.1f} ulp")


@pytest.fixture(scope="session")
def within_ulp():
    """within_ulp(actual, expected, dtype, row_scale=False): every value within one `dtype` ulp of the expected value
    (at the row's RMS where row_scale)."""
    return _within_ulp


@pytest.fixture
def patch_batches(monkeypatch):
    """``patch_batches(change)`` routes training's batches through ``change(n, batch)`` (n counts from 1) as they
    leave the reader's checks, on the prefetch worker: how a test poisons a run at a given step; ``patch_batches(
    interrupt_at=n)`` raises KeyboardInterrupt instead of the n-th batch (it reaches the training loop at that step,
    as Ctrl-C would). ``monkeypatch.undo()`` restores the real batches."""
    from sae.training import train as train_lib

    real = train_lib.checked_batches

    def patch(change=None, *, interrupt_at: int | None = None):
        def patched(*args, **kwargs):
            for n, batch in enumerate(real(*args, **kwargs), 1):
                if n == interrupt_at:
                    raise KeyboardInterrupt
                yield change(n, batch) if change else batch

        monkeypatch.setattr(train_lib, "checked_batches", patched)

    return patch


@pytest.fixture(scope="session")
def hook() -> str:
    """The hook every tiny cache and hand-built SAE uses: layer 1's residual stream of the tiny models."""
    return TINY_HOOK


@pytest.fixture(scope="session")
def harvest_tiny():
    """harvest_tiny(model_dir, texts, out, exclude_first=True): a real cache of ~2.4k rows in four shards, float32
    so tests compare exact numbers."""
    return _harvest_tiny


@pytest.fixture(scope="session")
def hand_sae():
    """hand_sae(W_enc, W_dec, b_enc=None, model=""): a plain ReLU SAE f = ReLU(x W_enc + b_enc), x̂ = f W_dec at
    the tiny hook, with exactly these weights."""
    return _hand_sae


@pytest.fixture(scope="session")
def tiny_cache(tiny_llama, text_dir, tmp_path_factory) -> Path:
    """One harvested tiny-Llama cache for the whole session (read-only: tests must not write into it)."""
    return _harvest_tiny(tiny_llama, text_dir, tmp_path_factory.mktemp("tiny_cache") / "cache")


# ------------------------------------------------------------------------------------------------ fault tally
# tests/test_faults.py records what each injected fault ended in (a "fault" user property); a test that fails counts
# its fault as lost or silently wrong. The sums are printed at the end of the session (and quoted in docs/faults.md).

FAULT_OUTCOMES = ("recovered exactly", "refused with a message", "finished before the kill")
_fault_tally: Counter = Counter()
_failed: set[str] = set()
_kills: list[str] = []  # where each kill -9 trial's signal landed


def pytest_runtest_logreport(report):
    if report.failed:
        _failed.add(report.nodeid)
    if report.when == "teardown":
        for name, outcome in report.user_properties:
            if name == "fault":
                _fault_tally["lost or silently wrong" if report.nodeid in _failed else outcome] += 1
            elif name == "kill":
                _kills.append(outcome)


def pytest_terminal_summary(terminalreporter):
    if _fault_tally:
        counts = ", ".join(f"{_fault_tally[o]} {o}" for o in (*FAULT_OUTCOMES, "lost or silently wrong"))
        terminalreporter.write_sep("-", "fault injection")
        terminalreporter.write_line(f"faults tried: {sum(_fault_tally.values())}: {counts}")
        if _kills:
            terminalreporter.write_line("kill -9 trials: " + "; ".join(_kills))


# ------------------------------------------------------------------------------------------------ the real model
# Shared by test_steer and test_attribute: SmolLM2 and a TopK SAE trained here in seconds on its layer-15 residual
# stream (the demo's hook), so interventions are checked on real directions of a real model.

REAL_HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M on the CPU, parameters frozen."""
    from sae.data.model import load_model

    model, tokenizer = load_model("smollm2", "cpu")
    return model.requires_grad_(False), tokenizer


@pytest.fixture(scope="session")
def smollm2_sae(smollm2, text_dir, tmp_path_factory):
    """A TopK SAE (k 32, 4x) trained on 6k tokens of stdlib source at SmolLM2's layer 15, through harvest and train."""
    from sae.data.harvest import HarvestConfig, harvest_with
    from sae.saes import SAE
    from sae.training.train import SAESpec, TrainConfig, train

    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("smollm2_sae")
    cache = harvest_with(HarvestConfig(hooks=[REAL_HOOK], dataset=str(text_dir), context_size=64, max_tokens=6144,
                                       dtype="float32", out=str(out / "cache")), model, tokenizer)
    (folder,) = train(TrainConfig(cache=str(cache), out=str(out / "saes"), total_tokens=4 * 6144, device="cpu",
                                  wandb_mode="disabled", saes=[SAESpec("topk", REAL_HOOK, expansion_factor=4, k=32)]))
    return SAE.load(folder).eval().requires_grad_(False)
