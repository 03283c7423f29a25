// The maas console: models, training jobs with live curves, and the gateway's rates.
// Plain JavaScript, no build step; charts by the vendored uPlot. The API key (when the gateway has
// keys) is kept in sessionStorage and sent as an Authorization header by fetch; job events are read
// as server-sent events through fetch's streaming body, since EventSource cannot send headers.
"use strict";

const KEY = "maas-api-key";
const app = document.getElementById("app");
let who = null;
let timers = [];

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

class Unauthorized extends Error {}

function headers(extra) {
  const key = sessionStorage.getItem(KEY);
  return Object.assign(key ? { Authorization: `Bearer ${key}` } : {}, extra || {});
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    showKeyForm("The gateway refused the key: " + (await errorText(response)));
    throw new Unauthorized();
  }
  if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
  return response.json();
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.error === "string" ? body.error : (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return response.statusText;
  }
}

function showKeyForm(message) {
  document.getElementById("key-form").hidden = false;
  document.getElementById("key-error").textContent = message || "";
  app.replaceChildren(el("p", { class: "muted" }, "Enter an API key to continue."));
}

document.getElementById("key").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = document.getElementById("key-input").value.trim();
  if (value) sessionStorage.setItem(KEY, value);
  document.getElementById("key-form").hidden = true;
  start();
});

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits === undefined ? 3 : digits);
}

function bytes(n) {
  if (!n) return "–";
  return n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} kB`;
}

function chart(target, title, labels, width, height) {
  const colors = ["#2f6fdb", "#c23b3b", "#2c8a4b", "#b07d12", "#7b4bc2", "#1c9aa5"];
  const series = [{ label: labels[0] }].concat(labels.slice(1).map((label, i) => ({
    label, stroke: colors[i % colors.length], width: 2, points: { show: true, size: 4 },
  })));
  const data = labels.map(() => []);
  const plot = new uPlot({ title, width: width || 560, height: height || 240, series,
    scales: { x: { time: labels[0] === "time" } } }, data, target);
  return { plot, data };
}

// --- the models page ---------------------------------------------------------------------------------

async function modelsPage() {
  const stats = el("div", { class: "card", id: "gateway-stats" }, el("h2", {}, "Gateway"),
    el("div", { id: "stat-line" }, el("span", { class: "muted" }, "collecting…")),
    el("div", { class: "charts", id: "rate-charts" }));
  const models = el("div", { class: "card" }, el("h2", {}, "Models"), el("div", { id: "models" }, "Loading…"));
  app.replaceChildren(stats, models);
  await renderModels();
  startRates();
}

async function renderModels(message) {
  const target = document.getElementById("models");
  if (!target) return;
  const { models } = await api("/console/api/models");
  const rows = [];
  for (const model of models) {
    const versions = el("table", { class: "versions" });
    for (const v of model.versions) {
      const isDefault = v.version === model.default_version;
      const metrics = Object.entries(v.metrics).map(([k, x]) => `${k} ${fmt(x)}`).join(", ");
      const actions = [];
      if (who && who.admin && !isDefault && v.state === "READY") {
        actions.push(el("button", { "data-promote": `${model.name}:${v.version}`,
          onclick: () => change(`/console/api/models/${encodeURIComponent(model.name)}/promote`, { version: v.version }) },
          "Make default"));
      }
      versions.append(el("tr", { "data-version": v.version },
        el("td", { class: isDefault ? "default" : "" }, `v${v.version}${isDefault ? " (default)" : ""}`),
        el("td", { class: `state-${v.state}` }, v.state, v.state_reason ? el("div", { class: "muted" }, v.state_reason) : null),
        el("td", {}, v.device || "–", el("div", { class: "muted" }, v.framework)),
        el("td", {}, metrics || "–"),
        el("td", { class: "muted" }, bytes(v.size_bytes), el("div", {}, (v.created_at || "").slice(0, 19))),
        el("td", {}, actions)));
    }
    const rollback = who && who.admin && model.versions.some((v) => v.version < model.default_version)
      ? el("button", { "data-rollback": model.name,
          onclick: () => change(`/console/api/models/${encodeURIComponent(model.name)}/rollback`, {}) }, "Roll back")
      : null;
    rows.push(el("tr", { "data-model": model.name },
      el("td", {}, el("b", {}, model.name), model.owner ? el("div", {}, el("span", { class: "badge" }, `private: ${model.owner}`)) : null),
      el("td", {}, model.family),
      el("td", {}, versions, rollback)));
  }
  target.replaceChildren(
    message ? el("p", { class: "muted", id: "change-result" }, message) : "",
    el("table", { id: "models-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "model"), el("th", {}, "family"),
        el("th", {}, "versions: state, device, held-out metrics"))),
      el("tbody", {}, rows)));
}

async function change(path, body) {
  try {
    const model = await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    await renderModels(`${model.name}: default is now v${model.default_version}`);
  } catch (error) {
    if (!(error instanceof Unauthorized)) await renderModels(`Refused: ${error.message}`);
  }
}

function startRates() {
  const charts = document.getElementById("rate-charts");
  const requests = chart(charts, "Requests/s (all gateway workers)", ["time", "gRPC", "HTTP", "errors"], 520, 200);
  const cache = chart(charts, "Cache hit rate (%)", ["time", "hit rate"], 520, 200);
  let previous = null;
  const tick = async () => {
    let now;
    try {
      now = await api("/console/api/stats");
    } catch (error) {
      return;
    }
    if (previous) {
      const dt = Math.max(0.001, now.time - previous.time);
      const sum = (tree, filter) => Object.values(tree).reduce((a, codes) =>
        a + Object.entries(codes).filter(([code]) => filter(code)).reduce((b, [, n]) => b + n, 0), 0);
      const all = () => true;
      const grpcBad = (code) => code !== "OK" && code !== "NOT_FOUND";
      const httpBad = (code) => Number(code) >= 500;
      const rate = (a, b) => Math.max(0, (a - b) / dt);
      const grpc = rate(sum(now.grpc_requests, all), sum(previous.grpc_requests, all));
      const http = rate(sum(now.http_requests, all), sum(previous.http_requests, all));
      const errors = rate(sum(now.grpc_requests, grpcBad) + sum(now.http_requests, httpBad),
        sum(previous.grpc_requests, grpcBad) + sum(previous.http_requests, httpBad));
      const hits = (now.cache.hit || 0) - (previous.cache.hit || 0);
      const looked = hits + (now.cache.miss || 0) - (previous.cache.miss || 0);
      const total = (now.cache.hit || 0) + (now.cache.miss || 0);
      push(requests, now.time, [grpc, http, errors]);
      push(cache, now.time, [looked ? (100 * hits) / looked : null]);
      document.getElementById("stat-line").replaceChildren(
        el("span", { class: "stat" }, el("b", {}, fmt(grpc + http, 1)), "requests/s"),
        el("span", { class: "stat" }, el("b", {}, total ? `${fmt((100 * (now.cache.hit || 0)) / total, 1)} %` : "–"),
          "cache hit rate since start"),
        el("span", { class: "stat" }, el("b", {}, now.workers), "gateway workers"));
    }
    previous = now;
  };
  tick();
  timers.push(setInterval(tick, 2000));
}

function push(target, x, ys) {
  target.data[0].push(x);
  ys.forEach((y, i) => target.data[i + 1].push(y));
  if (target.data[0].length > 150) target.data.forEach((column) => column.shift());
  target.plot.setData(target.data);
}

// --- training jobs ---------------------------------------------------------------------------------------

async function jobsPage() {
  const card = el("div", { class: "card" }, el("h2", {}, "Training jobs"), el("div", { id: "jobs" }, "Loading…"));
  app.replaceChildren(card);
  const { jobs } = await api("/console/api/jobs?limit=100");
  const rows = jobs.map((job) => el("tr", { "data-job": job.job_id },
    el("td", {}, el("a", { href: `/console/jobs/${encodeURIComponent(job.job_id)}` }, job.job_id)),
    el("td", { class: `state-${job.state}` }, job.state),
    el("td", {}, `${job.family} ${job.architecture}`),
    el("td", {}, job.output_model, job.model_version ? ` v${job.model_version}` : ""),
    el("td", {}, `${job.epoch}/${job.epochs}`),
    el("td", {}, fmt(job.train_loss)),
    el("td", {}, Object.entries(job.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "–"),
    el("td", { class: "muted" }, (job.created_at || "").slice(0, 19))));
  document.getElementById("jobs").replaceChildren(jobs.length
    ? el("table", { id: "jobs-table" }, el("thead", {}, el("tr", {}, ["job", "state", "family", "model", "epoch", "loss",
        "metrics", "created"].map((h) => el("th", {}, h)))), el("tbody", {}, rows))
    : el("p", { class: "muted" }, "No training jobs yet."));
}

async function jobPage(jobId) {
  const state = el("span", { id: "job-state" }, "…");
  const progress = el("span", { id: "job-progress" }, "");
  const message = el("div", { id: "job-message", class: "muted" }, "");
  const curve = el("div", { id: "curve", "data-epochs": "0" });
  app.replaceChildren(el("div", { class: "card" },
    el("h2", {}, "Job ", el("code", {}, jobId)), el("div", { id: "job-summary" }, "Loading…"),
    el("p", {}, "State: ", state, " ", progress), message, curve));
  const job = await api(`/console/api/jobs/${encodeURIComponent(jobId)}`);
  document.getElementById("job-summary").replaceChildren(
    el("span", {}, `${job.family} ${job.architecture} → ${job.output_model}, ${job.epochs} epochs, created ${(job.created_at || "").slice(0, 19)}`));
  let drawn = null;
  let points = new Map();
  const draw = () => {
    const epochs = [...points.keys()].sort((a, b) => a - b);
    const names = [...new Set(epochs.flatMap((e) => Object.keys(points.get(e).validation_metrics)))].sort();
    const labels = ["epoch", "train loss", ...names.map((n) => `validation ${n}`)];
    if (!drawn || drawn.labels.join() !== labels.join()) {
      curve.replaceChildren();
      drawn = { labels, chart: chart(curve, "Loss and validation metrics by epoch", labels, 720, 300) };
    }
    const columns = [epochs, epochs.map((e) => points.get(e).train_loss),
      ...names.map((n) => epochs.map((e) => points.get(e).validation_metrics[n] ?? null))];
    drawn.chart.plot.setData(columns);
    curve.setAttribute("data-epochs", String(epochs.length));
  };
  const terminal = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
  let finished = false;
  while (!finished) {
    points = new Map();  // each (re)connection replays the whole history first
    try {
      await readEvents(`/console/api/jobs/${encodeURIComponent(jobId)}/events`, (event) => {
        if (event.state) state.replaceChildren(el("span", { class: `state-${event.state}` }, event.state));
        if (event.message) message.textContent = event.message;
        if (event.epoch > 0) {
          points.set(event.epoch, event);
          progress.textContent = `epoch ${event.epoch}/${event.epochs}` +
            (event.eta_seconds > 0 ? `, about ${Math.round(event.eta_seconds)} s left` : "");
          draw();
        }
        if (terminal.has(event.state)) finished = true;
      });
    } catch (error) {
      if (error instanceof Unauthorized) return;
      message.textContent = `event stream: ${error.message}; reconnecting`;
    }
    if (!finished) await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function readEvents(path, onEvent) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }) });
  if (response.status === 401) {
    showKeyForm("The gateway refused the key.");
    throw new Unauthorized();
  }
  if (!response.ok) throw new Error(`${response.status}: ${await errorText(response)}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) kind = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (!data.length) continue;  // a keep-alive comment
      const payload = JSON.parse(data.join("\n"));
      if (kind === "error") throw new Error(payload.error);
      onEvent(payload);
    }
  }
}

// --- start --------------------------------------------------------------------------------------------

async function start() {
  timers.forEach(clearInterval);
  timers = [];
  try {
    who = await api("/console/api/whoami");
  } catch (error) {
    if (!(error instanceof Unauthorized)) app.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  document.getElementById("who").textContent = who.keys_required
    ? `tenant ${who.tenant}${who.admin ? " (admin)" : ""}` : "no API keys on this gateway (admin)";
  const job = location.pathname.match(/^\/console\/jobs\/([^/]+)$/);
  try {
    if (job) await jobPage(decodeURIComponent(job[1]));
    else if (location.hash === "#jobs") await jobsPage();
    else await modelsPage();
  } catch (error) {
    if (!(error instanceof Unauthorized)) app.replaceChildren(el("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", start);
start();
