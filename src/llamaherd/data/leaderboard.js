// llamaherd leaderboard page: ranking table, family tree and per-model view.
// Every user-supplied string reaches the DOM through text nodes (textContent), never through HTML parsing.
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const TITLES = { arc: "ARC", hellaswag: "HellaSwag", mmlu: "MMLU", truthfulqa: "TruthfulQA" };
  const state = { sortKey: "rank", sortDir: 1, family: "", kind: "", protocol: "", text: "" };
  let data = null;
  let models = new Map(); // name -> detail; a Map, so a name such as "constructor" or "__proto__" is only a key

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child); // strings become text nodes
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(value, estimate) {
    if (value === null || value === undefined) return "–";
    return (estimate ? "~" : "") + value.toFixed(2);
  }

  function modelHref(name) {
    return "#/model/" + encodeURIComponent(name);
  }

  function modelLink(name) {
    return el("a", { href: modelHref(name), class: "model-link", text: name });
  }

  function columns() {
    const bench = data.benchmarks.map((b) => ({ key: b, title: TITLES[b] || b, num: true }));
    return [
      { key: "rank", title: "#", num: true },
      { key: "name", title: "Model" },
      { key: "family", title: "Family" },
      { key: "kind", title: "Kind" },
      { key: "protocol", title: "Protocol" },
      { key: "n_params", title: "Params", num: true },
      ...bench,
      { key: "average", title: "Average", num: true },
      { key: "delta", title: "Δ parent", num: true },
      { key: "parent", title: "Parent" },
    ];
  }

  function sortValue(row, key) {
    if (key in TITLES) return row.scores[key];
    return row[key];
  }

  function compareRows(a, b) {
    const va = sortValue(a, state.sortKey);
    const vb = sortValue(b, state.sortKey);
    const missingA = va === null || va === undefined || va === "";
    const missingB = vb === null || vb === undefined || vb === "";
    if (missingA || missingB) return missingA === missingB ? a.rank - b.rank : missingA ? 1 : -1;
    const order = typeof va === "number" ? va - vb : String(va).localeCompare(String(vb));
    return order === 0 ? a.rank - b.rank : order * state.sortDir;
  }

  function visibleRows() {
    const text = state.text.trim().toLowerCase();
    return data.rows
      .filter((r) => !state.family || r.family === state.family)
      .filter((r) => !state.kind || r.kind === state.kind)
      .filter((r) => !state.protocol || r.protocol === state.protocol)
      .filter((r) => !text || r.name.toLowerCase().includes(text) || (r.parent || "").toLowerCase().includes(text))
      .sort(compareRows);
  }

  function humanCount(n) {
    if (!n) return "";
    return n >= 1e9 ? (n / 1e9).toFixed(2) + "B" : (n / 1e6).toFixed(1) + "M";
  }

  function renderHead() {
    const head = document.getElementById("board-head");
    head.replaceChildren();
    for (const col of columns()) {
      const th = el("th", { "data-key": col.key, scope: "col", class: col.num ? "num" : "", text: col.title });
      if (col.key === state.sortKey) th.setAttribute("aria-sort", state.sortDir > 0 ? "ascending" : "descending");
      th.addEventListener("click", () => {
        if (state.sortKey === col.key) state.sortDir = -state.sortDir;
        else {
          state.sortKey = col.key;
          state.sortDir = col.num && col.key !== "rank" ? -1 : 1; // numbers start best-first
        }
        renderTable();
      });
      head.append(th);
    }
  }

  function renderTable() {
    renderHead();
    const body = document.getElementById("board-body");
    body.replaceChildren();
    const rows = visibleRows();
    for (const r of rows) {
      const tr = el("tr", { "data-name": r.name, "data-kind": r.kind, "data-family": r.family || "" });
      tr.append(
        el("td", { class: "num", text: String(r.rank) }),
        el("td", { class: "name" }, modelLink(r.name)),
        el("td", { text: r.family || "" }),
        el("td", {}, el("span", { class: "kind kind-" + r.kind, text: r.kind })),
        el("td", { text: r.protocol }),
        el("td", { class: "num", text: humanCount(r.n_params) }),
      );
      for (const b of data.benchmarks) {
        const td = el("td", { class: "num" + (r.estimates[b] ? " est" : ""), "data-key": b, text: fmt(r.scores[b], r.estimates[b]) });
        if (r.estimates[b]) td.title = "estimate on a --limit subset" + (r.limit ? " (" + r.limit + " items per task)" : "");
        tr.append(td);
      }
      tr.append(el("td", { class: "num", "data-key": "average", text: fmt(r.average, r.estimate) }));
      const delta = el("td", { class: "num", "data-key": "delta" });
      if (r.delta !== null) {
        delta.textContent = (r.delta_estimate ? "~" : "") + (r.delta > 0 ? "+" : "") + r.delta.toFixed(2);
        delta.classList.add(r.delta > 0 ? "up" : r.delta < 0 ? "down" : "same");
        delta.title = "vs " + r.parent + " (" + fmt(r.parent_average, false) + ")";
      } else delta.textContent = "–";
      tr.append(delta);
      const parent = el("td", {});
      if (r.parent) parent.append(modelLink(r.parent), " (" + r.method + ")");
      tr.append(parent);
      body.append(tr);
    }
    document.getElementById("row-count").textContent = rows.length + " of " + data.rows.length + " rows";
  }

  function fillSelect(id, values) {
    const select = document.getElementById(id);
    for (const v of [...new Set(values.filter(Boolean))].sort()) select.append(el("option", { value: v, text: v }));
  }

  function renderLegend() {
    const list = document.getElementById("legend");
    for (const [key, text] of Object.entries(data.legend)) list.append(el("li", { text: key + " — " + text }));
  }

  function averagesOf(name) {
    return data.rows.filter((r) => r.name === name);
  }

  function treeNode(name, method, seen) {
    const li = el("li", { "data-name": name });
    if (method) li.append(el("span", { class: "method", text: method + " →" }), " ");
    li.append(modelLink(name));
    for (const r of averagesOf(name)) {
      const label = r.kind + (r.protocol !== "leaderboard-2023" ? " " + r.protocol : "") + " " + fmt(r.average, r.estimate);
      li.append(" ", el("span", { class: "avg kind-" + r.kind, text: label }));
    }
    const children = models.get(name).children;
    if (children.length && !seen.has(name)) {
      seen.add(name);
      const ul = el("ul");
      for (const c of children) ul.append(treeNode(c.name, c.method, seen));
      li.append(ul);
    }
    return li;
  }

  function renderTree() {
    const tree = document.getElementById("tree");
    tree.replaceChildren();
    const roots = [...models.keys()].filter((n) => models.get(n).parents.length === 0);
    const best = (n) => Math.max(-1, ...averagesOf(n).map((r) => (r.average === null ? -1 : r.average)));
    roots.sort((a, b) => best(b) - best(a) || a.localeCompare(b));
    const seen = new Set();
    for (const root of roots) tree.append(treeNode(root, null, seen));
  }

  function field(dl, label, value) {
    if (value === null || value === undefined || value === "") return;
    dl.append(el("dt", { text: label }), el("dd", { text: String(value) }));
  }

  function chart(row, parentRow) {
    const keys = [...data.benchmarks, "average"];
    const values = [row, parentRow].filter(Boolean).flatMap((r) => keys.map((k) => (k === "average" ? r.average : r.scores[k])));
    const top = Math.min(100, 10 * Math.ceil(Math.max(10, ...values.filter((v) => v !== null)) / 10 + 0.5));
    const w = 120 * keys.length + 40;
    const h = 280;
    const base = h - 64;
    const scale = (v) => ((base - 20) * v) / top;
    const root = svg("svg", { class: "chart", width: w, height: h, viewBox: "0 0 " + w + " " + h, role: "img" });
    root.append(svg("title", {}, row.name + " vs " + (parentRow ? parentRow.name : "no parent") + " (scale 0–" + top + "%)"));
    root.append(svg("line", { class: "axis", x1: 30, y1: base, x2: w, y2: base }));
    root.append(svg("text", { x: 26, y: 24, "text-anchor": "end" }, String(top)));
    root.append(svg("text", { x: 26, y: base, "text-anchor": "end" }, "0"));
    keys.forEach((key, i) => {
      const x = 40 + i * 120;
      const pairs = [[row, "bar-model"], [parentRow, "bar-parent"]];
      pairs.forEach(([r, cls], j) => {
        if (!r) return;
        const v = key === "average" ? r.average : r.scores[key];
        if (v === null || v === undefined) return;
        const bx = x + j * 46;
        root.append(svg("rect", { class: cls, x: bx, y: base - scale(v), width: 40, height: scale(v) }));
        root.append(svg("text", { x: bx + 20, y: base - scale(v) - 4, "text-anchor": "middle" }, v.toFixed(1)));
      });
      root.append(svg("text", { x: x + 43, y: base + 16, "text-anchor": "middle" }, TITLES[key] || "Average"));
    });
    const legend = [[row, "bar-model", row.name], [parentRow, "bar-parent", parentRow ? "parent: " + parentRow.name : ""]];
    legend.forEach(([r, cls, label], j) => {
      if (!r) return;
      const y = base + 36 + 18 * j;
      root.append(svg("rect", { class: cls, x: 40, y: y - 9, width: 10, height: 10 }), svg("text", { x: 56, y: y }, label));
    });
    return root;
  }

  function simpleTable(headers, rows) {
    const table = el("table", {});
    table.append(el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", { text: h })))));
    const body = el("tbody");
    for (const cells of rows) body.append(el("tr", {}, ...cells.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", { text: c === null || c === undefined ? "" : String(c) })))));
    table.append(body);
    return table;
  }

  function pct(value) {
    return typeof value === "number" ? (100 * value).toFixed(2) : "";
  }

  function safeLink(source) {
    try {
      const url = new URL(source);
      if (url.protocol === "https:" || url.protocol === "http:") return el("a", { href: url.href, rel: "noopener noreferrer", text: source });
    } catch (e) {
      // not a URL (e.g. "github:owner/repo@commit:path"): shown as text
    }
    return document.createTextNode(source || "");
  }

  function renderModel(name) {
    const view = document.getElementById("view-model");
    view.replaceChildren();
    const detail = models.get(name);
    if (!detail) {
      view.append(el("p", { id: "model-missing", text: "No model named " + name + "." }));
      return;
    }
    const m = detail.model;
    view.append(el("p", {}, el("a", { href: "#/", text: "← ranking" })), el("h2", { id: "model-name", text: m.name }));
    const dl = el("dl", { class: "fields" });
    field(dl, "family", m.family);
    field(dl, "parameters", m.n_params ? humanCount(m.n_params) + " (" + m.n_params.toLocaleString("en") + ")" : null);
    field(dl, "source", m.source);
    field(dl, "path", m.path);
    field(dl, "fingerprint", m.fingerprint);
    field(dl, "license", m.license);
    field(dl, "chat format", m.chat_format);
    field(dl, "notes", m.notes);
    field(dl, "added", m.added);
    view.append(dl);

    if (detail.parents.length) {
      view.append(el("h3", { text: "Made from" }));
      for (const p of detail.parents) {
        const block = el("div", { class: "parent" }, el("p", {}, modelLink(p.name), " by " + p.method + (p.date ? ", " + p.date : "")));
        if (p.synthetic) block.append(el("p", { class: "synthetic", text: p.synthetic }));
        if (p.data_files.length) block.append(simpleTable(["data file", "sha256"], p.data_files.map((f) => [f.path, f.sha256 || ""])));
        if (Object.keys(p.hyperparameters).length) block.append(el("pre", { text: JSON.stringify(p.hyperparameters, null, 2) }));
        view.append(block);
      }
    }
    if (detail.children.length) {
      const ul = el("ul");
      for (const c of detail.children) ul.append(el("li", {}, modelLink(c.name), " (" + c.method + ")"));
      view.append(el("h3", { text: "Derivatives" }), ul);
    }

    for (const row of averagesOf(name)) {
      const parentRow = row.parent ? data.rows.find((r) => r.name === row.parent && r.kind === row.kind && r.protocol === row.protocol) : null;
      const title = row.kind + ", " + row.protocol + (row.estimate ? " (estimate)" : "") + (parentRow ? " — against " + parentRow.name : "");
      view.append(el("h3", { text: title }), chart(row, parentRow || null));
    }

    if (detail.latest.length) {
      view.append(el("h3", { text: "Per-task results (latest run of each task)" }));
      view.append(simpleTable(
        ["task", "protocol", "n-shot", "metric", "score %", "± stderr %", "docs", "limit", "data", "date"],
        detail.latest.map((r) => [
          r.task, r.protocol, r.n_shot, r.metric, fmt(r.score, r.is_estimate), pct(r.metrics[r.metric + "_stderr"]),
          r.n_docs, r.limit === null ? "full" : r.limit, r.data_form, r.date,
        ]),
      ));
    }
    if (detail.history.length > detail.latest.length) {
      const history = el("details", {}, el("summary", { text: "All runs (" + detail.history.length + ")" }));
      history.append(simpleTable(["date", "task", "protocol", "score %", "limit", "fingerprint"],
        detail.history.map((r) => [r.date, r.task, r.protocol, fmt(r.score, r.is_estimate), r.limit === null ? "full" : r.limit, r.fingerprint])));
      view.append(history);
    }
    if (detail.reported.length) {
      view.append(el("h3", { text: "Reported results" }));
      view.append(simpleTable(
        ["protocol", ...data.benchmarks.map((b) => TITLES[b]), "average", "source", "date", "notes"],
        detail.reported.map((r) => [r.protocol, ...data.benchmarks.map((b) => fmt(r[b], false)), fmt(r.average, false), safeLink(r.source), r.source_date, r.notes]),
      ));
    }
  }

  function show(id) {
    for (const section of ["view-table", "view-tree", "view-model"]) document.getElementById(section).hidden = section !== id;
    document.getElementById("nav-table").classList.toggle("active", id === "view-table");
    document.getElementById("nav-tree").classList.toggle("active", id === "view-tree");
  }

  function decodedName(encoded) {
    try {
      return decodeURIComponent(encoded);
    } catch (e) {
      return encoded; // a malformed %-escape typed into the address bar names no model: shown as typed
    }
  }

  function route() {
    const hash = location.hash || "#/";
    if (hash.startsWith("#/model/")) {
      renderModel(decodedName(hash.slice("#/model/".length)));
      show("view-model");
      window.scrollTo(0, 0);
    } else if (hash === "#/tree") {
      renderTree();
      show("view-tree");
    } else {
      renderTable();
      show("view-table");
    }
  }

  function bindFilters() {
    const bind = (id, key, event) => document.getElementById(id).addEventListener(event, (e) => {
      state[key] = e.target.value;
      renderTable();
    });
    bind("filter-family", "family", "change");
    bind("filter-kind", "kind", "change");
    bind("filter-protocol", "protocol", "change");
    bind("filter-text", "text", "input");
    document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
  }

  function start(loaded) {
    data = loaded;
    models = new Map(Object.entries(data.models));
    document.getElementById("status").hidden = true;
    document.getElementById("generated").textContent = "generated " + data.generated;
    fillSelect("filter-family", data.rows.map((r) => r.family));
    fillSelect("filter-protocol", data.rows.map((r) => r.protocol));
    renderLegend();
    bindFilters();
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "true";
  }

  function load() {
    const embedded = document.getElementById("board-data");
    if (embedded) return Promise.resolve(JSON.parse(embedded.textContent));
    return fetch("api/leaderboard.json", { headers: { Accept: "application/json" } }).then((r) => {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    });
  }

  load().then(start, (err) => {
    document.getElementById("status").textContent = "Could not load the leaderboard data: " + err.message;
  });
})();
