"""Write a static feature browser for an analysis folder (`sae.analyse` output).

The site is opened straight from disk (file://), where browsers refuse fetch() of local JSON; so every JSON file
is re-emitted as a small .js file that assigns a global, and the page loads the one it needs with a <script> tag.
The HTML, JavaScript and CSS next to this module are copied unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

STATIC = ("index.html", "feature.html", "app.js", "style.css")


def _as_script(json_file: Path, variable: str, target: Path) -> None:
    target.write_text(f"window.{variable} = {json_file.read_text()};\n", encoding="utf-8")


def write_dashboard(analysis: str | Path, out: str | Path | None = None) -> Path:
    """Build the browser for `analysis` in `out` (default `<analysis>/dashboard`); returns the index.html path."""
    analysis = Path(analysis)
    index = analysis / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} is missing: run `sae analyse` first (it writes index.json last)")
    out = Path(out) if out is not None else analysis / "dashboard"
    features = out / "data" / "features"
    features.mkdir(parents=True, exist_ok=True)
    for name in STATIC:
        shutil.copyfile(Path(__file__).with_name(name), out / name)
    live = [row["id"] for row in json.loads(index.read_text())["features"]]
    for j in live:
        _as_script(analysis / "features" / f"{j}.json", "SAE_FEATURE", features / f"{j}.js")
    _as_script(index, "SAE_INDEX", out / "data" / "index.js")  # last: its presence marks a complete site
    return out / "index.html"
