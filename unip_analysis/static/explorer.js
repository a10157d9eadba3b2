// UNIP attention explorer: plain JavaScript, no build step, nothing fetched from anywhere.
//
// Per model, image and layer the data are either the shown rows themselves (uint8 of each row's
// maximum over the patch keys, that maximum and the prefix tokens' attention in fp32; the heads and
// their mean) or q (patch queries, already scaled by head_dim^-0.5) and k (every token) per head,
// fp16 or int8 with a scale per (token, head), from which a row is softmax(q . k_j + bias_j) over
// all tokens, computed on demand in float64. gzip + base64. Each layer carries the largest error of
// its shown rows, measured against the exact attention during the analysis (docs/analysis.md,
// "Attention explorer"); the page shows it next to the map.
//
// report.html mounts it with unipExplorerMount(root, unipExplorerReadDom(root), {global: true}), which
// also sets window.unipExplorer (the API the tests drive); the Jupyter widget (anywidget) appends an
// ES module `render({model, el})` to this same file.
"use strict";

const UX_F16 = (() => {
  const t = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
    t[h] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  return t;
})();
const UX_VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

function uxColor(v) {  // v in [0, 1] -> [r, g, b]
  const x = Math.min(Math.max(v, 0), 1) * (UX_VIRIDIS.length - 1), i = Math.min(Math.floor(x), UX_VIRIDIS.length - 2);
  const f = x - i, a = UX_VIRIDIS[i], b = UX_VIRIDIS[i + 1];
  return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
}

async function uxGunzip(text) {
  const bin = atob(text.trim()), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Response(stream).arrayBuffer();
}

function uxDecode(buf, off, dtype, count, scaleOff, d) {
  const out = new Float32Array(count);
  if (dtype === "f16") {
    const h = new Uint16Array(buf, off, count);
    for (let i = 0; i < count; i++) out[i] = UX_F16[h[i]];
  } else {
    const v = new Int8Array(buf, off, count), s = new Float32Array(buf, scaleOff, count / d);
    for (let i = 0; i < count; i++) out[i] = v[i] * s[(i / d) | 0];
  }
  return out;
}

class UxModel {
  constructor(meta) {
    Object.assign(this, meta);
    this.rows = meta.grid[0];
    this.cols = meta.grid[1];
    this.tokens = this.rows * this.cols + meta.npt;
    this.qIndex = new Map(meta.queries.map((q, i) => [q, i]));
    this.data = [];  // [image][layer] -> {rows: {u8, scale, prefix}} or {q, k, d}, and err
    this.biasArrays = [];
  }

  async load(blobs) {
    const nq = this.queries.length, N = this.tokens;
    if (this.bias.blob) {
      const buf = await uxGunzip(blobs[this.bias.blob]);
      this.biasArrays = this.bias.offsets.map((off, l) =>
        off === null ? null : new Float32Array(buf, off, this.heads[l] * nq * N));
    }
    this.data = await Promise.all(this.images.map(async (im) => {
      const buf = await uxGunzip(blobs[im.blob]);
      return im.layers.map((L, l) => {
        const H = this.heads[l], d = L.d, P = N - this.npt;
        if (L.enc === "rows") {
          return {err: L.err, rows: {
            u8: new Uint8Array(buf, L.u8, (H + 1) * nq * P),
            scale: new Float32Array(buf, L.scale, (H + 1) * nq),
            prefix: new Float32Array(buf, L.prefix, (H + 1) * nq * this.npt),
          }};
        }
        return {
          q: uxDecode(buf, L.q, L.dtype, H * nq * d, L.qs, d),
          k: uxDecode(buf, L.k, L.dtype, H * N * d, L.ks, d),
          d, err: L.err,
        };
      });
    }));
  }

  // Softmax of one head's logits over every token (prefix first), float64.
  headRow(image, layer, h, qi) {
    const L = this.data[image][layer - 1], d = L.d, N = this.tokens, nq = this.queries.length;
    const bias = this.biasArrays[layer - 1], out = new Float64Array(N), qo = (h * nq + qi) * d;
    let max = -Infinity;
    for (let j = 0; j < N; j++) {
      let s = 0;
      const ko = (h * N + j) * d;
      for (let t = 0; t < d; t++) s += L.q[qo + t] * L.k[ko + t];
      if (bias) s += bias[(h * nq + qi) * N + j];
      out[j] = s;
      if (s > max) max = s;
    }
    let sum = 0;
    for (let j = 0; j < N; j++) { out[j] = Math.exp(out[j] - max); sum += out[j]; }
    for (let j = 0; j < N; j++) out[j] /= sum;
    return out;
  }

  // A stored row (rows encoding): the prefix tokens' values, then u8 * max / 255 over the patches.
  storedRow(image, layer, h, qi) {
    const R = this.data[image][layer - 1].rows, npt = this.npt, P = this.tokens - npt;
    const out = new Float64Array(this.tokens), r = h * this.queries.length + qi, s = R.scale[r];
    for (let j = 0; j < npt; j++) out[j] = R.prefix[r * npt + j];
    for (let j = 0; j < P; j++) out[npt + j] = R.u8[r * P + j] * s / 255;
    return out;
  }

  fullRow(image, layer, head, query) {
    const qi = this.qIndex.get(query);
    if (qi === undefined) return null;
    if (this.data[image][layer - 1].rows) {
      return this.storedRow(image, layer, head === "mean" ? this.heads[layer - 1] : head, qi);
    }
    if (head !== "mean") return this.headRow(image, layer, head, qi);
    const H = this.heads[layer - 1], out = new Float64Array(this.tokens);
    for (let h = 0; h < H; h++) {
      const r = this.headRow(image, layer, h, qi);
      for (let j = 0; j < out.length; j++) out[j] += r[j];
    }
    for (let j = 0; j < out.length; j++) out[j] /= H;
    return out;
  }

  // The nearest stored query to patch (r, c) (every query unless the report uses a query stride).
  snap(r, c) {
    const s = this.stride, last = (n) => Math.floor((n - 1) / s) * s;
    return Math.min(Math.round(r / s) * s, last(this.rows)) * this.cols + Math.min(Math.round(c / s) * s, last(this.cols));
  }
}

function uxPct(x) {  // a fraction as a percentage: two significant digits, whole numbers from 10% (explorer.percent)
  const v = 100 * x;
  return `${v >= 10 ? v.toFixed(0) : v.toPrecision(2)}%`;
}

function uxEl(tag, attrs, parent) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k === "cls") e.className = v; else e.setAttribute(k, v);
  }
  if (parent) parent.appendChild(e);
  return e;
}

function unipExplorerReadDom(root) {
  const meta = JSON.parse(root.querySelector(".ux-meta").textContent), blobs = {};
  for (const s of root.querySelectorAll(".ux-blob")) blobs[s.dataset.key] = s.textContent;
  return {meta, blobs};
}

// Build the explorer inside `root` from {meta, blobs}. options.global: set window.unipExplorer;
// options.initial: the state to open with ({image, layer, head, query}); options.onChange(state,
// displayed): called after every render (the Jupyter widget syncs it).
function unipExplorerMount(root, source, options) {
  options = options || {};
  const colors = source.meta.colors || {}, budgetBytes = source.meta.budget || 0;
  const models = source.meta.models.map((m) => new UxModel(m));
  const byName = new Map(models.map((m) => [m.name, m]));
  const first = models[0];
  const state = {image: 0, qr: 0.5, qc: 0.5, layer: first.selected || 1, head: "mean",
                 a: 0, b: models.length > 1 ? 1 : -1};
  const api = {lastRenderMs: null};

  // --- controls ---
  const controls = uxEl("div", {cls: "ux-controls"}, root);
  const imageSel = uxEl("select", {cls: "ux-image"}, uxEl("label", {text: "image "}, controls));
  first.images.forEach((im, i) => uxEl("option", {value: i, text: `${i + 1}: ${im.label}`}, imageSel));
  const layerLabel = uxEl("label", {text: "layer "}, controls);
  const maxDepth = Math.max(...models.map((m) => m.depth));
  const layerInput = uxEl("input", {type: "range", min: 1, max: maxDepth, value: state.layer, cls: "ux-layer"}, layerLabel);
  const layerText = uxEl("span", {}, layerLabel);
  const headSel = uxEl("select", {cls: "ux-head"}, uxEl("label", {text: "head "}, controls));
  uxEl("option", {value: "mean", text: "mean of heads"}, headSel);
  const maxHeads = Math.max(...models.map((m) => Math.max(...m.heads)));
  for (let h = 0; h < maxHeads; h++) uxEl("option", {value: h, text: `${h + 1}`}, headSel);
  const modelLabel = uxEl("label", {text: "models "}, controls);
  const selA = uxEl("select", {cls: "ux-model-a"}, modelLabel), selB = uxEl("select", {cls: "ux-model-b"}, modelLabel);
  uxEl("option", {value: -1, text: "(none)"}, selB);
  models.forEach((m, i) => { uxEl("option", {value: i, text: m.name}, selA); uxEl("option", {value: i, text: m.name}, selB); });
  selA.value = state.a; selB.value = state.b;
  uxEl("p", {cls: "ux-help", text: "Hover or click a patch to make it the query; arrow keys move the query, " +
    "Shift+Up/Down the layer; click a small map to choose its layer and head. Small maps: every layer (rows) x " +
    "head (columns) for the same query, each scaled to its own maximum and framed in the head's pattern colour " +
    "(local / hybrid / global), labelled with the head's NMI and mean distance over the analysed images " +
    "(\u2605: the selected layer). Values are attention over the patch keys, not renormalised: the prefix " +
    "tokens (cls, registers, distillation token) take the rest, shown as the prefix share."}, root);
  const panelsEl = uxEl("div", {cls: "ux-panels"}, root);
  const loading = uxEl("p", {cls: "ux-note", text: "decoding the attention data\u2026"}, panelsEl);

  // --- one panel per shown model ---
  function buildPanel(m) {
    const p = {m, el: uxEl("div", {cls: "ux-panel"})};
    uxEl("h3", {text: m.name}, p.el);
    uxEl("p", {cls: "ux-enc", text: `${m.encodingName}: every shown row within ${uxPct(m.error)} of its ` +
      `maximum (measured against the exact attention); ${(m.bytes / 1e6).toFixed(1)} MB of the report's ` +
      `${(budgetBytes / 1e6).toFixed(0)} MB explorer budget`}, p.el);
    for (const note of m.reductions) uxEl("p", {cls: "ux-note", text: `reduced: ${note}`}, p.el);
    const main = uxEl("div", {cls: "ux-main"}, p.el);
    p.big = uxEl("canvas", {cls: "ux-big"}, main);
    const bar = uxEl("div", {cls: "ux-bar"}, main);
    p.barMax = uxEl("span", {}, bar);
    p.barCanvas = uxEl("canvas", {width: 12, height: 200}, bar);
    uxEl("span", {text: "0"}, bar);
    const g = p.barCanvas.getContext("2d");
    for (let y = 0; y < 200; y++) { const c = uxColor(1 - y / 199); g.fillStyle = `rgb(${c})`; g.fillRect(0, y, 12, 1); }
    p.info = uxEl("div", {cls: "ux-info"}, p.el);
    p.err = uxEl("div", {cls: "ux-err"}, p.el);
    p.gridEl = uxEl("div", {cls: "ux-grid"}, p.el);
    const H = Math.max(...m.heads);
    p.gridEl.style.gridTemplateColumns = `2.4em repeat(${H}, minmax(34px, 64px))`;
    p.cells = [];
    for (let l = 1; l <= m.depth; l++) {
      uxEl("div", {cls: "ux-rowlabel", text: (l === m.selected ? "\u2605" : "") + `L${l}`}, p.gridEl);
      const rowCells = [];
      for (let h = 0; h < H; h++) {
        if (h >= m.heads[l - 1]) { uxEl("div", {}, p.gridEl); continue; }
        const st = m.headStats[l - 1][h];
        const cell = uxEl("div", {cls: "ux-cell", title: `layer ${l}, head ${h + 1}: NMI ${st.nmi.toFixed(4)}, ` +
          `mean distance ${st.dist.toFixed(1)} px, ${st.pattern}`}, p.gridEl);
        cell.style.borderColor = colors[st.pattern] || "#888";
        const c = uxEl("canvas", {width: m.cols, height: m.rows}, cell);
        uxEl("div", {text: `h${h + 1} ${st.nmi.toFixed(3)}`}, cell);
        uxEl("div", {text: `${st.dist.toFixed(0)}px`}, cell);
        cell.addEventListener("click", () => set({layer: l, head: h}));
        rowCells.push({cell, canvas: c, layer: l, head: h});
      }
      p.cells.push(rowCells);
    }
    const pick = (ev) => {
      const r = p.big.getBoundingClientRect();
      const fr = (ev.clientY - r.top) / r.height, fc = (ev.clientX - r.left) / r.width;
      if (fr < 0 || fr >= 1 || fc < 0 || fc >= 1) return;
      const q = m.snap(Math.floor(fr * m.rows), Math.floor(fc * m.cols));
      set({qr: (Math.floor(q / m.cols) + 0.5) / m.rows, qc: ((q % m.cols) + 0.5) / m.cols});
    };
    p.big.addEventListener("click", pick);
    p.big.addEventListener("mousemove", pick);
    return p;
  }

  let panels = [], loaded = false;
  const imgCache = new Map();
  function imageOf(m, i) {
    const key = `${m.name}/${i}`;
    if (!imgCache.has(key)) {
      const im = new Image();
      im.onload = () => render();
      im.src = ["data:image/png;base64", m.images[i].png].join(",");
      imgCache.set(key, im);
    }
    return imgCache.get(key);
  }

  function queryOf(m) {
    return m.snap(Math.min(Math.floor(state.qr * m.rows), m.rows - 1), Math.min(Math.floor(state.qc * m.cols), m.cols - 1));
  }
  function headOf(m, layer) {
    return state.head === "mean" ? "mean" : Math.min(state.head, m.heads[layer - 1] - 1);
  }

  function paintMap(canvas, m, row) {
    const g = canvas.getContext("2d"), img = g.createImageData(m.cols, m.rows);
    let max = 0;
    for (const v of row) if (v > max) max = v;
    for (let i = 0; i < row.length; i++) {
      const c = uxColor(max > 0 ? row[i] / max : 0);
      img.data.set([c[0], c[1], c[2], 255], 4 * i);
    }
    g.putImageData(img, 0, 0);
    return max;
  }

  const displayed = {};
  function renderPanel(p) {
    const m = p.m, image = Math.min(state.image, m.images.length - 1), layer = Math.min(state.layer, m.depth);
    const head = headOf(m, layer), query = queryOf(m), qr = Math.floor(query / m.cols), qc = query % m.cols;
    const full = m.fullRow(image, layer, head, query), row = full.subarray(m.npt);
    displayed[m.name] = {image, layer, head, query, row: Array.from(row)};
    let prefix = 0;
    for (let j = 0; j < m.npt; j++) prefix += full[j];
    // the big map: image, attention overlay, patch grid, query
    const im = imageOf(m, image), W = im.naturalWidth || m.cols * m.patch, Hh = im.naturalHeight || m.rows * m.patch;
    const k = Math.max(1, Math.round(448 / Math.max(W, Hh)));
    if (p.big.width !== W * k || p.big.height !== Hh * k) { p.big.width = W * k; p.big.height = Hh * k; }
    const g = p.big.getContext("2d");
    g.clearRect(0, 0, p.big.width, p.big.height);
    if (im.complete && im.naturalWidth) { g.imageSmoothingEnabled = true; g.drawImage(im, 0, 0, p.big.width, p.big.height); }
    const off = document.createElement("canvas");
    off.width = m.cols; off.height = m.rows;
    const max = paintMap(off, m, row);
    g.globalAlpha = 0.6; g.imageSmoothingEnabled = false;
    g.drawImage(off, 0, 0, p.big.width, p.big.height);
    g.globalAlpha = 1;
    const ph = p.big.height / m.rows, pw = p.big.width / m.cols;
    if (Math.min(ph, pw) >= 6) {
      g.strokeStyle = "rgba(255,255,255,0.25)"; g.lineWidth = 1; g.beginPath();
      for (let r = 1; r < m.rows; r++) { g.moveTo(0, r * ph); g.lineTo(p.big.width, r * ph); }
      for (let c = 1; c < m.cols; c++) { g.moveTo(c * pw, 0); g.lineTo(c * pw, p.big.height); }
      g.stroke();
    }
    g.lineWidth = 2; g.strokeStyle = "#ff2d55"; g.strokeRect(qc * pw + 1, qr * ph + 1, pw - 2, ph - 2);
    p.barMax.textContent = max.toPrecision(3);
    const err = m.data[image][layer - 1].err;
    p.info.textContent = `query patch (${qr + 1}, ${qc + 1}) #${query} \u00b7 layer ${layer}/${m.depth} \u00b7 ` +
      `head ${head === "mean" ? "mean" : head + 1} \u00b7 prefix share ${prefix.toFixed(4)} \u00b7 max ${max.toPrecision(3)}`;
    p.err.textContent = `measured error at this layer and image: ${uxPct(err)} of the row maximum` +
      (err > 0.01 ? " \u2014 over 1%: the map is not the model's attention to the colour map's resolution" : "");
    p.err.classList.toggle("ux-warn", err > 0.01);
    // every layer x head for this query
    for (const rowCells of p.cells) {
      for (const c of rowCells) {
        const r = m.fullRow(image, c.layer, c.head, query);
        paintMap(c.canvas, m, r.subarray(m.npt));
        c.cell.classList.toggle("ux-sel-layer", c.layer === layer);
        c.cell.classList.toggle("ux-sel-head", c.layer === layer && c.head === head);
      }
    }
  }

  function render() {
    if (!panels.length) return;
    const t0 = performance.now();
    layerInput.value = state.layer;
    layerText.textContent = `${state.layer}`;
    headSel.value = String(state.head);
    imageSel.value = state.image;
    for (const p of panels) renderPanel(p);
    api.lastRenderMs = performance.now() - t0;
    if (options.onChange) options.onChange(api.state(), displayed);
  }

  function layoutPanels() {
    if (!loaded) return;  // built once the data are decoded
    panelsEl.textContent = "";
    panels = [state.a, state.b].filter((i) => i >= 0 && i < models.length)
      .filter((i, j, all) => all.indexOf(i) === j).map((i) => buildPanel(models[i]));
    for (const p of panels) panelsEl.appendChild(p.el);
    render();
  }

  function set(change) {
    Object.assign(state, change);
    state.layer = Math.max(1, Math.min(state.layer, maxDepth));
    if ("a" in change || "b" in change) layoutPanels(); else render();
  }

  imageSel.addEventListener("change", () => set({image: Number(imageSel.value)}));
  layerInput.addEventListener("input", () => set({layer: Number(layerInput.value)}));
  headSel.addEventListener("change", () => set({head: headSel.value === "mean" ? "mean" : Number(headSel.value)}));
  selA.addEventListener("change", () => set({a: Number(selA.value)}));
  selB.addEventListener("change", () => set({b: Number(selB.value)}));
  root.addEventListener("keydown", (ev) => {
    const m = panels.length ? panels[0].m : first, dr = 1 / m.rows * m.stride, dc = 1 / m.cols * m.stride;
    const moves = {ArrowUp: [-dr, 0], ArrowDown: [dr, 0], ArrowLeft: [0, -dc], ArrowRight: [0, dc]};
    if (!(ev.key in moves)) return;
    ev.preventDefault();
    if (ev.shiftKey && (ev.key === "ArrowUp" || ev.key === "ArrowDown")) {
      set({layer: state.layer + (ev.key === "ArrowUp" ? -1 : 1)});
      return;
    }
    const [a, b] = moves[ev.key];
    set({qr: Math.min(Math.max(state.qr + a, 0), 0.9999), qc: Math.min(Math.max(state.qc + b, 0), 0.9999)});
  });

  // --- the API (window.unipExplorer in report.html) ---
  const model = (name) => {
    const m = byName.get(name);
    if (!m) throw new Error(`no model named ${name}; models: ${[...byName.keys()].join(", ")}`);
    return m;
  };
  Object.assign(api, {
    models: () => models.map((m) => m.name),
    images: (name) => model(name).images.length,
    layers: (name) => model(name).depth,
    heads: (name, layer) => model(name).heads[layer - 1],
    grid: (name) => [model(name).rows, model(name).cols],
    queries: (name) => model(name).queries.slice(),
    encoding: (name) => model(name).encoding,
    // the largest measured error of the shown rows (fraction of the row maximum): the model's, or one image and layer's
    error: (name, image, layer) => (image === undefined ? model(name).error : model(name).data[image][layer - 1].err),
    row(name, image, layer, head, query) {
      const m = model(name), r = m.fullRow(image, layer, head, query);
      return r === null ? null : Array.from(r.subarray(m.npt));
    },
    prefixShare(name, image, layer, head, query) {
      const m = model(name), r = m.fullRow(image, layer, head, query);
      if (r === null) return null;
      let s = 0;
      for (let j = 0; j < m.npt; j++) s += r[j];
      return s;
    },
    set(change) {  // {image, layer, head, query: patch index of the first shown model}
      const c = Object.assign({}, change);
      if ("query" in c) {
        const m = panels.length ? panels[0].m : first;
        c.qr = (Math.floor(c.query / m.cols) + 0.5) / m.rows; c.qc = ((c.query % m.cols) + 0.5) / m.cols;
        delete c.query;
      }
      set(c);
    },
    state: () => ({image: state.image, layer: state.layer, head: state.head,
                   query: queryOf(panels.length ? panels[0].m : first),
                   models: panels.map((p) => p.m.name)}),
    displayed: () => JSON.parse(JSON.stringify(displayed)),
  });
  api.ready = Promise.all(models.map((m) => m.load(source.blobs))).then(() => {
    loading.remove();
    loaded = true;
    if (options.initial) api.set(options.initial);  // before the first render, which reports the state
    layoutPanels();
    root.setAttribute("data-ready", "true");
    return api;
  });
  if (options.global) window.unipExplorer = api;
  return api;
}
