// reslens explorer (MIT, part of reslens): the lens, trace and head views of one page, from the JSON in #data.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("data").textContent);
  const RANK_CAP = 65535;

  // --- decoding: {"t": type, "s": shape, "b": base64 little-endian} -> typed array ---------------
  let HALF = null;
  function half(bits) {
    const s = bits & 0x8000 ? -1 : 1, e = (bits >> 10) & 0x1f, f = bits & 0x3ff;
    if (e === 0) return s * f * Math.pow(2, -24);
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function arr(a) {
    const raw = atob(a.b), n = raw.length, bytes = new Uint8Array(n);
    for (let i = 0; i < n; i++) bytes[i] = raw.charCodeAt(i);
    const buf = bytes.buffer;
    if (a.t === "u1") return bytes;
    if (a.t === "u2") return new Uint16Array(buf);
    if (a.t === "u4") return new Uint32Array(buf);
    if (a.t === "i4") return new Int32Array(buf);
    if (!HALF) { HALF = new Float32Array(65536); for (let i = 0; i < 65536; i++) HALF[i] = half(i); }
    const h = new Uint16Array(buf), out = new Float32Array(h.length);
    for (let i = 0; i < h.length; i++) out[i] = HALF[h[i]];
    return out;
  }
  const NONE = new Set([65535, 4294967295]);

  // --- text ----------------------------------------------------------------------------------------
  const ESC = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ESC[c]);
  const SPECIAL = { "\n": "\\n", "\t": "\\t", "\r": "\\r", "\u00a0": "⍽" };
  // Every whitespace or invisible character shown: \n \t \r, ⍽ for a no-break space, \uXXXX for the others.
  function visible(s) {
    return s.replace(/[\s\u00ad\u200b-\u200f\u2028-\u202f\u2060\ufeff]/g,
      (c) => (c === " " ? " " : SPECIAL[c] || "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")));
  }
  // A token in a cell (reslens._text.cell_text): spaces-only as ␣, leading space dropped, cut to width.
  function cellText(s, width) {
    let t = visible(s);
    if (t && !t.replace(/ /g, "")) t = "␣".repeat(t.length);
    if (t.length > 1 && t[0] === " ") t = t.slice(1);
    return t.length <= width ? t : t.slice(0, width - 1) + "…";
  }
  // A token in a tooltip: every space visible as ␣.
  const tipText = (s) => visible(s).replace(/ /g, "␣");
  const fmt = (v) => (v !== v ? "NaN" : Math.abs(v) >= 1000 || v === 0 ? v.toFixed(0) : v.toPrecision(3));
  const rankText = (v) => (v >= RANK_CAP ? "≥" + RANK_CAP : String(v));

  // --- colour: white -> blue ----------------------------------------------------------------------
  const STOPS = [[247, 251, 255], [107, 174, 214], [8, 48, 107]];
  function blue(x) {
    if (x !== x) return ["#eee", "#999"];
    x = Math.min(1, Math.max(0, x));
    const i = x < 0.5 ? 0 : 1, t = x < 0.5 ? x * 2 : (x - 0.5) * 2, a = STOPS[i], b = STOPS[i + 1];
    const c = a.map((v, j) => Math.round(v + (b[j] - v) * t));
    return ["rgb(" + c.join(",") + ")", x > 0.55 ? "#fff" : "#111"];
  }

  const tip = document.getElementById("tip");
  function showTip(html, ev) {
    tip.innerHTML = html;
    tip.hidden = false;
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + w > innerWidth) x = Math.max(0, ev.clientX - w - 14);
    if (y + h > innerHeight) y = Math.max(0, ev.clientY - h - 14);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  const hideTip = () => { tip.hidden = true; };
  function el(tag, attrs, html) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (html !== undefined) e.innerHTML = html;
    return e;
  }

  // --- the lens view --------------------------------------------------------------------------------
  const METRICS = {
    top1: ["p(top-1)", "prob"], final: ["p(final top-1)", "prob"], target: ["p(next token)", "prob"],
    target_rank: ["rank of the next token", "rank"], final_rank: ["rank of the final top-1", "rank"],
    entropy: ["entropy (nats)", "clip"], kl_fl: ["KL(final ‖ layer) (nats)", "clip"],
    kl_lf: ["KL(layer ‖ final) (nats)", "clip"], js: ["JS (nats)", "clip"],
  };
  function quantile(values, q) {
    const v = Array.from(values).filter((x) => x === x).sort((a, b) => a - b);
    return v.length ? v[Math.min(v.length - 1, Math.floor(q * v.length))] : 1;
  }

  // trajectories travel as uint8 on log scales (reslens.explorer._payload.log_probs / log_ranks)
  const unlogP = (q) => (q === 0 ? NaN : Math.pow(10, (8 * (q - 255)) / 254));
  const unlogRank = (q) => (q === 255 ? RANK_CAP : Math.round(Math.pow(65536, q / 255) - 1));

  function lensView(V, root) {
    const T = V.tokens, R = V.rows.length, P = V.n_pos, K = V.k;
    function derived(L) {  // p(top-1) from the top-k, p(next token) from its log-prob
      const top1 = new Float32Array(R * P);
      for (let i = 0; i < R * P; i++) top1[i] = L.probs[i * K];
      L.m.top1 = top1;
      if (L.m.target_logprob) L.m.target = L.m.target_logprob.map(Math.exp);
      return L;
    }
    performance.mark("reslens-start");
    const lenses = V.lenses.map((L) => derived({
      name: L.name, top: arr(L.top), probs: arr(L.probs), m: Object.fromEntries(
        Object.entries(L.metrics).map(([k, a]) => [k, arr(a)])),
      traj: { off: arr(L.traj.off), tok: arr(L.traj.tok), prob: Float32Array.from(arr(L.traj.prob), unlogP),
        rank: Float32Array.from(arr(L.traj.rank), unlogRank), exact: L.traj.exact },
      changes: new Map(L.changes.map((c) => [c.r * P + c.p, c])),
    }));
    const ORDER = ["top1", "final", "target", "target_rank", "final_rank", "entropy", "kl_fl", "kl_lf", "js"];
    const CELL = T.map((t) => esc(cellText(t, 8)));  // each token's cell text, once
    // selected first: the last position, at its deepest row with a cause (the last row where it has none)
    const last = V.lenses[0].changes.filter((c) => c.p === P - 1).map((c) => c.r);
    const state = { lens: 0, metric: "top1", sel: { r: last.length ? Math.max(...last) : R - 1, p: P - 1 },
      trajBy: "prob" };
    const tokenOf = (i) => (NONE.has(i) || i < 0 ? null : T[i]);
    const nChanges = V.lenses.reduce((n, L) => n + L.changes.length, 0);
    root.innerHTML =
      '<div class="controls"><label>lens <select class="lens"></select></label>' +
      '<label>colour <select class="metric"></select></label>' +
      '<label>trajectory <select class="trajby"><option value="prob">probability</option>' +
      '<option value="rank">rank</option></select></label>' +
      '<span class="note">' + esc(nChanges ? nChanges + " cells where the top-1 changes carry their causes " +
        "(marked ◥; click one)" : "no causes precomputed (explore a model with changes > 0)") + "</span></div>" +
      '<div class="legend"><span class="lo"></span><span class="bar"></span><span class="hi"></span>' +
      '<span class="what"></span></div><div class="scroll"><table class="grid"></table></div>' +
      '<div class="panels"><div class="panel traj"></div><div class="panel cause"></div></div>';
    const q = (s) => root.querySelector(s);
    const lensSel = q("select.lens"), metricSel = q("select.metric");
    lenses.forEach((L, i) => lensSel.appendChild(el("option", { value: i }, esc(L.name))));
    for (const k of ORDER) if (k in lenses[0].m) metricSel.appendChild(el("option", { value: k }, METRICS[k][0]));

    // the grid: the next token on top, rows deepest first, the input at the bottom. The last FIRST positions
    // are built first (what the reader sees first), the earlier ones after the first paint, CHUNK at a time.
    const FIRST = 96, CHUNK = 128, W0 = 64, W = 50;
    const ioCells = (ids, a, b) => ids.slice(a, b).map((t, j) => '<td data-p="' + (a + j) + '" title="' +
      esc(tipText(tokenOf(t) ?? "")) + '">' + esc(cellText(tokenOf(t) ?? "", 8)) + "</td>").join("");
    const lensCells = (r, a, b) => {
      const out = [];
      for (let p = a; p < b; p++) {
        const [bg, fg, text, has] = look(r * P + p);
        out.push('<td class="c' + (has ? " has" : "") + '" data-r="' + r + '" data-p="' + p + '" style="background:' +
          bg + ";color:" + fg + '">' + text + "</td>");
      }
      return out.join("");
    };
    const rowsOf = [];  // [label html, class, cells(a, b), lens row or -1], top to bottom
    if (V.next) rowsOf.push(["next", "io next", (a, b) => ioCells(V.next, a, b), -1]);
    for (let r = R - 1; r >= 0; r--) rowsOf.push([esc(V.rows[r]), "", (a, b) => lensCells(r, a, b), r]);
    rowsOf.push(["input", "io input", (a, b) => ioCells(V.input, a, b), -1]);
    let look = scale(), from = Math.max(0, P - FIRST);
    performance.mark("reslens-decoded");
    const table = q("table.grid"), cells = new Array(R * P);
    // fixed column widths: the browser lays out hundreds of columns without measuring every cell
    table.style.width = W0 + W * (P - from) + "px";
    table.innerHTML = '<colgroup><col style="width:' + W0 + 'px"><col span="' + (P - from) + '" style="width:' + W +
      'px"></colgroup>' + rowsOf.map(([label, cls, html]) => '<tr class="' + cls + '"><th>' + label + "</th>" +
      html(from, P) + "</tr>").join("");
    const trs = table.querySelectorAll("tr");
    function keep(a, b) {  // the cells of positions a..b-1, just built
      rowsOf.forEach(([, , , r], k) => {
        if (r < 0) return;
        const tds = trs[k].children;
        for (let p = a; p < b; p++) cells[r * P + p] = tds[1 + p - from];
      });
    }
    keep(from, P);
    performance.mark("reslens-table");
    function more() {  // prepend the next CHUNK of earlier positions, keeping the view where it was
      if (from === 0) { window.reslensReady = true; return; }
      const a = Math.max(0, from - CHUNK), b = from, scroller = q(".scroll");
      rowsOf.forEach(([, , html], k) => trs[k].firstElementChild.insertAdjacentHTML("afterend", html(a, b)));
      from = a;
      keep(a, b);
      table.style.width = W0 + W * (P - from) + "px";
      table.querySelector("col[span]").span = P - from;
      scroller.scrollLeft += W * (b - a);
      setTimeout(more, 0);
    }

    // the colour scale of the chosen lens and metric (the legend says it); returns cell i's look
    function scale() {
      const L = lenses[state.lens], kind = METRICS[state.metric][1], m = L.m[state.metric];
      let lo = 0, hi = 1, what = "";
      if (kind === "rank") { hi = 4; what = "rank, log scale (dark = rank 0)"; }
      if (kind === "clip") {
        // the embedding row (100+ nats of KL) would swamp the scale: clip at the rows above it
        hi = quantile(R > 1 ? m.subarray(P) : m, 0.99) || 1;
        const max = Math.max(...Array.from(m).filter((x) => x === x));
        what = "clipped at " + fmt(hi) + ", the 99th percentile of the rows above the embedding (max " + fmt(max) + ")";
      }
      q(".lo").textContent = kind === "rank" ? "≥10⁴" : fmt(lo);
      q(".hi").textContent = kind === "rank" ? "0" : fmt(hi);
      q(".what").textContent = METRICS[state.metric][0] + (what ? "; " + what : "");
      return (i) => {
        const v = m[i], t = L.top[i * K];
        const x = kind === "rank" ? (v >= RANK_CAP ? 0 : 1 - Math.log10(v + 1) / hi) : (v - lo) / (hi - lo);
        const [bg, fg] = blue(x);
        return [bg, fg, NONE.has(t) ? "NaN" : CELL[t], L.changes.has(i)];
      };
    }
    function paint() {
      look = scale();
      for (let i = 0; i < R * P; i++) {
        const td = cells[i];
        if (!td) continue;
        const [bg, fg, text, has] = look(i);
        td.style.background = bg;
        td.style.color = fg;
        td.innerHTML = text;
        td.classList.toggle("has", has);
      }
    }

    function cellTip(r, p) {
      const L = lenses[state.lens], i = r * P + p;
      let h = "<b>" + esc(L.name) + ", row " + esc(V.rows[r]) + ", position " + p + "</b><br>input " +
        esc(tipText(tokenOf(V.input[p]) ?? "")) + '<ol class="topk">';
      for (let j = 0; j < K; j++) {
        const t = tokenOf(L.top[i * K + j]);
        if (t === null) continue;
        h += '<li><span class="tok">' + esc(tipText(t)) + '</span><span class="p">' + fmt(L.probs[i * K + j]) +
          "</span></li>";
      }
      h += "</ol>";
      if (V.next && "target_rank" in L.m) {
        h += '<div class="target">next ' + esc(tipText(tokenOf(V.next[p]) ?? "")) + ": rank <span class=rank>" +
          rankText(L.m.target_rank[i]) + "</span>, log p <span class=logp>" + fmt(L.m.target_logprob[i]) +
          "</span></div>";
      }
      h += "<div>" + esc(METRICS[state.metric][0]) + " " + fmt(L.m[state.metric][i]) + "</div>";
      if (L.changes.has(i)) h += "<div>click: why it changed</div>";
      return h;
    }

    function select(r, p) {
      state.sel = { r, p };
      table.querySelectorAll(".sel, .selp").forEach((e) => e.classList.remove("sel", "selp"));
      cells[r * P + p].classList.add("sel");
      table.querySelectorAll('tr.io td[data-p="' + p + '"]').forEach((e) => e.classList.add("selp"));
      drawTraj();
      drawCause();
    }

    function drawTraj() {
      const L = lenses[state.lens], { p, r } = state.sel, tr = L.traj, by = state.trajBy;
      const a = tr.off[p], b = tr.off[p + 1], W = 420, H = 190, left = 40, bottom = 24;
      const x = (row) => left + (R > 1 ? (row * (W - left - 10)) / (R - 1) : 0);
      const maxRank = 4;
      const y = (v) => (by === "prob" ? 8 + (1 - v) * (H - bottom - 8)
        : 8 + (Math.log10(Math.min(v, RANK_CAP) + 1) / maxRank) * (H - bottom - 8));
      const colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
        "#bcbd22", "#17becf"];
      let svg = '<svg width="' + W + '" height="' + H + '"><line x1="' + x(r) + '" x2="' + x(r) +
        '" y1="4" y2="' + (H - bottom) + '" stroke="#ff7f0e" stroke-dasharray="3 2"/>';
      const ticks = by === "prob" ? [0, 0.5, 1] : [0, 9, 99, 999];
      for (const t of ticks) svg += '<text x="2" y="' + (y(t) + 3) + '">' + t + "</text>";
      for (const rr of [0, Math.floor((R - 1) / 2), R - 1]) {
        svg += '<text x="' + (x(rr) - 6) + '" y="' + (H - 8) + '">' + esc(V.rows[rr]) + "</text>";
      }
      let keys = "";
      for (let j = a; j < b; j++) {
        let d = "", pen = false;
        for (let rr = 0; rr < R; rr++) {
          const v = by === "prob" ? tr.prob[j * R + rr] : tr.rank[j * R + rr];
          if (by === "prob" ? v === v : v < RANK_CAP) {
            d += (pen ? " L" : " M") + x(rr).toFixed(1) + "," + y(v).toFixed(1);
            pen = true;
          } else pen = false;
        }
        const c = colours[(j - a) % colours.length], tok = tokenOf(tr.tok[j]);
        svg += '<path fill="none" stroke-width="1.6" stroke="' + c + '" d="' + d.trim() + '"/>';
        keys += '<li data-token="' + esc(tok) + '"><i style="background:' + c + '"></i>' + esc(tipText(tok)) + "</li>";
      }
      svg += "</svg>";
      q(".traj").innerHTML = "<h2>Trajectories at position " + p + " <span>(" + esc(tipText(tokenOf(V.input[p]) ?? "")) +
        "; the distinct top-1 tokens of its rows; " + (by === "prob" ? "probability" : "rank, log scale") +
        (tr.exact ? "" : "; from the top-k only: a gap is a row where the token is not in it") + ")</span></h2>" +
        svg + '<ul class="keys">' + keys + "</ul>";
    }

    function drawCause() {
      const L = lenses[state.lens], { r, p } = state.sel, c = L.changes.get(r * P + p), box = q(".cause");
      if (!c) {
        const why = L.name !== "logit lens" && !L.changes.size ? "causes are split exactly for the logit lens only"
          : r === 0 ? "row 0 is the embedding: nothing was written before it"
          : "not precomputed for this cell (cells with causes are marked ◥)";
        box.innerHTML = "<h2>Why row " + esc(V.rows[r]) + " changed <span>(" + why + ")</span></h2>" +
          '<pre class="code">reslens.lens.lens_change(model, text, target=..., against=..., layers=(' +
          Math.max(0, r - 1) + ", " + Math.max(1, r) + "), position=" + p + ", tokenizer=tokenizer)</pre>";
        return;
      }
      const total = c.pieces.reduce((s, x) => s + x[2], 0), big = Math.max(...c.pieces.map((x) => Math.abs(x[2])));
      let h = "<h2>Why row " + esc(V.rows[r - 1]) + " → " + esc(V.rows[r]) + " changed <span>logit(" +
        esc(tipText(T[c.target])) + ") − logit(" + esc(tipText(T[c.against])) + "): " + fmt(c.from) + " → " +
        fmt(c.to) + ', change <span class="change">' + (c.to - c.from).toFixed(4) + "</span>; the " +
        c.pieces.length + ' pieces sum to <span class="sum">' + total.toFixed(4) + "</span></span></h2>" +
        '<ol class="pieces">';
      for (const [label, kind, v, trig] of c.pieces) {
        h += '<li class="' + (v >= 0 ? "pos" : "neg") + '" data-v="' + v + '" data-kind="' + kind + '"><span>' +
          esc(label) + "</span><span>" + (v >= 0 ? "+" : "") + v.toFixed(4) + '</span><span class="b" style="width:' +
          (100 * Math.abs(v) / (big || 1)).toFixed(1) + '%"></span>' +
          (trig.length ? '<span class="trig">' + trig.map(esc).join("\n") + "</span>" : "") + "</li>";
      }
      box.innerHTML = h + "</ol>";
    }

    table.addEventListener("mouseover", (ev) => {
      const td = ev.target.closest("td.c");
      if (td) showTip(cellTip(+td.dataset.r, +td.dataset.p), ev);
    });
    table.addEventListener("mouseleave", hideTip);
    table.addEventListener("click", (ev) => {
      const td = ev.target.closest("td.c");
      if (td) select(+td.dataset.r, +td.dataset.p);
    });
    lensSel.addEventListener("change", () => { state.lens = +lensSel.value; hideTip(); paint(); select(state.sel.r, state.sel.p); });
    metricSel.addEventListener("change", () => { state.metric = metricSel.value; paint(); });
    q("select.trajby").addEventListener("change", (ev) => { state.trajBy = ev.target.value; drawTraj(); });
    performance.mark("reslens-cells");
    select(state.sel.r, state.sel.p);
    performance.mark("reslens-selected");
    const scroller = q(".scroll");
    scroller.scrollLeft = scroller.scrollWidth;
    performance.mark("reslens-scrolled");
    addEventListener("reslens-painted", () => setTimeout(more, 0), { once: true });  // after the first paint
    root.reslens = { state, select, cells };
  }

  // --- the causal-trace view ---------------------------------------------------------------------------
  function traceView(V, root) {
    const [s0, s1] = V.subject, tok = (p) => tipText(V.tokens[p]) + (p >= s0 && p < s1 ? "*" : "");
    root.innerHTML = '<p class="note">p(' + esc(tipText(V.answer)) + ") clean " + fmt(V.clean) + ", corrupted " +
      fmt(V.corrupted) + "; colour = p(answer) with the cell restored (subject tokens starred)</p><div class=maps></div>";
    const maps = root.querySelector(".maps");
    V.maps.forEach((M, m) => {
      const L = M.restored.length, n = V.tokens.length;
      const hi = Math.max(V.clean, ...M.restored.flat().filter((v) => v !== null));
      let h = "<div><h2>" + esc(M.label) + '</h2><div class="scroll"><table class="grid trace" data-map="' + m + '">';
      for (let p = 0; p < n; p++) {
        h += "<tr><th>" + esc(cellText(V.tokens[p], 12) + (p >= s0 && p < s1 ? "*" : "")) + "</th>";
        for (let l = 0; l < L; l++) {
          const v = M.restored[l][p], [bg, fg] = blue(v === null ? NaN : (v - V.corrupted) / ((hi - V.corrupted) || 1));
          h += '<td class="c" data-l="' + l + '" data-p="' + p + '" style="background:' + bg + ";color:" + fg + '">&nbsp;</td>';
        }
        h += "</tr>";
      }
      h += '<tr class="io"><th>layer</th>' + M.restored.map((_, l) => "<td>" + (l % 5 ? "" : l) + "</td>").join("") + "</tr>";
      maps.insertAdjacentHTML("beforeend", h + "</table></div></div>");
    });
    maps.addEventListener("mouseover", (ev) => {
      const td = ev.target.closest("td.c");
      if (!td) return;
      const M = V.maps[+td.closest("table").dataset.map], l = +td.dataset.l, p = +td.dataset.p, v = M.restored[l][p];
      showTip("<b>" + esc(M.label) + ", layer " + l + ", token " + p + " " + esc(tok(p)) + "</b><br>restored p(" +
        esc(tipText(V.answer)) + ') <span class="restored">' + fmt(v) + '</span><br>indirect effect <span class="ie">' +
        fmt(v - V.corrupted) + "</span><br>clean " + fmt(V.clean) + ", corrupted " + fmt(V.corrupted), ev);
    });
    maps.addEventListener("mouseleave", hideTip);
  }

  // --- the head view ---------------------------------------------------------------------------------
  function headsView(V, root) {
    const pattern = V.pattern ? arr(V.pattern) : null, n = V.tokens ? V.tokens.length : 0;
    root.innerHTML = '<div class="heads"><div class="scores"></div><div class="pat">' + (pattern
      ? '<h2 class="ph">Attention pattern <span>(hover a head)</span></h2><canvas class="pattern" width="' + n +
        '" height="' + n + '" style="width:' + Math.min(420, Math.max(160, 6 * n)) + 'px"></canvas><p class="note">' +
        "rows: queries, columns: keys; tokens: " + esc(V.tokens.map(tipText).join(" ")) + "</p>"
      : '<p class="note">no attention pattern carried (explore(scores, patterns=...))</p>') + "</div></div>";
    const box = root.querySelector(".scores");
    V.scores.forEach((S, s) => {
      const vals = S.values.flat().filter((v) => v !== null), lo = Math.min(0, ...vals), hi = Math.max(...vals);
      let h = "<h2>" + esc(S.name) + " <span class=note>" + esc(S.description) + '</span></h2><table class="grid heads" data-s="' +
        s + '"><tr class="io"><th></th>' + S.values[0].map((_, j) => "<td>h" + j + "</td>").join("") + "</tr>";
      S.values.forEach((row, l) => {
        h += "<tr><th>L" + l + "</th>" + row.map((v, j) => {
          const [bg, fg] = blue(v === null ? NaN : (v - lo) / ((hi - lo) || 1));
          return '<td class="c" data-l="' + l + '" data-h="' + j + '" style="background:' + bg + ";color:" + fg + '">' +
            (v === null ? "" : v.toFixed(2)) + "</td>";
        }).join("") + "</tr>";
      });
      box.insertAdjacentHTML("beforeend", "<div>" + h + "</table></div>");
    });
    function drawPattern(l, hd) {
      const c = root.querySelector("canvas.pattern"), g = c.getContext("2d"), img = g.createImageData(n, n);
      const base = (l * V.scores[0].values[0].length + hd) * n * n;
      for (let i = 0; i < n * n; i++) {
        const [bg] = blue(pattern[base + i] / 255), rgb = bg.match(/\d+/g).map(Number);
        img.data.set([...rgb, 255], i * 4);
      }
      g.putImageData(img, 0, 0);
      c.dataset.head = l + "." + hd;
      root.querySelector(".ph").innerHTML = "Attention pattern of head " + l + "." + hd + " <span>(one prompt)</span>";
    }
    box.addEventListener("mouseover", (ev) => {
      const td = ev.target.closest("td.c");
      if (!td) return;
      const S = V.scores[+td.closest("table").dataset.s], l = +td.dataset.l, hd = +td.dataset.h;
      showTip("<b>head " + l + "." + hd + "</b><br>" + esc(S.name) + ' <span class="score">' + fmt(S.values[l][hd]) +
        "</span>", ev);
      if (pattern) drawPattern(l, hd);
    });
    box.addEventListener("mouseleave", hideTip);
  }

  // --- the page ----------------------------------------------------------------------------------------
  document.getElementById("holds").textContent = "This page holds: " + D.holds;
  const views = document.getElementById("views"), tabs = document.getElementById("tabs");
  const NAMES = { lens: "Lens", trace: "Causal trace", heads: "Heads" };
  const BUILD = { lens: lensView, trace: traceView, heads: headsView };
  D.views.forEach((V, i) => {
    const root = el("section", { class: "view " + V.kind, id: "view-" + i });
    views.appendChild(root);
    BUILD[V.kind](V, root);
    if (D.views.length > 1) {
      const b = el("button", { "data-view": i }, NAMES[V.kind]);
      b.addEventListener("click", () => {
        views.querySelectorAll(".view").forEach((v, j) => { v.hidden = j !== i; });
        tabs.querySelectorAll("button").forEach((x, j) => x.classList.toggle("on", j === i));
      });
      tabs.appendChild(b);
      root.hidden = i > 0;
    }
  });
  if (tabs.firstChild) tabs.firstChild.classList.add("on");
  if (!document.querySelector(".view.lens")) window.reslensReady = true;  // a lens view says when it is whole
  // the views are built: mark it, and mark again once the frame that shows them has been painted
  performance.mark("reslens-built");
  requestAnimationFrame(() => setTimeout(() => {
    performance.mark("reslens-painted");
    window.reslensPainted = true;
    dispatchEvent(new Event("reslens-painted"));
  }));
})();
