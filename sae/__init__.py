"""Sparse autoencoders for mechanistic interpretability: harvest → train → analyse.

The public API, for notebooks and scripts (each name loads its stage on first use, so ``import sae`` stays cheap)::

    import sae
    cache = sae.harvest(sae.HarvestConfig(model="smollm2", hooks=["blocks.15.hook_resid_post"], out="runs/x/cache"))
    saes = sae.train(sae.TrainConfig(cache=str(cache), saes=[sae.SAESpec(architecture="topk", k=32)], out="runs/x/saes"))
    print(sae.evaluate(sae.EvalConfig(cache=str(cache), saes=[str(saes[0])])))
    model = sae.SAE.load(saes[0])

The stage packages beneath it: ``sae.data`` (models, text, harvest, the cache), ``sae.saes`` (the SAE variants and
their formats), ``sae.training`` and ``sae.analysis``; ``docs/architecture.md`` draws how they depend on each other.
"""

from __future__ import annotations

import importlib
from typing import Any

from sae import compat

__version__ = "0.1.0"

_API = {
    "SAE": "sae.saes.base",
    "SAEConfig": "sae.saes.base",
    "find_saes": "sae.saes.pretrained",
    "load_model": "sae.data.model",
    "capture": "sae.data.model",
    "ActivationStore": "sae.data.store",
    "HarvestConfig": "sae.data.harvest",
    "harvest": "sae.data.harvest",
    "TrainConfig": "sae.training.train",
    "SAESpec": "sae.training.train",
    "train": "sae.training.train",
    "EvalConfig": "sae.analysis.evaluate",
    "evaluate": "sae.analysis.evaluate",
    "AnalyseConfig": "sae.analysis.analyse",
    "stream_features": "sae.analysis.analyse",
    "analyse": "sae.analysis.dashboard.build:run",
    "ExplainConfig": "sae.analysis.explain",
    "explain": "sae.analysis.explain",
    "steer": "sae.analysis.steer",
    "attribute": "sae.analysis.attribute:report",
}
"""Public name → the module that defines it (``module:name`` where the name there differs)."""

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'sae' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


compat.install(__getattr__, __all__)
