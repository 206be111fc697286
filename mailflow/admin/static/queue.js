// The queue page: reads the admin API (same origin) and writes the tables. Data goes into the page as text
// only (textContent), never as HTML. A message view opens at #message=QUEUE_ID.
"use strict";

const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("mailflow-admin-token") || "";
let shown = "";  // the queue id in the message view

class NeedToken extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new NeedToken("a token is needed");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
  return body;
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  return td;
}

function fill(tableId, items, write) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const item of items) write(body.insertRow(), item);
  if (!items.length) {
    const row = body.insertRow();
    const td = cell(row, "none", "muted");
    td.colSpan = 20;
  }
}

const time = (t) => (t ? new Date(t * 1000).toLocaleString() : "-");
const sender = (s) => s || "MAILER-DAEMON";

function ago(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0");
  return Math.floor(s / 86400) + "d" + String(Math.floor((s % 86400) / 3600)).padStart(2, "0") + "h";
}

async function loadSummary() {
  const summary = await api("/api/summary");
  $("host").textContent = summary.hostname;
  $("status").textContent = (summary.ready ? "ready" : "not ready") + " · mailflow " + summary.version +
    " · " + new Date(summary.time * 1000).toLocaleTimeString();
  fill("counts", Object.entries(summary.queues), (row, [queue, count]) => {
    cell(row, queue, "queue-" + queue);
    cell(row, count, "number");
  });
}

async function loadMessages() {
  const page = await api("/api/queue?limit=100");
  fill("messages", page.messages, (row, m) => {
    row.className = "pick";
    row.dataset.queueId = m.id;
    cell(row, m.id);
    const queue = cell(row, m.damaged ? m.queue + " (damaged)" : m.queue, "queue-" + m.queue);
    if (m.damaged) queue.title = m.damaged;  // a row of it the store could not take: shown with stand-ins
    cell(row, m.size, "number");
    cell(row, time(m.arrival));
    cell(row, sender(m.sender));
    cell(row, m.recipients.filter((r) => r.status === "pending").map((r) => r.address).join(", "));
    cell(row, m.attempts, "number");
    row.addEventListener("click", () => { location.hash = "message=" + m.id; });
  });
  $("messages-more").hidden = !page.next;
}

async function loadShape() {
  const shape = await api("/api/queue/shape?top=20");
  const head = $("shape").tHead;
  head.replaceChildren();
  const labels = head.insertRow();
  for (const label of ["", "T", ...shape.buckets]) cell(labels, label, "number");
  const rows = [["TOTAL", shape.total], ...shape.domains.map((d) => [d.domain, d])];
  fill("shape", rows, (row, [name, counts]) => {
    cell(row, name);
    cell(row, counts.total, "number");
    for (const n of counts.counts) cell(row, n, "number");
  });
}

async function loadDestinations() {
  const rows = await api("/api/destinations");
  fill("destinations", rows, (row, d) => {
    cell(row, d.transport);
    cell(row, d.nexthop);
    cell(row, d.window, "number");
    cell(row, d.in_flight, "number");
    cell(row, d.queued, "number");
    cell(row, d.failures, "number");
    cell(row, d.dead_until ? time(d.dead_until) : "-", d.dead_until ? "status-bounced" : "");
    cell(row, d.paused_until ? time(d.paused_until) : "-");
    cell(row, d.reason || "");
  });
}

async function loadDeliveries() {
  const rows = await api("/api/deliveries?limit=50");
  fill("deliveries", rows, (row, d) => {
    cell(row, time(d.time));
    cell(row, d.queue_id);
    cell(row, d.recipient);
    cell(row, d.status, "status-" + d.status);
    cell(row, d.dsn);
    cell(row, d.transport);
    cell(row, d.relay);
    cell(row, ago(d.delay), "number");
    cell(row, d.reason);
  });
}

async function loadMessage(id) {
  shown = id;
  const section = $("message");
  if (!id) {
    section.hidden = true;
    return;
  }
  $("message-id").textContent = id;
  section.hidden = false;
  let m;
  try {
    m = await api("/api/queue/" + encodeURIComponent(id));
  } catch (error) {
    if (error instanceof NeedToken) throw error;
    $("envelope").tBodies[0].replaceChildren();
    $("action-result").textContent = error.message;
    section.dataset.queue = "gone";
    return;
  }
  section.dataset.queue = m.queue;
  const pairs = [["Queue", m.queue], ["Size", m.size], ["Arrival", time(m.arrival)], ["Sender", sender(m.sender)],
    ["Client", m.client || "-"], ["Attempts", m.attempts],
    ["Next attempt", m.queue === "deferred" ? time(m.next_attempt) : "-"], ["Body", m.body_type],
    ["SMTPUTF8", m.smtputf8 ? "yes" : "no"], ["DSN", m.envid || m.ret ? "envid=" + (m.envid || "-") + " ret=" + (m.ret || "-") : "-"],
    ...(m.damaged ? [["Damaged", m.damaged]] : [])];
  fill("envelope", pairs, (row, [name, value]) => {
    const th = document.createElement("th");
    th.textContent = name;
    row.appendChild(th);
    cell(row, value, name === "Queue" ? "queue-" + value : "");
  });
  fill("recipients", m.recipients, (row, r) => {
    cell(row, r.address);
    cell(row, r.original && r.original !== r.address ? r.original : "");
    cell(row, r.status, "status-" + r.status);
    cell(row, r.dsn);
    cell(row, r.reason);
  });
  fill("history", m.history, (row, h) => {
    cell(row, time(h.time));
    cell(row, h.recipient);
    cell(row, h.status, "status-" + h.status);
    cell(row, h.dsn);
    cell(row, h.relay);
    cell(row, ago(h.delay), "number");
    cell(row, h.reason);
  });
  $("headers").textContent = m.headers === null ? "(the content is missing: a corrupt entry)" : m.headers;
}

async function act(action) {
  if (!shown) return;
  if (action === "delete" && !confirm("Delete " + shown + "? No bounce is sent.")) return;
  const result = $("action-result");
  try {
    const done = await api("/api/queue/" + action, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ ids: [shown] }),
    });
    result.textContent = action + ": " + done.messages + (done.messages === 1 ? " message" : " messages") +
      (done.missed.length ? " (not in a queue " + action + " applies to)" : "");
    result.dataset.action = action;
    result.dataset.messages = done.messages;
  } catch (error) {
    result.textContent = action + " failed: " + error.message;
  }
  await refresh();
}

async function refresh() {
  try {
    await loadSummary();
    await Promise.all([loadMessages(), loadShape(), loadDestinations(), loadDeliveries(), loadMessage(shown)]);
    $("error").hidden = true;
    document.body.dataset.loaded = String(Date.now());
  } catch (error) {
    if (error instanceof NeedToken) return;
    $("error").textContent = "Cannot read the admin API: " + error.message;
    $("error").hidden = false;
  }
}

function fromHash() {
  const match = /^#message=([0-9A-Za-z]+)$/.exec(location.hash);
  return match ? match[1] : "";
}

window.addEventListener("hashchange", () => { shown = fromHash(); $("action-result").textContent = ""; refresh(); });
$("message-close").addEventListener("click", (event) => { event.preventDefault(); location.hash = ""; });
$("refresh").addEventListener("click", refresh);
for (const button of document.querySelectorAll("button[data-action]")) {
  button.addEventListener("click", () => act(button.dataset.action));
}
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("mailflow-admin-token", token);
  $("token-form").hidden = true;
  refresh();
});
shown = fromHash();
refresh();
setInterval(refresh, 10000);
