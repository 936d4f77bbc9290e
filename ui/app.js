// The GenMLX status page: read-only. It reads the master's status document once, then follows
// /api/v1/stream. It authenticates with the session cookie `genmlx ui` sets; it never sees the
// token. Everything from the cluster is put in the page as text (agents write some of it).

import { followTelemetry, modelCharts, nodeCharts, stopTelemetry } from "/ui/charts.js";
import { fill, h } from "/ui/dom.js";
import { followIntegrations, forgetIntegrations } from "/ui/integrations.js";
import { renderLinks } from "/ui/links.js";

const $ = (id) => document.getElementById(id);
const EVENTS_KEPT = 100;
const RETRY_MS = 3000;

let stream = null;
let events = [];
let retryTimer = null;
let signedOut = false;

// A state word with an icon and a tone; the word and icon carry the meaning, the colour repeats it.
const TONES = {
  good: "✓", // ✓
  busy: "↻", // ↻
  bad: "✕", // ✕
  warn: "!",
  idle: "–", // –
};

function badge(label, word, tone, title) {
  return h(
    "span",
    { class: `badge tone-${tone}`, title: title || null },
    h("span", { class: "icon", "aria-hidden": "true" }, TONES[tone] || ""),
    label ? h("span", { class: "label" }, `${label}: `) : null,
    h("strong", {}, word),
  );
}

// ----- formatting -----

function bytes(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

function when(iso) {
  if (!iso) return "–";
  const t = new Date(iso);
  if (Number.isNaN(t.getTime())) return String(iso);
  return t.toLocaleString();
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (!Number.isFinite(s)) return "";
  if (s < 60) return `${Math.max(s, 0)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function condition(obj, type) {
  return (obj && obj.conditions ? obj.conditions : []).find((c) => c.type === type) || null;
}

function conditionTone(c, goodWhenTrue = true) {
  if (!c || c.status === "Unknown") return "busy";
  return (c.status === "True") === goodWhenTrue ? "good" : "bad";
}

// A model's phase as a tone: moving along is not a failure.
const PHASE_TONES = { Ready: "good", Progressing: "busy", Waiting: "busy", Blocked: "bad", Backoff: "bad" };
function phaseTone(model) {
  return PHASE_TONES[model.phase] || conditionTone(condition(model, "Ready"));
}

function percent(done, total) {
  if (!total) return null;
  return Math.min(100, Math.floor((100 * done) / total));
}

// ----- connection state -----

function setLive(state, text) {
  const live = $("live");
  live.dataset.state = state;
  $("live-text").textContent = text;
}

function showSignIn() {
  signedOut = true;
  if (stream) stream.close();
  stream = null;
  clearTimeout(retryTimer);
  $("content").hidden = true;
  fill($("node-cards"));
  fill($("model-cards"));
  fill($("matrix-wrap"));
  fill($("event-list"));
  forgetIntegrations();
  stopTelemetry();
  $("signin").hidden = false;
  setLive("signed-out", "not signed in");
}

async function getJson(path) {
  const reply = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (reply.status === 401 || reply.status === 403) return { unauthorized: true };
  if (!reply.ok) throw new Error(`${path}: HTTP ${reply.status}`);
  return { body: await reply.json() };
}

async function start() {
  clearTimeout(retryTimer);
  try {
    const status = await getJson("/api/v1/status");
    if (status.unauthorized) return showSignIn();
    render(status.body);
    await refreshEvents();
    if (signedOut) return;
    followTelemetry();
  } catch (e) {
    setLive("down", "reconnecting… (the master does not answer)");
    retryTimer = setTimeout(start, RETRY_MS);
    return;
  }
  follow();
}

function follow() {
  if (stream) stream.close();
  stream = new EventSource("/api/v1/stream");
  let lost = false;
  stream.addEventListener("open", () => {
    setLive("live", "live");
    if (lost) refreshEvents(); // what happened while the stream was away
    lost = false;
  });
  stream.addEventListener("status", (e) => {
    setLive("live", "live");
    render(JSON.parse(e.data));
  });
  stream.addEventListener("event", (e) => {
    addEvent(JSON.parse(e.data));
    renderEvents();
  });
  stream.addEventListener("error", () => {
    if (signedOut) return;
    lost = true;
    setLive("down", "reconnecting…");
    if (stream && stream.readyState === EventSource.CLOSED) {
      // The browser gave up (an answer that is not a stream: 401 when the session is gone, or an
      // error page). Ask again from the start: that tells a lost session from a master still away.
      stream = null;
      retryTimer = setTimeout(start, RETRY_MS);
    }
    // Otherwise EventSource reconnects by itself; the status it then sends fills the page again.
  });
}

async function refreshEvents() {
  try {
    const history = await getJson("/api/v1/events?limit=" + EVENTS_KEPT);
    if (history.unauthorized) return showSignIn();
    events = history.body.events || [];
    renderEvents();
  } catch (e) {
    // The stream's own reconnecting shows the trouble; the next reconnect asks again.
  }
}

function sameEvent(a, b) {
  return (
    a.object.kind === b.object.kind &&
    a.object.name === b.object.name &&
    a.reason === b.reason &&
    a.message === b.message &&
    a.firstTimestamp === b.firstTimestamp
  );
}

function addEvent(event) {
  events = [event, ...events.filter((e) => !sameEvent(e, event))].slice(0, EVENTS_KEPT);
}

// ----- rendering -----

function render(doc) {
  signedOut = false;
  $("signin").hidden = true;
  $("content").hidden = false;
  $("cluster-name").textContent = doc.name || "cluster";
  document.title = `${doc.name || "cluster"} · GenMLX`;
  renderOverview(doc);
  renderNodes(doc);
  renderLinks(doc, $("links"));
  renderModels(doc);
  followIntegrations(doc);
}

function syncState(doc) {
  const reconciling = condition(doc, "Reconciling");
  const pending = doc.pendingActions || [];
  if (!doc.generation) return { word: "No manifest", tone: "idle", why: "nothing applied yet" };
  if (doc.observedGeneration !== doc.generation)
    return { word: "OutOfSync", tone: "busy", why: `generation ${doc.generation} not observed yet` };
  if (pending.length) return { word: "OutOfSync", tone: "busy", why: `${pending.length} action(s) pending` };
  const stuck = (doc.models || []).filter((m) => (condition(m, "Stalled") || {}).status === "True");
  if (stuck.length)
    return { word: "OutOfSync", tone: "bad", why: `stalled: ${stuck.map((m) => m.name).join(", ")}` };
  if (reconciling && reconciling.status === "True")
    return { word: "Syncing", tone: "busy", why: reconciling.message || reconciling.reason };
  return { word: "Synced", tone: "good", why: `generation ${doc.generation} applied` };
}

function healthState(doc) {
  const models = doc.models || [];
  if (!models.length) return { word: "No models", tone: "idle" };
  const ready = models.filter((m) => conditionTone(condition(m, "Ready")) === "good").length;
  const stalled = models.filter((m) => (condition(m, "Stalled") || {}).status === "True").length;
  const degraded = condition(doc, "Degraded");
  if (degraded && degraded.status === "True")
    return { word: "Degraded", tone: "bad", why: degraded.message || degraded.reason };
  if (ready === models.length) return { word: "Healthy", tone: "good", why: `${ready} of ${models.length} model(s) serving` };
  if (stalled) return { word: "Degraded", tone: "bad", why: `${ready} of ${models.length} model(s) serving, ${stalled} stalled` };
  return { word: "Progressing", tone: "busy", why: `${ready} of ${models.length} model(s) serving` };
}

function renderOverview(doc) {
  const ready = condition(doc, "Ready");
  const sync = syncState(doc);
  const health = healthState(doc);
  const readyWord = ready ? (ready.status === "True" ? "Ready" : ready.status === "False" ? "Not ready" : "Unknown") : "Unknown";
  fill(
    $("badges"),
    h("li", {}, badge("Cluster", readyWord, conditionTone(ready), ready && ready.reason)),
    h("li", {}, badge("Sync", sync.word, sync.tone), sync.why ? h("span", { class: "why" }, sync.why) : null),
    h("li", {}, badge("Health", health.word, health.tone), health.why ? h("span", { class: "why" }, health.why) : null),
  );
  $("cluster-message").textContent = ready
    ? `${ready.reason ? ready.reason + ": " : ""}${ready.message || ""}`
    : "";

  const rev = doc.lastAppliedRevision;
  const items = [];
  const pair = (term, ...value) => items.push(h("div", {}, h("dt", {}, term), h("dd", {}, ...value)));
  if (rev && rev.commit) {
    pair(
      "Commit",
      h("code", {}, String(rev.commit).slice(0, 12)),
      rev.dirty ? h("span", { class: "tag tone-warn" }, "dirty: uncommitted changes") : h("span", { class: "tag" }, "clean"),
    );
  } else if (doc.generation) {
    pair("Commit", "not from a git checkout");
  }
  if (doc.manifestFile) pair("Manifest", h("code", {}, doc.manifestFile));
  if (doc.appliedAt) pair("Applied", h("time", { datetime: doc.appliedAt }, `${when(doc.appliedAt)} (${ago(doc.appliedAt)})`));
  pair("Generation", `${doc.observedGeneration ?? 0} observed of ${doc.generation ?? 0}`);
  if (doc.lastPass) {
    pair("Last pass", h("time", { datetime: doc.lastPass.at }, when(doc.lastPass.at)), ` · ${doc.lastPass.durationSeconds} s`);
  }
  fill($("applied"), items);

  const stalled = condition(doc, "Stalled");
  const problems = [];
  if (stalled && stalled.status === "True") {
    problems.push(
      h("div", { class: "alert tone-bad", role: "note" },
        h("h3", {}, `Stalled: ${stalled.reason}`),
        h("p", {}, stalled.message || ""),
        stalled.issues ? h("ul", {}, stalled.issues.map((i) => h("li", {}, i))) : null),
    );
  }
  const errors = (doc.lastPass && doc.lastPass.errors) || [];
  if (errors.length) {
    problems.push(h("div", { class: "alert tone-warn" }, h("h3", {}, "Errors in the last pass"), h("ul", {}, errors.map((e) => h("li", {}, String(e))))));
  }
  fill($("stalled"), problems);

  const pending = doc.pendingActions || [];
  fill(
    $("pending"),
    pending.length
      ? h("div", { class: "pending" }, h("h3", {}, `Pending plan (${pending.length})`), h("ol", {}, pending.map((a) => h("li", {}, h("code", {}, String(a))))))
      : null,
  );
}

function rankLabel(launch) {
  return `rank ${launch.rank + 1} of ${launch.worldSize}`;
}

function renderNodes(doc) {
  const cards = (doc.nodes || []).map((node) => {
    const ready = condition(node, "Ready");
    const facts = node.facts;
    const online = ready && ready.status === "True";
    const rows = [];
    const row = (term, ...value) => rows.push(h("div", {}, h("dt", {}, term), h("dd", {}, ...value)));
    row("Address", node.address ? h("code", {}, node.address) : "not found");
    if (facts) {
      row("Chip", facts.chip || facts.gpu || `${facts.arch} (${facts.cpuCount} cores)`);
      const used = facts.memoryTotal - facts.memoryAvailable;
      row("Memory", `${bytes(used)} used of ${bytes(facts.memoryTotal)}`, meter(used, facts.memoryTotal, "memory used"));
      row("System", `${facts.os} ${facts.osVersion || ""}`.trim());
    }
    const storage = (node.storage || []).map((s) =>
      h("li", {}, h("code", {}, s.path), " ", s.exists ? `${bytes(s.freeBytes)} free of ${bytes(s.totalBytes)}` : "missing"),
    );
    const ranks = (node.ranks || []).map((r) =>
      h("li", {}, `${r.launch.model}: ${rankLabel(r.launch)}, ${r.state}${r.phase && r.phase !== r.state ? ` (${r.phase})` : ""}`),
    );
    return h(
      "article",
      { class: "card", "aria-labelledby": `node-${node.name}` },
      h("h3", { id: `node-${node.name}` }, node.name, " ", badge(null, online ? "online" : ready && ready.status === "Unknown" ? "unknown" : "offline", conditionTone(ready))),
      ready && !online ? h("p", { class: "message" }, `${ready.reason}: ${ready.message || ""}`) : null,
      h("dl", { class: "facts" }, rows),
      h("h4", {}, "Last five minutes"),
      nodeCharts(node.name),
      h("h4", {}, "Storage"),
      storage.length ? h("ul", { class: "plain" }, storage) : h("p", {}, "none reported"),
      h("h4", {}, "Ranks"),
      ranks.length ? h("ul", { class: "plain" }, ranks) : h("p", {}, "none"),
    );
  });
  fill($("node-cards"), cards.length ? cards : h("p", {}, "No nodes in the applied manifest."));

  const rotation = doc.tokenRotation;
  fill(
    $("rotation"),
    rotation
      ? h("div", { class: "rotation" },
          h("h3", {}, "Token rotation"),
          h("p", {}, `The old cluster token counts until ${rotation.previousUntil}. `,
            rotation.nodesOnPreviousToken.length
              ? `Still on it: ${rotation.nodesOnPreviousToken.join(", ")} (${rotation.manual ? "copy the token file to them" : "the master pushes the new one"}).`
              : "Every node holds the new one."))
      : null,
  );
  announcers(
    "impostors",
    "Impostors",
    "These announce a node's name but cannot prove they hold the cluster token; nothing is sent to them.",
    (doc.impostors || []).map((i) => `${i.name} at ${i.address}: ${i.message}`),
  );
  const unmanaged = doc.unmanagedAgents || [];
  announcers(
    "unmanaged",
    "Unmanaged agents",
    "These agents announce themselves but cluster.yaml does not declare them; they are never used.",
    unmanaged.map((a) => `${a.name || "?"}${a.address ? ` at ${a.address}` : ""}${(a.storage || []).length ? " (joined)" : ""}`),
  );
  const joined = unmanaged.filter((a) => (a.storage || []).length);
  if (joined.length) {
    $("unmanaged").append(
      h("p", {}, "To use the nodes that joined, add them under spec.nodes in cluster.yaml and run genmlx apply:"),
      h("pre", { class: "node-yaml" }, h("code", {}, joined.map(nodeEntry).join("\n"))),
    );
  }
}

// A node's entry under spec.nodes in cluster.yaml, as `genmlx status` prints it.
function nodeEntry(agent) {
  return [
    `- name: ${agent.name}`,
    `  # address: ${agent.address}   # where zeroconf does not reach it`,
    "  storage:",
    ...agent.storage.map((path) => `    - path: ${JSON.stringify(path)}`), // a JSON string is a YAML one
  ].join("\n");
}

// A section listing what announces itself but is not used (its element id is also its class).
function announcers(id, title, explanation, lines) {
  fill(
    $(id),
    lines.length
      ? h("div", { class: id }, h("h3", {}, title), h("p", {}, explanation),
          h("ul", { class: "plain" }, lines.map((line) => h("li", {}, line))))
      : null,
  );
}

function meter(value, max, label) {
  if (!max) return null;
  return h("meter", { min: 0, max, value, "aria-label": label });
}

// What one model is doing on one node, in words.
function cellState(model, node) {
  const transfers = (node.transfers || []).filter((t) => t.model === model.name);
  const active = transfers.find((t) => t.state === "running" || t.state === "pending" || t.state === "queued");
  const failed = transfers.find((t) => t.state === "failed");
  const rank = (model.ranks || []).find((r) => r.node === node.name);
  const copy = (model.copies || []).find((c) => c.node === node.name);
  if (rank) {
    const launch = rank.launch || {};
    const label = rankLabel(launch);
    // The master's own check of rank 0 (model Ready) is fresher than the agent's periodic one, and
    // ranks serve as one group: a running rank of a Ready model serves, whatever its agent last saw.
    const serving = rank.phase === "serving" || rank.phase === "ready" || model.phase === "Ready";
    if (rank.state === "running" && serving) return { tone: "good", text: `serving ${label}` };
    if (rank.state === "running") return { tone: "busy", text: `${rank.phase || "starting"} ${label}` };
    if (rank.state === "exited" || rank.state === "failed")
      return { tone: "bad", text: `${label} exited${rank.exitCode !== null && rank.exitCode !== undefined ? ` (code ${rank.exitCode})` : ""}` };
    return { tone: "busy", text: `${rank.state} ${label}` };
  }
  if (active) {
    const pct = percent(active.bytesDone, active.bytesTotal);
    const amount = pct === null ? bytes(active.bytesDone) : `${pct}%`;
    if (active.kind === "download") return { tone: "busy", text: `downloading ${amount}`, pct };
    const from = String(active.origin || "").replace(/^peer\s+/, "").split("/")[0];
    return { tone: "busy", text: `syncing from ${peerName(from)} ${amount}`, pct };
  }
  if (failed && !copy) return { tone: "bad", text: `failed: ${failed.error || "unknown reason"}` };
  if (copy) return { tone: "good", text: "verified copy present" };
  const ready = condition(model, "Ready");
  if (phaseTone(model) === "bad" && ready)
    return { tone: "bad", text: `failed: ${ready.reason}: ${ready.message || ""}` };
  return { tone: "idle", text: "not present" };
}

let nodeByAddress = new Map();
function peerName(address) {
  return nodeByAddress.get(address) || address;
}

function placed(model, node) {
  return model.nodes.includes("*") || model.nodes.includes(node.name);
}

function renderModels(doc) {
  const nodes = doc.nodes || [];
  const models = doc.models || [];
  nodeByAddress = new Map(nodes.filter((n) => n.address).map((n) => [n.address, n.name]));
  if (!models.length) {
    fill($("matrix-wrap"), h("p", {}, "No models in the applied manifest."));
    fill($("model-cards"));
    return;
  }
  const head = h("tr", {}, h("th", { scope: "col" }, "Model"), nodes.map((n) => h("th", { scope: "col" }, n.name)));
  const body = models.map((m) =>
    h("tr", { "data-model": m.name },
      h("th", { scope: "row" }, m.name, " ", badge(null, m.phase || "?", phaseTone(m))),
      nodes.map((n) => {
        if (!placed(m, n)) return h("td", { class: "cell off", "data-node": n.name }, h("span", { class: "muted" }, "not placed here"));
        const state = cellState(m, n);
        return h("td", { class: `cell tone-${state.tone}`, "data-node": n.name },
          h("span", { class: "icon", "aria-hidden": "true" }, TONES[state.tone]), " ",
          h("span", { class: "state" }, state.text),
          state.pct !== undefined && state.pct !== null ? h("progress", { max: 100, value: state.pct, "aria-hidden": "true" }) : null);
      }),
    ),
  );
  fill($("matrix-wrap"), h("table", { class: "matrix" }, h("caption", {}, "Each model on each node"), h("thead", {}, head), h("tbody", {}, body)));

  fill($("model-cards"), models.map((m) => {
    const ready = condition(m, "Ready");
    const launches = (m.ranks || []).map((r) => r.launch).filter(Boolean);
    const first = launches.find((l) => l.rank === 0) || launches[0];
    const rows = [];
    const row = (term, ...value) => rows.push(h("div", {}, h("dt", {}, term), h("dd", {}, ...value)));
    row("Endpoint", m.endpoint ? h("code", {}, m.endpoint) : "not serving");
    row("Source", h("code", {}, m.source), m.revision ? ` @ ${m.revision}` : "");
    const commits = [...new Set((m.copies || []).map((c) => c.commit).filter(Boolean))];
    if (commits.length) row("Commit", commits.map((c, i) => [i ? ", " : "", h("code", {}, String(c).slice(0, 12))]));
    row("Parallelism", first ? `${first.parallelism} over ${first.worldSize} rank(s)` : `${m.parallelism} (not started)`);
    if (first && first.layerSplit) {
      const byRank = [...launches].sort((a, b) => a.rank - b.rank);
      const owner = (rank) => ((m.ranks || []).find((r) => r.launch && r.launch.rank === rank) || {}).node;
      row("Layer split", byRank.map((l, i) => `${i ? " · " : ""}rank ${l.rank + 1} on ${owner(l.rank) || "?"}: ${l.layerSplit[l.rank] ?? l.layerSplit[i]} layers`).join(""));
    }
    if (m.batching) row("Batching", m.batching.reason);
    for (const tier of m.promptCache || []) {
      const rate = tier.lookups ? `${Math.round((100 * tier.hits) / tier.lookups)}% hit rate (${tier.hits} of ${tier.lookups} prompts)` : "no lookups yet";
      const kind = tier.kind === "snapshots" ? ", whole-state snapshots" : tier.kind === "blocks" ? ", blocks" : "";
      row(`Prompt cache, ${tier.tier}`, `${tier.entries} entries, ${bytes(tier.bytes)}${kind} · ${rate}`);
    }
    const caches = m.promptCaches || [];
    if (caches.length) row("Prompt cache on disk", caches.map((c, i) => `${i ? " · " : ""}${c.node}: ${bytes(c.bytes)} in ${c.blocks} files`).join(""));
    return h("article", { class: "card", "aria-labelledby": `model-${m.name}`, "data-model": m.name },
      h("h3", { id: `model-${m.name}` }, m.name, " ", badge(null, ready && ready.status === "True" ? "Ready" : m.phase || "Not ready", phaseTone(m))),
      h("p", { class: "message" }, ready ? `${ready.reason}: ${ready.message || ""}` : ""),
      h("dl", { class: "facts" }, rows),
      h("h4", {}, "Last five minutes"),
      modelCharts(m.name));
  }));
}

function renderEvents() {
  const list = events.map((e) =>
    h("li", { class: `event ${e.type === "Warning" ? "tone-warn" : ""}` },
      h("span", { class: "type" }, e.type === "Warning" ? "⚠ Warning" : "Normal"),
      " ",
      h("time", { datetime: e.lastTimestamp, title: when(e.lastTimestamp) }, ago(e.lastTimestamp) || when(e.lastTimestamp)),
      " ",
      h("span", { class: "object" }, `${e.object.kind} ${e.object.name}`),
      " ",
      h("strong", {}, e.reason),
      e.count > 1 ? h("span", { class: "count", title: `first ${when(e.firstTimestamp)}` }, ` ×${e.count}`) : null,
      h("p", { class: "message" }, e.message)),
  );
  fill($("event-list"), list.length ? list : h("li", {}, "No events yet."));
}

// Section links move the keyboard focus too, so the next Tab continues inside that section.
for (const link of document.querySelectorAll('nav a[href^="#"]')) {
  link.addEventListener("click", () => {
    const target = document.getElementById(link.getAttribute("href").slice(1));
    if (target) setTimeout(() => target.focus(), 0);
  });
}

start();
