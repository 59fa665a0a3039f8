"""The package's shape: imports run one way between the stage packages, `import sae` is the public API, and the
import paths of release 0.1 still work (with a DeprecationWarning) for one release."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import sae

PACKAGE = Path(__file__).resolve().parent.parent / "sae"


def import_graph(package: Path) -> dict[str, set[str]]:
    """module → the package's modules it imports anywhere in its source (function-level imports included)."""
    modules = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                found |= {module, *(f"{module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_import_cycles():
    """No module imports one that imports it back, even lazily (analyse ↔ dashboard.export once did)."""
    graph = import_graph(PACKAGE)
    assert graph["sae.analysis.dashboard.export"] >= {"sae.analysis.analyse"} and "sae.analysis.dashboard.build" in graph

    done: set[str] = set()

    def cycle_from(path: list[str]) -> list[str] | None:
        """A cycle reachable from path[-1] (depth first; modules fully explored are skipped)."""
        for nxt in sorted(graph[path[-1]] - done):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            found = cycle_from(path + [nxt])
            if found:
                return found
        done.add(path[-1])
        return None

    cycles = [c for c in (cycle_from([m]) for m in sorted(graph)) if c]
    assert not cycles, " → ".join(cycles[0])


STAGES = {"sae.config": 0, "sae.data": 1, "sae.saes": 2, "sae.training": 3, "sae.analysis": 3}
"""How low each package sits (docs/architecture.md): a module imports only from its own level or below, and the two
packages of level 3 never import each other. Everything else (cli, planted, tiny, the API) sits on top."""


def stage_of(module: str) -> str:
    return next((p for p in STAGES if module == p or module.startswith(p + ".")), "sae")


def test_imports_point_down():
    graph = import_graph(PACKAGE)
    level = lambda m: STAGES.get(stage_of(m), len(STAGES))  # noqa: E731
    upward = [f"{a} → {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
              if level(b) > level(a) or (level(a) == level(b) and stage_of(a) != stage_of(b))]
    assert not upward, upward
    # the stages really do depend on each other in that order (the table above is not vacuous)
    edges = {(stage_of(a), stage_of(b)) for a, deps in graph.items() for b in deps}
    assert {("sae.data", "sae.config"), ("sae.saes", "sae.data"), ("sae.training", "sae.saes"),
            ("sae.analysis", "sae.saes"), ("sae", "sae.training"), ("sae", "sae.analysis")} <= edges


def test_one_module_per_variant():
    """Adding a variant is one module and one registry line: each class lives in a module of its own under sae.saes
    (Matryoshka beside the BatchTopK it extends)."""
    from sae.saes import SAE_CLASSES

    modules = {name: cls.__module__ for name, cls in SAE_CLASSES.items()}
    assert modules == {"relu_l1": "sae.saes.relu_l1", "topk": "sae.saes.topk", "batchtopk": "sae.saes.batchtopk",
                       "matryoshka_batchtopk": "sae.saes.batchtopk", "jumprelu": "sae.saes.jumprelu"}


def test_public_api_is_importable_and_documented():
    for name in sae.__all__:
        obj = getattr(sae, name)
        doc = inspect.getdoc(obj) or ""
        assert doc and not doc.startswith(f"{name}("), f"sae.{name} has no docstring of its own"
    assert {"SAE", "harvest", "train", "evaluate", "analyse", "steer", "attribute", "load_model", "ActivationStore",
            "HarvestConfig", "TrainConfig", "EvalConfig", "AnalyseConfig"} <= set(sae.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sae.nope  # noqa: B018


def test_import_sae_is_cheap():
    """`import sae` (and so `sae --help`'s first step) loads no stage: neither torch nor transformers."""
    done = subprocess.run([sys.executable, "-c", "import sys, sae; print(sorted({'torch', 'transformers'} & set(sys.modules)))"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


OLD_PATHS = """
import importlib, json, sys, warnings
warnings.simplefilter("error")  # anything but the expected DeprecationWarning fails
import sae
from sae.compat import MOVED

cache, out = sys.argv[1], sys.argv[2]
for old, new in MOVED.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(old)
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        f"{old} has moved to {new}; import it from there (the old path goes in the next release)"], (old, caught)
    target = importlib.import_module(new)
    public = [n for n in dir(target) if not n.startswith("_")]
    assert public and all(getattr(mod, n) is getattr(target, n) for n in public), old

# the names that are both an old module and a function of the API: callable after the old module was imported
from sae.train import TrainConfig, SAESpec
from sae.sae import SAE
assert isinstance(sae.train, type(sys)), "importing sae.train rebinds the package attribute"
paths = sae.train(TrainConfig(cache=cache, out=out, saes=[SAESpec("topk", "h0", d_sae=32, k=4)], batch_size=128,
                              total_tokens=256, wandb_mode="disabled"))
assert SAE.load(paths[0]).cfg.k == 4
assert sae.train.train is sae.training.train.train and sae.sae.SAE is sae.SAE
for name in ("harvest", "evaluate", "analyse", "explain", "steer", "attribute"):
    assert getattr(sae, name).__wrapped__ is sae.__getattr__(name), name
import inspect
assert "cfg" in inspect.signature(sae.train).parameters

# names of the old sae.sae that moved to the package's modules, and patching through an old path
from sae.sae import DEAD_FRACTION_LIMIT, SAELENS_FORMAT_VERSION, TRANSCODER_LAYOUTS, auxk_loss, sparse_decode
assert auxk_loss is sae.saes.base.auxk_loss and SAELENS_FORMAT_VERSION == sae.saes.formats.SAELENS_FORMAT_VERSION
import sae.store
sae.store.atomic_write_json = "patched"
assert sae.data.store.atomic_write_json == "patched"
try:
    sae.sae()
except TypeError as err:
    assert str(err) == "module sae.sae is not callable"
else:
    raise AssertionError("sae.sae() did not raise")

with warnings.catch_warnings(record=True) as caught:  # the old text module is the new data package
    warnings.simplefilter("always")
    from sae.data import load_texts
assert load_texts is sae.data.text.load_texts
assert ["sae.data.load_texts" in str(w.message) for w in caught] == [True]
print("ok")
"""


def test_old_import_paths_still_work(tmp_path):
    """Every 0.1 module path gives its new module's names with a DeprecationWarning naming the new path, and
    `sae.train(...)` still trains after `from sae.train import TrainConfig` (in a fresh interpreter: importing an old
    path rebinds `sae.<name>` for the rest of the process)."""
    from test_train import make_cache, planted

    data, _ = planted(1024, d=16, n_true=32)
    cache = make_cache(tmp_path / "cache", {"h0": data})
    done = subprocess.run([sys.executable, "-c", OLD_PATHS, str(cache), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
