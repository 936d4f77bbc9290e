// The Integrations section: how to point Claude Code, Codex, opencode, Cline and Open WebUI at this
// cluster, as copyable blocks. The master renders them (GET /api/v1/integrations, the same text as
// `genmlx integrations`) with the key as the `$(genmlx token --show)` placeholder: the page never
// holds the token. They are asked for again only when the set of Ready models changes.

import { fill, h } from "/ui/dom.js";

const COPIED_MS = 2000;
let shownFor = null;

// Signed out: nothing of the cluster stays on the page, and the next sign-in asks again.
export function forgetIntegrations() {
  shownFor = null;
  fill($list());
}

function readyModels(doc) {
  return (doc.models || [])
    .filter((m) => ((m.conditions || []).find((c) => c.type === "Ready") || {}).status === "True")
    .map((m) => m.name);
}

// After each status document: fetch the blocks again when the Ready models are not those shown.
export async function followIntegrations(doc) {
  const key = JSON.stringify(readyModels(doc));
  if (key === shownFor) return;
  shownFor = key;
  try {
    const reply = await fetch("/api/v1/integrations", { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    renderIntegrations(await reply.json());
  } catch (e) {
    shownFor = null; // ask again with the next status document
    fill($list(), h("p", {}, "The client configuration could not be read; run `genmlx integrations` instead."));
  }
}

function $list() {
  return document.getElementById("integration-list");
}

function renderIntegrations(document_) {
  const ready = document_.readyModels || [];
  const others = ready.length > 1
    ? [`, the first Ready model (Ready: ${ready.join(", ")}); `, h("code", {}, "genmlx integrations CLIENT --model NAME"), " names another."]
    : ["."];
  const lead = ready.length
    ? h("p", {}, "The blocks use ", h("code", {}, ready[0]), ...others)
    : h("p", { class: "alert tone-warn" }, "No model is Ready yet: the blocks say MODEL until one is.");
  const cards = (document_.integrations || []).map((integration) =>
    h("article", { class: "card integration", "data-client": integration.client, "aria-labelledby": `client-${integration.client}` },
      h("h3", { id: `client-${integration.client}` }, integration.name),
      h("p", { class: "message" }, integration.summary),
      integration.snippets.map((snippet) => snippetBlock(integration, snippet)),
      integration.notes.length ? h("ul", { class: "notes" }, integration.notes.map((n) => h("li", {}, n))) : null),
  );
  fill($list(), lead, cards);
}

function snippetBlock(integration, snippet) {
  const code = h("code", { class: `language-${snippet.language}` }, snippet.text);
  const pre = h("pre", { tabindex: "0", "aria-label": `${integration.name}: ${snippet.title}` }, code);
  const button = h("button", { type: "button", class: "copy", "aria-label": `Copy ${snippet.title} for ${integration.name}` }, "Copy");
  button.addEventListener("click", () => copyBlock(button, code, snippet.text));
  return h("div", { class: "snippet" }, h("div", { class: "snippet-head" }, h("span", {}, snippet.title), button), pre);
}

// The clipboard API needs a secure context (https, or localhost); a master on the LAN is plain
// http, where the page selects the block and asks the browser to copy the selection instead.
async function copyBlock(button, code, text) {
  let copied = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      copied = true;
    }
  } catch (e) {
    copied = false;
  }
  if (!copied) {
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    copied = document.execCommand && document.execCommand("copy");
  }
  button.textContent = copied ? "Copied" : "Selected: press Ctrl+C or ⌘C";
  button.dataset.state = copied ? "copied" : "selected";
  setTimeout(() => {
    button.textContent = "Copy";
    delete button.dataset.state;
  }, COPIED_MS);
}
