"""Tiny random models with a real (small, trained-here) tokenizer, saved as Hugging Face folders.

Building one takes about a second, so the tests and `scripts/gpu_check.sh --cpu` exercise the real loading path
(`load_model(folder)`) instead of a mock, and without the minutes SmolLM2 costs on a CPU.

    python -m sae.tiny FOLDER [--layers 16]   # a tiny Llama; 16 layers make every hook of configs/demo.yaml exist
"""

from __future__ import annotations

import argparse
import functools
import sysconfig
from pathlib import Path

import torch


def tokenizer(vocab_size: int = 512):
    """A byte-level BPE trained on a slice of the standard library (the text the demo harvests)."""
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


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int):
    """`tokenizer(vocab_size)`, trained once per process (about 3 s each time): `save` only writes it out."""
    return tokenizer(vocab_size)


def save(folder: str | Path, config) -> Path:
    """A randomly initialised (seed 0) model of `config` and a matching tokenizer, saved in `folder`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    _trained(text.vocab_size).save_pretrained(folder)
    return folder


def llama(folder: str | Path, layers: int = 3, hidden: int = 32) -> Path:
    """A tiny Llama (the family of SmolLM2) in `folder`."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return save(folder, cfg)


def main() -> None:
    p = argparse.ArgumentParser(description="Save a tiny random Llama with a small trained tokenizer.")
    p.add_argument("folder")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=32)
    args = p.parse_args()
    print(llama(args.folder, args.layers, args.hidden))


if __name__ == "__main__":
    main()
