// Feature browser for one SAE analysis (copied in by `sae analyse`). Works from file:// with no server: data arrives as <script> files that
// assign globals (fetch() of JSON is blocked on file://); the format is described in sae/analysis/dashboard/__init__.py. All text goes into the DOM through textContent, never
// innerHTML, so token strings such as "<script>" or "&amp;" are shown literally.
"use strict";

(() => {
  const SHOW_ROWS = 300; // rows rendered at once in the index; search narrows the rest
  const WHITESPACE = { " ": "\u00b7", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d" };

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }

  const num = (x, digits = 3) => (x === null || x === undefined ? "\u2013" : Number(x).toPrecision(digits));
  const token = (id) => window.SAE_TOKENS[id] ?? `<token ${id}>`;
  // `sae explain`'s results (data/explanations.js, optional): {id: {explanation, score: {balanced_accuracy, ...}}}.
  const explained = (id) => window.SAE_EXPLANATIONS?.features?.[id];
  const percent = (d) => (d >= 0.001 ? `${(100 * d).toPrecision(3)}%` : `${(100 * d).toExponential(1)}%`);

  // Token text with whitespace made visible (·, ↵, →) in a dimmer style, and the empty token as ∅.
  function tokenText(text) {
    const frag = document.createDocumentFragment();
    if (text === "") {
      frag.append(el("span", { class: "ws", text: "\u2205" }));
      return frag;
    }
    for (const part of text.split(/(\s+)/)) {
      if (!part) continue;
      if (/^\s+$/.test(part)) {
        frag.append(el("span", { class: "ws", text: [...part].map((c) => WHITESPACE[c] ?? "\u00b7").join("") }));
      } else {
        frag.append(document.createTextNode(part));
      }
    }
    return frag;
  }

  function chip(text, title) {
    const node = el("span", { class: "tok chip" }, tokenText(text));
    if (title !== undefined) node.title = title;
    return node;
  }

  function header(index, extra) {
    const meta = document.getElementById("meta");
    meta.textContent = `${index.hook} of ${index.model} \u00b7 ${index.d_sae} features, ${index.dead.length} dead \u00b7 ` +
      `${index.n_tokens.toLocaleString("en")} tokens (${index.split} split)${extra || ""}`;
  }

  // ------------------------------------------------------------------------------------------- index page

  function readState() {
    const params = new URLSearchParams(location.hash.slice(1));
    return {
      sort: params.get("sort") || "max_act",
      dir: params.get("dir") || "desc",
      q: params.get("q") || "",
    };
  }

  function writeState(state) {
    const params = new URLSearchParams({ sort: state.sort, dir: state.dir });
    if (state.q) params.set("q", state.q);
    history.replaceState(null, "", `#${params}`);
  }

  function matches(feature, q) {
    if (!q) return true;
    if (/^\d+$/.test(q) && feature.id === Number(q)) return true;
    const needle = q.toLowerCase();
    if ((explained(feature.id)?.explanation ?? "").toLowerCase().includes(needle)) return true;
    return [...feature.top_tokens, ...feature.promoted].some((t) => token(t).toLowerCase().includes(needle));
  }

  function renderIndex() {
    const index = window.SAE_INDEX;
    const state = readState();
    document.getElementById("search").value = state.q;
    document.getElementById("sort").value = state.sort;
    document.getElementById("order").textContent = state.dir === "desc" ? "descending" : "ascending";

    const q = state.q.trim();
    const sign = state.dir === "desc" ? -1 : 1;
    const rows = index.features.filter((f) => matches(f, q));
    rows.sort((a, b) => sign * (a[state.sort] - b[state.sort]) || a.id - b.id);
    if (/^\d+$/.test(q)) rows.sort((a, b) => (b.id === Number(q)) - (a.id === Number(q))); // exact id first

    const body = document.querySelector("#features tbody");
    body.replaceChildren(
      ...rows.slice(0, SHOW_ROWS).map((f) => {
        const link = el("a", { href: `feature.html#${f.id}`, text: `#${f.id}` });
        return el("tr", { "data-id": String(f.id) },
          el("td", {}, link),
          el("td", { class: "num", text: num(f.max_act) }),
          el("td", { class: "num", text: num(f.mean_top_act) }),
          el("td", { class: "num", text: percent(f.density) }),
          el("td", {}, ...f.top_tokens.map((t) => chip(token(t)))),
          el("td", {}, ...f.promoted.map((t) => chip(token(t)))),
          window.SAE_EXPLANATIONS ? explanationCell(explained(f.id)) : null);
      }));
    document.getElementById("count").textContent = `${rows.length} of ${index.features.length} live features`;
    document.getElementById("more").textContent =
      rows.length > SHOW_ROWS ? `Showing the first ${SHOW_ROWS}; search to narrow the list.` : "";
  }

  // The explanation and its detection score (balanced accuracy; the baseline, another feature's explanation, after).
  function explanationCell(e) {
    if (!e) return el("td", { class: "meta", text: "\u2013" });
    const s = e.score;
    return el("td", { class: "explanation" }, el("span", { text: e.explanation }),
      s ? el("span", { class: "meta score", text: ` ${num(s.balanced_accuracy, 2)} (${num(s.baseline_balanced_accuracy, 2)})`,
        title: "detection balanced accuracy (baseline: judged with another feature's explanation)" }) : null);
  }

  function index() {
    const data = window.SAE_INDEX;
    header(data);
    if (window.SAE_EXPLANATIONS) {
      document.querySelector("#features thead tr").append(el("th", { text: "explanation: fires on\u2026 (detection score)" }));
      document.getElementById("search").placeholder = "Search: feature id, token or explanation text";
    }
    const dead = document.getElementById("dead");
    dead.querySelector("summary").textContent = `${data.dead.length} dead features (never active)`;
    dead.querySelector(".ids").textContent = data.dead.join(", ") || "none";

    const update = (change) => {
      writeState({ ...readState(), ...change });
      renderIndex();
    };
    document.getElementById("search").addEventListener("input", (e) => update({ q: e.target.value }));
    document.getElementById("sort").addEventListener("change", (e) => update({ sort: e.target.value }));
    document.getElementById("order").addEventListener("click", () =>
      update({ dir: readState().dir === "desc" ? "asc" : "desc" }));
    window.addEventListener("hashchange", renderIndex);
    renderIndex();
  }

  // ------------------------------------------------------------------------------------------- feature page

  // Histogram of activations on log10 bins, as inline SVG (counts on a log scale: tails matter most).
  function histogram([first, counts], edges) {
    const W = 560, H = 150, pad = { l: 8, r: 8, t: 8, b: 26 };
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("class", "hist");
    const add = (tag, attrs, text) => {
      const node = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
      if (text !== undefined) node.textContent = text;
      svg.append(node);
      return node;
    };
    if (!counts.length) return svg;
    const edge = (i) => 10 ** edges[first + i];
    const top = Math.log10(Math.max(...counts) + 1);
    const bw = (W - pad.l - pad.r) / counts.length;
    counts.forEach((c, i) => {
      const h = ((H - pad.t - pad.b) * Math.log10(c + 1)) / top;
      const bar = add("rect", { x: pad.l + i * bw + 0.5, y: H - pad.b - h, width: Math.max(bw - 1, 1), height: h, class: "bar" });
      bar.append(Object.assign(document.createElementNS(ns, "title"), { textContent: `${num(edge(i))}\u2013${num(edge(i + 1))}: ${c}` }));
    });
    add("line", { x1: pad.l, x2: W - pad.r, y1: H - pad.b, y2: H - pad.b, class: "axis" });
    add("text", { x: pad.l, y: H - 8, class: "label" }, num(edge(0), 2));
    add("text", { x: W - pad.r, y: H - 8, class: "label end" }, num(edge(counts.length), 2));
    add("text", { x: W / 2, y: H - 8, class: "label mid" }, "activation (log scale)");
    return svg;
  }

  // One example [seq, pos, act, window]: the context's tokens around pos, shaded by this feature's activation
  // relative to its maximum (window values are thousandths of it); the hit token is outlined.
  function context([seq, pos, act, acts], maxAct) {
    const meta = window.SAE_INDEX;
    const [left, right] = meta.window;
    const lo = Math.max(0, pos - left), loAct = Math.max(meta.first_pos, pos - left);
    const ids = window.SAE_CONTEXTS[seq].slice(lo, Math.min(meta.context_size, pos + right + 1));
    const tokens = ids.map((id, i) => {
      const at = lo + i;
      const node = el("span", { class: "tok" }, tokenText(token(id)));
      if (at < loAct) {
        node.classList.add("na");
        node.title = "not in the cache";
      } else {
        const fraction = acts[at - loAct] / meta.window_scale;
        node.style.backgroundColor = `rgba(255, 128, 0, ${Math.min(1, Math.max(0, fraction)).toFixed(3)})`;
        node.title = `activation \u2248 ${num(at === pos ? act : fraction * maxAct)}`;
      }
      if (at === pos) node.classList.add("hit");
      return node;
    });
    return el("div", { class: "ctx" },
      el("span", { class: "act", text: num(act) }),
      el("span", { class: "toks" }, ...tokens),
      el("span", { class: "where meta", text: `context ${seq}, position ${pos}` }));
  }

  function explanationSection(f) {
    const e = explained(f.id);
    if (!e) return null;
    const s = e.score;
    const scores = s
      ? `detection on ${s.positive.length} activating and ${s.negative.length} non-activating held-out contexts: ` +
        `balanced accuracy ${num(s.balanced_accuracy, 2)}, AUROC ${num(s.auroc, 2)}; baseline (judged with ` +
        `feature ${s.baseline_feature ?? "\u2013"}'s explanation): ${num(s.baseline_balanced_accuracy, 2)}, ` +
        `AUROC ${num(s.baseline_auroc, 2)}`
      : "not scored: the analysis holds no held-out activating example, or no window where the feature is silent";
    return el("section", { id: "explanation" }, el("h2", { text: "Explanation" }),
      el("p", { class: "explanation", text: `Fires on ${e.explanation}` }), el("p", { class: "meta", text: scores }));
  }

  function lensColumn(title, tokens) {
    return el("div", { class: "lens" }, el("h3", { text: title }),
      el("ol", {}, ...tokens.map(([t, v]) => el("li", {}, chip(token(t)), el("span", { class: "meta", text: ` ${num(v)}` })))));
  }

  function renderFeature(f) {
    document.title = `Feature ${f.id}`;
    document.getElementById("title").textContent = `Feature ${f.id}`;
    const stats = el("dl", { class: "stats" },
      ...[["max activation", num(f.max_act)], ["mean of top activations", num(f.mean_top_act)],
        ["density", `${percent(f.density)} (${f.n_active.toLocaleString("en")} tokens)`],
        ["mean activation when active", num(f.mean_act)]].flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
    const intervals = window.SAE_INDEX.intervals;
    const samplesByInterval = {};
    for (const [seq, pos, act, i, acts] of f.samples) {
      const label = `${100 * intervals[i][0]}%\u2013${100 * intervals[i][1]}%`;
      (samplesByInterval[label] ||= []).push([seq, pos, act, acts]);
    }
    const main = document.getElementById("feature");
    main.replaceChildren(...[  // a section with nothing to show is null: left out, not shown as the text "null"
      el("section", { class: "overview" },
        stats,
        el("figure", {}, histogram(f.histogram, window.SAE_INDEX.hist_edges), el("figcaption", { text: "activation histogram" }))),
      explanationSection(f),
      el("section", { class: "logit-lens" }, el("h2", { text: "Logit lens" }),
        el("div", { class: "lens-cols" }, lensColumn("promotes", f.promoted), lensColumn("suppresses", f.suppressed))),
      el("section", { id: "top" }, el("h2", { text: "Top activations" }), ...f.top.map((e) => context(e, f.max_act))),
      el("section", { id: "samples" }, el("h2", { text: "Weaker activations (random samples by fraction of max)" }),
        ...Object.entries(samplesByInterval).reverse().flatMap(([interval, list]) =>
          [el("h3", { text: interval }), ...list.map((e) => context(e, f.max_act))]))].filter((s) => s !== null));
  }

  function loadFeature() {
    const index = window.SAE_INDEX;
    const hash = location.hash.slice(1);
    const live = index.features.map((f) => f.id).sort((a, b) => a - b);
    const main = document.getElementById("feature");
    if (hash && !/^\d+$/.test(hash)) { // not an id (feature.html#junk): say so rather than show "Feature NaN"
      let shown = hash;
      try { shown = decodeURIComponent(hash); } catch (e) { /* a malformed %-escape: show it as typed */ }
      document.title = "No such feature";
      document.getElementById("title").textContent = "No such feature";
      document.getElementById("prev").href = document.getElementById("next").href = `#${live[0] ?? 0}`;
      main.replaceChildren(el("p", { class: "notice",
        text: `"${shown}" is not a feature id: the address should end in # and a number, e.g. #${live[0] ?? 0}.` }));
      return;
    }
    const id = Number(hash || index.features[0]?.id || 0);
    const at = live.indexOf(id);
    document.getElementById("prev").href = `#${live[Math.max(0, at - 1)] ?? id}`;
    document.getElementById("next").href = `#${live[Math.min(live.length - 1, at + 1)] ?? id}`;
    if (index.dead.includes(id) || at < 0) {
      document.getElementById("title").textContent = `Feature ${id}`;
      main.replaceChildren(el("p", { class: "notice", text: index.dead.includes(id)
        ? `Feature ${id} is dead: it never fired on the ${index.n_tokens} analysed tokens.`
        : `There is no feature ${id} (this SAE has ${index.d_sae}).` }));
      return;
    }
    const file = `data/features/${Math.floor(id / index.features_per_file)}.js`;
    window.SAE_CHUNK = undefined;
    const script = el("script", { src: file });
    script.onload = () => renderFeature(window.SAE_CHUNK[id]);
    script.onerror = () => main.replaceChildren(el("p", { class: "notice", text: `${file} is missing.` }));
    document.head.append(script);
  }

  function feature() {
    header(window.SAE_INDEX);
    window.addEventListener("hashchange", loadFeature);
    loadFeature();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (!window.SAE_INDEX) {
      document.querySelector("main").replaceChildren(el("p", { class: "notice", text: "data/index.js is missing: rebuild the dashboard." }));
      return;
    }
    (page === "index" ? index : feature)();
  });
})();
