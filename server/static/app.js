// The demo page: one image query over HTTP, or a video streamed frame by frame
// over the websocket; both render the same result view (thumbnails, positions,
// timings). Plain browser JavaScript, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_INTERVAL_MS = 200;       // ~5 frames/s sent while a video plays
const FRAME_MAX_SIDE = 640;          // frames are downscaled before JPEG encoding
const FRAME_QUALITY = 0.8;
const MAX_BUFFERED_BYTES = 1 << 20;  // skip a frame while the socket is this backed up

// ---- small helpers -----------------------------------------------------------
function topK() {
  const n = parseInt($("top-k").value, 10);
  return Number.isFinite(n) && n > 0 ? n : 5;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function num(v) {
  const n = typeof v === "string" && v.trim() !== "" ? Number(v) : v;
  return typeof n === "number" && Number.isFinite(n) ? n : null;
}

function first(obj, keys) {
  if (!obj || typeof obj !== "object") return null;
  for (const k of keys) {
    const v = num(obj[k]);
    if (v !== null) return v;
  }
  return null;
}

// A result's position, whatever the server calls its fields: {e, n, zone, lat, lon}.
function positionOf(r) {
  const p = (r && typeof r.position === "object" && r.position) || {};
  const src = [p, r];
  const pick = (keys) => { for (const o of src) { const v = first(o, keys); if (v !== null) return v; } return null; };
  let e = pick(["easting", "utm_e", "e", "x"]);
  let n = pick(["northing", "utm_n", "n", "y"]);
  if (Array.isArray(p.utm) && p.utm.length === 2) { e = num(p.utm[0]); n = num(p.utm[1]); }
  let lat = pick(["lat", "latitude"]);
  let lon = pick(["lon", "lng", "longitude"]);
  if (Array.isArray(p.latlon) && p.latlon.length === 2) { lat = num(p.latlon[0]); lon = num(p.latlon[1]); }
  const zone = p.utm_zone || p.zone || r.utm_zone || null;
  return { e, n, zone, lat, lon };
}

// The position as short non-breaking parts: ["E 500065.0", "N 4000175.0"] (UTM
// metres; the zone goes in the tooltip), else latitude and longitude.
function positionParts(pos) {
  if (pos.e !== null && pos.n !== null) {
    return [`E ${pos.e.toFixed(1)}`, `N ${pos.n.toFixed(1)}`];
  }
  if (pos.lat !== null && pos.lon !== null) return [`${pos.lat.toFixed(5)},`, `${pos.lon.toFixed(5)}`];
  return ["no position"];
}

// An error response's message: FastAPI's {"detail": ...} (string or list of
// validation errors), or the status line when the body is not JSON.
async function errorMessage(resp) {
  let text = "";
  try { text = await resp.text(); } catch (_) { /* body unreadable */ }
  let detail = null;
  try {
    const body = JSON.parse(text);
    detail = body.detail !== undefined ? body.detail : (body.error || body.message);
  } catch (_) { detail = text.trim().slice(0, 300) || null; }
  if (Array.isArray(detail)) {
    detail = detail.map((d) => (d && d.msg ? `${(d.loc || []).join(".")}: ${d.msg}` : JSON.stringify(d))).join("; ");
  } else if (detail && typeof detail === "object") {
    detail = JSON.stringify(detail);
  }
  return `Error ${resp.status}${resp.statusText ? " " + resp.statusText : ""}: ${detail || "request failed"}`;
}

// ---- rendering -----------------------------------------------------------------
function setVersions(data) {
  if (data && data.model) $("model-version").textContent = data.model;
  if (data && data.index) $("index-version").textContent = data.index;
}

function renderTimings(t, clientMs) {
  t = t || {};
  for (const td of $("timings").querySelectorAll("td[data-key]")) {
    const key = td.dataset.key;
    const v = key === "client" ? num(clientMs) : first(t, [key, key + "_ms"]);
    td.textContent = v === null ? "–" : `${v.toFixed(1)} ms`;
  }
}

// Enough decimals that distinct neighbouring scores read differently (3 to 6).
function scoreDigits(scores) {
  let digits = 3;
  const clash = (d) => scores.some((s, i) => i > 0 && s !== scores[i - 1] && s.toFixed(d) === scores[i - 1].toFixed(d));
  while (digits < 6 && clash(digits)) digits += 1;
  return digits;
}

function renderResults(results) {
  const digits = scoreDigits(results.map((r) => num(r.score)).filter((s) => s !== null));
  const list = $("results");
  list.replaceChildren();
  $("no-results").hidden = results.length > 0;
  if (!results.length) $("no-results").textContent = "The index returned no match.";
  results.forEach((r, i) => {
    const rank = num(r.rank) ?? i + 1;
    const id = r.id ?? r.place_id;
    const score = num(r.score);
    const pos = positionOf(r);
    const label = r.label ?? r.place_label ?? "";
    const path = r.path ?? r.image_path ?? r["image path"] ?? "";

    const li = document.createElement("li");
    li.className = "result" + (i === 0 ? " top1" : "");
    li.dataset.id = String(id);
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = `match ${rank}: ${label || path || id}`;
    img.loading = "eager";
    img.decoding = "async";
    img.src = `/v1/places/${encodeURIComponent(id)}/image`;
    if (path) img.title = path;
    const info = document.createElement("div");
    info.className = "info";
    info.innerHTML = `<span class="rank"></span><span class="score"></span>` +
                     `<div class="label"></div><div class="pos"></div>`;
    info.querySelector(".rank").textContent = `#${rank}`;
    info.querySelector(".score").textContent = score === null ? "" : score.toFixed(digits);
    info.querySelector(".label").textContent = label || path || `id ${id}`;
    if (pos.zone) info.querySelector(".pos").title = `UTM zone ${pos.zone}`;
    for (const part of positionParts(pos)) {
      const span = document.createElement("span");
      span.textContent = part;
      info.querySelector(".pos").append(span);
    }
    li.append(img, info);
    list.append(li);
  });
  renderPlot(results, stream.trail);
}

const SVG_NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// A place's position as a plot point {x, y, unit}, or null without one.
function plotPoint(r) {
  const p = positionOf(r);
  if (p.e !== null && p.n !== null) return { x: p.e, y: p.n, unit: "m" };
  if (p.lat !== null && p.lon !== null) return { x: p.lon, y: p.lat, unit: "°" };
  return null;
}

// Scatter of the matches' positions (UTM metres, else lat/lon), equal scale on
// both axes so distances read true; the top match is drawn last, in red. While
// a stream is tracked, `trail` (its latest `track` objects) is drawn as a line
// ending in a square at the tracked place.
function renderPlot(results, trail) {
  const box = $("plot");
  box.replaceChildren();
  const pts = [];
  results.forEach((r, i) => {
    const q = plotPoint(r);
    if (q) pts.push({ ...q, i, rank: num(r.rank) ?? i + 1 });
  });
  const unitOf = pts.length ? pts[0].unit : null;
  const track = (trail || []).map(plotPoint).filter((q) => q && (unitOf === null || q.unit === unitOf));
  if (!pts.length && !track.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = results.length ? "The matches carry no positions." : "–";
    box.append(p);
    return;
  }
  const W = 280, H = 220, pad = 26;
  const all = pts.concat(track);
  let [x0, x1, y0, y1] = [Math.min(...all.map((p) => p.x)), Math.max(...all.map((p) => p.x)),
                          Math.min(...all.map((p) => p.y)), Math.max(...all.map((p) => p.y))];
  const span = Math.max(x1 - x0, y1 - y0, all[0].unit === "m" ? 10 : 1e-4);
  const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
  const scale = Math.min(W - 2 * pad, H - 2 * pad) / (span * 1.1);
  const sx = (x) => W / 2 + (x - cx) * scale;
  const sy = (y) => H / 2 - (y - cy) * scale;

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "positions of the matches" });
  root.append(svg("line", { class: "axis", x1: pad / 2, y1: H - pad / 2, x2: W - pad / 2, y2: H - pad / 2 }));
  root.append(svg("line", { class: "axis", x1: pad / 2, y1: pad / 2, x2: pad / 2, y2: H - pad / 2 }));
  const unit = all[0].unit;
  const spanText = unit === "m" ? `${(span * 1.1).toFixed(0)} m across` : `${(span * 1.1).toFixed(5)}° across`;
  root.append(svg("text", { x: W - pad / 2, y: H - 4, "text-anchor": "end" }, spanText));
  root.append(svg("text", { x: pad / 2 + 3, y: pad / 2 + 8 }, unit === "m" ? "N ↑  E →" : "lat ↑  lon →"));

  const ordered = pts.slice().sort((a, b) => b.i - a.i);  // top-1 last, on top
  for (const p of ordered) {
    const top = p.i === 0;
    const c = svg("circle", { class: "pt" + (top ? " top1" : ""), cx: sx(p.x), cy: sy(p.y), r: top ? 7 : 4.5 });
    c.append(svg("title", {}, `#${p.rank}: ${p.x.toFixed(unit === "m" ? 1 : 5)}, ${p.y.toFixed(unit === "m" ? 1 : 5)}`));
    root.append(c);
    root.append(svg("text", { class: "pt-label", x: sx(p.x) + 8, y: sy(p.y) + 3 }, `${p.rank}`));
  }
  if (track.length) {
    const line = track.map((q) => `${sx(q.x).toFixed(1)},${sy(q.y).toFixed(1)}`).join(" ");
    root.append(svg("polyline", { class: "track-line", points: line }));
    const now = track[track.length - 1];
    const last = trail[trail.length - 1];
    const sq = svg("rect", { class: "tracked" + (last.localized ? " localized" : ""),
                             x: sx(now.x) - 6, y: sy(now.y) - 6, width: 12, height: 12 });
    sq.append(svg("title", {}, `tracked: ${last.label ?? last.id}, confidence ${num(last.confidence)?.toFixed(2)}`));
    root.append(sq);
  }
  box.append(root);
}

// The tracked place of a stream, in words (also when the index has no positions).
function renderTrack(track) {
  const el = $("track");
  if (!el) return;
  if (!track) { el.textContent = ""; return; }
  const conf = num(track.confidence);
  el.textContent = `Tracked: ${track.label || track.path || "id " + track.id}` +
                   (conf !== null ? `, confidence ${conf.toFixed(2)}` : "") +
                   (track.localized ? " (localized)" : " (not localized yet)");
}

// One query answer (HTTP) or one stream frame message: the same view.
function renderAnswer(data, clientMs) {
  const results = Array.isArray(data.results) ? data.results : [];
  setVersions(data);
  renderTimings(data.timings_ms || data.timings, clientMs);
  renderResults(results);
}

// A failed query: no stale matches from the previous one stay on screen.
function clearAnswer() {
  renderTimings({}, null);
  renderResults([]);
  $("no-results").textContent = "No matches for this query.";
  $("plot").replaceChildren();
}

// ---- serving status ---------------------------------------------------------------
async function refreshStatus() {
  const badge = $("ready");
  try {
    const resp = await fetch("/readyz", { cache: "no-store" });
    let body = {};
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    setVersions(body);
    if (resp.ok) {
      badge.dataset.state = "ready";
      badge.textContent = "ready";
      badge.title = "";
    } else {
      badge.dataset.state = "not_ready";
      badge.textContent = "not ready";
      badge.title = String(body.reason || body.detail || resp.statusText);
    }
  } catch (e) {
    badge.dataset.state = "down";
    badge.textContent = "unreachable";
    badge.title = String(e);
  }
}

// ---- image query --------------------------------------------------------------------
let queryPreviewUrl = null;

async function queryImage(file) {
  stopStream();
  showError("");
  stream.trail = [];  // a single image has no track
  renderTrack(null);
  const preview = $("query-preview");
  if (queryPreviewUrl) URL.revokeObjectURL(queryPreviewUrl);
  queryPreviewUrl = URL.createObjectURL(file);
  preview.src = queryPreviewUrl;
  preview.hidden = !file.type.startsWith("image/");
  preview.onerror = () => { preview.hidden = true; };
  $("busy").hidden = false;
  const t0 = performance.now();
  try {
    const resp = await fetch(`/v1/query?top_k=${topK()}`, {
      method: "POST",
      headers: { "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    if (!resp.ok) {
      showError(await errorMessage(resp));
      clearAnswer();
      return;
    }
    const data = await resp.json();
    renderAnswer(data, performance.now() - t0);
  } catch (e) {
    showError(`Could not reach the server: ${e}`);
  } finally {
    $("busy").hidden = true;
  }
}

// ---- video streaming ---------------------------------------------------------------
const stream = { ws: null, timer: null, sent: 0, received: 0, closing: null, failed: false, trail: [] };
const TRAIL = 60;  // tracked places drawn as the stream's path

function setStreamStatus(text) { $("stream-status").textContent = text; }

function wsUrl(path) {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  return `${proto}//${location.host}${path}`;
}

function startStream() {
  const video = $("video");
  if (!video.src) return;
  stopStream();
  showError("");
  const ws = new WebSocket(wsUrl("/v1/stream"));
  ws.binaryType = "arraybuffer";
  stream.ws = ws;
  stream.sent = 0;
  stream.received = 0;
  stream.failed = false;
  stream.trail = [];
  renderTrack(null);
  $("stream-start").disabled = true;
  $("stream-stop").disabled = false;
  setStreamStatus("connecting…");

  ws.onopen = () => {
    ws.send(JSON.stringify({ codec: "jpeg", top_k: topK() }));
    setStreamStatus("waiting for the server…");
    video.currentTime = video.ended ? 0 : video.currentTime;
    video.play().catch((e) => showError(`The browser cannot play this video: ${e.message || e}`));
    stream.timer = setInterval(() => sendFrame(ws, video), FRAME_INTERVAL_MS);
  };
  ws.onmessage = (ev) => onStreamMessage(ev);
  ws.onerror = () => setStreamStatus("connection error");
  ws.onclose = (ev) => {
    if (stream.ws !== ws && stream.ws !== null) return;  // an older stream, replaced by this one
    if (stream.ws === ws) finishStream();
    if (ev.code !== 1000 && ev.code !== 1005 && !stream.failed) {
      const why = ev.reason ? `: ${ev.reason}` : "";
      showError(`The stream was closed (code ${ev.code})${why}`);
    }
    if (!$("stream-status").textContent.startsWith("done")) {
      setStreamStatus(`stopped: ${stream.sent} frames sent, ${stream.received} answered`);
    }
  };
}

function sendFrame(ws, video) {
  if (ws.readyState !== WebSocket.OPEN || video.paused || video.readyState < 2) return;
  if (ws.bufferedAmount > MAX_BUFFERED_BYTES) return;
  const vw = video.videoWidth, vh = video.videoHeight;
  if (!vw || !vh) return;
  const s = Math.min(1, FRAME_MAX_SIDE / Math.max(vw, vh));
  const canvas = $("grab");
  canvas.width = Math.round(vw * s);
  canvas.height = Math.round(vh * s);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  canvas.toBlob((blob) => {
    if (!blob || ws.readyState !== WebSocket.OPEN) return;
    stream.sent += 1;
    ws.send(blob);
  }, "image/jpeg", FRAME_QUALITY);
}

// Server messages carry a `type`: ready, result (one per processed frame),
// warning (a bad frame, the stream goes on), error (the stream is closed), end.
function onStreamMessage(ev) {
  if (typeof ev.data !== "string") return;
  let msg;
  try { msg = JSON.parse(ev.data); } catch (_) { return; }
  const type = msg.type || (Array.isArray(msg.results) ? "result" : msg.error ? "error" : "");
  if (type === "ready") {
    setVersions(msg);
    setStreamStatus(`streaming (top ${msg.top_k ?? topK()})`);
  } else if (type === "warning") {
    showError(`Warning: ${msg.detail || msg.error}`);
  } else if (type === "error") {
    stream.failed = true;
    showError(`Stream error: ${msg.detail || msg.error}`);
  } else if (type === "end") {
    setStreamStatus(`done: ${msg.processed ?? stream.received} of ${msg.received ?? stream.sent} frames ` +
                    `answered, ${msg.dropped ?? 0} dropped`);
  } else if (type === "result" && Array.isArray(msg.results)) {
    stream.received += 1;
    const frame = msg.frame ?? stream.received;
    const latency = first(msg, ["latency_ms", "latency"]);
    const dropped = first(msg, ["dropped"]) ?? 0;
    if (!stream.failed && $("error").textContent.startsWith("Warning")) showError("");
    if (msg.track) {
      stream.trail.push(msg.track);
      if (stream.trail.length > TRAIL) stream.trail.shift();
    }
    renderTrack(msg.track);
    renderAnswer(msg, latency);
    setStreamStatus(`frame ${frame}: ${stream.received} answered, ${stream.sent} sent, ${dropped} dropped` +
                    (latency !== null ? `, latency ${latency.toFixed(0)} ms` : ""));
  }
}

function finishStream() {
  clearInterval(stream.timer);
  stream.timer = null;
  clearTimeout(stream.closing);
  stream.closing = null;
  stream.ws = null;
  $("stream-start").disabled = !$("video").src;
  $("stream-stop").disabled = true;
}

function closeSocket() {
  const ws = stream.ws;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "client done");
}

function stopStream() {
  $("video").pause();
  closeSocket();
  if (stream.ws) finishStream();
}

// At the end of the video: stop sending and tell the server; it answers the
// last frame, sends "end" and closes. Close ourselves if it does not.
function videoEnded() {
  clearInterval(stream.timer);
  stream.timer = null;
  const ws = stream.ws;
  if (!ws || stream.closing) return;
  if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
  stream.closing = setTimeout(closeSocket, 5000);
}

// ---- wiring -------------------------------------------------------------------------
let videoUrl = null;

function pickVideo(file) {
  stopStream();
  showError("");
  const video = $("video");
  if (videoUrl) URL.revokeObjectURL(videoUrl);
  videoUrl = URL.createObjectURL(file);
  video.src = videoUrl;
  video.hidden = false;
  $("stream-start").disabled = false;
  setStreamStatus(`${file.name}: press Stream to send its frames`);
}

$("image-file").addEventListener("change", (ev) => {
  const file = ev.target.files && ev.target.files[0];
  if (file) queryImage(file);
  ev.target.value = "";  // choosing the same file again queries again
});
$("video-file").addEventListener("change", (ev) => {
  const file = ev.target.files && ev.target.files[0];
  if (file) pickVideo(file);
});
$("video").addEventListener("error", () => {
  if ($("video").src) showError("The browser cannot play this video file (unsupported format?).");
});
$("video").addEventListener("ended", videoEnded);
$("stream-start").addEventListener("click", startStream);
$("stream-stop").addEventListener("click", stopStream);

refreshStatus();
setInterval(refreshStatus, 10000);
