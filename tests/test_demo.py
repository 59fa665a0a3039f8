"""The whole path on the real embedded SmolLM2: `sae demo` (shortened), then the notebook against its outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sae.cli import main as cli_main

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explore.ipynb"


@pytest.mark.slow
def test_demo_end_to_end_then_notebook(tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [
        f"harvest.out={out}/cache", "harvest.max_tokens=24000",
        f"train.out={out}/saes", "train.total_tokens=60000",
        f"eval.out={out}/eval", "eval.lm_loss_contexts=4",
        f"analyse.out={out}/analysis",
    ]
    assert cli_main(["demo", *overrides]) == 0
    printed = capsys.readouterr().out
    assert "demo finished" in printed and "feature browser:" in printed and "CE rec" in printed

    results = json.loads((out / "eval" / "eval.json").read_text())
    saes = results["saes"]
    assert len(saes) == 2
    for r in saes:
        # Even this short run must beat the linear baseline with as many dimensions as it has active latents.
        assert r["beats_pca_at_l0"], (r["name"], r["fvu"], r["pca_fvu_at_l0"])
        assert r["failures"] == [], (r["name"], r["failures"])  # neither silent nor mostly dead
        assert 0 < r["l0"] < 200 and 0 < r["fvu"] < 0.6
        assert r["ce_recovered"] > 0.5, (r["name"], r["ce_recovered"])
    index = Path(printed.split("feature browser:")[-1].split()[0])
    assert index.is_file() and index.name == "index.html"

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    sae_dir = next(p for p in (out / "saes").iterdir() if (p / "cfg.json").exists())
    env = {"SAE_DIR": str(sae_dir), "SAE_CACHE": str(out / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "feature" in outputs.lower()


def test_a_wheel_ships_the_demo_config_and_the_browser(tmp_path):
    """`sae demo` and the browser read files beside the modules: a wheel (not only the editable install) holds them."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"  # a copy: building writes build/ beside the sources
    shutil.copytree(root, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "wandb", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True, timeout=300)
    names = zipfile.ZipFile(next(tmp_path.glob("sae-*.whl"))).namelist()
    from sae.cli import DEMO_CONFIG

    assert DEMO_CONFIG.is_relative_to(root / "sae") and DEMO_CONFIG.is_file()
    for shipped in ["sae/configs/demo.yaml", "sae/analysis/dashboard/index.html", "sae/analysis/dashboard/app.js",
                    "sae/data/store.py", "sae/saes/topk.py", "sae/training/train.py", "sae/analysis/dashboard/build.py"]:
        assert shipped in names, shipped
