// Live charts of the last five minutes, from the master's GET /api/v1/telemetry: per node its
// CPU, GPU, memory and network; per model its tokens/s, time to first token and queue. Drawn
// with uPlot (vendored under /ui/vendor/uplot, loaded before this module as the global uPlot).
//
// Readable without colour: the series of a chart differ by their dash pattern and are named in
// its legend, and each chart's caption says in words what it shows now and its peak. A figure a
// node cannot measure (a GPU it does not have) is a gap, never a zero.
//
// Each node's and model's charts live in one element that outlives the cards: the status
// renders its cards again on every change and puts the same element back in (nodeCharts,
// modelCharts), so a chart keeps drawing across renders.

import { h } from "/ui/dom.js";

const POLL_MS = 2000;
const WINDOW_S = 300;
const HEIGHT = 130;
const DASHES = [[], [6, 4], [2, 3], [10, 3, 2, 3]]; // solid, dashed, dotted, dash-dot
const MARKER_DASHES = ["solid", "dashed", "dotted", "double"]; // the same four, as CSS borders say them

let timer = null;
let following = false;
const groups = new Map(); // "node:NAME" or "model:NAME" -> Group

// ----- what each chart shows -----

const percentText = (v) => `${Math.round(v)}%`;
const sum = (values) => values.reduce((a, b) => a + b, 0);

function bytesText(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = Math.abs(n);
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}
const rateText = (v) => `${bytesText(v)}/s`;
const tokensText = (v) => `${v >= 100 ? Math.round(v) : v.toFixed(1)} tok/s`;
const compact = (v) => (v >= 1000 ? `${(v / 1000).toFixed(v >= 10000 ? 0 : 1)}k` : `${v >= 10 ? Math.round(v) : +v.toFixed(1)}`);
const secondsText = (v) => (v < 1 ? `${Math.round(v * 1000)} ms` : `${v.toFixed(2)} s`);
const countText = (v) => `${Math.round(v)}`;

// A network series: the throughput of a node's interfaces of some kinds (never loopback).
function throughput(sample, direction, thunderbolt) {
  const picked = (sample.network || []).filter(
    (i) => i.kind !== "loopback" && (i.kind === "thunderbolt") === thunderbolt,
  );
  return picked.length ? sum(picked.map((i) => i[direction])) : null;
}
const hasThunderbolt = (samples) => samples.some((s) => (s.network || []).some((i) => i.kind === "thunderbolt"));

const NODE_CHARTS = [
  {
    key: "cpu",
    title: "CPU",
    text: percentText,
    range: () => [0, 100],
    series: () => [{ label: "CPU busy", value: (s) => s.cpuPercent }],
  },
  {
    key: "gpu",
    title: "GPU",
    text: percentText,
    range: () => [0, 100],
    absent: "this node reports no GPU figures (on a Mac, brew install macmon for power too)",
    series: () => [{ label: "GPU busy", value: (s) => (s.gpu ? s.gpu.utilizationPercent : null) }],
  },
  {
    key: "memory",
    title: "Memory",
    text: bytesText,
    range: (samples) => [0, Math.max(...samples.map((s) => s.memoryTotalBytes || 0))],
    series: (samples) => [
      { label: "used", value: (s) => s.memoryUsedBytes },
      samples.some((s) => s.memoryWiredBytes !== null && s.memoryWiredBytes !== undefined)
        ? { label: "wired", value: (s) => s.memoryWiredBytes }
        : null,
      samples.some((s) => s.swapUsedBytes) ? { label: "swap", value: (s) => s.swapUsedBytes } : null,
    ],
  },
  {
    key: "network",
    title: "Network",
    text: rateText,
    series: (samples) => [
      { label: "in", value: (s) => throughput(s, "rxBytesPerS", false) },
      { label: "out", value: (s) => throughput(s, "txBytesPerS", false) },
      hasThunderbolt(samples) ? { label: "Thunderbolt in", value: (s) => throughput(s, "rxBytesPerS", true) } : null,
      hasThunderbolt(samples) ? { label: "Thunderbolt out", value: (s) => throughput(s, "txBytesPerS", true) } : null,
    ],
  },
];

const MODEL_CHARTS = [
  {
    key: "tokens",
    title: "Tokens per second",
    text: tokensText,
    axisText: compact,
    series: () => [
      { label: "generated", value: (p) => p.generationTokensPerS },
      { label: "prompt", value: (p) => p.promptTokensPerS },
    ],
  },
  {
    key: "ttft",
    title: "Time to first token",
    text: secondsText,
    points: true, // a value only where a request started: points, not a line through the gaps
    series: () => [{ label: "mean", value: (p) => p.timeToFirstTokenS }],
  },
  {
    key: "queue",
    title: "Requests",
    text: countText,
    steps: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000], // whole requests on the axis
    series: () => [
      { label: "waiting", value: (p) => p.requestsWaiting },
      { label: "running", value: (p) => p.requestsRunning },
    ],
  },
];

// ----- a chart -----

function colours() {
  const style = getComputedStyle(document.documentElement);
  const read = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
  return { text: read("--text", "#1a1d23"), muted: read("--muted", "#4a5160"), grid: read("--border", "#c9ced8"), line: read("--focus", "#0b57d0") };
}

class Chart {
  constructor(spec) {
    this.spec = spec;
    this.caption = h("figcaption", {}, `${spec.title}: waiting for figures…`);
    this.plot = h("div", { class: "plot", role: "img", "aria-label": `${spec.title}: no figures yet` });
    this.element = h("figure", { class: "chart", "data-chart": spec.key }, this.caption, this.plot);
    this.uplot = null;
    this.labels = "";
  }

  update(samples) {
    const series = this.spec.series(samples).filter(Boolean);
    const xs = samples.map((s) => s.at);
    const columns = series.map((one) => samples.map((s) => number(one.value(s))));
    const known = columns.flat().filter((v) => v !== null);
    this.element.dataset.points = String(samples.length);
    if (!known.length && this.spec.absent) {
      this.say(`${this.spec.title}: ${this.spec.absent}`);
      this.element.dataset.state = "absent";
      this.drop();
      return;
    }
    this.element.dataset.state = "drawn";
    this.say(this.describe(series, columns));
    const labels = series.map((s) => s.label).join("|");
    if (this.uplot && labels !== this.labels) this.drop(); // a series came or went
    this.labels = labels;
    const data = [xs, ...columns];
    if (this.uplot) {
      this.uplot.setData(data);
      this.fit();
    } else if (this.plot.isConnected) {
      this.uplot = new uPlot(this.options(series, samples), data, this.plot);
    }
  }

  // "CPU busy 43% now, peak 97%" for each series, in words.
  describe(series, columns) {
    const parts = series.map((one, i) => {
      const values = columns[i].filter((v) => v !== null);
      if (!values.length) return `${one.label}: none`;
      const now = columns[i][columns[i].length - 1];
      const nowText = now === null ? ": none now" : ` ${this.spec.text(now)} now`;
      return `${one.label}${nowText}, peak ${this.spec.text(Math.max(...values))}`;
    });
    return `${this.spec.title} over the last ${Math.round(WINDOW_S / 60)} minutes: ${parts.join("; ")}`;
  }

  say(text) {
    this.caption.textContent = text;
    this.plot.setAttribute("aria-label", text);
  }

  options(series, samples) {
    const c = colours();
    const spec = this.spec;
    const axis = { stroke: c.muted, grid: { stroke: c.grid, width: 1 }, ticks: { stroke: c.grid, width: 1 } };
    return {
      width: this.width(),
      height: HEIGHT,
      cursor: { drag: { x: false, y: false } },
      // The legend's marker of each series is drawn in its dash pattern too.
      legend: { show: true, live: true, markers: { dash: (u, i) => MARKER_DASHES[(i - 1) % DASHES.length] || "solid" } },
      scales: {
        x: { time: true },
        y: { range: spec.range ? () => spec.range(samples) : (u, min, max) => [0, Math.max(max || 0, 1e-9) * 1.1] },
      },
      axes: [
        { ...axis, values: (u, ticks) => ticks.map((t) => clock(t)) },
        {
          ...axis,
          size: 70,
          ...(spec.steps ? { incrs: spec.steps } : {}),
          values: (u, ticks) => ticks.map((t) => (spec.axisText || spec.text)(t)),
        },
      ],
      series: [
        { label: "time", value: (u, t) => (t === null ? "–" : clock(t)) },
        ...series.map((one, i) => ({
          label: one.label,
          stroke: i % 2 ? c.text : c.line,
          width: 1.5,
          dash: DASHES[i % DASHES.length],
          spanGaps: false,
          points: { show: Boolean(spec.points), size: 6 },
          ...(spec.points ? { paths: () => null } : {}), // points only: no line
          value: (u, v) => (v === null || v === undefined ? "–" : spec.text(v)),
        })),
      ],
    };
  }

  width() {
    return Math.max(160, Math.floor(this.element.clientWidth || 280));
  }

  fit() {
    const width = this.width();
    if (this.uplot && Math.abs(this.uplot.width - width) > 2) this.uplot.setSize({ width, height: HEIGHT });
  }

  drop() {
    if (this.uplot) this.uplot.destroy();
    this.uplot = null;
  }
}

function clock(t) {
  return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function number(v) {
  return typeof v === "number" && Number.isFinite(v) ? v : null;
}

// ----- a node's or a model's charts -----

class Group {
  constructor(label, specs) {
    this.samples = [];
    this.charts = specs.map((spec) => new Chart(spec));
    this.element = h("div", { class: "charts", "aria-label": label }, this.charts.map((c) => c.element));
  }

  add(samples) {
    const last = this.samples.length ? this.samples[this.samples.length - 1].at : -Infinity;
    this.samples.push(...samples.filter((s) => s.at > last));
    const newest = this.samples.length ? this.samples[this.samples.length - 1].at : 0;
    this.samples = this.samples.filter((s) => s.at > newest - WINDOW_S);
    this.draw();
  }

  draw() {
    for (const chart of this.charts) chart.update(this.samples);
  }

  // The master has nothing new of this node or model: its charts say since when.
  quiet() {
    const newest = this.newest();
    if (!newest) return;
    for (const chart of this.charts) {
      if (chart.element.dataset.state === "drawn") chart.say(`${chart.spec.title}: nothing new since ${clock(newest)}`);
      chart.element.dataset.state = chart.element.dataset.state === "drawn" ? "quiet" : chart.element.dataset.state;
    }
  }

  newest() {
    return this.samples.length ? this.samples[this.samples.length - 1].at : 0;
  }
}

function group(kind, name) {
  const key = `${kind}:${name}`;
  if (!groups.has(key)) {
    const label = kind === "node" ? `Charts of node ${name}` : `Charts of model ${name}`;
    groups.set(key, new Group(label, kind === "node" ? NODE_CHARTS : MODEL_CHARTS));
  }
  return groups.get(key);
}

// The element holding a node's charts: the same one on every render of its card.
export function nodeCharts(name) {
  const charts = group("node", name);
  setTimeout(() => charts.draw(), 0); // once the card is in the page, charts can take its width
  return charts.element;
}

export function modelCharts(name) {
  const charts = group("model", name);
  setTimeout(() => charts.draw(), 0);
  return charts.element;
}

// ----- following the master -----

// Asks again from the oldest newest sample any live series has, so a node whose clock runs
// behind the others still gets its new samples; each series keeps only what it has not seen. A
// series that stopped (a node gone, a model stopped) no longer counts once it is out of the
// window, and its charts say since when they have nothing new.
function since() {
  const newest = [...groups.values()].map((g) => g.newest()).filter((t) => t > 0);
  const latest = Math.max(0, ...newest);
  const live = newest.filter((t) => t > latest - WINDOW_S);
  return live.length ? Math.min(...live) : 0;
}

async function poll() {
  try {
    const reply = await fetch(`/api/v1/telemetry?since=${since()}`, {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    if (reply.ok) {
      const body = await reply.json();
      const heard = new Set();
      for (const [name, samples] of Object.entries(body.nodes || {})) {
        group("node", name).add(samples);
        heard.add(`node:${name}`);
      }
      for (const [name, points] of Object.entries(body.models || {})) {
        group("model", name).add(points);
        heard.add(`model:${name}`);
      }
      for (const [key, g] of groups) if (!heard.has(key)) g.quiet();
    }
  } catch (e) {
    // The stream's reconnecting shows a master away; the next poll asks again.
  }
  if (following) timer = setTimeout(poll, POLL_MS);
}

export function followTelemetry() {
  if (following) return;
  following = true;
  poll();
}

export function stopTelemetry() {
  following = false;
  clearTimeout(timer);
  for (const g of groups.values()) for (const c of g.charts) c.drop();
  groups.clear();
}

window.addEventListener("resize", () => {
  for (const g of groups.values()) for (const c of g.charts) c.fit();
});
