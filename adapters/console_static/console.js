"use strict";
// The operator console: the board over a WebSocket, actions over POST with the CSRF token.

const LABEL = {
  no_answer: "无人接听", busy: "占线", answered_safe: "接通·已安全", answered_at_risk: "接通·仍有风险",
  prevented: "已劝阻", loss: "已被骗", false_alarm: "误报", unreachable: "未联系上",
  resolved_by_callback: "回拨解除", open: "待回拨", escalated: "已派单上门", closed: "已结案",
  critical: "紧急", warning: "预警", guard: "保安", police: "民警", quick_police: "快警平台",
  grid_worker: "网格员", offered: "已派单", accepted: "已接警", declined: "已拒绝", expired: "超时",
  cancelled: "已撤回", arrived: "已到达", reported: "已反馈", notified: "已知会",
  online: "在线", offline: "离线", unknown: "未上报", dissuaded: "已劝阻", not_home: "无人在家",
};
const label = (key) => LABEL[key] || key || "—";
const state = { operator: null, csrf: null, incidents: new Map(), units: [], selected: null,
                seenCritical: new Set(), callbackMax: 3, first: true };
const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const time = (iso) => iso ? new Date(iso).toLocaleTimeString("zh-CN", { hour12: false }) : "—";
function since(iso) {
  if (!iso) return "—";
  const s = Math.max(0, Math.floor((Date.now() - new Date(iso)) / 1000));
  return `${Math.floor(s / 60)}分${String(s % 60).padStart(2, "0")}秒`;
}
function between(a, b) {
  if (!a || !b) return "—";
  const s = Math.round((new Date(b) - new Date(a)) / 1000);
  return `${Math.floor(s / 60)}分${String(s % 60).padStart(2, "0")}秒`;
}

function toast(text) {
  const box = $("#toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

function beep() {
  try {
    const ctx = new AudioContext();
    const osc = ctx.createOscillator();
    osc.frequency.value = 880;
    osc.connect(ctx.destination);
    osc.start();
    osc.stop(ctx.currentTime + 0.35);
  } catch (e) { /* no sound device: the card still flashes */ }
}

async function act(incident, action, body) {
  const response = await fetch(`/api/incidents/${encodeURIComponent(incident)}/${action}`, {
    method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
    body: JSON.stringify(body), credentials: "same-origin",
  });
  // 503: no connection, or the broker never confirmed it: the server's text says which
  if (!response.ok) {
    const text = await response.text();
    toast(response.status === 503 ? text : `操作未发送：${text}`);
  }
}

function residentFacts(inc) {
  const sub = inc.subscriber;
  return el("dl", { class: "facts" },
    el("dt", {}, "居民"), el("dd", { class: "big" }, sub.known ? `${sub.name}（${sub.display_name}）` : "未登记用户"),
    el("dt", {}, "小区"), el("dd", {}, sub.estate_name ? `${sub.estate_name}（${sub.estate}）` : "—"),
    el("dt", {}, "地址"), el("dd", {}, sub.address || "地址不详"),
    el("dt", {}, "手机"), el("dd", {}, sub.msisdn),
    el("dt", {}, "涉诈号码"), el("dd", {}, `${inc.counterpart}（${inc.category_label || inc.category || "未分类"}）`),
    el("dt", {}, "通话时长"), el("dd", { class: "big" }, `${Math.round(inc.duration_s)}秒`),
    el("dt", {}, "紧急已"), el("dd", { "data-since": inc.critical_at || "" }, since(inc.critical_at)),
    el("dt", {}, "回拨"), el("dd", {}, `${inc.callback.attempts}/${inc.callback.max_attempts} 次未接通`),
  );
}

function actionBar(inc) {
  const id = inc.incident_id;
  const outcome = el("select", { "data-field": "outcome" },
    ["prevented", "loss", "false_alarm", "unreachable"].map((o) => el("option", { value: o }, label(o))));
  const note = el("input", { placeholder: "备注", "data-field": "note", maxlength: "200" });
  const stop = (fn) => (event) => { event.stopPropagation(); fn(); };
  return el("div", { class: "actions" },
    ["no_answer", "busy", "answered_safe", "answered_at_risk"].map((r) =>
      el("button", { "data-action": r, onclick: stop(() => act(id, "callback", { result: r })) }, label(r))),
    el("button", { class: "danger", "data-action": "escalate", onclick: stop(() => act(id, "escalate", {})) }, "立即上门"),
    el("span", { onclick: (e) => e.stopPropagation() }, outcome, " ", note, " ",
      el("button", { "data-action": "close", onclick: stop(() => act(id, "close", { outcome: outcome.value, note: note.value })) }, "结案")),
  );
}

function card(inc) {
  const node = el("article", { class: `card ${inc.status}`, "data-incident": inc.incident_id,
                               onclick: () => select(inc.incident_id) },
    el("h3", {}, inc.incident_id, el("span", { class: `badge ${inc.status}` }, `${label(inc.severity)} · ${label(inc.status)}`)),
    residentFacts(inc),
    inc.alerts.length ? el("p", { class: "refused" }, `需人工处置：${inc.alerts.join("、")}`) : null,
    el("p", {}, inc.dispatches.filter((d) => d.status !== "notified")
      .map((d) => `${d.unit_name} ${label(d.status)}`).join("；")),
    actionBar(inc));
  if (!state.first && !state.seenCritical.has(inc.incident_id)) {
    node.classList.add("new");
    beep();
  }
  state.seenCritical.add(inc.incident_id);
  return node;
}

function row(inc) {
  return el("div", { class: "row", "data-incident": inc.incident_id, onclick: () => select(inc.incident_id) },
    el("span", {}, inc.incident_id), el("span", {}, inc.subscriber.display_name || inc.subscriber.msisdn),
    el("span", {}, `${inc.counterpart}（${inc.category_label || "未分类"}）`),
    el("span", {}, `${Math.round(inc.duration_s)}秒`), el("span", {}, label(inc.outcome || inc.status)));
}

function renderBoard() {
  const all = [...state.incidents.values()];
  const critical = all.filter((i) => i.status !== "closed" && (i.severity === "critical" || i.status === "escalated"));
  const warnings = all.filter((i) => i.status === "open" && i.severity === "warning");
  const closed = all.filter((i) => i.status === "closed").slice(-20).reverse();
  critical.sort((a, b) => (a.critical_at || a.opened_at).localeCompare(b.critical_at || b.opened_at));
  $("#critical").replaceChildren(...critical.map(card));
  $("#warnings").replaceChildren(...warnings.map(row));
  $("#closed").replaceChildren(...closed.map(row));
  state.first = false;
  renderDetail();
}

function select(id) { state.selected = id; renderDetail(); }

function renderDetail() {
  const box = $("#detail");
  const inc = state.selected && state.incidents.get(state.selected);
  if (!inc) { box.hidden = true; return; }
  box.hidden = false;
  const accepted = inc.dispatches.map((d) => d.accepted_at).filter(Boolean).sort()[0];
  const arrived = inc.dispatches.map((d) => d.arrived_at).filter(Boolean).sort()[0];
  box.replaceChildren(
    el("h2", {}, inc.incident_id, " ", el("span", { class: `badge ${inc.status}` }, label(inc.outcome || inc.status))),
    residentFacts(inc),
    el("dl", { class: "facts" },
      el("dt", {}, "预警→紧急"), el("dd", {}, between(inc.opened_at, inc.critical_at)),
      el("dt", {}, "→上门派单"), el("dd", {}, between(inc.critical_at || inc.opened_at, inc.escalated_at)),
      el("dt", {}, "→首位接警"), el("dd", {}, between(inc.escalated_at, accepted)),
      el("dt", {}, "→首位到达"), el("dd", {}, between(inc.escalated_at, arrived))),
    el("h3", {}, "派单"),
    el("table", { id: "dispatch-table" }, el("tr", {}, ["单位", "角色", "状态", "派单", "接警", "到达", "结果"].map((h) => el("th", {}, h))),
      inc.dispatches.map((d) => el("tr", { "data-unit": d.unit, "data-status": d.status },
        el("td", {}, d.unit_name), el("td", {}, label(d.role)), el("td", {}, label(d.status)),
        el("td", {}, time(d.offered_at)), el("td", {}, time(d.accepted_at)), el("td", {}, time(d.arrived_at)),
        el("td", {}, label(d.outcome))))),
    el("h3", {}, "时间线"),
    el("ol", { class: "timeline" }, inc.timeline.map((t) =>
      el("li", { "data-kind": t.kind }, el("time", {}, time(t.at)), el("b", {}, t.by.replace("operator/", "接线员 ")), " ", t.text))),
  );
}

function renderUnits() {
  $("#unit-table tbody").replaceChildren(...state.units.map((u) => el("tr", { "data-unit": u.id },
    el("td", {}, u.id), el("td", {}, u.name), el("td", {}, label(u.kind)),
    el("td", { class: u.presence }, label(u.presence)), el("td", {}, u.busy ? "处置中" : "空闲"),
    el("td", {}, u.incident || ""))));
}

async function search(event) {
  if (event) event.preventDefault();
  const query = new URLSearchParams(new FormData($("#search")));
  $("#export").href = `/api/history.csv?${query}`;
  const response = await fetch(`/api/history?${query}`, { credentials: "same-origin" });
  const { incidents } = await response.json();
  $("#history-table tbody").replaceChildren(...incidents.map((i) => el("tr", {},
    el("td", {}, i.incident_id), el("td", {}, i.closed.replace("T", " ")), el("td", {}, `${i.name} ${i.subscriber}`),
    el("td", {}, i.counterpart), el("td", {}, label(i.severity)), el("td", {}, label(i.outcome)), el("td", {}, i.note))));
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  // frames missed while the socket was down: the whole board again once it is back
  socket.onopen = () => { if (state.live === false) load(); };
  socket.onmessage = (message) => {
    const { kind, data } = JSON.parse(message.data);
    if (kind === "incident") { state.incidents.set(data.incident_id, data); renderBoard(); }
    else if (kind === "units") { state.units = data; renderUnits(); }
    else if (kind === "refused") toast(`操作被拒绝：${data.reason}`);
    else if (kind === "connection") setLink(data.feed);
    else if (kind === "dispatcher") setDispatcher(data.state);
  };
  socket.onclose = () => { state.live = false; setLink("page"); setTimeout(connect, 2000); };
}

function setLink(feed) {
  // the board is only current while the console's own feed is live and this page hears it
  const link = $("#link");
  const up = feed === "live";
  link.textContent = {
    live: "已连接", stopped: "消息中断：看板已停止更新", page: "与调度台断开：看板已停止更新",
  }[feed] || "未连接：正在重连，看板可能不是最新";
  link.className = `link ${up ? "up" : "down"}`;
  $("#stale").hidden = up;
  document.body.classList.toggle("stale-board", !up);
}

function setDispatcher(presence) {
  // an operator must see at once when nobody is dispatching: incidents then wait on them
  const node = $("#dispatcher");
  node.textContent = { online: "调度服务运行中", offline: "调度服务已停止：预警不会自动处置" }[presence]
    || "调度服务状态未知";
  node.className = `link ${presence === "online" ? "up" : "down"}`;
}

async function load() {
  const response = await fetch("/api/state", { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/login"; return false; }
  const data = await response.json();
  Object.assign(state, { operator: data.operator, csrf: data.csrf, units: data.units, callbackMax: data.callback_max });
  for (const inc of data.incidents) state.incidents.set(inc.incident_id, inc);
  state.live = true;
  $("#operator").textContent = `接线员 ${data.operator}`;
  setLink(data.feed);
  setDispatcher(data.dispatcher);
  renderBoard();
  renderUnits();
  return true;
}

async function start() {
  if (!await load()) return;
  connect();
  setInterval(() => document.querySelectorAll("[data-since]").forEach((node) => {
    node.textContent = since(node.dataset.since || null);
  }), 1000);
}

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".pane").forEach((pane) => { pane.hidden = pane.id !== tab.dataset.tab; });
  if (tab.dataset.tab === "history") search();
}));
$("#search").addEventListener("submit", search);
$("#logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": state.csrf }, credentials: "same-origin" });
  location.href = "/login";
});
start();
