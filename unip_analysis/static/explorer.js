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
const UX_RECEIVED_QUERIES = 256;
const UX_EMBEDDINGS = {pca: "PCA", tsne: "t-SNE", umap: "UMAP"};
const UX_VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];

// The token a head's sink share goes to, as the analysis names it: "cls", "reg0"... or a patch index.
function uxSinkName(token) {
  return typeof token === "number" ? `patch ${token}` : String(token);
}

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
    this.colCache = new Map();
    this.recCache = new Map();
  }

  async load(blobs) {
    const nq = this.queries.length, N = this.tokens;
    if (this.bias.blob) {
      const buf = await uxGunzip(blobs[this.bias.blob]);
      this.biasArrays = this.bias.offsets.map((off, l) =>
        off === null ? null : new Float32Array(buf, off, this.heads[l] * nq * N));
    }
    if (this.qk) {  // the query-key view: per head of every layer a box (fp32) and uint16 points
      const buf = await uxGunzip(blobs[this.qk.blob]), total = this.heads.reduce((a, b) => a + b, 0);
      this.qkN = 2 * this.images.length * this.qk.tokens.length * 2;  // (query, key) x images x tokens x (x, y)
      this.qkBoxes = new Float32Array(buf, this.qk.boxes, total * 4);
      this.qkU16 = new Uint16Array(buf, this.qk.points, total * this.qkN);
      this.qkBase = [];
      let b = 0;
      for (const h of this.heads) { this.qkBase.push(b); b += h; }
      this.qkTok = new Map(this.qk.tokens.map((t, i) => [t, i]));
      this.qkCache = new Map();
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

  // "Who looks here": the attention each stored query patch gives to patch `key` (column npt + key
  // of the shown rows), in the order of this.queries; cached, as hovering redraws often.
  column(image, layer, head, key) {
    const ck = `${image}/${layer}/${head}/${key}`;
    if (this.colCache.has(ck)) return this.colCache.get(ck);
    const nq = this.queries.length, out = new Float64Array(nq), L = this.data[image][layer - 1];
    if (L.rows) {
      const R = L.rows, h = head === "mean" ? this.heads[layer - 1] : head, P = this.tokens - this.npt;
      for (let qi = 0; qi < nq; qi++) { const r = h * nq + qi; out[qi] = R.u8[r * P + key] * R.scale[r] / 255; }
    } else {
      for (let qi = 0; qi < nq; qi++) out[qi] = this.fullRow(image, layer, head, this.queries[qi])[this.npt + key];
    }
    if (this.colCache.size > 256) this.colCache.clear();
    this.colCache.set(ck, out);
    return out;
  }

  // What each token receives: per image, the mean over the stored patch queries (at most
  // UX_RECEIVED_QUERIES of them, evenly spaced: q and k of a large grid make every row costly) of
  // its attention (full softmax rows, prefix tokens first) [image * tokens + j]; sizes the keys.
  received(layer, head) {
    const ck = `${layer}/${head}`;
    if (!this.recCache.has(ck)) {
      const N = this.tokens, step = Math.ceil(this.queries.length / UX_RECEIVED_QUERIES);
      const qs = this.queries.filter((_, i) => i % step === 0), out = new Float64Array(this.images.length * N);
      for (let i = 0; i < this.images.length; i++) {
        for (const q of qs) {
          const r = this.fullRow(i, layer, head, q);
          for (let j = 0; j < N; j++) out[i * N + j] += r[j] / qs.length;
        }
      }
      this.recCache.set(ck, out);
    }
    return this.recCache.get(ck);
  }

  // The query-key view's points of one head: [(query, key)][image][token][x, y], decoded from uint16.
  qkPoints(layer, head) {
    const ck = `${layer}/${head}`;
    if (!this.qkCache.has(ck)) {
      const g = this.qkBase[layer - 1] + head, n = this.qkN, u = this.qkU16.subarray(g * n, (g + 1) * n);
      const b = this.qkBoxes.subarray(4 * g, 4 * g + 4), sx = b[1] - b[0], sy = b[3] - b[2];
      const out = new Float64Array(n);
      for (let i = 0; i < n; i += 2) { out[i] = b[0] + u[i] * sx / 65535; out[i + 1] = b[2] + u[i + 1] * sy / 65535; }
      this.qkCache.set(ck, out);
    }
    return this.qkCache.get(ck);
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

function uxTokenName(m, token) {  // prefix tokens first, then the patches (row-major)
  if (token >= m.npt) {
    const q = token - m.npt;
    return `patch (${Math.floor(q / m.cols) + 1}, ${(q % m.cols) + 1}) #${q}`;
  }
  return m.npt === 1 ? "the cls token" : `prefix token ${token + 1} of ${m.npt}`;
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
  const state = {image: 0, qr: 0.5, qc: 0.5, kr: 0.5, kc: 0.5, layer: first.selected || 1, head: "mean",
                 a: 0, b: models.length > 1 ? 1 : -1, qkColor: "role"};
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
    "tokens (cls, registers, distillation token) take the rest, shown as the prefix share. Beside it, who looks " +
    "here: the attention each query gives to one key patch (click that map to choose the key). Below, the " +
    "queries and keys of the explored images in one 2-D embedding per head (AttentionViz: keys moved to the " +
    "queries' centroid and both scaled to a common spread, which leaves every softmax row unchanged): a local head " +
    "lays them out like the image's grid, a sink head puts one key far from the rest. Hover a point to see its " +
    "patch; click a query to make it the query, a key to see who looks at it."}, root);
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
    p.col = uxEl("canvas", {cls: "ux-col", title: "who looks here: click a patch to make it the key"}, main);
    p.info = uxEl("div", {cls: "ux-info"}, p.el);
    p.colInfo = uxEl("div", {cls: "ux-info ux-colinfo"}, p.el);
    p.err = uxEl("div", {cls: "ux-err"}, p.el);
    if (m.qk) buildQK(p);
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
          `mean distance ${st.dist.toFixed(1)} px, ${st.pattern}` +
          (st.sink === undefined ? "" : `, sink share ${st.sink.toFixed(2)} (${uxSinkName(st.sinkToken)})`)}, p.gridEl);
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
    p.col.addEventListener("click", (ev) => {
      const r = p.col.getBoundingClientRect();
      const fr = (ev.clientY - r.top) / r.height, fc = (ev.clientX - r.left) / r.width;
      if (fr < 0 || fr >= 1 || fc < 0 || fc >= 1) return;
      set({kr: (Math.floor(fr * m.rows) + 0.5) / m.rows, kc: (Math.floor(fc * m.cols) + 0.5) / m.cols});
    });
    return p;
  }

  // --- the query-key view ---
  const QK_ROLE = {query: "#e6550d", key: "#3182bd", prefix: "#111"};
  function buildQK(p) {
    const m = p.m, box = uxEl("div", {cls: "ux-qk"}, p.el);
    p.qkTitle = uxEl("div", {cls: "ux-qk-title"}, box);
    const ctl = uxEl("div", {cls: "ux-qk-ctl"}, box);
    p.qkColor = uxEl("select", {cls: "ux-qk-color"}, uxEl("label", {text: "colour by "}, ctl));
    for (const [v, t] of [["role", "role (query / key / prefix token)"], ["row", "patch row"], ["col", "patch column"],
                          ["bright", "image brightness of the patch"]]) uxEl("option", {value: v, text: t}, p.qkColor);
    p.qkColor.addEventListener("change", () => set({qkColor: p.qkColor.value}));
    p.qkLegend = uxEl("span", {cls: "ux-qk-legend"}, ctl);
    p.qkTop = uxEl("div", {cls: "ux-qk-top"}, box);
    const wrap = uxEl("div", {cls: "ux-qk-wrap"}, box);
    p.qkBig = uxEl("canvas", {cls: "ux-qk-big", width: 380, height: 380}, wrap);
    p.qkTip = uxEl("div", {cls: "ux-qk-tip"}, wrap);
    p.qkTipCanvas = uxEl("canvas", {width: 48, height: 48}, p.qkTip);
    p.qkTipText = uxEl("div", {}, p.qkTip);
    p.qkSmallEl = uxEl("div", {cls: "ux-qk-small"}, wrap);
    p.qkSmallLayer = null;
    const hit = (ev) => {
      const r = p.qkBig.getBoundingClientRect(), t = p.qkBig.tx;
      if (!t) return null;
      const x = (ev.clientX - r.left) * p.qkBig.width / r.width, y = (ev.clientY - r.top) * p.qkBig.height / r.height;
      const pts = m.qkPoints(t.layer, t.head);
      let best = -1, bd = 64;  // within 8 px
      for (let i = 0; i < pts.length; i += 2) {
        const dx = t.x(pts[i]) - x, dy = t.y(pts[i + 1]) - y, d = dx * dx + dy * dy;
        if (d < bd) { bd = d; best = i / 2; }
      }
      if (best < 0) return null;
      const T = m.qk.tokens.length, I = m.images.length;
      return {role: best >= I * T ? "key" : "query", image: Math.floor((best % (I * T)) / T), token: m.qk.tokens[best % T]};
    };
    p.qkBig.addEventListener("mousemove", (ev) => {
      const h = hit(ev);
      if (!h) { p.qkTip.style.display = "none"; return; }
      const w = p.qkBig.parentElement.getBoundingClientRect();
      p.qkTip.style.display = "block";
      p.qkTip.style.left = `${ev.clientX - w.left + 12}px`; p.qkTip.style.top = `${ev.clientY - w.top + 12}px`;
      const g = p.qkTipCanvas.getContext("2d"), im = imageOf(m, h.image);
      g.clearRect(0, 0, 48, 48);
      let what;
      if (h.token < m.npt) {
        what = uxTokenName(m, h.token);
      } else {
        const q = h.token - m.npt, pr = Math.floor(q / m.cols), pc = q % m.cols;
        if (im.complete && im.naturalWidth) {
          const sw = im.naturalWidth / m.cols, sh = im.naturalHeight / m.rows;
          g.imageSmoothingEnabled = false;
          g.drawImage(im, pc * sw, pr * sh, sw, sh, 0, 0, 48, 48);
        }
        what = `patch (${pr + 1}, ${pc + 1}) #${q}`;
      }
      p.qkTipText.textContent = `${h.role} \u00b7 image ${h.image + 1} \u00b7 ${what}` + (h.role === "key"
        ? ` \u00b7 receives ${uxPct(m.received(p.qkBig.tx.layer, p.qkBig.tx.head)[h.image * m.tokens + h.token])}` : "");
    });
    p.qkBig.addEventListener("mouseleave", () => { p.qkTip.style.display = "none"; });
    p.qkBig.addEventListener("click", (ev) => {
      const h = hit(ev);
      if (!h || h.token < m.npt) return;
      const q = h.token - m.npt, fr = (Math.floor(q / m.cols) + 0.5) / m.rows, fc = ((q % m.cols) + 0.5) / m.cols;
      set(h.role === "query" ? {image: h.image, qr: fr, qc: fc} : {image: h.image, kr: fr, kc: fc});
    });
  }

  function qkColorOf(m, token, image) {
    if (token < m.npt) return QK_ROLE.prefix;
    const q = token - m.npt;
    if (state.qkColor === "row") return `rgb(${uxColor(m.rows > 1 ? Math.floor(q / m.cols) / (m.rows - 1) : 0)})`;
    if (state.qkColor === "col") return `rgb(${uxColor(m.cols > 1 ? (q % m.cols) / (m.cols - 1) : 0)})`;
    if (state.qkColor === "bright") return `rgb(${uxColor(m.qk.brightness[image][q] / 255)})`;
    return null;
  }

  // One head's queries (filled squares) and keys (hollow squares) on a canvas, x and y to one scale.
  function drawQK(canvas, m, layer, head, big, mark) {
    const pts = m.qkPoints(layer, head), T = m.qk.tokens.length, I = m.images.length, n = I * T;
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < pts.length; i += 2) {
      x0 = Math.min(x0, pts[i]); x1 = Math.max(x1, pts[i]); y0 = Math.min(y0, pts[i + 1]); y1 = Math.max(y1, pts[i + 1]);
    }
    const W = canvas.width, H = canvas.height, pad = big ? 10 : 3;
    const k = Math.min((W - 2 * pad) / Math.max(x1 - x0, 1e-12), (H - 2 * pad) / Math.max(y1 - y0, 1e-12));
    const ox = (W - k * (x1 - x0)) / 2, oy = (H - k * (y1 - y0)) / 2;
    const t = {layer, head, x: (v) => ox + k * (v - x0), y: (v) => H - oy - k * (v - y0)};
    const g = canvas.getContext("2d"), s = big ? 4 : 2, rec = big ? m.received(layer, head) : null;
    g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
    g.lineWidth = 1;
    for (const role of [1, 0]) {  // keys under queries, prefix tokens on top
      for (const prefixPass of [false, true]) {
        for (let i = 0; i < n; i++) {
          const token = m.qk.tokens[i % T];
          if ((token < m.npt) !== prefixPass) continue;
          const o = 2 * (role * n + i), x = t.x(pts[o]), y = t.y(pts[o + 1]);
          const c = qkColorOf(m, token, Math.floor(i / T)) || (role ? QK_ROLE.key : QK_ROLE.query);
          let r = prefixPass ? s + 1 : s;
          if (role && rec) r += 14 * Math.sqrt(rec[Math.floor(i / T) * m.tokens + token]);  // area ~ attention received
          if (role) { g.strokeStyle = c; g.strokeRect(x - r / 2, y - r / 2, r, r); }
          else { g.fillStyle = c; g.fillRect(x - r / 2, y - r / 2, r, r); }
        }
      }
    }
    if (mark) {  // the explorer's query (red) and key (cyan) in the shown image
      for (const [role, token, colour] of [[0, mark.query, "#ff2d55"], [1, mark.key, "#00bcd4"]]) {
        const ti = m.qkTok.get(m.npt + token);
        if (ti === undefined) continue;
        const o = 2 * (role * n + mark.image * T + ti);
        g.strokeStyle = colour; g.lineWidth = 2; g.beginPath();
        g.arc(t.x(pts[o]), t.y(pts[o + 1]), big ? 7 : 4, 0, 2 * Math.PI); g.stroke();
      }
    }
    canvas.tx = t;
  }

  function renderQK(p, image, layer, head, query, key) {
    const m = p.m, h = head === "mean" ? 0 : head, stats = m.headStats[layer - 1];
    p.qkColor.value = state.qkColor;
    p.qkTitle.textContent = `queries and keys, layer ${layer}, head ${h + 1}` +
      (head === "mean" ? " (the mean of heads has none: choose a head on the right)" : "") +
      ` \u00b7 ${UX_EMBEDDINGS[m.qk.method] || m.qk.method} over ${m.images.length} images (${m.qk.seconds.toFixed(1)} s)` +
      (m.qk.stride > 1 ? ` \u00b7 every ${m.qk.stride}th patch row and column` : "") +
      ` \u00b7 NMI ${stats[h].nmi.toFixed(3)}, ${stats[h].pattern}` +
      (stats[h].sink === undefined ? "" : ` \u00b7 sink share ${stats[h].sink.toFixed(2)} (${uxSinkName(stats[h].sinkToken)})`);
    const rec = m.received(layer, h), N = m.tokens, I = m.images.length, mean = new Float64Array(N);
    for (let i = 0; i < I; i++) for (let j = 0; j < N; j++) mean[j] += rec[i * N + j] / I;
    let top = 0;
    for (let j = 1; j < N; j++) if (mean[j] > mean[top]) top = j;
    p.qkTop.textContent = `keys sized by the attention they receive; the most attended token: ${uxTokenName(m, top)}, ` +
      `${uxPct(mean[top])} of the patch queries' attention (mean over the ${I} explored images)`;
    p.qkLegend.textContent = state.qkColor === "role"
      ? "" : " filled: queries, hollow: keys, black: prefix tokens; colour from low (purple) to high (yellow)";
    if (state.qkColor === "role") {
      p.qkLegend.textContent = "";
      for (const [name, c] of [["query", QK_ROLE.query], ["key (hollow)", QK_ROLE.key], ["prefix token", QK_ROLE.prefix]]) {
        const sw = uxEl("span", {cls: "ux-qk-swatch"}, p.qkLegend);
        sw.style.background = c;
        uxEl("span", {text: ` ${name} `}, p.qkLegend);
      }
    }
    drawQK(p.qkBig, m, layer, h, true, {image, query, key});
    if (p.qkSmallLayer !== layer) {  // every head of the layer, ordered by NMI (most global first)
      p.qkSmallEl.textContent = "";
      uxEl("div", {cls: "ux-qk-cap", text: `every head of layer ${layer}, by NMI (lowest first)`}, p.qkSmallEl);
      const order = [...Array(m.heads[layer - 1]).keys()].sort((a, b) => stats[a].nmi - stats[b].nmi || a - b);
      p.qkSmall = order.map((hh) => {
        const cell = uxEl("div", {cls: "ux-qk-cell", title: `head ${hh + 1}: NMI ${stats[hh].nmi.toFixed(4)}, ` +
          `${stats[hh].pattern}`}, p.qkSmallEl);
        cell.style.borderColor = colors[stats[hh].pattern] || "#888";
        const c = uxEl("canvas", {width: 96, height: 96}, cell);
        uxEl("div", {text: `h${hh + 1} ${stats[hh].nmi.toFixed(3)}` +
          (stats[hh].sink === undefined ? "" : ` s${stats[hh].sink.toFixed(2)}`)}, cell);
        cell.addEventListener("click", () => set({head: hh}));
        return {cell, canvas: c, head: hh};
      });
      p.qkSmallLayer = layer;
      p.qkSmallColor = null;
    }
    if (p.qkSmallColor !== state.qkColor) {  // the small multiples change only with the layer or colouring
      for (const c of p.qkSmall) drawQK(c.canvas, m, layer, c.head, false, null);
      p.qkSmallColor = state.qkColor;
    }
    for (const c of p.qkSmall) c.cell.classList.toggle("ux-sel-head", c.head === h);
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
  function keyOf(m) {
    return Math.min(Math.floor(state.kr * m.rows), m.rows - 1) * m.cols + Math.min(Math.floor(state.kc * m.cols), m.cols - 1);
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
    const key = keyOf(m), col = m.column(image, layer, head, key);
    displayed[m.name] = {image, layer, head, query, row: Array.from(row), key, column: Array.from(col)};
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
    // who looks here: each stored query's attention to the key, painted over the patches it stands for
    if (p.col.width !== p.big.width || p.col.height !== p.big.height) { p.col.width = p.big.width; p.col.height = p.big.height; }
    const gc = p.col.getContext("2d"), s = m.stride, kr = Math.floor(key / m.cols), kc = key % m.cols;
    gc.clearRect(0, 0, p.col.width, p.col.height);
    if (im.complete && im.naturalWidth) { gc.imageSmoothingEnabled = true; gc.drawImage(im, 0, 0, p.col.width, p.col.height); }
    const spread = new Float64Array(m.rows * m.cols);
    for (let r = 0; r < m.rows; r++) {
      for (let c = 0; c < m.cols; c++) spread[r * m.cols + c] = col[m.qIndex.get(Math.floor(r / s) * s * m.cols + Math.floor(c / s) * s)];
    }
    const colMax = paintMap(off, m, spread);
    gc.globalAlpha = 0.6; gc.imageSmoothingEnabled = false;
    gc.drawImage(off, 0, 0, p.col.width, p.col.height);
    gc.globalAlpha = 1; gc.lineWidth = 2; gc.strokeStyle = "#00bcd4";
    gc.strokeRect(kc * pw + 1, kr * ph + 1, pw - 2, ph - 2);
    let received = 0;
    for (const v of col) received += v;
    p.colInfo.textContent = `who looks here (right): key patch (${kr + 1}, ${kc + 1}) #${key} receives ` +
      `${(received / col.length).toFixed(4)} of the attention of the average query (${col.length} stored queries), ` +
      `at most ${colMax.toPrecision(3)}`;
    p.barMax.textContent = max.toPrecision(3);
    const err = m.data[image][layer - 1].err;
    p.info.textContent = `query patch (${qr + 1}, ${qc + 1}) #${query} \u00b7 layer ${layer}/${m.depth} \u00b7 ` +
      `head ${head === "mean" ? "mean" : head + 1} \u00b7 prefix share ${prefix.toFixed(4)} \u00b7 max ${max.toPrecision(3)}`;
    p.err.textContent = `measured error at this layer and image: ${uxPct(err)} of the row maximum` +
      (err > 0.01 ? " \u2014 over 1%: the map is not the model's attention to the colour map's resolution" : "");
    p.err.classList.toggle("ux-warn", err > 0.01);
    if (m.qk) renderQK(p, image, layer, head, query, key);
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
    // "who looks here": the attention each stored query patch (queries(name), row-major) gives to patch `key`
    column: (name, image, layer, head, key) => Array.from(model(name).column(image, layer, head, key)),
    // the query-key view of one head (0-based): {queries, keys}, each [[x, y], ...] over images x tokens in order
    qk(name, layer, head) {
      const m = model(name);
      if (!m.qk) return null;
      const pts = m.qkPoints(layer, head), n = pts.length / 4, pairs = (o) => {
        const out = [];
        for (let i = 0; i < n; i++) out.push([pts[2 * (o + i)], pts[2 * (o + i) + 1]]);
        return out;
      };
      return {queries: pairs(0), keys: pairs(n)};
    },
    qkTokens: (name) => (model(name).qk ? model(name).qk.tokens.slice() : null),
    // a head's attention-sink statistic (head 0-based, or "mean" over the layer's heads): {share, token},
    // the largest mean share one token receives and that token ("cls", "reg0"... or a patch index); null
    // where the analysis has none
    sinkShare(name, layer, head) {
      const stats = model(name).headStats[layer - 1];
      if (stats[0].sink === undefined) return null;
      if (head === "mean") return {share: stats.reduce((s, st) => s + st.sink, 0) / stats.length, token: null};
      return {share: stats[head].sink, token: stats[head].sinkToken};
    },
    prefixShare(name, image, layer, head, query) {
      const m = model(name), r = m.fullRow(image, layer, head, query);
      if (r === null) return null;
      let s = 0;
      for (let j = 0; j < m.npt; j++) s += r[j];
      return s;
    },
    set(change) {  // {image, layer, head, query / key: patch index of the first shown model, qkColor}
      const c = Object.assign({}, change), m = panels.length ? panels[0].m : first;
      for (const [name, r, cc] of [["query", "qr", "qc"], ["key", "kr", "kc"]]) {
        if (!(name in c)) continue;
        c[r] = (Math.floor(c[name] / m.cols) + 0.5) / m.rows; c[cc] = ((c[name] % m.cols) + 0.5) / m.cols;
        delete c[name];
      }
      set(c);
    },
    state: () => ({image: state.image, layer: state.layer, head: state.head,
                   query: queryOf(panels.length ? panels[0].m : first),
                   key: keyOf(panels.length ? panels[0].m : first), qkColor: state.qkColor,
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
