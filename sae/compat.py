"""The import paths of release 0.1, before the stage packages, kept working for one release.

``import sae.train`` (or ``from sae.store import ActivationStore``) gives a stand-in for the module's new home with a
DeprecationWarning naming it. Where an old module path is also a function of the public API (``sae.train``,
``sae.harvest``, ``sae.evaluate``, ``sae.analyse``, ``sae.explain``, ``sae.steer``, ``sae.attribute``), importing it
rebinds the package attribute to the stand-in, so the stand-in is callable as that function: ``sae.train(cfg)`` works
before and after ``from sae.train import TrainConfig``. The old ``sae.data`` (text loading) is the new package
``sae.data`` itself, which forwards those names likewise.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
import types
import warnings
from collections.abc import Callable, Collection
from typing import Any

MOVED = {
    "sae.sae": "sae.saes",
    "sae.pretrained": "sae.saes.pretrained",
    "sae.model": "sae.data.model",
    "sae.harvest": "sae.data.harvest",
    "sae.store": "sae.data.store",
    "sae.source": "sae.data.source",
    "sae.train": "sae.training.train",
    "sae.trainer": "sae.training.trainer",
    "sae.distributed": "sae.training.distributed",
    "sae.sharded": "sae.training.sharded",
    "sae.plan": "sae.training.plan",
    "sae.evaluate": "sae.analysis.evaluate",
    "sae.analyse": "sae.analysis.analyse",
    "sae.explain": "sae.analysis.explain",
    "sae.steer": "sae.analysis.steer",
    "sae.attribute": "sae.analysis.attribute",
    "sae.splice": "sae.analysis.splice",
    "sae.dashboard": "sae.analysis.dashboard",
    "sae.dashboard.build": "sae.analysis.dashboard.build",
    "sae.dashboard.export": "sae.analysis.dashboard.export",
}
"""Old module path → new one."""


def warn_moved(old: str, new: str) -> None:
    warnings.warn(f"{old} has moved to {new}; import it from there (the old path goes in the next release)",
                  DeprecationWarning, stacklevel=3)


class MovedModule(types.ModuleType):
    """An old module path: attributes come from the new module (and, where that is a package, from its modules: the
    names of the old ``sae.sae`` now live in ``sae.saes.base``, ``.formats``, ...), writes go to it too (so patching
    an old path patches the code that runs), and a call goes to ``sae.<name>`` of the API where there is one."""

    __target__: types.ModuleType

    def __getattr__(self, name: str) -> Any:
        target = self.__dict__.get("__target__")  # unset while the import machinery sets the module up
        if target is None or (name.startswith("__") and name not in ("__path__", "__file__")):
            raise AttributeError(name)  # __path__ passes: `import sae.dashboard.build` looks in the new package
        if hasattr(target, name):
            return getattr(target, name)
        for info in pkgutil.iter_modules(getattr(target, "__path__", [])):
            module = importlib.import_module(f"{target.__name__}.{info.name}")
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(f"module {self.__name__!r} (now {target.__name__!r}) has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__"):
            super().__setattr__(name, value)
        else:
            setattr(self.__target__, name, value)

    def __delattr__(self, name: str) -> None:
        if name.startswith("__"):
            super().__delattr__(name)
        else:
            delattr(self.__target__, name)

    def __dir__(self) -> list[str]:
        return dir(self.__target__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = self.__dict__.get("__wrapped__")
        if function is None:
            raise TypeError(f"module {self.__name__} is not callable")
        return function(*args, **kwargs)


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old paths of ``MOVED`` (no file is left at any of them); `api` gives the public API's functions by
    name (``sae.__getattr__``), for the old paths that share a name with one."""

    def __init__(self, api: Callable[[str], Any], public: Collection[str]) -> None:
        self.api, self.public = api, public

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return MovedModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        new = MOVED[module.__name__]
        warn_moved(module.__name__, new)
        module.__target__ = importlib.import_module(new)
        short = module.__name__.removeprefix("sae.")
        if short in self.public:  # callable as that function (and inspect.signature reads its signature)
            module.__wrapped__ = self.api(short)
        module.__doc__ = f"Moved to {new}."


def install(api: Callable[[str], Any], public: Collection[str]) -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder(api, public))
