"""notebooks/explore.ipynb executes top to bottom against a tiny harvested cache and SAE, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore.ipynb"


def test_explore_notebook_runs(tiny_cache, tiny_llama, hand_sae, tmp_path, monkeypatch):
    cache = tiny_cache
    torch.manual_seed(0)
    sae_dir = hand_sae(torch.randn(32, 48), torch.randn(48, 32) * 0.1, model=str(tiny_llama)).save(tmp_path / "sae")
    monkeypatch.setenv("SAE_CACHE", str(cache))
    monkeypatch.setenv("SAE_DIR", str(sae_dir))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns plt.show() into a PNG

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    text = "\n".join(
        out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )
    assert "relu_l1 SAE, 32 -> 48 at blocks.1.hook_resid_post" in text
    for heading in ("highest maximum activation", "densest", "rarest that ever fire"):
        assert f"== {heading}" in text
    assert "[[" in text and "fires most on" in text  # contexts shown, and the typed sentence was looked up
    assert "| steered (add #" in text and "activation × gradient at blocks.1.hook_resid_post" in text
    assert any(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))  # the density plot rendered
