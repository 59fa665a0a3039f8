"""The static feature browser: its data format (written by `sae.analysis.dashboard.export` from `sae.analysis.analyse`'s statistics;
`sae.analysis.dashboard.build` runs the stage) and the pages that show it.

The site is opened straight from disk (file://), where browsers refuse fetch() of local JSON, so the data is stored
as `.js` files that assign one global each (`window.NAME = <JSON>;`) and the pages load them with <script> tags.
`sae analyse` writes those files directly and they are the only copy of the analysis: Python reads them back with
`read_js` (the notebook, the tests), the browser runs them. An analysis folder holds::

    data/index.js        SAE_INDEX: metadata, one summary row per live feature, dead ids (written last: marks completion)
    data/tokens.js       SAE_TOKENS: {token id: text}, each id decoded once, for every id the other files mention
    data/contexts.js     SAE_CONTEXTS: {context index: [token ids]}, the contexts any example comes from
    data/features/<c>.js SAE_CHUNK: {feature id: details} for the live ids j with j // FEATURES_PER_FILE == c
    data/explanations.js SAE_EXPLANATIONS: optional, written by `sae explain` (see sae.analysis.explain for its format)
    data/written-by-sae  a marker: this data/ folder is the toolkit's, so a new analysis may replace what is in it

Examples are `[seq, pos, act, window]` (samples insert an interval index before `window`): the feature's activation
at context `seq`, position `pos`, and its activations at the cached positions max(first_pos, pos - left) ..
min(context_size, pos + right + 1) - 1 in thousandths of the feature's maximum (so a window costs a few bytes per
token; the exact activation of the example itself is `act`). `write_dashboard` copies the HTML, JavaScript and CSS
next to this module into the analysis folder, or into each of several, with an index page linking them.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from sae.config import UserError
from sae.data.store import atomic_write_bytes, to_json

STATIC = ("index.html", "feature.html", "app.js", "style.css")
#: Features per data file: one file per feature would be ~10k small files; one file would make every page load all.
FEATURES_PER_FILE = 64
#: Window activations are stored as integers in units of max_act / WINDOW_SCALE.
WINDOW_SCALE = 1000


MARKER = "written-by-sae"
"""In an analysis's data/ folder: the folder was made by `sae analyse`. Only such a folder's files are ever removed."""
DATA_FILES = ("index.js", "tokens.js", "contexts.js", "explanations.js", MARKER)
"""The files `sae analyse` and `sae explain` write in data/, besides features/<c>.js."""


def claim_data(*folders: Path) -> None:
    """Make each `folder/data` ready for a new analysis: the files an earlier `sae analyse` (or `sae explain`) wrote
    there are removed, and nothing else. A data/ folder, or a page of the browser (index.html, ...), that the toolkit
    did not write is refused before anything changes in any of the folders: `sae analyse out=.` in a project with a
    data/ folder must not delete it."""
    for folder in folders:
        data = folder / "data"
        theirs = [p.name for p in [data] if p.exists() and not ((data / MARKER).is_file() or _legacy_analysis(data))]
        theirs += [name for name in STATIC if (folder / name).exists() and not _is_page(folder / name)]
        if theirs:
            raise UserError(f"{folder} already holds {', '.join(theirs)} that `sae analyse` did not write; analyse "
                            "into a new or empty folder (out=...), nothing was changed")
    for folder in folders:
        data = folder / "data"
        for path in [*(data / name for name in DATA_FILES), *(data / "features").glob("*.js")]:
            path.unlink(missing_ok=True)
        for empty in (data / "features", data):
            if empty.is_dir() and not any(empty.iterdir()):
                empty.rmdir()


def mark_data(data: Path) -> None:
    """Create `data` as the toolkit's (``MARKER`` first, so even a half-written analysis is removable)."""
    (data / "features").mkdir(parents=True, exist_ok=True)
    (data / MARKER).write_text("written by `sae analyse`; a new analysis into this folder replaces these files\n")


def _is_page(path: Path) -> bool:
    """A page of the browser that `sae analyse` copied or wrote (each names it near its top)."""
    try:
        with open(path, "rb") as f:
            return b"sae analyse" in f.read(400)
    except OSError:
        return False


def _legacy_analysis(data: Path) -> bool:
    """A data/ folder of an analysis from before the marker: its index.js is one of ours."""
    try:
        with open(data / "index.js", "rb") as f:
            return f.read(18) == b"window.SAE_INDEX ="
    except OSError:
        return False


def write_js(path: Path, variable: str, data: Any) -> None:
    """Write `window.<variable> = <data as JSON>;` atomically (a reader sees the old file or the new, never half)."""
    text = to_json(data, path, separators=(",", ":"), ensure_ascii=False)
    atomic_write_bytes(path, f"window.{variable} = {text};\n".encode("utf-8"))


def read_js(path: str | Path) -> Any:
    """The data of a file written by `write_js`."""
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text[text.index("=") + 1 :].rstrip().rstrip(";"))


def is_analysis(folder: Path) -> bool:
    """A finished analysis: `data/index.js` is written last."""
    return (folder / "data" / "index.js").is_file()


def write_dashboard(analysis: str | Path) -> Path:
    """Make `analysis` (one analysis folder, or a folder of them) browsable; returns the index.html to open.

    For several analyses each gets its pages and the parent gets an index.html linking them.
    """
    analysis = Path(analysis)
    if is_analysis(analysis):
        for name in STATIC:
            shutil.copyfile(Path(__file__).with_name(name), analysis / name)
        return analysis / "index.html"
    children = sorted(p for p in analysis.iterdir() if is_analysis(p)) if analysis.is_dir() else []
    if not children:
        raise FileNotFoundError(f"{analysis} holds no analysis (data/index.js): run `sae analyse` first")
    rows = []
    for child in children:
        write_dashboard(child)
        meta = read_js(child / "data" / "index.js")
        rows.append(
            f'<tr><td><a href="{html.escape(child.name)}/index.html">{html.escape(child.name)}</a></td>'
            f'<td class="num">{meta["d_sae"]}</td><td class="num">{len(meta["features"])}</td>'
            f'<td class="num">{len(meta["dead"])}</td><td>{html.escape(meta["hook"])}</td></tr>'
        )
    shutil.copyfile(Path(__file__).with_name("style.css"), analysis / "style.css")
    page = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<meta name="generator" content="sae analyse">\n'
        '<title>SAE analyses</title>\n'
        '<link rel="stylesheet" href="style.css">\n</head>\n<body>\n<header><h1>SAE analyses</h1></header>\n<main>\n'
        '<table id="saes"><thead><tr><th>SAE</th><th class="num">features</th><th class="num">live</th>'
        '<th class="num">dead</th><th>hook</th></tr></thead>\n<tbody>\n' + "\n".join(rows) + "\n</tbody></table>\n"
        "</main>\n</body>\n</html>\n"
    )
    (analysis / "index.html").write_text(page, encoding="utf-8")
    return analysis / "index.html"
