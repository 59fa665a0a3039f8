"""The static feature browser, rendered by real headless Chromium from file:// (its JavaScript must have run)."""

from __future__ import annotations

import json
import os
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sae.dashboard import write_dashboard

CHROMIUM = Path("/usr/bin/chromium")
NASTY = ["def", " <script>alert(1)</script>", " &amp;", ' "q\'', "\n", "\t", "  ", ""]


@pytest.fixture(scope="module")
def browser() -> Path:
    if not CHROMIUM.exists():
        reason = "headless Chromium is not installed: run scripts/ci_browser_deps.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


def run_chromium(browser: Path, profile: Path, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    done = subprocess.run([str(browser), *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def example(tokens: list[str], acts: list[float | None], at: int, seq: int) -> dict:
    return {"act": acts[at], "seq": seq, "pos": 10 + at, "at": at, "tokens": tokens, "acts": acts}


def feature(j: int, max_act: float, density: float, top_tokens: list[str], examples: list[dict]) -> dict:
    return {
        "id": j, "max_act": max_act, "mean_top_act": sum(e["act"] for e in examples) / len(examples),
        "density": density, "mean_act": max_act / 3, "top_tokens": top_tokens, "promoted": [f" promo{j}", "<b>"],
        "n_active": int(density * 5000), "top": examples,
        "samples": [{**examples[-1], "act": max_act / 5, "interval": "0%-25%"}],
        "histogram": {"log10_edges": [-1.0, -0.5, 0.0, 0.5, 1.0], "counts": [40, 12, 3, 1]},
        "suppressed": [[f" supp{j}", -1.5], ["&lt;", -0.9]],
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A synthetic analysis folder with awkward token text, and the browser built from it."""
    root = tmp_path_factory.mktemp("analysis")
    acts = [0.0, 5.0, 2.5, 0.5, None, 1.0, 0.0, 0.2]
    features = [
        feature(0, 5.0, 0.01, [" <script>alert(1)</script>"], [example(NASTY, acts, 1, 4), example(["a", "b"], [1.0, 0.1], 0, 9)]),
        feature(3, 9.0, 0.2, ["\n"], [example(["x", " = ", "9"], [0.0, 9.0, 3.0], 1, 1)]),
        feature(7, 1.0, 0.0005, [" rare"], [example([" rare", "!"], [1.0, None], 0, 2)]),
    ]
    for f in features:
        f["promoted"] = [[t, 2.0 - i] for i, t in enumerate(f["promoted"])]
    (root / "features").mkdir()
    for f in features:
        (root / "features" / f"{f['id']}.json").write_text(json.dumps(f))
    rows = [{k: f[k] for k in ("id", "max_act", "mean_top_act", "density", "mean_act", "top_tokens")} | {"promoted": [t for t, _ in f["promoted"]]}
            for f in sorted(features, key=lambda f: -f["max_act"])]
    index = {"sae": "saes/x", "hook": "blocks.1.hook_resid_post", "model": "tiny", "d_sae": 8, "n_tokens": 5000,
             "split": "all", "window": [2, 1], "features": rows, "dead": [1, 2, 4, 5, 6]}
    (root / "index.json").write_text(json.dumps(index))
    return write_dashboard(root, root / "site").parent


class Dom(HTMLParser):
    """Row order of the index table, and per context the displayed token texts and which one is the hit."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[int] = []
        self.contexts: list[dict] = []
        self.tags: list[tuple[str, set[str]]] = []
        self.scripts: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if tag == "script":
            self.scripts.append(attrs.get("src") or "inline")
        if tag == "tr" and "data-id" in attrs:
            self.rows.append(int(attrs["data-id"]))
        if tag == "div" and "ctx" in classes:
            self.contexts.append({"tokens": [], "hit": None})
        if tag == "span" and "tok" in classes and self.contexts and not self._inside("lens"):
            self.contexts[-1]["tokens"].append("")
            if "hit" in classes:
                self.contexts[-1]["hit"] = len(self.contexts[-1]["tokens"]) - 1
        self.tags.append((tag, classes))

    def _inside(self, cls: str) -> bool:
        return any(cls in classes for _, classes in self.tags)

    def handle_endtag(self, tag):
        while self.tags and self.tags.pop()[0] != tag:
            pass

    def handle_data(self, data):
        if self._inside("toks") and self._inside("tok"):
            self.contexts[-1]["tokens"][-1] += data


def shown(token: str) -> str:
    """How the browser displays a token: whitespace made visible, the empty token as ∅."""
    return "".join({" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192"}.get(c, c) for c in token) or "\u2205"


@pytest.mark.slow
def test_index_sorts_and_searches_in_chromium(browser, site, tmp_path):
    url = (site / "index.html").as_uri()
    by_max = Dom(run_chromium(browser, tmp_path, "--dump-dom", url))
    assert by_max.rows == [3, 0, 7]  # rendered by the page's JavaScript, max activation descending
    assert Dom(run_chromium(browser, tmp_path, "--dump-dom", url + "#sort=density&dir=asc")).rows == [7, 0, 3]
    assert Dom(run_chromium(browser, tmp_path, "--dump-dom", url + "#sort=mean_top_act")).rows == [3, 0, 7]
    assert Dom(run_chromium(browser, tmp_path, "--dump-dom", url + "#q=7")).rows == [7]
    searched = run_chromium(browser, tmp_path, "--dump-dom", url + "#q=%3Cscript")
    assert Dom(searched).rows == [0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in searched  # shown as text ...
    assert Dom(searched).scripts == ["data/index.js", "app.js"]  # ... never turned into an element
    assert "5 dead features" in searched and "1, 2, 4, 5, 6" in searched


@pytest.mark.slow
def test_feature_page_shows_contexts_lens_and_histogram(browser, site, tmp_path):
    html = run_chromium(browser, tmp_path, "--dump-dom", (site / "feature.html").as_uri() + "#0")
    dom = Dom(html)
    top, second, sample = dom.contexts
    assert top["tokens"] == [shown(t) for t in NASTY] and top["hit"] == 1
    assert second["tokens"] == ["a", "b"] and second["hit"] == 0
    assert sample["tokens"] == ["a", "b"]  # the interval sample, below the top examples
    assert "data/features/0.js" in dom.scripts and "inline" not in dom.scripts
    assert "Feature 0" in html and "promo0" in html and "supp0" in html and "&amp;lt;" in html
    assert html.count('class="bar"') == 4  # one histogram bar per bin
    assert "background-color: rgb(255, 128, 0);" in html  # the hit token is shaded at full strength (alpha 1)
    assert "background-color: rgba(255, 128, 0, 0.5);" in html  # 2.5 of a maximum of 5
    dead = run_chromium(browser, tmp_path, "--dump-dom", (site / "feature.html").as_uri() + "#2")
    assert "Feature 2 is dead" in dead


@pytest.mark.slow
def test_screenshots_are_not_blank(browser, site, tmp_path):
    import matplotlib.image

    for page, orange_expected in (("index.html", False), ("feature.html#0", True)):
        png = tmp_path / f"{page.split('.')[0]}.png"
        run_chromium(browser, tmp_path, f"--screenshot={png}", "--window-size=1280,900", f"{site.as_uri()}/{page}")
        image = matplotlib.image.imread(png)[..., :3]
        assert image.shape[:2] == (900, 1280)
        assert image.std() > 0.05  # text and tables, not one flat colour
        orange = (image[..., 0] > 0.9) & (image[..., 1] > 0.4) & (image[..., 1] < 0.8) & (image[..., 2] < 0.45)
        assert (orange.sum() > 200) == orange_expected  # activation shading only on the feature page
