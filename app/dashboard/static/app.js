// Distillery dashboard: polls the JSON API and renders jobs, one job's report and a per-model chart.
// No framework, no build step, nothing fetched from another origin; text is only ever set with textContent.
// A job's report has its own URL, #/jobs/<id>: it can be linked, bookmarked and reloaded, and back/forward move
// between reports. Polling is cheap: one request (the job list) per tick while nothing changes.
"use strict";

(() => {
  const KEY_STORAGE = "distillery.apiKey";
  const POLL_MS = 1500;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const JOB_ROUTE = /^#\/jobs\/([^/?#]+)$/;

  const state = {
    jobs: [],
    listText: "", // the last job list as the API sent it: the same text again means nothing changed
    models: new Map(), // id -> model
    modelsLoaded: false,
    modelsVersion: 0,
    missingModels: new Set(), // model ids of listed jobs that the model list did not have (deleted): not re-asked
    selected: null, // job id of the URL's report (#/jobs/<id>)
    job: null, // that job, from the list or read alone
    jobError: "",
    artifacts: new Map(), // artifact id -> its record, or {error}
    chartModel: null, // model id charted (null: the newest job's model)
    chartJobs: [],
    chartSig: "", // what the charted jobs were last read for
    needKey: false,
    timer: null,
    polls: 0,
    scrollToJob: false, // the URL changed to a report: bring it into view once it is drawn
    followModel: false, // the URL's job was not read yet: chart its model once it is
  };

  const $ = (id) => document.getElementById(id);

  // What each part of the page was last drawn from: a poll that brings nothing new redraws nothing.
  const drawn = { jobs: "", job: "", chart: "" };
  function unchanged(part, ...inputs) {
    const key = JSON.stringify(inputs);
    if (drawn[part] === key) return true;
    drawn[part] = key;
    return false;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs = {}, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (v !== null && v !== undefined) node.setAttribute(k, String(v));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- API ------------------------------------------------------------------------------------------------

  class AuthError extends Error {}

  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders(extra = {}) {
    const headers = { ...extra };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    return headers;
  }

  async function errorOf(resp, path) {
    const body = await resp.json().catch(() => null);
    const message = (body && body.error && body.error.message) || `${path}: HTTP ${resp.status}`;
    return resp.status === 401 ? new AuthError(message) : new ApiError(message, resp.status);
  }

  // The response body as text (the job list is compared as text before it is parsed).
  async function apiText(path) {
    const resp = await fetch(path, { headers: authHeaders({ Accept: "application/json" }), cache: "no-store",
      credentials: "omit" });
    if (!resp.ok) throw await errorOf(resp, path);
    return resp.text();
  }

  async function api(path) {
    return JSON.parse(await apiText(path));
  }

  // ---- formatting: the shared spec (docs/api.md), the same text as the CLI and the SDK's report ------------

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const DASH = "–";

  // x with d decimals, rounded half away from zero on the exact binary value (toFixed), never "-0.0": the rule of
  // app/client/fmt.py, so that the page and the CLI write every figure alike.
  function fixed(x, d) {
    const s = x.toFixed(d);
    return /^-0(\.0*)?$/.test(s) ? s.slice(1) : s;
  }

  // counts: thousands separators (206,282)
  function fmtCount(n) {
    if (!isNum(n)) return DASH;
    return fixed(n, 0).replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }

  // sizes: binary units with one decimal (512 B, 807.0 KiB, 1.2 MiB, 3.4 GiB)
  function fmtBytes(n) {
    if (!isNum(n)) return DASH;
    if (Math.abs(Number(fixed(n, 0))) < 1024) return `${fixed(n, 0)} B`;
    const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    let v = n / 1024;
    let i = 0;
    while (i < units.length - 1 && Math.abs(Number(fixed(v, 1))) >= 1024) { // 1023.96 KiB reads 1.0 MiB
      v /= 1024;
      i += 1;
    }
    return `${fixed(v, 1)} ${units[i]}`;
  }

  // ratios and speedups: two decimals and x (0.10x, 4.12x; below 0.005: <0.01x)
  function fmtRatio(v) {
    if (!isNum(v)) return DASH;
    return v < 0.005 ? "<0.01x" : `${fixed(v, 2)}x`;
  }

  // accuracy, fidelity, percentages: one decimal (97.8%), from a fraction
  function fmtPct(v) {
    return isNum(v) ? `${fixed(v * 100, 1)}%` : DASH;
  }

  // differences in percentage points, from a difference of fractions: signed, one decimal, zero is +0.0 pt
  function fmtPt(v) {
    if (!isNum(v)) return DASH;
    let s = fixed(v * 100, 1);
    if (s === "-0.0") s = "0.0";
    return `${s.startsWith("-") ? s : "+" + s} pt`;
  }

  // latencies: three significant digits (0.123 ms, 1.23 ms, 12.3 ms, 123 ms, 1,234 ms)
  function fmtMs(v) {
    if (!isNum(v)) return DASH;
    if (v === 0) return "0.00 ms";
    if (Math.abs(Number(fixed(v, 0))) >= 1000) return `${fmtCount(v)} ms`;
    const d = Math.max(0, 2 - Math.floor(Math.log10(Math.abs(v))));
    let s = fixed(v, d);
    if (d > 0 && Math.abs(Number(s)) >= 10 ** (3 - d)) s = fixed(v, d - 1); // 9.996 -> 10.0, not 10.00
    return `${s} ms`;
  }

  // a speedup with its direction: 2.00x faster, 0.80x slower
  function fmtSpeedup(v) {
    return isNum(v) ? `${fmtRatio(v)} ${v >= 1 ? "faster" : "slower"}` : DASH;
  }

  function fmtNum(v, digits) {
    return isNum(v) ? fixed(v, digits) : DASH;
  }

  const pad2 = (n) => String(n).padStart(2, "0");

  // Local time: today's as 14:03:27, older as 2025-12-01 14:03 (the full time is the cell's title).
  function fmtTime(iso, short = false) {
    if (!iso) return DASH;
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return iso;
    const time = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const day = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())}`;
    if (!short) return `${day} ${time}`;
    return day === fmtTime(new Date().toISOString()).slice(0, 10) ? time : `${day} ${time.slice(0, 5)}`;
  }

  function fmtDuration(start, end) {
    if (!start) return DASH;
    const ms = (end ? new Date(end) : new Date()) - new Date(start);
    if (!Number.isFinite(ms) || ms < 0) return DASH;
    const s = ms / 1000;
    if (s < 60) return `${fixed(s, 1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${pad2(Math.floor(s % 60))} s`;
    return `${Math.floor(s / 3600)} h ${pad2(Math.floor((s % 3600) / 60))} min`;
  }

  // The formatters, for the browser test to compare with the spec's reference (tests/e2e/test_dashboard.py).
  window.distilleryFormat = Object.freeze({ fixed, fmtCount, fmtBytes, fmtRatio, fmtPct, fmtPt, fmtMs,
    fmtSpeedup });

  const method = (job) => (job.config && job.config.method) || (job.kind === "distill" ? "distill" : DASH);
  const shortId = (id) => `…${id.slice(-8)}`; // ids begin with their creation time: the end tells them apart
  const modelName = (id) => (state.models.get(id) ? state.models.get(id).name : shortId(id));
  const jobHash = (id) => `#/jobs/${encodeURIComponent(id)}`;

  function statusBadge(status) {
    return el("span", { class: `status status-${status}`, text: status });
  }

  // ---- the URL: #/jobs/<id> is a job's report, anything else the list -------------------------------------

  function routedJob() {
    const m = JOB_ROUTE.exec(location.hash);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch (err) {
      return m[1];
    }
  }

  // Show what the URL says (on load, on a link or row clicked, on back/forward).
  function applyRoute() {
    const id = routedJob();
    if (id === state.selected) return;
    state.selected = id;
    state.job = id ? state.jobs.find((j) => j.id === id) || state.chartJobs.find((j) => j.id === id) || null : null;
    state.jobError = "";
    drawn.job = "";
    if (state.job) state.chartModel = state.job.model_id;
    state.followModel = Boolean(id) && !state.job; // chart its model once it is read
    state.scrollToJob = Boolean(id);
    if (state.needKey) return; // shown once a key is entered
    renderAll();
    poll(); // reads the job (if it is not listed) and its model's chart now
  }

  function openJob(id) {
    if (routedJob() === id) return;
    location.hash = jobHash(id); // a history entry; hashchange applies it
  }

  // ---- connection and key ---------------------------------------------------------------------------------

  function setConn(text, bad) {
    const c = $("conn");
    c.textContent = text;
    c.classList.toggle("bad", Boolean(bad));
  }

  function showAuth(message) {
    state.needKey = true;
    // nothing read with a previous key stays on the page (the URL's job id stays: it is shown after a key)
    state.jobs = [];
    state.listText = "";
    state.chartJobs = [];
    state.chartSig = "";
    state.models.clear();
    state.modelsLoaded = false;
    state.missingModels.clear();
    state.artifacts.clear();
    state.job = null;
    state.jobError = "";
    $("jobs").querySelector("tbody").replaceChildren();
    for (const id of ["job-id", "job-status", "job-flags", "job-facts", "job-error", "job-notes", "params-line",
      "artifact-download", "artifact-info", "download-error"]) $(id).replaceChildren();
    $("artifact-download").href = "#/";
    $("metrics").querySelector("tbody").replaceChildren();
    $("comparison-table").querySelector("tbody").replaceChildren();
    $("comparison-kept").replaceChildren();
    $("job-panel").hidden = true;
    $("chart").replaceChildren();
    $("chart-model").replaceChildren();
    drawn.jobs = drawn.job = drawn.chart = "";
    $("auth").hidden = false;
    $("main").hidden = true;
    $("auth-error").textContent = message || "";
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
    setConn("API key needed", true);
    $("key").focus();
  }

  function hideAuth() {
    state.needKey = false;
    $("auth").hidden = true;
    $("main").hidden = false;
    $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
  }

  function useKey() {
    const key = $("key").value.trim();
    if (!key) {
      $("auth-error").textContent = "enter a key";
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key").value = "";
    state.models.clear();
    state.modelsLoaded = false;
    poll();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_STORAGE);
    poll();
  }

  // ---- jobs table -----------------------------------------------------------------------------------------

  function progressCell(job) {
    const pct = Math.round((job.status === "succeeded" ? 1 : job.progress || 0) * 100);
    const fill = el("div", { class: `fill fill-${job.status}` });
    fill.style.width = `${pct}%`;
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": pct }, fill);
    return el("td", { class: "progress" }, bar, el("span", { class: "pct", text: `${pct}%` }),
      el("div", { class: "stage muted", text: job.stage || "", title: job.stage || null }));
  }

  function renderJobs() {
    const running = state.jobs.some((j) => !TERMINAL.has(j.status)); // their "took" grows between polls
    if (unchanged("jobs", state.listText, state.selected, state.modelsVersion, running ? Date.now() : 0)) return;
    const body = $("jobs").querySelector("tbody");
    const rows = state.jobs.map((job) => {
      const tr = el("tr", { id: `job-${job.id}`, class: `job-row${job.id === state.selected ? " selected" : ""}`,
        dataset: { jobId: job.id, status: job.status } },
        el("td", { class: "nowrap" }, el("a", { href: jobHash(job.id), class: "job-link", title: job.id },
          el("code", { text: shortId(job.id) }))),
        el("td", { class: "col-kind", text: job.kind }),
        el("td", { text: method(job) }),
        el("td", { class: "model", text: modelName(job.model_id), title: job.model_id }),
        el("td", { class: "status-cell" }, statusBadge(job.status),
          job.metrics && job.metrics.slower_than_baseline ? el("span", { class: "flag", text: "slower",
            title: "slower than the baseline at some batch size" }) : null),
        progressCell(job),
        el("td", { class: "nowrap", text: fmtTime(job.created_at, true), title: fmtTime(job.created_at) }),
        el("td", { class: "num took", text: fmtDuration(job.started_at, job.finished_at) }));
      return tr;
    });
    body.replaceChildren(...rows);
    $("jobs-empty").hidden = state.jobs.length > 0;
    $("jobs-box").hidden = state.jobs.length === 0;
    $("jobs-count").textContent = state.jobs.length ? `(${state.jobs.length} newest)` : "";
  }

  function onJobsClick(event) {
    if (event.target.closest("a")) return; // the id's own link: the browser follows it (new tab, copy, ...)
    const tr = event.target.closest("tr.job-row");
    if (tr) openJob(tr.dataset.jobId);
  }

  // ---- one job --------------------------------------------------------------------------------------------

  function metricRow(key, label, base, res, change, opts = {}) {
    const cell = (side, v, text) => el("td", { class: "num", dataset: { metric: key, side,
      value: v === null || v === undefined ? "" : String(v) }, text });
    return el("tr", { class: opts.cls || null, dataset: { metric: key } },
      el("th", { text: label }),
      cell("baseline", base.value, base.text),
      cell("result", res.value, res.text),
      el("td", { class: "num change", dataset: { metric: key, side: "change" }, text: change || "" }));
  }

  const side = (v, fmt) => ({ value: isNum(v) ? v : null, text: fmt(v) });

  function metricRows(m) {
    const base = m.baseline || {};
    const res = m.result || {};
    const ratios = m.ratios || {};
    const rows = [
      metricRow("size_bytes", "Size", side(base.size_bytes, fmtBytes), side(res.size_bytes, fmtBytes),
        isNum(ratios.size) ? `${fmtRatio(ratios.size)} the size` : ""),
      metricRow("params", "Parameters", side(base.params, fmtCount), side(res.params, fmtCount),
        isNum(ratios.params) ? fmtRatio(ratios.params) : ""),
    ];
    if (isNum(base.macs) || isNum(res.macs)) {
      rows.push(metricRow("macs", "MACs per row", side(base.macs, fmtCount), side(res.macs, fmtCount),
        isNum(ratios.macs) ? fmtRatio(ratios.macs) : ""));
    }
    const batches = [...new Set([...Object.keys(base.latency_ms || {}), ...Object.keys(res.latency_ms || {})])]
      .sort((a, b) => Number(a) - Number(b));
    for (const b of batches) {
      const bl = (base.latency_ms || {})[b] || {};
      const rl = (res.latency_ms || {})[b] || {};
      const speedup = (ratios.speedup || {})[b];
      const slower = isNum(speedup) && speedup < 1;
      rows.push(metricRow(`latency_ms_p50_${b}`, `Latency p50, batch ${b}`, side(bl.p50, fmtMs), side(rl.p50, fmtMs),
        isNum(speedup) ? fmtSpeedup(speedup) : "",
        { cls: slower ? "slower" : null }));
    }
    if (isNum(base.accuracy) || isNum(res.accuracy)) {
      let drop = m.accuracy_drop;
      if (!isNum(drop) && isNum(base.accuracy) && isNum(res.accuracy)) drop = base.accuracy - res.accuracy;
      rows.push(metricRow("accuracy", "Accuracy (test split)", side(base.accuracy, fmtPct), side(res.accuracy, fmtPct),
        isNum(drop) ? fmtPt(-drop) : "", { cls: m.within_accuracy_budget === false ? "slower" : null }));
    }
    if (isNum(base.f1_macro) || isNum(res.f1_macro)) {
      rows.push(metricRow("f1_macro", "F1 (macro)", side(base.f1_macro, (v) => fmtNum(v, 3)),
        side(res.f1_macro, (v) => fmtNum(v, 3)), ""));
    }
    const none = { value: null, text: DASH };
    if (isNum(res.agreement)) rows.push(metricRow("agreement", "Agreement with baseline (top-1)", none,
      side(res.agreement, fmtPct), ""));
    if (isNum(res.cosine)) rows.push(metricRow("cosine", "Cosine similarity of outputs", none,
      side(res.cosine, (v) => fmtNum(v, 4)), ""));
    if (isNum(res.sqnr_db)) rows.push(metricRow("sqnr_db", "SQNR", none,
      side(res.sqnr_db, (v) => `${fixed(v, 1)} dB`), ""));
    if (isNum(base.peak_memory_bytes) || isNum(res.peak_memory_bytes)) {
      rows.push(metricRow("peak_memory_bytes", "Peak memory", side(base.peak_memory_bytes, fmtBytes),
        side(res.peak_memory_bytes, fmtBytes), isNum(ratios.peak_memory) ? fmtRatio(ratios.peak_memory) : ""));
    }
    return rows;
  }

  // "Parameters 206,282 -> 206,282 (1.00x), plus 1,074 scales and zero points": a quantized result's params count
  // the baseline's tensors, and quant_params the scales and zero points added beside them (when reported).
  function paramsLine(m) {
    const base = m.baseline || {};
    const res = m.result || {};
    if (!isNum(res.quant_params) || res.quant_params === 0) return "";
    let r = (m.ratios || {}).params;
    if (!isNum(r) && isNum(base.params) && base.params && isNum(res.params)) r = res.params / base.params;
    return `Parameters ${fmtCount(base.params)} -> ${fmtCount(res.params)}${isNum(r) ? ` (${fmtRatio(r)})` : ""}, ` +
      `plus ${fmtCount(res.quant_params)} scales and zero points`;
  }

  const STUDENTS = { kd: "distilled (knowledge distillation)", labels_only: "labels only" };
  const KEPT = { kd: "the distilled student", labels_only: "the labels-only student" };

  // metrics.method.comparison of a distill job with compare_baseline: both students' accuracy, the difference,
  // and which one became the artifact (when the report says).
  function renderComparison(m) {
    const c = m && m.method && m.method.comparison;
    const box = $("comparison");
    if (!c || (!isNum(c.kd) && !isNum(c.labels_only))) {
      box.hidden = true;
      return;
    }
    const kept = c.kept === "kd" || c.kept === "labels_only" ? c.kept : null;
    const row = (key, label, value, text) => el("tr", { dataset: { metric: key }, class: kept === key ? "kept" : null },
      el("th", { text: label }),
      el("td", { class: "num", dataset: { metric: key, value: isNum(value) ? String(value) : "" }, text }),
      el("td", {}, kept === key ? el("span", { class: "kept-badge", text: "kept: the artifact" }) : null));
    const delta = isNum(c.delta) ? c.delta : isNum(c.kd) && isNum(c.labels_only) ? c.kd - c.labels_only : null;
    $("comparison-table").querySelector("tbody").replaceChildren(
      row("kd", `Student, ${STUDENTS.kd}`, c.kd, fmtPct(c.kd)),
      row("labels_only", `Student, ${STUDENTS.labels_only}`, c.labels_only, fmtPct(c.labels_only)),
      row("delta", "Difference (distilled − labels only)", delta, fmtPt(delta)));
    $("comparison-split").textContent = c.split || "test";
    const keptText = $("comparison-kept");
    if (kept) {
      const chosen = typeof c.chosen_on === "string" && c.chosen_on ? ` (chosen on ${c.chosen_on})` : "";
      const reason = typeof c.kept_reason === "string" && c.kept_reason ? `: ${c.kept_reason}` : "";
      keptText.textContent = `Kept ${KEPT[kept]} as the artifact${chosen}${reason}`;
      keptText.dataset.kept = kept;
    } else {
      keptText.textContent = "";
      delete keptText.dataset.kept;
    }
    box.hidden = false;
  }

  function renderDownload(job) {
    const box = $("job-download");
    const link = $("artifact-download");
    if (!job.artifact_id) {
      box.hidden = true;
      return;
    }
    const art = state.artifacts.get(job.artifact_id);
    const meta = art && !art.error ? art : null;
    link.href = `/v1/artifacts/${encodeURIComponent(job.artifact_id)}/content`;
    link.dataset.artifactId = job.artifact_id;
    const filename = meta ? meta.filename : `${job.artifact_id}`;
    link.setAttribute("download", filename);
    link.textContent = `Download ${meta ? meta.filename : "artifact"}`;
    $("artifact-info").textContent = meta
      ? `${fmtBytes(meta.size_bytes)}, ${meta.format}, sha256 ${meta.sha256.slice(0, 12)}…`
      : art && art.error ? art.error : "";
    $("artifact-info").title = meta ? `sha256 ${meta.sha256}` : "";
    box.hidden = false;
  }

  // With a key in this tab the download carries it (a plain link cannot send a header): fetched, then saved
  // from a blob. In open mode the plain link downloads (streamed by the browser, nothing held in memory).
  async function onDownloadClick(event) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    $("download-error").textContent = "";
    if (!key) return;
    event.preventDefault();
    const link = event.currentTarget;
    if (link.getAttribute("aria-busy") === "true") return;
    link.setAttribute("aria-busy", "true");
    try {
      const resp = await fetch(link.href, { headers: { Authorization: "Bearer " + key }, cache: "no-store",
        credentials: "omit" });
      if (!resp.ok) throw await errorOf(resp, link.pathname);
      const url = URL.createObjectURL(await resp.blob());
      const save = el("a", { href: url, download: link.getAttribute("download") || "artifact", hidden: true });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000); // the download has its own copy by then
    } catch (err) {
      $("download-error").textContent = `download failed: ${err.message}`;
    } finally {
      link.removeAttribute("aria-busy");
    }
  }

  function renderJob() {
    const panel = $("job-panel");
    if (!state.selected) {
      panel.hidden = true;
      drawn.job = "";
      return;
    }
    panel.hidden = false;
    const job = state.job;
    const art = job && job.artifact_id ? state.artifacts.get(job.artifact_id) : null;
    if (!unchanged("job", state.selected, job, state.jobError, job ? modelName(job.model_id) : "", art || null)) {
      drawJob(job);
    }
    if (state.scrollToJob && (job || state.jobError)) {
      state.scrollToJob = false;
      const top = panel.getBoundingClientRect().top;
      if (top < 0 || top > window.innerHeight - 80) panel.scrollIntoView({ block: "start" });
    }
  }

  function drawJob(job) {
    $("job-id").textContent = state.selected;
    const table = $("metrics");
    if (!job) {
      $("job-status").replaceChildren();
      $("job-flags").replaceChildren();
      $("job-facts").replaceChildren();
      $("job-download").hidden = true;
      $("comparison").hidden = true;
      $("params-line").textContent = "";
      table.hidden = true;
      $("job-notes").replaceChildren();
      $("job-error").textContent = state.jobError || "loading…";
      return;
    }
    $("job-status").replaceChildren(statusBadge(job.status));
    const facts = [
      ["Kind", job.kind], ["Method", method(job)], ["Model", `${modelName(job.model_id)} (${job.model_id})`],
      ["Dataset", job.dataset_id || DASH],
      ["Progress", `${Math.round((job.status === "succeeded" ? 1 : job.progress || 0) * 100)}% ${job.stage || ""}`],
      ["Device", job.device || job.device_requested], ["Worker", job.worker || DASH],
      ["Attempts", `${job.attempts} / ${job.max_attempts}`], ["Created", fmtTime(job.created_at)],
      ["Started", fmtTime(job.started_at)], ["Finished", fmtTime(job.finished_at)],
      ["Took", fmtDuration(job.started_at, job.finished_at)], ["Artifact", job.artifact_id || DASH],
    ];
    $("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }),
      el("dd", { text: String(v) })]));
    $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    renderDownload(job);
    const m = job.metrics;
    const flags = [];
    if (m && m.slower_than_baseline) {
      flags.push(el("span", { class: "flag", id: "flag-slower", text: "slower than baseline" }));
    }
    if (m && m.within_accuracy_budget === false) {
      flags.push(el("span", { class: "flag", text: "accuracy drop over budget" }));
    }
    $("job-flags").replaceChildren(...flags);
    if (m && m.baseline && m.result) {
      table.querySelector("tbody").replaceChildren(...metricRows(m));
      table.hidden = false;
    } else {
      table.querySelector("tbody").replaceChildren();
      table.hidden = true;
    }
    $("params-line").textContent = m && m.result ? paramsLine(m) : "";
    renderComparison(m);
    const notes = (m && Array.isArray(m.notes) ? m.notes : []).map((n) => el("li", { text: String(n) }));
    $("job-notes").replaceChildren(...notes);
  }

  // ---- chart ----------------------------------------------------------------------------------------------

  function yMetric(jobs) {
    const chosen = $("chart-y").value;
    if (chosen !== "auto") return chosen;
    return jobs.some((j) => isNum(j.metrics.result.accuracy)) ? "accuracy" : "agreement";
  }

  // Round ticks; steps of 1, 2 or 5 times a power of ten (never 2.5: a percentage tick keeps one decimal).
  function niceTicks(lo, hi, n = 5) {
    const span = hi - lo || 1;
    const step0 = span / n;
    const mag = 10 ** Math.floor(Math.log10(step0));
    const step = [1, 2, 5, 10].map((s) => s * mag).find((s) => span / s <= n) || step0;
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
    return ticks;
  }

  function renderModelOptions() {
    const select = $("chart-model");
    const current = state.chartModel;
    const models = [...state.models.values()];
    const options = models.map((m) => el("option", { value: m.id, text: `${m.name} (${shortId(m.id)})` }));
    if (!options.length) options.push(el("option", { value: "", text: "no models yet" }));
    const same = select.options.length === options.length &&
      options.every((o, i) => select.options[i].value === o.value && select.options[i].textContent === o.textContent);
    if (!same) select.replaceChildren(...options);
    if (current) select.value = current;
  }

  function renderBatchOptions(jobs) {
    const select = $("chart-batch");
    const batches = new Set();
    for (const j of jobs) for (const b of Object.keys(j.metrics.result.latency_ms || {})) batches.add(b);
    const sorted = [...batches].sort((a, b) => Number(a) - Number(b));
    const prev = select.value;
    const same = select.options.length === sorted.length && sorted.every((b, i) => select.options[i].value === b);
    if (!same) select.replaceChildren(...sorted.map((b) => el("option", { value: b, text: b })));
    if (sorted.includes(prev)) select.value = prev;
    return select.value;
  }

  // Moves the chart's point labels into the plot area [l, r] x [t, b] (in the SVG's units) where they stick out
  // (a label beside a point at the right edge, the original's above a point at the top), then off the labels
  // placed before them (two points close together).
  function fitLabels(root, area) {
    const placed = [];
    const overlaps = (a, b) => a.x < b.x + b.width && b.x < a.x + a.width &&
      a.y < b.y + b.height && b.y < a.y + a.height;
    for (const t of root.querySelectorAll("text.fit")) {
      let b;
      try {
        b = t.getBBox();
      } catch (err) {
        continue;
      }
      if (!b.width) continue; // not laid out (the page is hidden): placed from estimates only
      const box = { x: b.x, y: b.y, width: b.width, height: b.height };
      const inside = () => {
        let dx = 0;
        let dy = 0;
        if (box.x + box.width > area.r) dx = area.r - (box.x + box.width);
        if (box.x + dx < area.l) dx = area.l - box.x;
        if (box.y + box.height > area.b) dy = area.b - (box.y + box.height);
        if (box.y + dy < area.t) dy = area.t - box.y;
        box.x += dx;
        box.y += dy;
      };
      inside();
      for (let i = 0; i < 8; i += 1) {
        const hit = placed.find((p) => overlaps(p, box));
        if (!hit) break;
        const below = hit.y + hit.height + 1;
        box.y = below + box.height <= area.b ? below : hit.y - 1 - box.height;
        inside();
      }
      placed.push(box);
      if (box.x !== b.x) t.setAttribute("x", String(Number(t.getAttribute("x")) + box.x - b.x));
      if (box.y !== b.y) t.setAttribute("y", String(Number(t.getAttribute("y")) + box.y - b.y));
    }
  }

  function renderChart() {
    const box = $("chart");
    const note = $("chart-note");
    const jobs = state.chartJobs.filter((j) => j.model_id === state.chartModel && j.metrics && j.metrics.result &&
      j.metrics.baseline);
    if (!state.chartModel || !jobs.length) {
      drawn.chart = "";
      box.replaceChildren(el("p", { class: "muted", text: state.chartModel
        ? "No succeeded jobs for this model yet." : "No model selected." }));
      note.textContent = "";
      return;
    }
    const metric = yMetric(jobs);
    const batch = renderBatchOptions(jobs);
    if (unchanged("chart", state.chartModel, jobs.map((j) => [j.id, j.updated_at]), state.selected, metric, batch,
      modelName(state.chartModel))) return;
    const latency = (s) => {
      const l = (s.latency_ms || {})[batch];
      return l && isNum(l.p50) ? l.p50 : null;
    };
    const baseSide = jobs[0].metrics.baseline;
    const baseY = metric === "accuracy" ? baseSide.accuracy : 1.0; // fidelity of the original to itself is 1
    const points = [];
    let skipped = 0;
    for (const j of jobs) {
      const r = j.metrics.result;
      if (!isNum(r[metric]) || !isNum(r.size_bytes)) {
        skipped += 1;
        continue;
      }
      points.push({ job: j, x: r.size_bytes, y: r[metric], lat: latency(r) });
    }
    const base = isNum(baseY) && isNum(baseSide.size_bytes)
      ? { x: baseSide.size_bytes, y: baseY, lat: latency(baseSide) } : null;

    const W = 720;
    const H = 380;
    const M = { l: 64, r: 24, t: 16, b: 48 };
    const area = { l: M.l + 2, r: W - M.r, t: M.t, b: H - M.b - 2 }; // where the point labels must stay
    const all = base ? [...points, base] : points;
    if (!all.length) {
      drawn.chart = "";
      box.replaceChildren(el("p", { class: "muted", text: `No job of this model has ${metric}.` }));
      note.textContent = "";
      return;
    }
    const xMax = Math.max(...all.map((p) => p.x)) * 1.1;
    let yLo = Math.min(...all.map((p) => p.y));
    let yHi = Math.max(...all.map((p) => p.y));
    const pad = Math.max((yHi - yLo) * 0.15, 0.005);
    yLo = Math.max(0, yLo - pad);
    yHi = Math.min(metric === "cosine" ? 1.0005 : 1.0, yHi + pad);
    if (yHi <= yLo) yHi = yLo + 0.01;
    const sx = (x) => M.l + (x / xMax) * (W - M.l - M.r);
    const sy = (y) => H - M.b - ((y - yLo) / (yHi - yLo)) * (H - M.t - M.b);
    const lats = all.map((p) => p.lat).filter(isNum);
    const latMax = lats.length ? Math.max(...lats) : 1;
    const radius = (lat) => (isNum(lat) ? 4 + 14 * Math.sqrt(lat / latMax) : 4);
    const textWidth = (s) => 6.6 * s.length; // a first guess at 12px; fitLabels corrects it once laid out

    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": `${modelName(state.chartModel)}: size against ${metric}`,
      dataset: { plot: [area.l, area.t, area.r, area.b].join(" ") } });
    const axes = svg("g", { class: "axes" });
    let unit = 1; // size ticks round in the unit they are written in (200.0 KiB, not 195.3 KiB)
    while (xMax / unit >= 1024 && unit < 1024 ** 4) unit *= 1024;
    for (const t of niceTicks(0, xMax / unit).map((v) => v * unit)) {
      axes.append(svg("line", { x1: sx(t), x2: sx(t), y1: M.t, y2: H - M.b, class: "grid" }));
      axes.append(svg("text", { x: sx(t), y: H - M.b + 16, "text-anchor": "middle" }, fmtBytes(t)));
    }
    for (const t of niceTicks(yLo, yHi)) {
      axes.append(svg("line", { x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t), class: "grid" }));
      axes.append(svg("text", { x: M.l - 6, y: sy(t) + 4, "text-anchor": "end" },
        metric === "cosine" ? fixed(t, 3) : fmtPct(t)));
    }
    axes.append(svg("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis" }));
    axes.append(svg("line", { x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis" }));
    axes.append(svg("text", { x: (M.l + W - M.r) / 2, y: H - 8, "text-anchor": "middle", class: "label" },
      "artifact size"));
    axes.append(svg("text", { x: 14, y: (M.t + H - M.b) / 2, "text-anchor": "middle", class: "label",
      transform: `rotate(-90 14 ${(M.t + H - M.b) / 2})` }, metric));
    root.append(axes);

    if (base) {
      const g = svg("g", { class: "baseline" });
      const r = radius(base.lat);
      const cx = sx(base.x);
      const cy = sy(base.y);
      g.append(svg("rect", { x: cx - r, y: cy - r, width: 2 * r, height: 2 * r }));
      // above the square, or below it where the top of the plot is too near; centred, or shifted off an edge
      const above = cy - r - 4 - 12 >= area.t;
      const w = textWidth("original");
      const x = Math.min(Math.max(cx, area.l + w / 2), area.r - w / 2);
      g.append(svg("text", { x, y: above ? cy - r - 4 : cy + r + 14, "text-anchor": "middle", class: "fit" },
        "original"));
      g.append(svg("title", {}, `original: ${fmtBytes(base.x)}, ${metric} ${fixed(base.y, 4)}, ` +
        `p50 ${fmtMs(base.lat)} at batch ${batch}`));
      root.append(g);
    }
    const sorted = [...points].sort((a, b) => (b.lat || 0) - (a.lat || 0)); // small points drawn on top
    for (const p of sorted) {
      const g = svg("g", { class: `point${p.job.id === state.selected ? " selected" : ""}`,
        dataset: { jobId: p.job.id } });
      const r = radius(p.lat);
      const cx = sx(p.x);
      const cy = sy(p.y);
      g.append(svg("circle", { cx, cy, r, class: "point", dataset: { jobId: p.job.id } }));
      const label = method(p.job);
      const right = cx + r + 3 + textWidth(label) <= area.r; // else on the point's left
      g.append(svg("text", { x: right ? cx + r + 3 : cx - r - 3, y: cy + 4, "text-anchor": right ? "start" : "end",
        class: "fit" }, label));
      const speed = ((p.job.metrics.ratios || {}).speedup || {})[batch];
      g.append(svg("title", {}, `job ${p.job.id}: ${method(p.job)}, ${fmtBytes(p.x)}, ${metric} ${fixed(p.y, 4)}, ` +
        `p50 ${fmtMs(p.lat)} at batch ${batch}${isNum(speed) ? ` (${fmtSpeedup(speed)})` : ""}`));
      root.append(g);
    }
    box.replaceChildren(root);
    fitLabels(root, area);
    note.textContent = `${points.length} result${points.length === 1 ? "" : "s"}; point area grows with latency ` +
      `p50 at batch ${batch} (smaller is faster); click a point to open its job.` +
      (skipped ? ` ${skipped} job(s) without ${metric} not shown.` : "");
  }

  function onChartClick(event) {
    const g = event.target.closest("[data-job-id]");
    if (g) openJob(g.dataset.jobId);
  }

  // ---- polling --------------------------------------------------------------------------------------------

  async function loadModels() {
    const page = await api("/v1/models?limit=200");
    const before = [...state.models.values()].map((m) => `${m.id}:${m.name}`).join();
    state.models = new Map(page.items.map((m) => [m.id, m]));
    state.modelsLoaded = true;
    if ([...state.models.values()].map((m) => `${m.id}:${m.name}`).join() !== before) state.modelsVersion += 1;
    for (const j of state.jobs) if (!state.models.has(j.model_id)) state.missingModels.add(j.model_id);
  }

  // One tick: the job list (one request). Anything else only when the list says it changed: the models when a
  // job names one not seen, the charted jobs when that model's succeeded jobs changed, the report's job when it is
  // not listed and not finished, an artifact's record once.
  async function refresh() {
    const text = await apiText("/v1/jobs?limit=100");
    if (text !== state.listText) {
      state.jobs = JSON.parse(text).items;
      state.listText = text;
    }
    const unknown = state.jobs.some((j) => !state.models.has(j.model_id) && !state.missingModels.has(j.model_id));
    if (!state.modelsLoaded || unknown) await loadModels();

    if (state.selected) {
      const id = state.selected;
      const listed = state.jobs.find((j) => j.id === id);
      if (listed) {
        state.job = listed;
        state.jobError = "";
      } else if (!(state.job && state.job.id === id && TERMINAL.has(state.job.status)) && !state.jobError) {
        try {
          const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
          if (state.selected === id) state.job = job;
        } catch (err) {
          if (!(err instanceof ApiError) || state.selected !== id) throw err;
          state.job = null;
          state.jobError = err.status === 404 || err.status === 422 ? `no job ${id}: ${err.message}` : err.message;
          if (err.status >= 500) throw err;
        }
      }
      const job = state.job;
      if (job && job.artifact_id && !state.artifacts.has(job.artifact_id)) {
        try {
          state.artifacts.set(job.artifact_id, await api(`/v1/artifacts/${encodeURIComponent(job.artifact_id)}`));
        } catch (err) {
          if (!(err instanceof ApiError)) throw err;
          state.artifacts.set(job.artifact_id, { error: err.message });
        }
      }
      if (job && (state.followModel || !state.chartModel)) state.chartModel = job.model_id;
      if (job) state.followModel = false;
    }

    if (!state.chartModel || (!state.models.has(state.chartModel) && !(state.job &&
      state.job.model_id === state.chartModel))) {
      state.chartModel = state.jobs.length ? state.jobs[0].model_id
        : (state.models.size ? state.models.keys().next().value : null);
    }
    const sig = state.chartModel ? [state.chartModel, ...state.jobs.filter((j) => j.model_id === state.chartModel &&
      j.status === "succeeded").map((j) => `${j.id}@${j.updated_at}`)].join(" ") : "";
    if (sig !== state.chartSig) {
      if (state.chartModel) {
        const q = new URLSearchParams({ model_id: state.chartModel, status: "succeeded", limit: "200" });
        state.chartJobs = (await api(`/v1/jobs?${q}`)).items;
      } else {
        state.chartJobs = [];
      }
      state.chartSig = sig;
    }
    state.polls += 1;
  }

  function renderAll() {
    renderJobs();
    renderJob();
    renderModelOptions();
    renderChart();
  }

  // One poll at a time: a poll asked for while one runs (a click) runs right after it.
  let polling = false;
  let pollAgain = false;

  async function poll() {
    clearTimeout(state.timer);
    if (polling) {
      pollAgain = true;
      return;
    }
    polling = true;
    let waitForKey = false;
    try {
      if (!document.hidden || state.polls === 0) {
        await refresh();
        hideAuth();
        renderAll();
        setConn(`updated ${fmtTime(new Date().toISOString()).slice(11)}`, false);
      }
    } catch (err) {
      if (err instanceof AuthError) {
        showAuth(sessionStorage.getItem(KEY_STORAGE) ? `the key was refused: ${err.message}` : "");
        waitForKey = true; // no polling until a key is entered
      } else {
        setConn(`cannot reach the API: ${err.message}`, true);
      }
    } finally {
      polling = false;
    }
    if (pollAgain) {
      pollAgain = false;
      poll();
    } else if (!waitForKey) {
      state.timer = setTimeout(poll, POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("jobs").addEventListener("click", onJobsClick);
    $("chart").addEventListener("click", onChartClick);
    $("artifact-download").addEventListener("click", onDownloadClick);
    $("key-save").addEventListener("click", useKey);
    $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
    $("forget-key").addEventListener("click", forgetKey);
    $("chart-model").addEventListener("change", (e) => { state.chartModel = e.target.value || null; poll(); });
    $("chart-model").addEventListener("focus", () => { state.modelsLoaded = false; }); // newly uploaded models
    $("chart-y").addEventListener("change", renderChart);
    $("chart-batch").addEventListener("change", renderChart);
    window.addEventListener("hashchange", applyRoute);
    window.addEventListener("popstate", applyRoute);
    document.addEventListener("visibilitychange", () => { if (!document.hidden && !state.needKey) poll(); });
    state.selected = routedJob();
    state.scrollToJob = state.followModel = Boolean(state.selected);
    poll();
  });
})();
