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

from sae.data.model import ModelError, hidden_size, hooks, resolve_hook

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


def splice_fn(sae: nn.Module, edit: FeatureEdit | None = None,
              keep_error: bool = True) -> Callable[[Tensor, Tensor], Tensor]:
    """(x, y) → what the model sees at y's place with the SAE there: x is the activation the SAE reads, y the one it
    replaces — the same activation for an SAE; a transcoder's input and output hooks for a transcoder.

    keep_error=False: the SAE's output decode(edit(f), x) with f = encode(x). keep_error=True: y + decode(edit(f), x)
    − decode(f, x), i.e. the edited output plus the SAE's error y − decode(f, x). With no edit, or an edit that returns
    f unchanged, that is y itself, bit for bit (the two decodes are the same computation).
    """

    def fn(a: Tensor, y: Tensor) -> Tensor:
        x = a.to(sae.W_dec.dtype)
        f = sae.encode(x)
        if not keep_error:
            return sae.decode(edit(f) if edit else f, x)
        return y.to(x.dtype) + (sae.decode(edit(f), x) - sae.decode(f, x)) if edit else y

    return fn


def check_fits(model: nn.Module, sae: nn.Module) -> None:
    """The SAE's hooks must exist in the model (else the hook map's error lists the valid names) and carry its
    widths (the text model's: a multimodal wrapper such as Gemma 3's has no hidden_size of its own)."""
    width = hidden_size(model)
    ends = [("reads", sae.cfg.hook_name, sae.cfg.d_in)]
    if sae.cfg.is_transcoder:
        ends.append(("writes", sae.cfg.hook_name_out, sae.cfg.d_out))
    for verb, hook, d in ends:
        resolve_hook(model, hook)
        if d != width:
            raise ModelError(f"the SAE {verb} {d}-wide activations at {hook} but this model's are {width} wide; use "
                             f"the model the SAE was trained on ({sae.cfg.model_name or 'not recorded'})")


@contextmanager
def spliced(model: nn.Module, sae: nn.Module, edit: FeatureEdit | None = None, *, keep_error: bool = True,
            first: int = 0) -> Iterator[None]:
    """While open, the model runs with `sae` spliced in at `sae.cfg.hook_name` (see `splice_fn`), positions before
    `first` left untouched. Positions count across forward calls (see `keep_first`): one `with` per sequence.

    A transcoder (Dunefsky et al. 2024) reads its input hook and writes at its output hook, later in the same forward
    pass (e.g. in place of the MLP's output): its input is kept as it passes and used when the output comes."""
    check_fits(model, sae)
    fn = splice_fn(sae, edit, keep_error)
    if not sae.cfg.is_transcoder:
        fns = {sae.cfg.hook_name: keep_first(first, lambda a: fn(a, a))}
    else:
        seen: dict[str, Tensor] = {}

        def read(a: Tensor) -> None:  # returns None: observes only
            seen["x"] = a

        fns = {sae.cfg.hook_name: read, sae.cfg.hook_name_out: keep_first(first, lambda y: fn(seen.pop("x"), y))}
    with hooks(model, fns):
        yield
