"""The static feature browser, rendered by real headless Chromium from file:// (its JavaScript must have run)."""

from __future__ import annotations

import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import torch

from sae.analysis.analyse import AnalyseConfig
from sae.analysis.dashboard.build import analyse
from sae.analysis.dashboard import read_js, write_dashboard, write_js

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


STRAY = re.compile(r">\s*(null|undefined|NaN)\s*<")
"""A JavaScript value that reached the page as text between two elements (a null child of replaceChildren, say)."""


def run_chromium(browser: Path, profile: Path, *args: str) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    done = subprocess.run([str(browser), *flags, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def synthetic_analysis(root: Path) -> None:
    """Analysis data in the format `sae analyse` writes (see sae.analysis.dashboard), with awkward token text.

    Context 4 is NASTY itself; position 0 of every context is the excluded BOS (first_pos 1), shown greyed.
    """
    texts = [*NASTY, "<bos>", "a", "b", "x", " = ", "9", " rare", "!", " promo0", " promo3", " promo7", "<b>",
             " supp0", " supp3", " supp7", "&lt;"]
    tok = {t: i for i, t in enumerate(texts)}
    ids = lambda *words: [tok[w] for w in words]  # noqa: E731
    write_js(root / "tokens.js", "SAE_TOKENS", dict(enumerate(texts)))
    write_js(root / "contexts.js", "SAE_CONTEXTS", {
        4: ids(*NASTY), 9: ids("<bos>", "a", "b"), 1: ids("<bos>", "x", " = ", "9"), 2: ids("<bos>", " rare", "!")})

    def feature(j: int, max_act: float, density: float, fires_on: str, top: list, first_bin: int) -> dict:
        return {
            "id": j, "max_act": max_act, "mean_top_act": sum(e[2] for e in top) / len(top), "density": density,
            "mean_act": max_act / 3, "top_tokens": ids(fires_on), "n_active": int(density * 5000), "top": top,
            "promoted": [[tok[f" promo{j}"], 2.0], [tok["<b>"], 1.0]], "suppressed": [[tok[f" supp{j}"], -1.5], [tok["&lt;"], -0.9]],
            "samples": [[9, 1, max_act / 5, 0, [200, 20]]], "histogram": [first_bin, [40, 12, 3, 1]],
        }

    features = [
        feature(0, 5.0, 0.01, NASTY[1], [[4, 1, 5.0, [1000, 500, 100, 0, 200, 0, 40]], [9, 1, 1.0, [200, 20]]], 30),
        feature(3, 9.0, 0.2, " = ", [[1, 2, 9.0, [0, 1000, 333]]], 40),
        feature(7, 1.0, 0.0005, " rare", [[2, 1, 1.0, [1000, 0]]], 20),
    ]
    write_js(root / "features" / "0.js", "SAE_CHUNK", {f["id"]: f for f in features})
    rows = [{k: f[k] for k in ("id", "max_act", "mean_top_act", "density", "mean_act", "top_tokens")}
            | {"promoted": [t for t, _ in f["promoted"]]} for f in sorted(features, key=lambda f: -f["max_act"])]
    write_js(root / "index.js", "SAE_INDEX", {
        "sae": "saes/x", "hook": "blocks.1.hook_resid_post", "model": "tiny", "d_sae": 8, "n_tokens": 5000,
        "split": "all", "window": [2, 6], "first_pos": 1, "context_size": 8, "features_per_file": 64,
        "window_scale": 1000, "hist_edges": [-4 + i / 8 for i in range(65)], "intervals": [[0, 0.25], [0.25, 0.5], [0.5, 0.75]],
        "features": rows, "dead": [1, 2, 4, 5, 6]})


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A synthetic analysis folder with awkward token text, made browsable."""
    root = tmp_path_factory.mktemp("analysis")
    (root / "data" / "features").mkdir(parents=True)
    synthetic_analysis(root / "data")
    return write_dashboard(root).parent


@pytest.fixture(scope="module")
def real_site(tiny_cache, tiny_llama, hand_sae, tmp_path_factory) -> Path:
    """The browser of a real `analyse` run: a random ReLU SAE on the session's tiny-Llama cache."""
    root = tmp_path_factory.mktemp("real_site")
    torch.manual_seed(0)
    hand_sae(torch.randn(32, 40), torch.randn(40, 32) * 0.1, model=str(tiny_llama)).save(root / "sae")
    out = analyse(AnalyseConfig(sae=str(root / "sae"), cache=str(tiny_cache), out=str(root / "an"), n_top=4,
                                window_left=5, window_right=2, device="cpu"))
    return write_dashboard(out).parent


@pytest.fixture(scope="module")
def explained_site(site, tmp_path_factory) -> Path:
    """The synthetic site with `sae explain` results for features 0 and 3 (3 not scored)."""
    import shutil

    root = Path(shutil.copytree(site, tmp_path_factory.mktemp("explained") / "an"))
    score = {"balanced_accuracy": 0.875, "auroc": 0.9375, "baseline_balanced_accuracy": 0.5, "baseline_auroc": 0.4375,
             "baseline_feature": 3, "positive": [[4, 1]] * 4, "negative": [[9, 2]] * 4}
    write_js(root / "data" / "explanations.js", "SAE_EXPLANATIONS", {"features": {
        "0": {"explanation": "html <tags> in strings", "shown": [[4, 1]], "score": score},
        "3": {"explanation": "assignment operators", "shown": [[1, 2]], "score": None}}})
    return root


@pytest.mark.slow
def test_explanations_show_in_the_index_search_and_the_feature_page(browser, explained_site, site, tmp_path):
    url = (explained_site / "index.html").as_uri()
    html = run_chromium(browser, tmp_path, "--dump-dom", url)
    assert Dom(html).rows == [3, 0, 7] and "html &lt;tags&gt; in strings" in html and " 0.88 (0.50)" in html
    assert "explanation: fires on" in html
    assert Dom(run_chromium(browser, tmp_path, "--dump-dom", url + "#q=assignment")).rows == [3]  # by explanation text
    assert Dom(run_chromium(browser, tmp_path, "--dump-dom", url + "#q=TAGS")).rows == [0]
    page = run_chromium(browser, tmp_path, "--dump-dom", (explained_site / "feature.html").as_uri() + "#0")
    assert "Fires on html &lt;tags&gt; in strings" in page
    assert "4 activating and 4 non-activating" in page and "balanced accuracy 0.88, AUROC 0.94" in page
    assert "feature 3's explanation): 0.50, AUROC 0.44" in page
    assert "not scored" in run_chromium(browser, tmp_path, "--dump-dom", (explained_site / "feature.html").as_uri() + "#3")
    plain = run_chromium(browser, tmp_path, "--dump-dom", (site / "index.html").as_uri())  # no explanations.js
    assert "explanation: fires on" not in plain and Dom(plain).rows == [3, 0, 7]


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
    visible = {" ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}
    return "".join(visible.get(c, "\u00b7" if c.isspace() else c) for c in token) or "\u2205"


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
    assert Dom(searched).scripts == ["data/index.js", "data/tokens.js", "data/explanations.js", "app.js"]  # ... never an element
    assert "5 dead features" in searched and "1, 2, 4, 5, 6" in searched


@pytest.mark.slow
def test_feature_page_shows_contexts_lens_and_histogram(browser, site, tmp_path):
    html = run_chromium(browser, tmp_path, "--dump-dom", (site / "feature.html").as_uri() + "#0")
    dom = Dom(html)
    top, second, sample = dom.contexts
    assert top["tokens"] == [shown(t) for t in NASTY] and top["hit"] == 1
    assert second["tokens"] == ["<bos>", "a", "b"] and second["hit"] == 1
    assert sample["tokens"] == ["<bos>", "a", "b"]  # the interval sample, below the top examples
    assert "data/features/0.js" in dom.scripts and "inline" not in dom.scripts
    assert html.count("not in the cache") == 3  # position 0 of each context: the excluded BOS
    assert "Feature 0" in html and "promo0" in html and "supp0" in html and "&amp;lt;" in html
    assert not STRAY.findall(html), STRAY.findall(html)  # no explanations here: that section is left out, not "null"
    assert html.count('class="bar"') == 4  # one histogram bar per bin
    assert "background-color: rgb(255, 128, 0);" in html  # the hit token is shaded at full strength (alpha 1)
    assert "background-color: rgba(255, 128, 0, 0.5);" in html  # 2.5 of a maximum of 5
    dead = run_chromium(browser, tmp_path, "--dump-dom", (site / "feature.html").as_uri() + "#2")
    assert "Feature 2 is dead" in dead


@pytest.mark.slow
def test_feature_page_with_an_address_that_is_no_id_says_so(browser, site, tmp_path):
    """feature.html#junk is one notice naming what was typed, not a page for "Feature NaN" (issue 17)."""
    for junk, shown in (("junk", "junk"), ("%3Cb%3E7", "&lt;b&gt;7"), ("12abc", "12abc")):
        html = run_chromium(browser, tmp_path, "--dump-dom", (site / "feature.html").as_uri() + "#" + junk)
        assert "NaN" not in html and f'"{shown}" is not a feature id' in html, html[-1500:]
        assert "No such feature" in html and not STRAY.findall(html) and "<b>7" not in html


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


@pytest.mark.slow
def test_real_analysis_renders_its_features_and_contexts(browser, real_site, tmp_path):
    data = real_site / "data"
    index, tokens, contexts = (read_js(data / f"{name}.js") for name in ("index", "tokens", "contexts"))
    rows = Dom(run_chromium(browser, tmp_path, "--dump-dom", (real_site / "index.html").as_uri())).rows
    assert rows == [f["id"] for f in index["features"]] and len(rows) > 10  # every live feature, by max activation

    for summary in (index["features"][0], index["features"][-1]):
        j = summary["id"]
        feature = read_js(data / "features" / f"{j // index['features_per_file']}.js")[str(j)]
        dom = Dom(run_chromium(browser, tmp_path, "--dump-dom", f"{(real_site / 'feature.html').as_uri()}#{j}"))
        assert len(dom.contexts) == len(feature["top"]) + len(feature["samples"]) > 0
        for (seq, pos, _, _), ctx in zip(feature["top"], dom.contexts):
            lo = max(0, pos - 5)
            assert ctx["tokens"] == [shown(tokens[str(t)]) for t in contexts[str(seq)][lo : pos + 3]]
            assert ctx["hit"] == pos - lo


def test_rerunning_analyse_keeps_the_browsers_explanations_consistent(tiny_cache, tiny_llama, hand_sae, tmp_path):
    """A second `sae analyse` into an explained folder removed data/explanations.js but kept explanations.json, so the
    browser lost explanations `sae explain` still held. The same analysis gets them back; another (its features
    may differ) shows none, as `sae explain` refuses to continue them."""
    from sae.analysis.explain import FILE, fingerprint, save

    torch.manual_seed(0)
    hand_sae(torch.randn(32, 40), torch.randn(40, 32) * 0.1, model=str(tiny_llama)).save(tmp_path / "sae")

    def run(n_top: int) -> Path:
        return analyse(AnalyseConfig(sae=str(tmp_path / "sae"), cache=str(tiny_cache), out=str(tmp_path / "an"),
                                     n_top=n_top, device="cpu"))

    out = run(4)
    save(out, {"analysis": fingerprint(out), "features": {"3": {"explanation": "commas"}}})
    shown_before = (out / "data" / "explanations.js").read_text()
    run(4)
    assert (out / "data" / "explanations.js").read_text() == shown_before
    run(3)
    assert (out / FILE).is_file() and not (out / "data" / "explanations.js").exists()
