// upscaled web page: plain JavaScript, no build step. Everything shown comes from the JSON API;
// text from files (names, reasons) is only ever set as textContent, never as HTML, and passes
// through shown() first.
"use strict";

const body = document.body;
const READ_ONLY = body.dataset.readOnly === "true";
const TOKEN_REQUIRED = body.dataset.tokenRequired === "true";
const SCALE = Number(body.dataset.scale);
const UPLOAD_MAX = Number(body.dataset.uploadMaxMb) * 1024 * 1024;
const $ = (sel) => document.querySelector(sel);

// -- small helpers ---------------------------------------------------------------------------

// Names come from anyone who can write to the inbox. A newline in one would forge a line of a
// log box, a bidi override reverse what follows, ESC and friends hide in the text; a byte that
// is not UTF-8 arrives as a lone surrogate (see web/app.py JSONResponse). Each is shown as an
// escape (\n, \x1b, \u202e, \xff), as model/names.py shows names in the logs.
const UNSHOWN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}\p{Cs}]/gu;
function escapeChar(ch) {
  const o = ch.codePointAt(0);
  if (o >= 0xdc80 && o <= 0xdcff) return "\\x" + (o - 0xdc00).toString(16).padStart(2, "0");
  if (ch === "\n") return "\\n";
  if (ch === "\r") return "\\r";
  if (ch === "\t") return "\\t";
  if (o < 0x100) return "\\x" + o.toString(16).padStart(2, "0");
  return o < 0x10000 ? "\\u" + o.toString(16).padStart(4, "0") : "\\U" + o.toString(16).padStart(8, "0");
}
const shown = (text) => String(text ?? "").replace(UNSHOWN, escapeChar);
function setText(node, text) { node.textContent = shown(text); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) e.setAttribute(k, v);  // raw: the API's own name, sent back as it came
    else if (k === "title") e.title = shown(v);
    else e[k] = v;
  }
  for (const c of children.flat()) e.append(c instanceof Node ? c : document.createTextNode(shown(c)));
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "—";
  const u = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
const ms = (s) => (s === undefined || s === null) ? "—" : (s * 1000).toFixed(0) + " ms";
const px = (wh) => wh ? `${wh[0]}×${wh[1]}` : "";
const when = (iso) => iso ? new Date(iso).toLocaleTimeString() : "";
const short = (v) => v ? (v.length > 26 ? v.slice(0, 15) + "…" + v.slice(-8) : v) : "—";

function headers(extra) {
  const h = {"X-Upscaled-Request": "1", ...(extra || {})};  // the page's mark: see web/security.py
  const t = sessionStorage.getItem("upscaled-token");
  if (t) h["X-Upscaled-Token"] = t;
  return h;
}

async function getJSON(url) {
  // The token on reads too: with one configured, details (pids, tracebacks, folders) need it.
  const t = sessionStorage.getItem("upscaled-token");
  const r = await fetch(url, {headers: t ? {"Accept": "application/json", "X-Upscaled-Token": t} : {"Accept": "application/json"}});
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).error || r.statusText);
  return r.json();
}

async function post(url, data) {
  const r = await fetch(url, {method: "POST", headers: headers({"Content-Type": "application/json"}),
                              body: JSON.stringify(data || {})});
  const j = await r.json().catch(() => ({error: r.statusText}));
  return {ok: r.ok, status: r.status, json: j};
}

function say(text, bad) {
  const m = $("#msg");
  setText(m, text);
  m.className = bad ? "bad" : "good";
  m.hidden = false;
  clearTimeout(say.timer);
  say.timer = setTimeout(() => { m.hidden = true; }, 6000);
}

function problemText(res) {
  const j = res.json || {};
  if (j.error) return j.error;
  if (j.log) return j.log.filter(l => l.level !== "INFO" && l.level !== "DEBUG").map(l => l.text).join("\n");
  return "HTTP " + res.status;
}

// A line chart on a canvas: series of [x, y] points, min/max labels, no library.
function plot(canvas, series, opts) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 34;
  ctx.clearRect(0, 0, W, H);
  const pts = series.flatMap(s => s.points).filter(p => Number.isFinite(p[1]));
  canvas.dataset.points = String(pts.length);
  ctx.fillStyle = "#8a94a6";
  ctx.font = "11px sans-serif";
  if (!pts.length) { ctx.fillText((opts && opts.empty) || "no data yet", pad, H / 2); return; }
  let [x0, x1, y0, y1] = axes(pts);
  canvas.dataset.axes = [x0, x1, y0, y1].join(",");  // what the axes span, for people reading the DOM (and tests)
  canvas.dataset.series = series.map(s => `${s.label}:${s.points.filter(p => Number.isFinite(p[1])).length}`).join(",");
  const X = x => pad + (x - x0) / (x1 - x0) * (W - pad - 8);
  const Y = y => H - 18 - (y - y0) / (y1 - y0) * (H - 30);
  ctx.strokeStyle = "#cfd5df";
  ctx.beginPath(); ctx.moveTo(pad, 8); ctx.lineTo(pad, H - 18); ctx.lineTo(W - 8, H - 18); ctx.stroke();
  ctx.fillText(fmt(y1), 2, 14); ctx.fillText(fmt(y0), 2, H - 20);
  const xf = opts && opts.xfmt ? opts.xfmt : fmt;
  if (x1 - x0 === 2 && pts.every(p => p[0] === x0 + 1)) {  // one x: its label under it, no made-up ends
    const l = xf(x0 + 1);
    ctx.fillText(l, X(x0 + 1) - ctx.measureText(l).width / 2, H - 4);
  } else {
    ctx.fillText(xf(x0), pad, H - 4);
    const xl = xf(x1);
    ctx.fillText(xl, W - 8 - ctx.measureText(xl).width, H - 4);
  }
  let lx = pad + 8;
  for (const s of series) {
    ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
    ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.points.filter(p => Number.isFinite(p[1])).forEach((p, i) => i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1])));
    ctx.stroke();
    if (s.points.length === 1) { ctx.beginPath(); ctx.arc(X(s.points[0][0]), Y(s.points[0][1]), 3, 0, 7); ctx.fill(); }
    ctx.setLineDash([]);
    ctx.fillText(s.label, lx, 12); lx += ctx.measureText(s.label).width + 14;
    ctx.lineWidth = 1;
  }
}

// Axis ranges with room around the data: the lowest line (bicubic, under the model's) must not lie
// on the x axis, one point gets a range around it, and values that cannot be negative (a loss,
// PSNR) get no negative axis.
function axes(pts) {
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  const nonneg = y0 >= 0;
  const room = y1 > y0 ? (y1 - y0) * 0.08 : (Math.abs(y0) * 0.1 || 1);
  y0 -= room; y1 += room;
  if (nonneg && y0 < 0) y0 = 0;
  return [x0, x1, y0, y1];
}
const stepFmt = (x) => "step " + Math.round(x);
function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(3); }

// -- views -----------------------------------------------------------------------------------

const views = ["overview", "files", "compare", "make", "models", "train"];
function current() { const v = location.hash.slice(1).split("?")[0]; return views.includes(v) ? v : "overview"; }
function show() {
  const v = current();
  for (const name of views) {
    $("#view-" + name).hidden = name !== v;
    $("#nav-" + name).classList.toggle("active", name === v);
  }
  refresh(true);
}
window.addEventListener("hashchange", show);

let overview = null;
let refreshing = false;
async function refresh(now) {
  if (refreshing && !now) return;  // a slow answer: skip this tick rather than pile up requests
  refreshing = true;
  try {
    overview = await getJSON("/api/overview");
    renderOverview(overview);
    const v = current();
    if (v === "files" || v === "compare") await loadFiles();
    if (v === "make") await trackBatches();
    if (v === "models") await loadModels();
    if (v === "train") await loadTrain();
  } catch (e) {
    setText($("#daemon-pill"), "page: " + e.message);
  } finally {
    refreshing = false;
  }
}

// -- overview --------------------------------------------------------------------------------

function renderOverview(o) {
  const d = o.daemon, m = o.model, c = o.counts;
  const pill = $("#daemon-pill");
  pill.textContent = d.running ? (o.ready ? "daemon ready" : "daemon " + d.state) : "daemon not running";
  pill.className = "status-pill " + (o.ready ? "ok" : d.running ? "warn" : "bad");
  pill.title = shown(o.problems.join("; "));
  setText($("#ov-model-version"), m.version || "—");
  setText($("#ov-model-detail"), m.version ? `${m.origin || ""} ${m.file || ""} on ${m.device || "?"}, loaded ${when(m.loaded_at)}` : "");
  const f = $("#ov-figures");
  f.replaceChildren();
  if (m.figures && m.figures.psnr_y !== undefined) {
    f.append(el("span", {}, `validation PSNR-Y ${m.figures.psnr_y.toFixed(2)} dB`),
             el("span", {class: "dim"}, ` bicubic ${m.figures.bicubic_psnr_y.toFixed(2)} dB`),
             el("span", {class: m.figures.gain_db >= 0 ? "gain" : "loss"}, ` (${m.figures.gain_db >= 0 ? "+" : ""}${m.figures.gain_db.toFixed(2)} dB)`),
             m.figures.set ? el("span", {class: "dim"}, ` on ${m.figures.set}`) : "");
  } else if (m.probe) {
    f.append(el("span", {}, `probe PSNR-Y ${m.probe.psnr_y.toFixed(2)} dB`), el("span", {class: "dim"}, ` bicubic ${m.probe.bicubic_psnr_y.toFixed(2)} dB (no validation figures in this checkpoint)`));
  } else {
    f.append(el("span", {class: "dim"}, "no validation figures"));
  }
  const ev = [];
  if (m.loading) ev.push(`loading ${m.loading.file}: ${m.loading.step}`);
  if (m.refused) ev.push(`refused ${m.refused.file}: ${m.refused.reason}`);
  setText($("#ov-model-events"), ev.join(" · "));
  $("#ov-queued").textContent = c.queued ?? "—";
  $("#ov-inflight").textContent = c.in_flight ?? "—";
  $("#ov-processed").textContent = c.processed ?? "—";
  $("#ov-failed").textContent = c.failed ?? "—";
  $("#ov-failed-folder").textContent = c.failed_folder ?? "—";
  $("#ov-retrying").textContent = c.retrying ?? "—";
  const t = o.throughput || {};
  $("#ov-throughput").textContent = `${(t.images_per_min || 0).toFixed(1)} images/min · ${(t.output_mp_per_s || 0).toFixed(2)} output MP/s`;
  const t0 = o.now;
  plot($("#ov-chart"), [{label: "files done", color: "#2f6fdf", points: o.history.map(h => [h[0] - t0, h[1]])}],
       {xfmt: x => x === 0 ? "now" : Math.abs(x) < 120 ? `${Math.round(x)} s` : `${Math.round(x / 60)} min`});
  let any = false;
  const le = $("#ov-last-error"), lf = $("#ov-last-failed");
  setText(le, o.last_error ? `last error: ${o.last_error.file}: ${o.last_error.reason} (${when(o.last_error.time)})` : "");
  setText(lf, o.last_failed ? `last failed: ${o.last_failed.file}: ${o.last_failed.reason} (${when(o.last_failed.time)})` : "");
  any = !!(o.last_error || o.last_failed);
  $("#ov-retrying-list").replaceChildren(...o.retrying.map(r => el("li", {}, `retrying ${r.file}: ${r.problem} (attempt ${r.attempts}, next in ${r.next_in_s} s)`)));
  $("#ov-blocked-list").replaceChildren(...o.blocked.map(b => el("li", {}, `skipped ${b.file}: ${b.reason}`)));
  any = any || o.retrying.length || o.blocked.length;
  $("#ov-no-problems").hidden = !!any;
}

// -- files and retry -------------------------------------------------------------------------

let files = null;
async function loadFiles() {
  files = await getJSON("/api/files");
  const done = $("#files-done tbody");
  done.replaceChildren(...files.done.map(r => el("tr", {"data-output": r.output || "", "data-file": r.file || ""},
    el("td", {}, r.output && r.in_outbox !== false ? pickBox(r.output) : ""),
    el("td", {}, r.file || r.output || ""),
    el("td", {class: "state done"}, r.in_outbox === false ? "done (moved out)" : "done"),
    el("td", {}, `${px(r.size_in)} ${bytes(r.input_bytes)} → ${px(r.size_out)} ${bytes(r.output_bytes)}`),
    el("td", {}, ms(r.seconds.decode)), el("td", {}, ms(r.seconds.upscale)), el("td", {}, ms(r.seconds.encode)),
    el("td", {title: r.model_version || ""}, short(r.model_version)),
    el("td", {}, when(r.time)),
    el("td", {}, r.output && r.in_outbox !== false ? [el("a", {class: "compare-btn", href: "#compare?out=" + encodeURIComponent(r.output)}, "compare"), " ",
                                                      downloadLink(r.output)] : ""))));
  showPicked();
  const failed = $("#files-failed tbody");
  failed.replaceChildren(...files.failed.map(r => el("tr", {"data-file": r.file},
    el("td", {}, r.file), el("td", {class: "reason"}, r.reason), el("td", {}, r.stage || ""),
    el("td", {title: r.model_version || ""}, short(r.model_version)), el("td", {}, when(r.time)),
    el("td", {}, r.exists && !READ_ONLY ? el("button", {type: "button", class: "retry-btn", onclick: () => retry(r.file)}, "Retry") : ""))));
  const queued = $("#files-queued tbody");
  queued.replaceChildren(...files.queued.map(r => el("tr", {"data-file": r.file},
    el("td", {}, r.file), el("td", {class: "state " + r.state}, r.state),
    el("td", {}, r.state === "retrying" ? `${r.reason} (attempt ${r.attempts}, next in ${r.next_in_s} s)` : bytes(r.input_bytes)))));
  fillCompareSelect();
}

async function retry(file) {
  const res = await post("/api/retry", {file});
  if (res.ok) say(`${file} is back in the inbox as ${res.json.inbox}`);
  else say(`retry ${file}: ${problemText(res)}`, true);
  refresh();
}

// -- compare ---------------------------------------------------------------------------------

const cmp = {out: null, geo: null, zoom: null};
function fillCompareSelect() {
  const sel = $("#cmp-select");
  const outs = files.done.filter(r => r.output && r.in_outbox !== false).map(r => r.output);
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "").get("out");
  const have = [...sel.options].map(o => o.value);
  if (outs.join("\n") !== have.join("\n")) sel.replaceChildren(...outs.map(o => el("option", {value: o}, o)));
  if (wanted && outs.includes(wanted)) sel.value = wanted;
  $("#cmp-empty").hidden = outs.length > 0;
  $("#cmp-stage").hidden = outs.length === 0;
  if (current() === "compare" && sel.value && sel.value !== cmp.out) openCompare(sel.value);
}
$("#cmp-select").addEventListener("change", (e) => { location.hash = "compare?out=" + encodeURIComponent(e.target.value); });

async function openCompare(out) {
  cmp.out = out; cmp.zoom = null;
  const g = await getJSON("/api/compare?out=" + encodeURIComponent(out));
  cmp.geo = g;
  setText($("#cmp-info"), `${g.width}×${g.height} output` + (g.model_version ? `, model ${short(g.model_version)}` : "") +
    (g.before_available ? "" : ` — ${g.why_no_before}`));
  showFit();
}

function q(side, extra) { return "/api/preview?out=" + encodeURIComponent(cmp.out) + "&side=" + side + (extra || ""); }

function showFit() {
  const g = cmp.geo;
  cmp.zoom = null;
  $("#cmp-mode").textContent = "fit";
  const stage = $("#cmp-stage");
  stage.classList.remove("zoomed");
  // As large as the window allows, width and height (a portrait output fits too, slider in
  // view); small previews enlarged up to 2x, both images alike.
  const top = stage.getBoundingClientRect().top + window.scrollY;
  const room = Math.max(160, window.innerHeight - (top - window.scrollY) - 48);
  let w = Math.min(1000, stage.parentElement.clientWidth - 4, 2 * g.fit_width);
  if (w * g.fit_height / g.fit_width > room) w = Math.floor(room * g.fit_width / g.fit_height);
  setStage(w, Math.round(w * g.fit_height / g.fit_width), q("before"), q("after"), g.before_available);
}

function setStage(w, h, before, after, hasBefore) {
  const stage = $("#cmp-stage");
  stage.style.width = w + "px"; stage.style.height = h + "px";
  $("#cmp-slider").style.width = w + "px";
  const b = $("#cmp-before"), a = $("#cmp-after");
  for (const img of [a, b]) { img.style.width = w + "px"; img.style.height = h + "px"; }
  if (hasBefore) { b.src = before; b.hidden = false; } else { b.removeAttribute("src"); b.hidden = true; }
  a.src = after;
  slide();
}

function slide() {
  const v = $("#cmp-slider").value;
  $("#cmp-after-wrap").style.clipPath = `inset(0 0 0 ${v}%)`;
  $("#cmp-handle").style.left = v + "%";
}
// The divider itself can be dragged, on the image (the slider below does the same).
let dragged = false;
$("#cmp-handle").addEventListener("pointerdown", (e) => {
  e.preventDefault(); e.stopPropagation();
  const h = e.currentTarget;
  dragged = false;
  h.setPointerCapture(e.pointerId);
  const move = (ev) => {
    const r = $("#cmp-stage").getBoundingClientRect();
    dragged = true;
    $("#cmp-slider").value = String(Math.max(0, Math.min(100, (ev.clientX - r.left) / r.width * 100)));
    slide();
  };
  const up = () => { h.removeEventListener("pointermove", move); h.removeEventListener("pointerup", up); };
  h.addEventListener("pointermove", move);
  h.addEventListener("pointerup", up);
});
$("#cmp-handle").addEventListener("click", (e) => { if (dragged) e.stopPropagation(); dragged = false; });  // a drag is not a zoom click; a plain click is
$("#cmp-slider").addEventListener("input", slide);
$("#cmp-fit").addEventListener("click", showFit);

// Click: 1:1 pixels of the output around that point (a crop made by the server).
$("#cmp-stage").addEventListener("click", (e) => {
  const g = cmp.geo;
  if (!g) return;
  const r = e.currentTarget.getBoundingClientRect();
  let ox, oy;
  if (cmp.zoom) { ox = cmp.zoom.x + (e.clientX - r.left); oy = cmp.zoom.y + (e.clientY - r.top); }
  else { ox = (e.clientX - r.left) / r.width * g.width; oy = (e.clientY - r.top) / r.height * g.height; }
  const cw = Math.min(g.crop_max, g.width), ch = Math.min(g.crop_max, g.height);
  // Aligned to 64 px so that nearby clicks reuse the server's cached crops.
  const x = Math.max(0, Math.min(g.width - cw, Math.round((ox - cw / 2) / 64) * 64));
  const y = Math.max(0, Math.min(g.height - ch, Math.round((oy - ch / 2) / 64) * 64));
  cmp.zoom = {x, y};
  $("#cmp-mode").textContent = `1:1 at ${x},${y}`;
  $("#cmp-stage").classList.add("zoomed");
  const extra = `&x=${x}&y=${y}&w=${cw}&h=${ch}`;
  setStage(cw, ch, q("before", extra), q("after", extra), g.before_available);
});

// -- make (uploads) --------------------------------------------------------------------------

async function upload(fileList) {
  const list = $("#make-list");
  const form = new FormData();
  // This upload's own output size and format (output.scale or long_side, output.format): the
  // fields come first, so the server has them before the files; empty = as configured.
  const [sizeKey, sizeValue] = $("#make-size").value.split(":");
  if (sizeKey) form.append(sizeKey, sizeValue);
  if ($("#make-format").value) form.append("format", $("#make-format").value);
  let n = 0;
  for (const f of fileList) {
    if (f.size > UPLOAD_MAX) { list.prepend(el("li", {class: "bad"}, `${f.name}: larger than the upload limit`)); continue; }
    form.append("files", f, f.name); n++;
  }
  if (!n) return;
  const item = el("li", {}, `uploading ${n} file(s)…`);
  const since = new Date(Date.now() - 2000).toISOString().replace(/\.\d+Z$/, "+00:00");  // the daemon's clock, to the second
  list.prepend(item);
  const r = await fetch("/api/upload", {method: "POST", headers: headers(), body: form});
  const j = await r.json().catch(() => ({error: r.statusText}));
  if (j.error) { setText(item, "upload refused: " + j.error); item.className = "bad"; return; }
  item.remove();
  startBatch(j.files, since);
  refresh();
}
$("#make-input").addEventListener("change", (e) => { upload(e.target.files); e.target.value = ""; });
const drop = $("#make-drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files); });

// -- downloads and upload batches --------------------------------------------------------------

const dl = (out) => "/api/download?out=" + encodeURIComponent(out);
const zipOf = (outs, name) => "/api/download.zip?" + outs.map(o => "out=" + encodeURIComponent(o)).join("&") + "&name=" + encodeURIComponent(name);
function downloadLink(out) { return el("a", {class: "download-btn", href: dl(out), download: ""}, "download"); }

// Files: outputs ticked for one zip; the ticks outlive the table's refreshes.
const picked = new Set();
function pickBox(out) {
  return el("input", {type: "checkbox", class: "pick", checked: picked.has(out), "aria-label": "select " + out,
                      onchange: (e) => { e.target.checked ? picked.add(out) : picked.delete(out); showPicked(); }});
}
function showPicked() {
  const live = new Set((files ? files.done : []).map(r => r.output));
  for (const o of [...picked]) if (!live.has(o)) picked.delete(o);
  const a = $("#files-zip");
  a.hidden = picked.size === 0;
  a.textContent = `download ${picked.size} selected (.zip)`;
  a.href = zipOf([...picked], "upscaled-selection");
}

// Make: each upload is a batch; each file goes queued → working → done (or failed), from the
// daemon's records, with a link to its output, and the batch's outputs as one zip.
const batches = [];
function startBatch(results, since) {
  const b = {since, files: results, box: el("li", {class: "batch"}), states: {}};
  batches.unshift(b);
  $("#make-list").prepend(b.box);
  drawBatch(b);
}
function drawBatch(b) {
  const ok = b.files.filter(f => f.ok);
  const outs = ok.map(f => (b.states[f.saved_as] || {}).output).filter(Boolean);
  const finished = ok.every(f => ["done", "failed"].includes((b.states[f.saved_as] || {}).state));
  const req = (ok[0] || {}).request;  // the same for every file of an upload
  const asked = req ? " (" + Object.entries(req).map(([k, v]) => `${k.replace("_", " ")} ${v}`).join(", ") + ")" : "";
  const head = el("div", {class: "batch-head"}, `${when(b.since)}: ${ok.length} file(s)${asked} ${finished ? "finished" : "in the inbox"}`,
    outs.length ? [" · ", el("a", {class: "batch-zip", href: zipOf(outs, "upscaled-batch"), download: ""}, `download ${outs.length} output(s) (.zip)`)] : "");
  const rows = b.files.map(f => {
    if (!f.ok) return el("li", {class: "bad upload-refused", "data-name": f.name}, `${f.name}: refused: ${f.reason}`);
    const s = b.states[f.saved_as] || {state: "queued"};
    const text = s.state === "done" ? `${f.name}: done → ${s.output}` : s.state === "failed" ? `${f.name}: failed: ${s.reason}`
      : s.state === "working" ? `${f.name}: being upscaled` : `${f.name}: queued in the inbox` + (f.saved_as !== f.name ? ` as ${f.saved_as}` : "");
    return el("li", {class: "upload-ok state-" + s.state + (s.state === "failed" ? " bad" : " good"), "data-name": f.name, "data-state": s.state},
      text, s.state === "done" && s.in_outbox ? [" ", downloadLink(s.output)] : "");
  });
  b.box.replaceChildren(head, el("ul", {class: "plain"}, ...rows));
  b.finished = finished;
}
async function trackBatches() {
  for (const b of batches) {
    if (b.finished) continue;
    const names = b.files.filter(f => f.ok).map(f => f.saved_as);
    if (!names.length) { b.finished = true; continue; }
    const j = await getJSON("/api/upload/progress?since=" + encodeURIComponent(b.since) + "&" + names.map(n => "file=" + encodeURIComponent(n)).join("&"));
    for (const s of j.files) b.states[s.file] = s;
    drawBatch(b);
  }
}

// -- models ----------------------------------------------------------------------------------

// The `current` pointer says what the daemon should serve; whether it does is its own word.
function currentNote(r, running) {
  if (r.refused) return el("span", {class: "loss", title: r.refused.time || ""}, "current, refused by the daemon: " + r.refused.reason);
  return el("span", {class: "dim"}, r.served || !running ? "current" : "current (not served yet)");
}

async function loadModels() {
  const j = await getJSON("/api/models");
  const tb = $("#models-table tbody");
  tb.replaceChildren(...j.models.map(r => {
    const f = r.figures || {};
    const action = READ_ONLY || r.problem ? "" : r.origin === "run"
      ? el("button", {type: "button", class: "promote-btn", onclick: () => promote(r.name)}, "Promote")
      : r.current ? currentNote(r, j.daemon_running) : el("button", {type: "button", class: "serve-btn", onclick: () => rollback(r.origin === "bundled" ? r.name : r.version)}, "Serve");
    return el("tr", {"data-name": r.name, "data-version": r.version || "", class: r.served ? "served" : ""},
      el("td", {title: r.version || ""}, (r.served ? "▶ " : "") + (r.origin === "published" ? short(r.version) : r.name)),
      el("td", {}, r.origin), el("td", {}, r.step ?? ""),
      el("td", {}, f.psnr_y !== undefined ? f.psnr_y.toFixed(2) : "—"),
      el("td", {}, f.bicubic_psnr_y !== undefined ? f.bicubic_psnr_y.toFixed(2) : "—"),
      el("td", {class: f.gain_db === undefined ? "" : f.gain_db >= 0 ? "gain" : "loss"}, f.gain_db !== undefined ? (f.gain_db >= 0 ? "+" : "") + f.gain_db.toFixed(2) : "—"),
      el("td", {}, f.ssim_y !== undefined ? f.ssim_y.toFixed(4) : "—"),
      el("td", {title: f.fingerprint || ""}, (r.same_set ? "≡ " : "") + (f.set || r.problem || "—")),
      el("td", {}, action));
  }));
  drawLearning(j.learning);
  await loadRuns($("#models-runs"), false);
}

// `upscaled learn`: the material kept, the last run's table and decision, its before/after crop.
const dB = (v) => typeof v === "number" ? v.toFixed(3) + " dB" : "—";
function drawLearning(L) {
  if (!L) return;
  setText($("#learning-material"), L.on
    ? `Kept for learning: ${L.files} file${L.files === 1 ? "" : "s"}, ${L.mb.toFixed(1)} MB of learn.keep_mb ${L.keep_mb} MB (kept at most ${L.keep_days} days)`
    : `Learning is off (learn.keep_mb: 0): the daemon keeps nothing` + (L.files ? ` (${L.files} files, ${L.mb.toFixed(1)} MB still in the folder)` : ""));
  const last = L.last;
  const table = $("#learning-table");
  table.hidden = !last;
  $("#learning-crop").hidden = !(last && L.crop);
  if (!last) {
    setText($("#learning-last"), L.problem || "upscaled learn has not run yet.");
    setText($("#learning-decision"), "");
    return;
  }
  setText($("#learning-last"), `Last learn: ${last.time ? new Date(last.time).toLocaleString() : "—"}, ${last.steps ?? "?"} steps in ${last.minutes ?? "?"} min, `
    + `${last.train_images ?? "?"} images trained on, ${last.slice_images ?? "?"} held out; served ${short(last.served)}, candidate ${short(last.candidate)}`);
  table.querySelector("tbody").replaceChildren(...last.rows.map(r => {
    const change = typeof r.served === "number" && typeof r.candidate === "number" ? r.candidate - r.served : null;
    return el("tr", {"data-set": r.set}, el("td", {}, r.set), el("td", {}, r.images ?? ""), el("td", {}, dB(r.served)),
      el("td", {}, dB(r.candidate)),
      el("td", {class: change === null ? "" : change >= 0 ? "gain" : "loss"}, change === null ? "—" : (change >= 0 ? "+" : "") + change.toFixed(3) + " dB"));
  }));
  const box = $("#learning-decision");
  box.className = last.decision === "published" ? "gain" : last.decision === "refused" ? "loss" : "";
  setText(box, `${last.decision}: ${last.reason}` + (last.published ? ` (now ${last.published})` : ""));
  if (L.crop) {
    const img = $("#learning-crop img");
    const url = "/api/learn/crop?v=" + encodeURIComponent(L.crop.v);
    if (img.getAttribute("src") !== url) img.src = url;
    setText($("#learning-crop figcaption"), `${(L.crop.panels || []).join(" | ")}: ${L.crop.image || ""}, held out (never trained on)`);
  }
}

function showLog(res, what) {
  const box = $("#models-log");
  box.hidden = false;
  box.className = "log " + (res.ok ? "good" : "bad");
  const lines = (res.json.log || []).map(l => `${l.level.toLowerCase()}: ${l.text}`);
  if (res.json.error) lines.push(res.json.error);
  box.textContent = [`${what}: ${res.ok ? "done" : "refused"}`, ...lines].map(shown).join("\n");  // a line per line
}

async function promote(name) {
  say(`verifying ${name}…`);
  const res = await post("/api/promote", {checkpoint: name, force: $("#models-force").checked});
  showLog(res, "promote " + name);
  say(res.ok ? `${name} promoted: the daemon verifies it and swaps it in` : `${name} not promoted (see above)`, !res.ok);
  refresh();
}
async function rollback(version) {
  const res = await post("/api/rollback", version ? {version} : {});
  showLog(res, version ? "serve " + version : "roll back");
  say(res.ok ? "done: the daemon picks up the change by itself" : "refused (see above)", !res.ok);
  refresh();
}
$("#models-rollback").addEventListener("click", () => rollback(null));

// -- runs and training -----------------------------------------------------------------------

function curveSeries(c) {
  return {
    loss: [{label: "L1", color: "#2f6fdf", points: c.train.map(p => [p.step, p.l1])},
           {label: "generator loss", color: "#d9822b", points: c.train.filter(p => p.loss_g !== p.l1).map(p => [p.step, p.loss_g])}],
    val: [{label: "model", color: "#2f9d5a", points: c.val.map(p => [p.step, p.psnr_y])},
          {label: "bicubic", color: "#d9822b", dash: [6, 4], points: c.val.map(p => [p.step, p.bicubic_psnr_y])}],
  };
}

const runCache = {};
async function loadRuns(box, withControls) {
  const j = await getJSON("/api/runs");
  const keep = new Set(j.runs.map(r => r.name));
  for (const child of [...box.children]) if (!keep.has(child.dataset.run)) child.remove();
  for (const r of j.runs) {
    let card = box.querySelector(`[data-run="${CSS.escape(r.name)}"]`);
    if (!card) {
      card = el("div", {class: "run card", "data-run": r.name},
        el("h3", {}, r.name), el("div", {class: "run-state"}),
        el("canvas", {class: "run-curve", width: 420, height: 140}),
        el("img", {class: "run-sample", alt: "latest sample sheet", hidden: true}),
        el("div", {class: "run-actions"}));
      box.append(card);
    }
    setText(card.querySelector(".run-state"), `${r.state}, step ${r.step}${r.steps ? " of " + r.steps : ""}` +
      (r.best !== null ? `, best PSNR-Y ${r.best.toFixed(2)} dB` : ""));
    const d = await getJSON("/api/runs/" + encodeURIComponent(r.name));
    runCache[r.name] = d;
    plot(card.querySelector(".run-curve"), curveSeries(d.curve).val, {empty: "no validation yet", xfmt: stepFmt});
    const img = card.querySelector(".run-sample");
    if (withControls) img.hidden = true;  // the Train view shows the run's sheet once, under "Latest samples"
    else if (r.samples.length) {
      const src = `/api/sample?run=${encodeURIComponent(r.name)}&file=${encodeURIComponent(r.samples[r.samples.length - 1])}`;
      if (img.getAttribute("src") !== src) img.src = src;
      img.hidden = false;
    }
    const actions = card.querySelector(".run-actions");
    actions.replaceChildren();
    if (!READ_ONLY && r.resumable && !j.training.running)
      actions.append(el("button", {type: "button", class: "resume-btn", onclick: () => resume(r.name)}, "Resume"));
    if (!READ_ONLY && !withControls)
      for (const ck of r.checkpoints) actions.append(el("button", {type: "button", class: "promote-btn", onclick: () => promote(`${r.name}/${ck}`)}, `Promote ${ck.replace(".safetensors", "")}`));
  }
  return j;
}

async function loadTrain() {
  const st = await getJSON("/api/train");
  const s = $("#train-state");
  setText(s, st.running ? `training: ${st.run} (${st.phase}${st.pid ? ", pid " + st.pid : ""})` : (st.last_exit ? `last run ${st.last_exit.run}: ${st.last_exit.what}` : "no run going"));
  s.dataset.running = String(!!st.running);
  $("#train-start").disabled = !!st.running || READ_ONLY;
  $("#train-stop").disabled = !st.running || READ_ONLY;
  const scale = st.defaults.scale;
  $("#train-crop-in").textContent = `crop in (LR): ${Math.floor(Number($("#train-crop").value) / scale)} px`;
  trainNotes(st.defaults);  // not awaited: the first estimate measures for a few seconds
  const j = await loadRuns($("#train-runs"), true);
  const name = st.run || (j.runs[0] && j.runs[0].name);
  const d = name && runCache[name];
  if (d) {
    const c = curveSeries(d.curve);
    plot($("#train-loss"), c.loss, {xfmt: stepFmt});
    plot($("#train-val-curve"), c.val, {empty: "no validation yet", xfmt: stepFmt});
    const img = $("#train-sample");
    $("#train-sample-run").textContent = name;
    if (d.samples.length) {
      const src = `/api/sample?run=${encodeURIComponent(name)}&file=${encodeURIComponent(d.samples[d.samples.length - 1])}`;
      if (img.getAttribute("src") !== src) img.src = src;
      img.hidden = false;
      $("#train-sample-none").hidden = true;
    } else {  // a run just started: none of its own yet, and never the last run's
      img.removeAttribute("src");
      img.hidden = true;
      $("#train-sample-none").hidden = false;
    }
  }
}

// What a run would cost here: a short probe of real training steps at the form's batch and crop
// (measured by the page's server once per size), times the steps asked for.
const estimates = {};
let stepsTouched = false;
$("#train-steps").addEventListener("input", () => { stepsTouched = true; });
async function trainNotes(defaults) {
  const note = $("#train-root-note");
  note.hidden = !!defaults.data_root;
  note.textContent = defaults.data_root ? "" : "This page trains only on the configured folders (trainer.data" +
    (defaults.data ? ` = ${defaults.data}` : ", not set") + "; trainer.val" + (defaults.val ? ` = ${defaults.val}` : ", not set") +
    "). To name other folders here, set web.data_root to the folder holding them — config.yaml: web: {data_root: /path/to/data}, " +
    "or upscaled web --set web.data_root=/path/to/data — and restart upscaled web.";
  const batch = Number($("#train-batch").value), crop = Number($("#train-crop").value);
  const key = batch + "x" + crop;
  if (!(key in estimates)) {
    estimates[key] = null;  // one probe at a time per size
    $("#train-estimate").textContent = "measuring a few training steps for an estimate…";
    try { estimates[key] = await getJSON(`/api/train/estimate?batch=${batch}&crop=${crop}`); }
    catch (e) { delete estimates[key]; $("#train-estimate").textContent = "no estimate: " + e.message; return; }
  }
  const p = estimates[key];
  if (!p) return;
  if (!stepsTouched && Number($("#train-steps").value) !== p.suggested_steps) $("#train-steps").value = p.suggested_steps;
  const steps = Number($("#train-steps").value) || 0;
  const pre = Math.min(steps, p.pretrain_steps), gan = steps - pre;
  const secs = pre * p.pretrain_s + gan * p.gan_s;
  const dur = secs < 5400 ? `${Math.round(secs / 60)} min` : `${(secs / 3600).toFixed(1)} h`;
  $("#train-estimate").textContent = `≈ ${dur} for ${steps} steps on ${p.device} (${pre} pre-training at ${p.pretrain_s.toFixed(2)} s, ` +
    `${gan} GAN at ${p.gan_s.toFixed(2)} s per step, measured here; validation adds to it)` +
    (p.device === "cpu" ? `. On a CPU, ${p.suggested_steps} steps starting from the served model is a sensible run.` : "");
}

$("#train-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const data = Object.fromEntries(new FormData(e.target).entries());
  data.init_current = $("#train-init-current").checked;
  const res = await post("/api/train/start", data);
  if (res.ok) say(`training run ${res.json.run} started (${res.json.params.steps} steps)`);
  else say("not started: " + problemText(res), true);
  refresh();
});
$("#train-stop").addEventListener("click", async () => {
  const res = await post("/api/train/stop", {});
  say(res.ok ? `stopping ${res.json.run}: it saves its state` : "stop: " + problemText(res), !res.ok);
  refresh();
});
async function resume(name) {
  const res = await post("/api/train/resume", {run: name});
  say(res.ok ? `resumed ${name}` : "resume: " + problemText(res), !res.ok);
  refresh();
}
$("#train-crop").addEventListener("input", () => refresh());

// -- start -----------------------------------------------------------------------------------

if (READ_ONLY) for (const w of document.querySelectorAll(".writes")) w.classList.add("disabled");
if (TOKEN_REQUIRED && !READ_ONLY) {
  const box = $("#token-box");
  box.hidden = false;
  const input = $("#token");
  input.value = sessionStorage.getItem("upscaled-token") || "";
  input.addEventListener("change", () => sessionStorage.setItem("upscaled-token", input.value.trim()));
}
show();
setInterval(refresh, 1500);
