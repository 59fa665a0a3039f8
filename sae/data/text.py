"""Text sources → packed fixed-length token contexts, in a deterministic order.

The order matters: a harvest that restarts re-reads the same stream and skips the contexts already on disk, so
every source here must yield the same documents in the same order on every run.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from sae.config import UserError

STDLIB = "stdlib"

#: File suffix → `datasets` builder for local files.
_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(UserError):
    """A dataset spec that yields no usable text; the message says what to pass instead."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set (as huggingface_hub reads it): fail at once on a hub id instead of waiting on the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_dataset(dataset: str, split: str):
    """Stream a hub dataset, or one line saying why the hub cannot serve it."""
    import datasets

    if hub_offline():
        raise DataError(f"dataset {dataset!r} is a hub id but HF_HUB_OFFLINE is set; pass a local file or folder, "
                        "or unset HF_HUB_OFFLINE")
    try:
        return datasets.load_dataset(dataset, split=split, streaming=True)
    except (ConnectionError, TimeoutError) as err:
        raise DataError(f"cannot reach the Hugging Face hub for dataset {dataset!r} ({type(err).__name__}); "
                        "check the network or pass a local file or folder") from None


#: Suffixes that mark a dataset name as a file, not a hub id (the ones read, and a few common ones that are not).
_FILE_SUFFIXES = {*_BUILDERS, ".tsv", ".md", ".gz", ".zst", ".arrow", ".xml", ".html"}


def looks_local(dataset: str) -> bool:
    """A dataset name meant as a local path: an explicit one (./, ../, /, ~), one with a file suffix (.txt, .jsonl,
    ...), one with more than one slash (a hub id is owner/name) or one under a folder that exists here. A missing one
    is "no such file" at once, where a hub id would be looked up on the network."""
    return (dataset.startswith((".", "/", "~")) or Path(dataset).suffix.lower() in _FILE_SUFFIXES
            or dataset.count("/") > 1 or ("/" in dataset and Path(dataset.split("/")[0]).expanduser().is_dir()))


@functools.cache
def stdlib_files() -> tuple[Path, ...]:
    """The Python standard library's own source: real text that ships with every Python, sorted for determinism.
    Listed once per process: the walk takes ~0.7 s, on the tokenising worker beside each harvest's forward."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts))


#: What a text file should not hold much of: characters that undecodable bytes became, and control characters other
#: than tab, newline, vertical tab, form feed and carriage return.
_NOT_TEXT = re.compile("[\ufffd\x00-\x08\x0e-\x1f\x7f]")
NOT_TEXT_LIMIT = 1 / 3
"""A file with more than this share of such characters is refused as not text (random bytes give ~0.55, a Latin-1
text full of accents ~0.2)."""


def read_text_file(file: str | Path) -> str:
    """A file of a text dataset, decoded as UTF-8 with undecodable bytes as U+FFFD (one rule for a single file and
    for a folder's files). A file that is mostly not text (binary: an image, an archive, a .pyc) is refused naming
    it; one with a few undecodable bytes is read, with a warning on stderr."""
    text = Path(file).read_text(encoding="utf-8", errors="replace")
    bad = len(_NOT_TEXT.findall(text))
    if text and bad / len(text) > NOT_TEXT_LIMIT:
        raise DataError(f"{file} is not text: {bad / len(text):.0%} of it is undecodable bytes or control characters "
                        "(a binary file?); remove it from the dataset, or convert it to UTF-8 text")
    if "\ufffd" in text:
        print(f"warning: {file} is not valid UTF-8: {text.count(chr(0xFFFD))} undecodable byte sequence(s) read as "
              "U+FFFD", file=sys.stderr)
    return text


def _read(files: list[str]) -> Iterator[dict[str, str]]:
    for file in files:
        yield {"text": read_text_file(file)}


def _documents(files: Iterable[Path]):
    """A folder of files read as one document per file. A generator-backed `datasets.IterableDataset` starts at
    once, where `load_dataset("text", data_files=...)` spends ~1.5 s resolving 1,800 files before the first one."""
    import datasets

    return datasets.IterableDataset.from_generator(_read, gen_kwargs={"files": [str(f) for f in files]})


def load_texts(dataset: str, split: str = "train", text_column: str = "text") -> Iterator[str]:
    """Documents from `dataset`: "stdlib", a local file or folder, or a Hugging Face hub id (streamed)."""
    import datasets

    path = Path(dataset).expanduser()
    if dataset == STDLIB:
        source, text_column = _documents(stdlib_files()), "text"
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"dataset folder {dataset!r} holds no files")
        kinds = {_BUILDERS.get(p.suffix) for p in files}
        if len(kinds) == 1 and None not in kinds and kinds != {"text"}:
            source = datasets.load_dataset(kinds.pop(), data_files=[str(f) for f in files], split="train", streaming=True)
        else:
            source, text_column = _documents(files), "text"
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"cannot read {dataset!r}: use one of {', '.join(_BUILDERS)} or a folder of text files")
        if builder == "text":  # one document, decoded as a folder's files are
            source, text_column = _documents([path]), "text"
        else:
            source = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
    elif looks_local(dataset):
        raise DataError(f"dataset path {dataset!r} does not exist: no such file or folder ({path.absolute()})")
    else:
        source = _hub_dataset(dataset, split)
    return _column(source, text_column, dataset)


def _column(source: Iterable[dict], column: str, dataset: str) -> Iterator[str]:
    try:
        for row in source:
            if column not in row:
                raise DataError(f"dataset {dataset!r} has no column {column!r}; its columns: {', '.join(row)}")
            text = row[column]
            if isinstance(text, str) and text:
                yield text
    except (ConnectionError, TimeoutError) as err:  # a streamed hub dataset fetches as it goes
        raise DataError(f"lost the connection while streaming dataset {dataset!r} ({type(err).__name__}); "
                        "run the same command again to continue where it stopped") from None


def bos_token(tokenizer) -> int | None:
    """The token each context starts with: BOS, or EOS for tokenizers without one (GPT-2's)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def pack(
    texts: Iterable[str],
    tokenizer,
    context_size: int,
    prepend_bos: bool = True,
    docs_per_call: int = 64,
) -> Iterator[list[int]]:
    """Tokenise documents, join them with EOS, and cut the stream into contexts of exactly `context_size` tokens.

    With `prepend_bos` each context starts with the BOS token followed by `context_size - 1` stream tokens, as
    SAELens does, so position 0 is always the same (outlier) token and can be dropped cleanly. The tail shorter
    than a context is dropped.

    Documents are tokenised in calls of 1, 2, 4, ... up to `docs_per_call` documents: the tokenizer's batched call is
    ~2x faster per token at 64 documents than at one (measured on the stdlib with SmolLM2's tokenizer, 2 cores), but a
    first call of 64 stdlib files is ~350k tokens, 20x what a 16k-token harvest uses, and `scripts/bench_harvest.py`
    measured that surplus, tokenised on a worker beside the forward, as most of the harvest's shortfall against a bare
    forward. Each document is tokenised alone either way, so the contexts do not depend on the grouping.
    """
    bos = bos_token(tokenizer)
    eos = tokenizer.eos_token_id
    if prepend_bos and bos is None:
        raise DataError("prepend_bos needs a tokenizer with a BOS or EOS token; set prepend_bos=false")
    body = context_size - 1 if prepend_bos else context_size
    buffer: list[int] = []
    batch: list[str] = []

    def drain():
        nonlocal buffer
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
        n_full = len(buffer) // body
        for i in range(n_full):
            chunk = buffer[i * body : (i + 1) * body]
            yield [bos, *chunk] if prepend_bos else chunk
        buffer = buffer[n_full * body :]

    per_call = 1
    for text in texts:
        batch.append(text)
        if len(batch) == per_call:
            yield from drain()
            batch, per_call = [], min(2 * per_call, docs_per_call)
    if batch:
        yield from drain()
