// Distillery dashboard: polls the JSON API and renders jobs, one job's report and a per-model chart.
// No framework, no build step, nothing fetched from another origin; text is only ever set with textContent.
"use strict";

(() => {
  const KEY_STORAGE = "distillery.apiKey";
  const POLL_MS = 1500;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    jobs: [],
    models: new Map(), // id -> model
    selected: null, // job id shown in the job panel
    chartModel: null, // model id charted (null: the newest job's model)
    chartJobs: [],
    needKey: false,
    timer: null,
    polls: 0,
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

  async function api(path) {
    const headers = { Accept: "application/json" };
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers.Authorization = "Bearer " + key;
    const resp = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    if (resp.status === 401) {
      const body = await resp.json().catch(() => null);
      throw new AuthError((body && body.error && body.error.message) || "unauthorized");
    }
    if (!resp.ok) {
      const body = await resp.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || `${path}: HTTP ${resp.status}`);
    }
    return resp.json();
  }

  // ---- formatting -----------------------------------------------------------------------------------------

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);

  function fmtBytes(n) {
    if (!isNum(n)) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(n) >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)} ${units[i]}`;
  }

  function fmtCount(n) {
    if (!isNum(n)) return "–";
    return n.toLocaleString("en-US");
  }

  function fmtPct(v) {
    return isNum(v) ? `${(v * 100).toFixed(2)}%` : "–";
  }

  function fmtNum(v, digits = 4) {
    return isNum(v) ? v.toFixed(digits) : "–";
  }

  function fmtMs(v) {
    if (!isNum(v)) return "–";
    return `${v < 1 ? v.toFixed(3) : v < 100 ? v.toFixed(2) : v.toFixed(0)} ms`;
  }

  function fmtRatio(v) {
    return isNum(v) ? `${v.toFixed(2)}×` : "–";
  }

  function fmtTime(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
  }

  function fmtDuration(start, end) {
    if (!start) return "–";
    const ms = (end ? new Date(end) : new Date()) - new Date(start);
    if (!Number.isFinite(ms) || ms < 0) return "–";
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  const method = (job) => (job.config && job.config.method) || (job.kind === "distill" ? "distill" : "–");
  const modelName = (id) => (state.models.get(id) ? state.models.get(id).name : `…${id.slice(-8)}`);
  const shortId = (id) => `…${id.slice(-8)}`; // ids begin with their creation time: the end tells them apart

  function statusBadge(status) {
    return el("span", { class: `status status-${status}`, text: status });
  }

  // ---- connection and key ---------------------------------------------------------------------------------

  function setConn(text, bad) {
    const c = $("conn");
    c.textContent = text;
    c.classList.toggle("bad", Boolean(bad));
  }

  function showAuth(message) {
    state.needKey = true;
    // nothing read with a previous key stays on the page
    state.jobs = [];
    state.chartJobs = [];
    state.models.clear();
    state.selected = null;
    $("jobs").querySelector("tbody").replaceChildren();
    $("metrics").querySelector("tbody").replaceChildren();
    $("job-facts").replaceChildren();
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
      el("div", { class: "stage muted", text: job.stage || "" }));
  }

  function renderJobs() {
    const running = state.jobs.some((j) => !TERMINAL.has(j.status)); // their "took" grows between polls
    if (unchanged("jobs", state.jobs, state.selected, [...state.models.keys()], running ? Date.now() : 0)) return;
    const body = $("jobs").querySelector("tbody");
    const rows = state.jobs.map((job) => {
      const tr = el("tr", { id: `job-${job.id}`, class: `job-row${job.id === state.selected ? " selected" : ""}`,
        dataset: { jobId: job.id, status: job.status }, tabindex: 0 },
        el("td", {}, el("code", { text: shortId(job.id), title: job.id })),
        el("td", { text: job.kind }),
        el("td", { text: method(job) }),
        el("td", { text: modelName(job.model_id), title: job.model_id }),
        el("td", { class: "status-cell" }, statusBadge(job.status),
          job.metrics && job.metrics.slower_than_baseline ? el("span", { class: "flag", text: "slower",
            title: "slower than the baseline at some batch size" }) : null),
        progressCell(job),
        el("td", { text: fmtTime(job.created_at) }),
        el("td", { text: fmtDuration(job.started_at, job.finished_at) }));
      return tr;
    });
    body.replaceChildren(...rows);
    $("jobs-empty").hidden = state.jobs.length > 0;
    $("jobs-count").textContent = state.jobs.length ? `(${state.jobs.length} newest)` : "";
  }

  function onJobsClick(event) {
    const tr = event.target.closest("tr.job-row");
    if (tr) selectJob(tr.dataset.jobId);
  }

  function onJobsKey(event) {
    if (event.key !== "Enter") return;
    const tr = event.target.closest("tr.job-row");
    if (tr) selectJob(tr.dataset.jobId);
  }

  function selectJob(id) {
    state.selected = id;
    const job = state.jobs.find((j) => j.id === id) || state.chartJobs.find((j) => j.id === id);
    if (job) {
      state.chartModel = job.model_id;
      renderJob(job);
    }
    renderJobs();
    poll();
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
        isNum(ratios.params) ? `${fmtRatio(ratios.params)}` : ""),
    ];
    if (isNum(base.macs) || isNum(res.macs)) {
      rows.push(metricRow("macs", "MACs per row", side(base.macs, fmtCount), side(res.macs, fmtCount),
        isNum(ratios.macs) ? fmtRatio(ratios.macs) : ""));
    }
    const batches = Object.keys(res.latency_ms || {}).sort((a, b) => Number(a) - Number(b));
    for (const b of batches) {
      const bl = (base.latency_ms || {})[b] || {};
      const rl = (res.latency_ms || {})[b] || {};
      const speedup = (ratios.speedup || {})[b];
      const slower = isNum(speedup) && speedup < 1;
      rows.push(metricRow(`latency_ms_p50_${b}`, `Latency p50, batch ${b}`, side(bl.p50, fmtMs), side(rl.p50, fmtMs),
        isNum(speedup) ? `${fmtRatio(speedup)} speedup${slower ? " (slower)" : ""}` : "",
        { cls: slower ? "slower" : null }));
    }
    if (isNum(base.accuracy) || isNum(res.accuracy)) {
      const drop = m.accuracy_drop;
      rows.push(metricRow("accuracy", "Accuracy (test split)", side(base.accuracy, fmtPct), side(res.accuracy, fmtPct),
        isNum(drop) ? `${drop > 0 ? "−" : "+"}${Math.abs(drop * 100).toFixed(2)} pt` : "",
        { cls: m.within_accuracy_budget === false ? "slower" : null }));
    }
    if (isNum(base.f1_macro) || isNum(res.f1_macro)) {
      rows.push(metricRow("f1_macro", "F1 (macro)", side(base.f1_macro, (v) => fmtNum(v, 4)),
        side(res.f1_macro, (v) => fmtNum(v, 4)), ""));
    }
    const none = { value: null, text: "–" };
    if (isNum(res.agreement)) rows.push(metricRow("agreement", "Agreement with baseline (top-1)", none,
      side(res.agreement, fmtPct), ""));
    if (isNum(res.cosine)) rows.push(metricRow("cosine", "Cosine similarity of outputs", none,
      side(res.cosine, (v) => fmtNum(v, 5)), ""));
    if (isNum(res.sqnr_db)) rows.push(metricRow("sqnr_db", "SQNR", none,
      side(res.sqnr_db, (v) => `${v.toFixed(1)} dB`), ""));
    return rows;
  }

  function renderJob(job) {
    $("job-panel").hidden = false;
    if (unchanged("job", job, modelName(job.model_id))) return;
    $("job-id").textContent = job.id;
    $("job-status").replaceChildren(statusBadge(job.status));
    const facts = [
      ["Kind", job.kind], ["Method", method(job)], ["Model", `${modelName(job.model_id)} (${job.model_id})`],
      ["Dataset", job.dataset_id || "–"],
      ["Progress", `${Math.round((job.progress || 0) * 100)}% ${job.stage || ""}`],
      ["Device", job.device || job.device_requested], ["Worker", job.worker || "–"],
      ["Attempts", `${job.attempts} / ${job.max_attempts}`], ["Created", fmtTime(job.created_at)],
      ["Started", fmtTime(job.started_at)], ["Finished", fmtTime(job.finished_at)],
      ["Artifact", job.artifact_id || "–"],
    ];
    $("job-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: String(v) })]));
    $("job-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    const m = job.metrics;
    const flags = [];
    if (m && m.slower_than_baseline) {
      flags.push(el("span", { class: "flag", id: "flag-slower", text: "slower than baseline" }));
    }
    if (m && m.within_accuracy_budget === false) {
      flags.push(el("span", { class: "flag", text: "accuracy drop over budget" }));
    }
    $("job-flags").replaceChildren(...flags);
    const table = $("metrics");
    if (m && m.baseline && m.result) {
      table.querySelector("tbody").replaceChildren(...metricRows(m));
      table.hidden = false;
    } else {
      table.querySelector("tbody").replaceChildren();
      table.hidden = true;
    }
    const notes = (m && Array.isArray(m.notes) ? m.notes : []).map((n) => el("li", { text: String(n) }));
    $("job-notes").replaceChildren(...notes);
  }

  function closeJob() {
    state.selected = null;
    drawn.job = "";
    $("job-panel").hidden = true;
    renderJobs();
  }

  // ---- chart ----------------------------------------------------------------------------------------------

  function yMetric(jobs) {
    const chosen = $("chart-y").value;
    if (chosen !== "auto") return chosen;
    return jobs.some((j) => isNum(j.metrics.result.accuracy)) ? "accuracy" : "agreement";
  }

  function niceTicks(lo, hi, n = 5) {
    const span = hi - lo || 1;
    const step0 = span / n;
    const mag = 10 ** Math.floor(Math.log10(step0));
    const step = [1, 2, 2.5, 5, 10].map((s) => s * mag).find((s) => span / s <= n) || step0;
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
    const latency = (side) => {
      const l = (side.latency_ms || {})[batch];
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
    const all = base ? [...points, base] : points;
    if (!all.length) {
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

    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": `${modelName(state.chartModel)}: size against ${metric}` });
    const axes = svg("g", { class: "axes" });
    for (const t of niceTicks(0, xMax)) {
      axes.append(svg("line", { x1: sx(t), x2: sx(t), y1: M.t, y2: H - M.b, class: "grid" }));
      axes.append(svg("text", { x: sx(t), y: H - M.b + 16, "text-anchor": "middle" }, fmtBytes(t)));
    }
    for (const t of niceTicks(yLo, yHi)) {
      axes.append(svg("line", { x1: M.l, x2: W - M.r, y1: sy(t), y2: sy(t), class: "grid" }));
      axes.append(svg("text", { x: M.l - 6, y: sy(t) + 4, "text-anchor": "end" },
        metric === "cosine" ? t.toFixed(3) : `${(t * 100).toFixed(1)}%`));
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
      g.append(svg("rect", { x: sx(base.x) - r, y: sy(base.y) - r, width: 2 * r, height: 2 * r }));
      g.append(svg("text", { x: sx(base.x), y: sy(base.y) - r - 4, "text-anchor": "middle" }, "original"));
      g.append(svg("title", {}, `original: ${fmtBytes(base.x)}, ${metric} ${base.y.toFixed(4)}, ` +
        `p50 ${fmtMs(base.lat)} at batch ${batch}`));
      root.append(g);
    }
    const sorted = [...points].sort((a, b) => (b.lat || 0) - (a.lat || 0)); // small points drawn on top
    for (const p of sorted) {
      const g = svg("g", { class: `point${p.job.id === state.selected ? " selected" : ""}`,
        dataset: { jobId: p.job.id } });
      g.append(svg("circle", { cx: sx(p.x), cy: sy(p.y), r: radius(p.lat), class: "point",
        dataset: { jobId: p.job.id } }));
      g.append(svg("text", { x: sx(p.x) + radius(p.lat) + 3, y: sy(p.y) + 4 }, method(p.job)));
      const speed = ((p.job.metrics.ratios || {}).speedup || {})[batch];
      g.append(svg("title", {}, `job ${p.job.id}: ${method(p.job)}, ${fmtBytes(p.x)}, ${metric} ${p.y.toFixed(4)}, ` +
        `p50 ${fmtMs(p.lat)} at batch ${batch}${isNum(speed) ? ` (${fmtRatio(speed)} speedup)` : ""}`));
      root.append(g);
    }
    box.replaceChildren(root);
    note.textContent = `${points.length} result${points.length === 1 ? "" : "s"}; point area grows with latency ` +
      `p50 at batch ${batch} (smaller is faster); click a point to open its job.` +
      (skipped ? ` ${skipped} job(s) without ${metric} not shown.` : "");
  }

  function onChartClick(event) {
    const g = event.target.closest("[data-job-id]");
    if (g) selectJob(g.dataset.jobId);
  }

  // ---- polling --------------------------------------------------------------------------------------------

  async function loadModels() {
    const page = await api("/v1/models?limit=200");
    state.models = new Map(page.items.map((m) => [m.id, m]));
  }

  async function refresh() {
    const page = await api("/v1/jobs?limit=100");
    state.jobs = page.items;
    const unknownModel = state.jobs.some((j) => !state.models.has(j.model_id));
    if (unknownModel || state.polls % 20 === 0) await loadModels();
    if (!state.chartModel || !state.models.has(state.chartModel)) {
      state.chartModel = state.jobs.length ? state.jobs[0].model_id
        : (state.models.size ? state.models.keys().next().value : null);
    }
    if (state.chartModel) {
      const q = new URLSearchParams({ model_id: state.chartModel, status: "succeeded", limit: "200" });
      state.chartJobs = (await api(`/v1/jobs?${q}`)).items;
    } else {
      state.chartJobs = [];
    }
    if (state.selected) {
      const listed = state.jobs.find((j) => j.id === state.selected);
      const job = listed || (await api(`/v1/jobs/${encodeURIComponent(state.selected)}`));
      renderJob(job);
    }
    state.polls += 1;
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
        renderJobs();
        renderModelOptions();
        renderChart();
        setConn(`updated ${new Date().toLocaleTimeString()}`, false);
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
    $("jobs").addEventListener("keydown", onJobsKey);
    $("chart").addEventListener("click", onChartClick);
    $("job-close").addEventListener("click", closeJob);
    $("key-save").addEventListener("click", useKey);
    $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey(); });
    $("forget-key").addEventListener("click", forgetKey);
    $("chart-model").addEventListener("change", (e) => { state.chartModel = e.target.value || null; poll(); });
    $("chart-y").addEventListener("change", renderChart);
    $("chart-batch").addEventListener("change", renderChart);
    document.addEventListener("visibilitychange", () => { if (!document.hidden && !state.needKey) poll(); });
    poll();
  });
})();
