"""Stage 1, data: load a model and name its hook points (``model``), read and pack text (``text``), run the model to
cache activations (``harvest``) in safetensors shards (``store``), and feed training from a cache or a live model
(``source``). Imports only ``sae.config``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    """The old module ``sae.data`` (now ``sae.data.text``): its names still resolve here for one release."""
    import importlib
    import warnings

    text = importlib.import_module("sae.data.text")
    if name.startswith("__") or not hasattr(text, name):
        raise AttributeError(f"module 'sae.data' has no attribute {name!r}")
    warnings.warn(f"sae.data.{name} has moved to sae.data.text.{name}; import it from there (the old path goes in the "
                  "next release)", DeprecationWarning, stacklevel=2)
    value = globals()[name] = getattr(text, name)  # warned once: `from sae.data import x` looks it up twice
    return value
