// The catalog page: fetches data.json on a timer and rebuilds the tables.
// Every value shown (task keys, prefixes, event fields) is user data: it goes
// into the DOM through textContent only, never through innerHTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let refresh = 2000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    if (cell instanceof Node) {
      const td = el("td");
      td.appendChild(cell);
      tr.appendChild(td);
    } else {
      tr.appendChild(el("td", cell));
    }
  }
  return tr;
}

function fill(id, rows) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...rows);
}

function seconds(x) {
  if (x === null || x === undefined) return "-";
  if (x < 1e-3) return (x * 1e6).toFixed(0) + " µs";
  if (x < 1) return (x * 1e3).toFixed(1) + " ms";
  return x.toFixed(2) + " s";
}

function bytes(x) {
  if (!x) return "-";
  const units = ["B", "kiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (x >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return x.toFixed(1) + " " + units[i];
}

function hist(h) {
  const width = 120, height = 24;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "hist");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  if (!h || !h.count) {
    return el("span", "no data", "muted");
  }
  const max = Math.max(...h.counts);
  const w = width / h.counts.length;
  h.counts.forEach((n, i) => {
    const r = document.createElementNS(SVG, "rect");
    const bar = max ? Math.max(n ? 1 : 0, (n / max) * height) : 0;
    r.setAttribute("x", i * w);
    r.setAttribute("y", height - bar);
    r.setAttribute("width", Math.max(w - 1, 1));
    r.setAttribute("height", bar);
    const title = document.createElementNS(SVG, "title");
    const upper = i < h.bounds.length ? "≤ " + seconds(h.bounds[i]) : "> " + seconds(h.bounds[h.bounds.length - 1]);
    title.textContent = upper + ": " + n;
    r.appendChild(title);
    svg.appendChild(r);
  });
  return svg;
}

function settings(options) {
  return Object.entries(options || {}).map(([k, v]) => k + "=" + JSON.stringify(v)).join(", ");
}

function entryState(e) {
  return e.active ? "active" : "INACTIVE";
}

function entryErrors(e) {
  return e.errors ? e.errors + ": " + (e.last_error || "") : "";
}

function serverRows(role, address, info, table) {
  const entries = Object.entries(info.entries || {});
  if (!entries.length) {
    return [row([role + " " + address, "-", info.error ? "" : "none", info.error || "", ""])];
  }
  return entries.map(([name, e]) => {
    const options = e.options || (table || {})[e.settings];
    const tr = row([role + " " + address, name, entryState(e), settings(options), entryErrors(e)]);
    if (!e.active || e.errors) tr.className = "bad";
    return tr;
  });
}

// Workers that run an entry alike (same state, settings, no error) share one
// row: a fleet of 100 workers is a few rows, and a worker that differs stands out.
function workerRows(workers, table) {
  const groups = new Map();
  const rows = [];
  for (const [addr, info] of Object.entries(workers)) {
    const entries = Object.entries(info.entries || {});
    if (!entries.length || info.error) {
      rows.push(...serverRows("worker", addr, info, table));
      continue;
    }
    for (const [name, e] of entries) {
      if (!e.active || e.errors) {
        const tr = row(["worker " + addr, name, entryState(e), settings(e.options || table[e.settings]), entryErrors(e)]);
        tr.className = "bad";
        rows.push(tr);
        continue;
      }
      const id = JSON.stringify([name, e.settings || JSON.stringify(e.options || {})]);
      if (!groups.has(id)) groups.set(id, {name, e, addrs: []});
      groups.get(id).addrs.push(addr);
    }
  }
  for (const g of groups.values()) {
    const shown = g.addrs.slice(0, 3).join(", ") + (g.addrs.length > 3 ? ", …" : "");
    const label = g.addrs.length === 1 ? "worker " + shown : g.addrs.length + " workers: " + shown;
    rows.push(row([label, g.name, entryState(g.e), settings(g.e.options || table[g.e.settings]), ""]));
  }
  return rows;
}

function stacks(container, tasks, empty) {
  const nodes = [];
  for (const t of tasks) {
    const head = (t.worker || "") + "  " + (t.key || "") + "  (" + (t.prefix || "") + ")  " + seconds(t.elapsed);
    nodes.push(el("div", head, "task"));
    const lines = (t.stack || []).map(f => "  File \"" + f.filename + "\", line " + f.lineno + ", in " + f.name + (f.line ? "\n    " + f.line : ""));
    nodes.push(el("pre", lines.join("\n") || "(no Python frames)"));
  }
  if (!nodes.length) nodes.push(el("p", empty, "muted"));
  container.replaceChildren(...nodes);
}

function fields(obj, skip) {
  return Object.entries(obj).filter(([k]) => !skip.includes(k)).map(([k, v]) => k + "=" + JSON.stringify(v)).join(" ");
}

function render(d) {
  refresh = Math.max(100, (d.refresh || 2) * 1000);
  document.getElementById("updated").textContent = "updated " + new Date(d.time * 1000).toLocaleTimeString();
  const trace = document.getElementById("trace");
  trace.hidden = !(d.trace && d.trace.available);

  const servers = serverRows("scheduler", d.scheduler.address, d.scheduler);
  servers.push(...workerRows(d.workers, d.settings || {}));
  fill("servers", servers);

  fill("prefixes", d.prefixes.map(p => {
    const tr = row([p.prefix, p.success ?? "-", p.error ?? "-",
      p.wait && p.wait.count ? seconds(p.wait.sum / p.wait.count) + " mean" : "-",
      hist(p.wait), hist(p.compute), p.memory ? bytes(p.memory.max) : "-"]);
    tr.children[1].className = tr.children[2].className = "num";
    return tr;
  }));

  stacks(document.getElementById("slow"), d.slow, "No task is running past warn-after.");
  stacks(document.getElementById("timeouts"), d.timeouts.map(e => ({...e.msg, worker: e.msg.worker})), "No recent timeout.");

  fill("events", (d.events || []).map(e => row([new Date(e.time * 1000).toLocaleTimeString(), e.event, fields(e, ["time", "event"])])));

  const topics = [];
  for (const [name, events] of Object.entries(d.topics)) {
    topics.push(el("h3", name));
    const table = el("table");
    const body = el("tbody");
    for (const e of events) {
      body.appendChild(row([new Date(e.time * 1000).toLocaleTimeString(), typeof e.msg === "object" && e.msg ? fields(e.msg, []) : String(e.msg)]));
    }
    table.appendChild(body);
    topics.push(table);
  }
  if (!topics.length) topics.push(el("p", "No catalog.* event yet.", "muted"));
  document.getElementById("topics").replaceChildren(...topics);
}

async function tick() {
  try {
    const answer = await fetch("catalog/data.json", {cache: "no-store"});
    if (!answer.ok) throw new Error(answer.status + " " + answer.statusText);
    render(await answer.json());
  } catch (err) {
    document.getElementById("updated").textContent = "cannot load data: " + err;
  }
  setTimeout(tick, refresh);
}

tick();
