// The statusd dashboard: one page, plain JavaScript, no third-party code.
//
// It speaks JSON-RPC over the daemon's /ws (docs/protocol.md, docs/websocket.md) with the
// token that `statusctl dashboard` put in the link's fragment. Every string from the daemon
// (task names, URLs, messages, notifications) reaches the page through textContent or
// createElement, never as HTML. Pushes only mark what changed; the DOM is updated once per
// animation frame, so a burst of updates costs one layout.
"use strict";

const TOKEN_KEY = "statusd-token";
const NEW_LINK = "ask statusctl dashboard for a new link";
const STATUS_SHOWN = 200; // status lines kept on the page
const TASK_PAGE = 500; // tasks.list page size
const ITEMS_SHOWN = 100; // a task's items fetched for their failure reasons
const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 10000;

const $ = (id) => document.getElementById(id);

// -- the token: out of the address bar at once ------------------------------------------------

function takeToken() {
  const match = /^#token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Gone from the address bar, the history entry and anything that syncs it.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

// -- small helpers ----------------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function button(label, onClick) {
  const node = element("button", "", label);
  node.type = "button";
  node.addEventListener("click", onClick);
  return node;
}

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

function formatBytes(count) {
  if (count === null || count === undefined) return "?";
  let value = count;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${UNITS[unit]}`;
}

function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "--";
  const whole = Math.round(seconds);
  if (whole < 60) return `${whole} s`;
  if (whole < 3600) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${Math.floor(whole / 3600)} h ${Math.floor((whole % 3600) / 60)} min`;
}

function formatTime(timestamp) {
  const date = new Date(timestamp);
  return Number.isNaN(date.getTime()) ? String(timestamp) : date.toLocaleTimeString();
}

// -- state ------------------------------------------------------------------------------------

const state = {
  token: null,
  ws: null,
  nextId: 1,
  waiting: new Map(),
  control: false,
  admin: false,
  daemon: null, // pid and started_at of the daemon last connected to
  lastSeq: null, // the newest status seq seen, for `since` after a reconnect
  retryMs: RETRY_MIN_MS,
  refusedHandshakes: 0,
  tasks: new Map(), // id -> {info, failures, note, node}
  fetching: new Set(),
  dirty: new Set(),
  statusQueue: [],
  summaryDirty: false,
  frame: 0,
  stopped: false,
  // For the tests and the responsiveness measure in docs/dashboard.md.
  stats: { frames: 0, renderMs: 0, longestRenderMs: 0, messages: 0 },
};
window.statusdDashboard = state;

// -- the connection ---------------------------------------------------------------------------

function call(method, params) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) {
    return Promise.reject({ message: "not connected" });
  }
  const id = state.nextId++;
  ws.send(JSON.stringify({ jsonrpc: "2.0", id, method, params: params || {} }));
  return new Promise((resolve, reject) => state.waiting.set(id, { resolve, reject }));
}

function setConnection(text, name) {
  const node = $("connection");
  node.textContent = text;
  node.dataset.state = name;
}

function showBanner(text, kind) {
  const banner = $("banner");
  banner.textContent = text;
  banner.dataset.kind = kind;
  banner.hidden = false;
}

function stopWith(reason) {
  state.stopped = true;
  sessionStorage.removeItem(TOKEN_KEY);
  setConnection("not connected", "refused");
  showBanner(`This link no longer works (${reason}): ${NEW_LINK}.`, "error");
}

function connect() {
  if (state.stopped) return;
  setConnection("connecting", "connecting");
  const url = `ws://${location.host}/ws?token=${encodeURIComponent(state.token)}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  let opened = false;
  ws.addEventListener("open", () => {
    opened = true;
    state.refusedHandshakes = 0;
    state.retryMs = RETRY_MIN_MS;
    setConnection("live", "live");
    start().catch((error) => {
      // A connection lost meanwhile is the close handler's to report.
      if (state.ws === ws && ws.readyState === WebSocket.OPEN) {
        showBanner(`could not load: ${error.message}`, "error");
      }
    });
  });
  ws.addEventListener("message", (event) => receive(event.data));
  ws.addEventListener("close", (event) => closed(event, opened));
}

function closed(event, opened) {
  for (const pending of state.waiting.values()) pending.reject({ message: "connection lost" });
  state.waiting.clear();
  if (event.code === 1008 && /token/.test(event.reason)) {
    stopWith(event.reason);
    return;
  }
  if (opened) {
    setConnection("reconnecting", "down");
    showBanner("The daemon went away; reconnecting...", "warning");
    later();
    return;
  }
  // A refused handshake looks like any failure to a script. If the daemon still serves
  // this page, it is up and refused the token (revoked, expired), not down.
  fetch("/", { method: "HEAD", cache: "no-store" }).then(
    (response) => {
      state.refusedHandshakes = response.ok ? state.refusedHandshakes + 1 : 0;
      if (state.refusedHandshakes >= 2) stopWith("the daemon refused its token");
      else later();
    },
    () => {
      state.refusedHandshakes = 0;
      setConnection("reconnecting", "down");
      showBanner("The daemon is not answering; reconnecting...", "warning");
      later();
    },
  );
}

function later() {
  setTimeout(connect, state.retryMs);
  state.retryMs = Math.min(state.retryMs * 2, RETRY_MAX_MS);
}

function receive(data) {
  const value = JSON.parse(data);
  for (const message of Array.isArray(value) ? value : [value]) {
    state.stats.messages += 1;
    if (message.id !== undefined && message.method === undefined) {
      const pending = state.waiting.get(message.id);
      state.waiting.delete(message.id);
      if (!pending) continue;
      if (message.error) pending.reject(message.error);
      else pending.resolve(message.result);
    } else {
      pushed(message.method, message.params);
    }
  }
}

async function start() {
  const info = await call("daemon.info");
  const daemon = `${info.pid} ${info.started_at}`;
  const restarted = state.daemon !== null && state.daemon !== daemon;
  state.daemon = daemon;
  state.admin = info.admin;
  state.control = info.scope === "control";
  document.body.dataset.control = state.control ? "yes" : "no";
  $("who").textContent = `${info.user}${info.admin ? " (admin)" : ""}, ${info.scope || "?"}`;
  $("add").hidden = !state.control;
  $("banner").hidden = true;
  if (restarted) {
    // Numbering restarted with the daemon: everything it holds is new to us.
    state.lastSeq = 0;
    addStatusLine({ level: "warning", message: "the daemon restarted", local: true });
  }
  if (state.lastSeq === null) {
    const recent = await call("status.recent", {});
    for (const message of recent.messages) queueStatus(message);
    state.lastSeq = recent.messages.length ? recent.messages.at(-1).seq : info.status_seq;
  }
  await call("subscribe", {
    status: true,
    since: state.lastSeq,
    tasks: "all",
    notifications: true,
  });
  await Promise.all([loadTasks(), loadNotifications(), loadSummary()]);
}

// -- pushes -----------------------------------------------------------------------------------

function pushed(method, params) {
  if (method === "status") queueStatus(params);
  else if (method === "task_update") taskUpdate(params);
  else if (method === "notification") notificationArrived(params);
  else if (method === "unread_count") showUnread(params.count);
  else if (method === "dropped") droppedMessages(params);
}

function droppedMessages(params) {
  const what = params.stream === "status" ? "status messages" : `${params.stream} updates`;
  addStatusLine({
    level: "warning",
    message: `${params.count} ${what} were dropped (the page or the connection fell behind)`,
    local: true,
    dropped: true,
  });
  if (params.stream === "tasks") loadTasks();
  if (params.stream === "notifications") loadNotifications();
}

// -- tasks ------------------------------------------------------------------------------------

const FINAL = new Set(["completed", "failed", "cancelled"]);
const END_STATUS = { completed: "completed", error: "failed", cancelled: "cancelled" };

async function loadTasks() {
  let cursor = null;
  do {
    const params = { limit: TASK_PAGE, items: false };
    if (cursor) params.cursor = cursor;
    const page = await call("tasks.list", params);
    for (const info of page.tasks) setTask(info);
    cursor = page.next_cursor;
  } while (cursor);
}

function setTask(info) {
  let task = state.tasks.get(info.id);
  if (!task) {
    task = { info, failures: [], note: "", node: null };
    state.tasks.set(info.id, task);
    state.summaryDirty = true;
  } else {
    if (task.info.status !== info.status) state.summaryDirty = true;
    task.info = info;
  }
  if (info.result && Array.isArray(info.result.items)) {
    task.failures = info.result.items
      .filter((item) => item.error)
      .map((item) => `${item.url}: ${item.error}`);
  } else if (info.status === "failed" && !task.failures.length && !state.fetching.has(info.id)) {
    fetchTask(info.id);
  }
  markTask(info.id);
}

async function fetchTask(id) {
  if (state.fetching.has(id)) return;
  state.fetching.add(id);
  try {
    setTask(await call("tasks.get", { task_id: id, items_limit: ITEMS_SHOWN }));
  } catch (error) {
    if (error.code === -32001) removeTask(id);
  } finally {
    state.fetching.delete(id);
  }
}

function taskUpdate(update) {
  const task = state.tasks.get(update.job_id);
  if (!task) {
    fetchTask(update.job_id);
    return;
  }
  const info = task.info;
  const status = update.task_status || END_STATUS[update.status];
  if (status && status !== info.status) state.summaryDirty = true;
  if (status) info.status = status;
  for (const [from, to] of [
    ["progress", "progress"],
    ["processed", "processed_items"],
    ["total", "total_items"],
    ["current_item", "current_item"],
    ["bytes_done", "bytes_done"],
    ["bytes_total", "bytes_total"],
    ["bytes_per_second", "bytes_per_second"],
    ["eta_s", "eta_s"],
    ["results", "result"],
  ]) {
    if (update[from] !== undefined) info[to] = update[from];
  }
  if (update.item_failed) {
    task.failures.push(`${update.item_failed.url}: ${update.item_failed.error}`);
  }
  task.note = update.item_retry ? update.message : "";
  if (update.status in END_STATUS) fetchTask(update.job_id);
  markTask(update.job_id);
}

function removeTask(id) {
  const task = state.tasks.get(id);
  if (!task) return;
  state.tasks.delete(id);
  if (task.node) task.node.remove();
  state.summaryDirty = true;
  schedule();
}

function markTask(id) {
  state.dirty.add(id);
  schedule();
}

function taskControl(id, method) {
  const task = state.tasks.get(id);
  call(method, { task_id: id }).then(
    (result) => {
      if (method === "tasks.retry" && result.task_id && result.task_id !== id) {
        fetchTask(result.task_id);
      }
      fetchTask(id);
    },
    (error) => {
      if (task) {
        task.note = `${method.slice(6)}: ${error.message}`;
        markTask(id);
      }
    },
  );
}

function buildTask(id) {
  const node = element("li", "task");
  node.dataset.id = id;
  const head = element("div", "task-head");
  node.name = head.appendChild(element("span", "name"));
  node.owner = head.appendChild(element("span", "owner"));
  node.status = head.appendChild(element("span", "state"));
  node.appendChild(head);
  const bar = node.appendChild(element("div", "bar"));
  node.fill = bar.appendChild(element("div", "fill"));
  node.numbers = node.appendChild(element("div", "numbers"));
  node.current = node.appendChild(element("div", "current"));
  node.note = node.appendChild(element("div", "note"));
  node.failures = node.appendChild(element("ul", "failures"));
  node.buttons = node.appendChild(element("div", "buttons"));
  for (const [label, method] of [
    ["Pause", "tasks.pause"],
    ["Resume", "tasks.resume"],
    ["Retry", "tasks.retry"],
    ["Cancel", "tasks.cancel"],
  ]) {
    const control = button(label, () => taskControl(id, method));
    control.dataset.action = label.toLowerCase();
    node.buttons.appendChild(control);
  }
  return node;
}

const ACTIONS = {
  pause: new Set(["pending", "running"]),
  resume: new Set(["paused"]),
  retry: new Set(["failed", "cancelled"]),
  cancel: new Set(["pending", "running", "paused"]),
};

// How far a task is, 0 to 1: by bytes when their total is known, else by items. A failed
// item is not progress, and its size (none, or a part kept for a retry) says nothing of what
// was saved: a failed or cancelled task counts the items its result says completed, and one
// without a result holding no bytes got nowhere. The daemon's `progress` field follows the
// same rule (progress_of in statusd/state/tasks.py), and statusctl keeps it in
// render.task_fraction; tests/test_progress_rule.py holds all three to one table.
function taskFraction(info) {
  const number = (value) => (typeof value === "number" && Number.isFinite(value) ? value : 0);
  const clamp = (fraction) => Math.max(0, Math.min(1, fraction));
  if (info.status === "completed") return 1;
  const done = number(info.bytes_done);
  if (info.status === "failed" || info.status === "cancelled") {
    const completed = info.result ? info.result.completed : undefined;
    const items = number(info.total_items);
    if (typeof completed === "number" && items > 0) return clamp(completed / items);
    if (done <= 0) return 0;
  }
  const total = number(info.bytes_total);
  if (total > 0) return clamp(done / total);
  return clamp(number(info.progress) / 100);
}

function renderTask(task) {
  const info = task.info;
  const node = task.node;
  node.dataset.status = info.status;
  node.dataset.bytesDone = String(info.bytes_done ?? 0);
  node.name.textContent = info.name || info.id;
  node.name.title = info.id;
  node.owner.textContent = state.admin ? info.owner : "";
  node.status.textContent = info.status;
  const progress = taskFraction(info) * 100;
  // A CSSOM property, which the page's style-src 'self' allows (a style attribute it does not).
  node.fill.style.width = `${progress}%`;
  const parts = [`${progress.toFixed(1)}%`];
  if (info.bytes_total !== null && info.bytes_total !== undefined) {
    parts.push(`${formatBytes(info.bytes_done)} of ${formatBytes(info.bytes_total)}`);
  } else if (info.bytes_done) {
    parts.push(formatBytes(info.bytes_done));
  }
  if (info.status === "running") {
    parts.push(`${formatBytes(info.bytes_per_second || 0)}/s`, `eta ${formatEta(info.eta_s)}`);
  }
  parts.push(`${info.processed_items} of ${info.total_items} items`);
  node.numbers.textContent = parts.join("  ·  ");
  node.current.textContent =
    info.status === "running" && info.current_item ? `now: ${info.current_item}` : "";
  node.note.textContent = task.note || (info.error && FINAL.has(info.status) ? info.error : "");
  node.failures.replaceChildren(...task.failures.map((reason) => element("li", "", reason)));
  for (const control of node.buttons.children) {
    control.hidden = !state.control || !ACTIONS[control.dataset.action].has(info.status);
  }
}

function newer(a, b) {
  return a.created_at > b.created_at || (a.created_at === b.created_at && a.id > b.id);
}

function placeTask(task) {
  // Newest first. Pages arrive newest first and new tasks are the newest: both ends are
  // tried before a walk through the list.
  const list = $("tasks");
  const infoOf = (node) => state.tasks.get(node.dataset.id)?.info;
  const first = list.firstElementChild;
  const last = list.lastElementChild;
  if (!last || !newer(task.info, infoOf(last))) {
    list.appendChild(task.node);
    return;
  }
  if (newer(task.info, infoOf(first))) {
    list.prepend(task.node);
    return;
  }
  for (const other of list.children) {
    if (newer(task.info, infoOf(other))) {
      list.insertBefore(task.node, other);
      return;
    }
  }
  list.appendChild(task.node);
}

// -- status -----------------------------------------------------------------------------------

function queueStatus(message) {
  if (typeof message.seq === "number") {
    if (state.lastSeq !== null && message.seq <= state.lastSeq) return;
    state.lastSeq = Math.max(state.lastSeq || 0, message.seq);
  }
  state.statusQueue.push(message);
  schedule();
}

function addStatusLine(message) {
  state.statusQueue.push(message);
  schedule();
}

function statusNode(message) {
  const node = element("li", `level-${message.level}${message.dropped ? " dropped" : ""}`);
  node.dataset.level = message.level;
  if (message.timestamp) node.appendChild(element("time", "", formatTime(message.timestamp)));
  node.appendChild(element("span", "level", message.level));
  node.appendChild(element("span", "text", message.message));
  return node;
}

// -- notifications ----------------------------------------------------------------------------

async function loadNotifications() {
  const result = await call("notifications.list", { limit: 50 });
  const list = $("notifications");
  list.replaceChildren(...result.notifications.map(notificationNode));
  const unread = await call("notifications.unread_count");
  showUnread(unread.count);
}

function notificationArrived(notification) {
  const list = $("notifications");
  const existing = list.querySelector(`li[data-id="${Number(notification.id)}"]`);
  const node = notificationNode(notification);
  if (existing) existing.replaceWith(node);
  else list.prepend(node);
}

function notificationNode(notification) {
  const node = element("li", notification.read ? "notification" : "notification unread");
  node.dataset.id = String(notification.id);
  node.dataset.type = notification.type;
  const head = node.appendChild(element("div", "notification-head"));
  head.appendChild(element("span", "title", notification.title));
  head.appendChild(element("time", "", formatTime(notification.created_at)));
  node.appendChild(element("div", "message", notification.message));
  // Shown, never followed: a link is another user's (an admin's) text.
  if (notification.link) node.appendChild(element("div", "link", notification.link));
  const buttons = node.appendChild(element("div", "buttons"));
  if (!notification.read) {
    const read = button("Mark read", () =>
      call("notifications.mark_read", { id: notification.id }).then(() => {
        node.classList.remove("unread");
        read.remove();
      }, showError),
    );
    read.dataset.action = "read";
    buttons.appendChild(read);
  }
  if (state.control) {
    const remove = button("Delete", () =>
      call("notifications.delete", { id: notification.id }).then(() => node.remove(), showError),
    );
    remove.dataset.action = "delete";
    buttons.appendChild(remove);
  }
  return node;
}

function showUnread(count) {
  const badge = $("unread");
  badge.textContent = `${count} unread`;
  badge.dataset.count = String(count);
  badge.hidden = count === 0;
}

function showError(error) {
  showBanner(error.message || String(error), "error");
}

// -- summary ----------------------------------------------------------------------------------

async function loadSummary() {
  const summary = await call("tasks.summary");
  const parts = ["running", "pending", "paused", "completed", "failed", "cancelled"]
    .filter((name) => summary[name])
    .map((name) => `${summary[name]} ${name}`);
  $("summary").textContent = `${summary.total} tasks${parts.length ? ": " : ""}${parts.join(", ")}`;
}

// -- one render per frame ---------------------------------------------------------------------

function schedule() {
  if (!state.frame) state.frame = requestAnimationFrame(render);
}

function render() {
  const started = performance.now();
  state.frame = 0;
  for (const id of state.dirty) {
    const task = state.tasks.get(id);
    if (!task) continue;
    if (!task.node) {
      task.node = buildTask(id);
      placeTask(task);
    }
    renderTask(task);
  }
  state.dirty.clear();
  $("task-count").textContent = `(${state.tasks.size})`;
  $("no-tasks").hidden = state.tasks.size > 0;
  if (state.statusQueue.length) {
    const list = $("status");
    const fresh = state.statusQueue.splice(0).slice(-STATUS_SHOWN).map(statusNode).reverse();
    list.prepend(...fresh);
    while (list.children.length > STATUS_SHOWN) list.lastElementChild.remove();
  }
  if (state.summaryDirty && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.summaryDirty = false;
    loadSummary().catch(() => {
      state.summaryDirty = true;
    });
  }
  const took = performance.now() - started;
  state.stats.frames += 1;
  state.stats.renderMs += took;
  state.stats.longestRenderMs = Math.max(state.stats.longestRenderMs, took);
}

// -- adding downloads -------------------------------------------------------------------------

function addDownloads(event) {
  event.preventDefault();
  const urls = $("add-urls")
    .value.split("\n")
    .map((line) => line.trim())
    .filter((line) => line);
  const params = { urls };
  const dest = $("add-dest").value.trim();
  const topic = $("add-topic").value.trim();
  if (dest) params.dest = dest;
  if (topic) params.topic = topic;
  const result = $("add-result");
  call("tasks.download", params).then(
    (answer) => {
      result.textContent = `added task ${answer.task_id}`;
      $("add-urls").value = "";
      fetchTask(answer.task_id);
    },
    (error) => {
      result.textContent = `not added: ${error.message}`;
    },
  );
}

// -- start ------------------------------------------------------------------------------------

function main() {
  state.token = takeToken();
  $("add-form").addEventListener("submit", addDownloads);
  $("read-all").addEventListener("click", () =>
    call("notifications.mark_all_read").then(loadNotifications, showError),
  );
  if (!state.token) {
    state.stopped = true;
    setConnection("not connected", "refused");
    showBanner(`This page has no token: ${NEW_LINK}.`, "error");
    return;
  }
  connect();
}

main();
