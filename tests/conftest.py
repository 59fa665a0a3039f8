"""Shared fixtures: tiny random models with a real (small, trained-here) tokenizer, saved as HF folders.

Building them takes about a second, so most tests exercise the real loading path (`load_model(folder)`)
instead of a mock.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch

# Keep conversions of the embedded model in one place per test session (reused between runs on one machine).
os.environ.setdefault("SAE_CACHE_DIR", str(Path.home() / ".cache" / "sae"))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40]]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _save(folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    _tokenizer(config.vocab_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return _save(tmp_path_factory.mktemp("tiny_llama"), cfg)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return _save(tmp_path_factory.mktemp("tiny_gpt2"), cfg)


@pytest.fixture(scope="session")
def tiny_neox(tmp_path_factory) -> Path:
    from transformers import GPTNeoXConfig

    cfg = GPTNeoXConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=256)
    return _save(tmp_path_factory.mktemp("tiny_neox"), cfg)


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of real text files (a slice of the standard library) as a local dataset."""
    folder = tmp_path_factory.mktemp("texts")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(stdlib.glob("*.py"))[40:70]:
        (folder / (p.stem + ".txt")).write_text(p.read_text(errors="replace"))
    return folder
