// The Thunderbolt links section: each cable the node facts show, as the master's last checks from
// both ends found it (reachable, round trip, bandwidth), with the warning of a link slower than its
// ports are rated for. A table per cable, a row per end.

import { fill, h } from "/ui/dom.js";

const STATE_TONES = { up: "good", down: "bad", unaddressed: "warn", unchecked: "idle" };

function endRow(end, peer) {
  const check = end.lastCheck;
  const from = `${end.node} ${end.address}${end.interface ? ` on ${end.interface}` : ""}`;
  if (!check) return h("tr", {}, h("th", { scope: "row" }, from), h("td", { colspan: 3 }, "not checked yet"));
  const state = check.up ? "up" : `${check.addressed === false ? "not addressed" : "down"}: ${check.detail}`;
  const rtt = check.rttMs === null || check.rttMs === undefined ? "–" : `${check.rttMs} ms`;
  const speed = check.gbitS === null || check.gbitS === undefined ? "–" : `${check.gbitS} Gbit/s`;
  return h(
    "tr",
    { class: check.up ? null : "tone-bad" },
    h("th", { scope: "row" }, from, h("span", { class: "muted" }, ` → ${peer.node}`)),
    h("td", {}, state),
    h("td", {}, rtt),
    h("td", {}, speed),
  );
}

function linkTable(link) {
  const [a, b] = link.ends;
  const tone = link.warning && link.state === "up" ? "warn" : STATE_TONES[link.state] || "idle";
  return h(
    "div",
    { class: "link" },
    h(
      "table",
      { class: "matrix links" },
      h("caption", {}, h("code", {}, link.subnet), " ", h("span", { class: `badge tone-${tone}` }, link.state)),
      h("thead", {}, h("tr", {}, ["From", "State", "Round trip", "Bandwidth"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, endRow(a, b), endRow(b, a)),
    ),
    link.warning ? h("p", { class: "alert tone-warn" }, link.warning) : null,
  );
}

export function renderLinks(doc, container) {
  const links = doc.links || [];
  fill(
    container,
    links.length
      ? [
          h("h3", {}, "Thunderbolt links"),
          h("p", { class: "muted" }, "Checked from both ends every few minutes; `genmlx mesh plan --verify` checks them now."),
          ...links.map(linkTable),
        ]
      : null,
  );
}
