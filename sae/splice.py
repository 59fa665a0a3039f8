"""Splice an SAE into a model's forward pass at its hook, optionally editing its features on the way.

One mechanism for every stage that runs the model with an SAE inside it. `sae eval` replaces the activation by the
SAE's reconstruction (how much of the model's loss the SAE keeps). `sae steer` and `sae attribute` edit the features
and add back the SAE's own error x − x̂, so that with no edit the model computes what it computes without the SAE and
every change comes from the edit alone (Marks et al. 2024, "Sparse Feature Circuits", §2: the error is kept as a
node of its own).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from sae.model import ModelError, hooks, resolve_hook

FeatureEdit = Callable[[Tensor], Tensor]
"""Dense features [..., d_sae] → the features to decode instead (a new tensor; the input is left as it is)."""


def check_first(first: int) -> None:
    """A negative count of leading positions would splice every position yet slice from the end downstream."""
    if first < 0:
        raise ModelError(f"exclude_first={first} must be ≥ 0 (leading positions left as they are; 0: none)")


def keep_first(first: int, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A hook that replaces positions >= `first` with fn(activation) and leaves the leading ones untouched.

    Positions are counted across the calls the hook receives, so in a generation loop that feeds the prompt and then
    one token at a time, the later one-token calls are positions `len(prompt)`, ... and are replaced; use a fresh
    hook for each sequence.
    """
    check_first(first)
    seen = 0

    def hook(a: Tensor) -> Tensor:
        nonlocal seen
        start, seen = seen, seen + a.shape[1]
        new = fn(a).to(a.dtype)
        kept = min(max(first - start, 0), a.shape[1])
        if kept:
            new = torch.cat([a[:, :kept], new[:, kept:]], dim=1)
        return new

    return hook


def splice_fn(sae: nn.Module, edit: FeatureEdit | None = None, keep_error: bool = True) -> Callable[[Tensor], Tensor]:
    """x → what the model sees with the SAE at x's place.

    keep_error=False: the reconstruction decode(edit(encode(x))). keep_error=True: x + decode(edit(f)) − decode(f)
    with f = encode(x), i.e. the edited reconstruction plus the SAE's error x − decode(f). With no edit, or an edit
    that returns f unchanged, that is x itself, bit for bit (the two decodes are the same computation).
    """

    def fn(a: Tensor) -> Tensor:
        x = a.to(sae.W_dec.dtype)
        f = sae.encode(x)
        if not keep_error:
            return sae.decode(edit(f) if edit else f)
        return x + (sae.decode(edit(f)) - sae.decode(f)) if edit else x

    return fn


def check_fits(model: nn.Module, sae: nn.Module) -> None:
    """The SAE's hook must exist in the model (else the hook map's error lists the valid names) and carry d_in."""
    resolve_hook(model, sae.cfg.hook_name)
    width = model.config.hidden_size
    if sae.cfg.d_in != width:
        raise ModelError(f"the SAE reads {sae.cfg.d_in}-wide activations at {sae.cfg.hook_name} but this model's are "
                         f"{width} wide; use the model the SAE was trained on ({sae.cfg.model_name or 'not recorded'})")


@contextmanager
def spliced(model: nn.Module, sae: nn.Module, edit: FeatureEdit | None = None, *, keep_error: bool = True,
            first: int = 0) -> Iterator[None]:
    """While open, the model runs with `sae` spliced in at `sae.cfg.hook_name` (see `splice_fn`), positions before
    `first` left untouched. Positions count across forward calls (see `keep_first`): one `with` per sequence."""
    check_fits(model, sae)
    with hooks(model, {sae.cfg.hook_name: keep_first(first, splice_fn(sae, edit, keep_error))}):
        yield
