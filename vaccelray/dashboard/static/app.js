// Polls /state.json every second and redraws the page: no build step, no library.
"use strict";

const COLUMNS = ["address", "health", "backend", "inflight", "sessions", "capacity", "error"];

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
}

function workers(rows) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of rows) {
    const tr = document.createElement("tr");
    tr.dataset.address = w.address;
    tr.dataset.health = w.health;
    for (const name of COLUMNS) cell(tr, w[name], name);
    body.appendChild(tr);
  }
}

function failures(rows) {
  const body = document.querySelector("#failures tbody");
  body.replaceChildren();
  for (const f of rows) {
    const tr = document.createElement("tr");
    cell(tr, new Date(f.time * 1000).toLocaleTimeString());
    cell(tr, f.call);
    cell(tr, f.status);
    cell(tr, f.message);
    body.appendChild(tr);
  }
}

function chart(id, svg) {
  // The SVG is drawn by the daemon, its text escaped there.
  const doc = new DOMParser().parseFromString(svg, "image/svg+xml");
  document.getElementById(id).replaceChildren(document.importNode(doc.documentElement, true));
}

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const response = await fetch("/state.json", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${await response.text()}`);
    const state = await response.json();
    document.getElementById("kind").textContent = state.kind;
    document.getElementById("listening").textContent = "listening on " + state.listening.join(", ");
    workers(state.workers);
    failures(state.failures);
    chart("throughput", state.throughput);
    chart("latency", state.latency);
    updated.textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();
    updated.className = "muted";
  } catch (error) {
    updated.textContent = "no update: " + error.message;
    updated.className = "stale";
  }
}

refresh();
setInterval(refresh, 1000);
