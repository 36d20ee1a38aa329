"use strict";
// The operator console: the board over a WebSocket, actions over POST with the CSRF token.
// Every duration is measured on the dispatcher's clock (learnt from the CloudEvent time of
// live messages), every time shown in the deployment's time zone.

const LABEL = {
  no_answer: "无人接听", busy: "占线", answered_safe: "接通·已安全", answered_at_risk: "接通·仍有风险",
  open: "待回拨", escalated: "上门处置中", closed: "已结案",
  critical: "紧急", warning: "预警", guard: "保安", police: "民警", quick_police: "快警平台",
  grid_worker: "网格员", offered: "待接警", accepted: "已接警", declined: "已拒绝", expired: "超时未接",
  cancelled: "已撤回", arrived: "已到达", reported: "已反馈", notified: "已知会",
  online: "在线", offline: "离线", unknown: "未上报",
};
const ACTION_LABEL = {
  no_answer: "回拨：无人接听", busy: "回拨：占线", answered_safe: "回拨：接通·已安全",
  answered_at_risk: "回拨：接通·仍有风险", escalate: "立即上门", police: "派民警", close: "结案",
  acknowledge: "确认警报",
};
const CLOSE_OUTCOMES = ["prevented", "loss", "false_alarm", "unreachable"];
const state = {
  operator: null, csrf: null, incidents: new Map(), viewed: new Map(), units: [], selected: null,
  seen: new Set(), first: true, offset: 0, feedback: new Map(), drafts: new Map(),
  tops: new Map(), moved: new Map(),
  vocab: { outcomes: {}, alert_text: {}, rules: {}, stations: {}, unit_names: {}, timezone: "Asia/Shanghai" },
  feed: "connecting",
};
const $ = (selector) => document.querySelector(selector);
// one word per outcome everywhere: the dispatcher's own (incident and unit outcomes)
const label = (key) => state.vocab.outcomes[key] || LABEL[key] || key || "—";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// ---- time: the dispatcher's clock, the deployment's zone ----------------------------------

const dispatcherNow = () => Date.now() + state.offset;
function learnClock(iso) {
  const at = Date.parse(iso || "");
  if (!Number.isNaN(at)) state.offset = at - Date.now();
}
let clockFormat = null;
let dayFormat = null;
function setZone(zone) {
  clockFormat = new Intl.DateTimeFormat("zh-CN", { timeZone: zone, hour12: false, hour: "2-digit", minute: "2-digit", second: "2-digit" });
  dayFormat = new Intl.DateTimeFormat("zh-CN", { timeZone: zone, hour12: false, month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
setZone("Asia/Shanghai");
const time = (iso) => iso ? clockFormat.format(new Date(iso)) : "—";
const stamp = (iso) => iso ? dayFormat.format(new Date(iso)) : "—";
function span(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  return `${Math.floor(s / 60)}分${String(s % 60).padStart(2, "0")}秒`;
}
function between(a, b) {
  if (!a || !b) return "—";
  return span((Date.parse(b) - Date.parse(a)) / 1000);
}
// a running clock from ``from`` (stopped at ``to`` once there is one)
function clock(kind, from, to) {
  const node = el("span", { "data-clock": kind, "data-from": from || "", "data-to": to || "" });
  tickClock(node);
  return node;
}
function tickClock(node) {
  const from = node.dataset.from;
  if (!from) { node.textContent = "—"; return; }
  const end = node.dataset.to ? Date.parse(node.dataset.to) : dispatcherNow();
  node.textContent = span((end - Date.parse(from)) / 1000);
}
function countdown(until, prefix = "剩") {
  const node = el("span", { class: "countdown", "data-until": until, "data-prefix": prefix });
  tickCountdown(node);
  return node;
}
function tickCountdown(node) {
  const left = Math.ceil((Date.parse(node.dataset.until) - dispatcherNow()) / 1000);
  node.textContent = left > 0 ? `${node.dataset.prefix}${left >= 60 ? span(left) : `${left}秒`}` : "已到时限";
  node.classList.toggle("due", left <= 10);
}

// ---- words --------------------------------------------------------------------------------

function who(by) {
  if (!by || by === "dispatcher") return "系统";
  if (by.startsWith("operator/")) return `接线员 ${by.slice(9)}`;
  if (state.vocab.unit_names[by]) return state.vocab.unit_names[by];
  if (by.startsWith("+")) return "居民";
  return by;
}
// the dispatcher's timeline names rules, stations and units by id, outcomes with their code
function readable(text) {
  let out = text.replace(/规则([A-Za-z0-9._-]+)/g, (_, id) => `规则「${state.vocab.rules[id] || id}」`);
  for (const [id, name] of Object.entries(state.vocab.unit_names)) out = out.split(`（${id}）`).join("");
  for (const [id, name] of Object.entries(state.vocab.stations)) out = out.split(id).join(name);
  return out.replace(/（[a-z_]+）/g, "");
}
// an alert's instruction, and what the incident's dispatches say beside it: a door nobody
// took while a patrol is already on its way, police exhausted while quick police are asked
function alertText(code, inc) {
  const text = state.vocab.alert_text[code] || `需人工处置（警报代码 ${code}）`;
  if (!inc || inc.status === "closed") return text;
  const police = (inc.dispatches || []).filter((d) => d.role === "police" || d.role === "quick_police");
  const coming = police.filter((d) => d.status === "accepted" || d.status === "arrived");
  const asked = police.filter((d) => d.status === "offered");
  if (code === "door_exhausted" && coming.length) {
    return `${text}（${coming.map((d) => d.unit_name).join("、")} 已接警${coming.some((d) => d.status === "arrived") ? "并到达" : "，在途"}）`;
  }
  if (code === "police_exhausted" && asked.length) {
    return `${text}（${asked.map((d) => d.unit_name).join("、")} 仍在等待接警）`;
  }
  return text;
}

// ---- the alarm: a dead end sounds until an operator acknowledges it -----------------------

const alarm = { active: false, beeps: 0, ctx: null };
window.consoleAlarm = {
  get active() { return alarm.active; }, get beeps() { return alarm.beeps; },
  context: () => alarm.ctx ? alarm.ctx.state : "none",
};
function audio() {
  if (!alarm.ctx) {
    try { alarm.ctx = new AudioContext(); } catch (e) { return null; }
  }
  if (alarm.ctx.state === "suspended") alarm.ctx.resume().catch(() => {});
  return alarm.ctx;
}
function tone(ctx, frequency, start, length) {
  const osc = ctx.createOscillator();
  const gain = ctx.createGain();
  osc.type = "square";
  osc.frequency.value = frequency;
  gain.gain.value = 0.15;
  osc.connect(gain).connect(ctx.destination);
  osc.start(ctx.currentTime + start);
  osc.stop(ctx.currentTime + start + length);
}
function beep(alarming) {
  const ctx = audio();
  if (!ctx) return;
  if (alarming) { tone(ctx, 988, 0, 0.18); tone(ctx, 740, 0.22, 0.18); tone(ctx, 988, 0.44, 0.18); }
  else tone(ctx, 880, 0, 0.3);
  alarm.beeps += 1;
  $("#sound-off").hidden = ctx.state === "running";
}
function setAlarm(active) {
  const was = alarm.active;
  alarm.active = active;
  document.body.classList.toggle("alarming", active);
  if (active && !was) beep(true);
  if (!active) $("#sound-off").hidden = true;
}
setInterval(() => { if (alarm.active) beep(true); }, 1500);
document.addEventListener("click", () => { if (alarm.ctx && alarm.ctx.state === "suspended") alarm.ctx.resume(); });

// the dispatcher records who acknowledged which dead end; one that comes later sounds again
const acknowledged = (inc) => inc.alerts.every((a) => (inc.acknowledged || []).includes(a));
const deadEnd = (inc) => inc.status !== "closed" && inc.alerts.length > 0;
const alarming = (inc) => deadEnd(inc) && !acknowledged(inc);

// ---- actions and their feedback -----------------------------------------------------------

function feedback(id, status, text) {
  const current = state.feedback.get(id) || {};
  state.feedback.set(id, { ...current, status, text, answered: Date.now() });
  setTimeout(renderBoard, FEEDBACK_MS + 50);
  renderBoard();
}

// while an action waits for the dispatcher, the incident's buttons wait too, for at most
// PENDING_MS, and for REPEAT_MS in any case: a second press would be a second action (two
// callback attempts counted for one call, an early escalation), and a dispatcher answers
// well within the time a hand takes to press twice
const PENDING_MS = 10000;
const REPEAT_MS = 2000;
// a card that moved on the board this recently takes no press: the hand was aimed at what
// was there a moment ago (a new critical card comes in at the top and pushes the rest down)
const MOVED_MS = 800;
// a confirmation takes no press this soon after it was asked for: a double click is one press
const CONFIRM_MS = 500;

async function act(inc, action, body, word) {
  const id = inc.incident_id;
  if (pending(inc)) return;
  if (Date.now() - (state.moved.get(id) || 0) < MOVED_MS) {
    feedback(id, "failed", `看板刚刚变动，${word}未发送：请核对事件后再按`);
    return;
  }
  state.feedback.set(id, { status: "sent", text: word, action, since: Date.now() });
  setTimeout(renderBoard, REPEAT_MS + 50);
  setTimeout(renderBoard, PENDING_MS + 50);
  renderBoard();
  let response;
  try {
    response = await fetch(`/api/incidents/${encodeURIComponent(id)}/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": state.csrf },
      body: JSON.stringify(body), credentials: "same-origin",
    });
  } catch (e) {
    feedback(id, "failed", `${word}未发送：与调度台的连接中断`);
    return;
  }
  if (!response.ok) {
    // 503: no connection, or the broker never confirmed it: the server's text says which
    const text = await response.text();
    feedback(id, "failed", response.status === 503 ? text : `${word}未发送：${text}`);
    return;
  }
  const answer = await response.json();
  const current = state.feedback.get(id);
  if (current && current.status === "sent") {
    current.actionId = answer.action_id;
    const early = earlyRefusals.get(answer.action_id);
    if (early) feedback(id, "refused", early.text || early.reason);
    else {
      const known = state.incidents.get(id) || state.viewed.get(id);
      if (known && applied(known)) renderBoard();  // its update may have come before this answer
    }
  }
}
// a refusal may come over the socket before the POST that sent the action has returned
const earlyRefusals = new Map();

// applied once the incident's timeline holds an entry recording this very action; the
// first such entry is the dispatcher's own word on it, shown as the feedback
function applied(inc) {
  const pending = state.feedback.get(inc.incident_id);
  if (!pending || pending.status !== "sent" || !pending.actionId) return false;
  const entry = inc.timeline.find((t) => t.action_id === pending.actionId);
  if (!entry) return false;
  pending.status = "applied";
  pending.entry = { kind: entry.kind, text: entry.text };
  pending.answered = Date.now();
  // the card of a closed incident leaves the board at once: its feedback would go unseen
  if (inc.status === "closed") toast(`${inc.incident_id} 已结案：${label(inc.outcome)}（见下方“最近结案”）`);
  setTimeout(renderBoard, FEEDBACK_MS + 50);
  return true;
}
// an action recorded that changed nothing: a repeat, or a callback result that no longer
// counts (the incident was escalated meanwhile, or is not critical)
const unchanged = (entry) => /_ignored$/.test(entry.kind) || /不计入）$/.test(entry.text);

function refused(data) {
  for (const [id, pending] of state.feedback) {
    if (pending.actionId === data.action_id) {
      feedback(id, "refused", data.text || data.reason);
      return;
    }
  }
  if (data.operator !== state.operator) return;
  earlyRefusals.set(data.action_id, data);
  setTimeout(() => {
    if (earlyRefusals.delete(data.action_id)) {
      if (![...state.feedback.values()].some((f) => f.actionId === data.action_id)) toast(`操作被拒绝：${data.text || data.reason}`);
    }
  }, 10000);
}

// an answered press is said for FEEDBACK_MS, then the line goes: an old "已生效" above a new
// button reads as if it were about that button
const FEEDBACK_MS = 15000;
function feedbackLine(inc) {
  const fb = state.feedback.get(inc.incident_id);
  if (!fb) return null;
  if (fb.answered && Date.now() - fb.answered > FEEDBACK_MS) return null;
  if (fb.status === "applied" && fb.entry && unchanged(fb.entry)) {
    return el("p", { class: "feedback noted", role: "status" }, `已记录，事件未因此改变：${readable(fb.entry.text)}`);
  }
  const text = {
    sent: `已发送：${fb.text}，等待调度服务…`,
    applied: `已生效：${fb.entry ? readable(fb.entry.text) : fb.text}`,
    refused: `被拒绝：${fb.text}`, failed: fb.text,
  }[fb.status];
  return el("p", { class: `feedback ${fb.status}`, role: "status" }, text);
}

// ---- the board ----------------------------------------------------------------------------

function residentFacts(inc, full) {
  const sub = inc.subscriber;
  const end = inc.closed_at;
  return el("dl", { class: "facts" },
    el("dt", {}, "居民"), el("dd", { class: "big" }, sub.known ? `${sub.name}（${sub.display_name}）` : "未登记用户",
      sub.vulnerable ? el("span", { class: "tag vulnerable" }, "易受骗人群") : null),
    el("dt", {}, "小区"), el("dd", {}, sub.estate_name || "—"),
    el("dt", {}, "地址"), el("dd", {}, sub.address || "地址不详"),
    el("dt", {}, "手机"), el("dd", {}, sub.msisdn),
    el("dt", {}, "涉诈号码"), el("dd", {}, `${inc.counterpart}（${inc.category_label || "未分类"}）`),
    el("dt", {}, "通话时长"), el("dd", {}, el("b", {}, `${Math.round(inc.duration_s)}秒`),
      inc.calls.length && inc.calls.every((c) => c.ended) && inc.status !== "closed"
        ? el("span", { class: "tag ended" }, "通话已结束") : null,
      full ? ` · 规则「${state.vocab.rules[inc.rule] || inc.rule}」` : ""),
    inc.critical_at ? [el("dt", {}, "紧急已持续"), el("dd", { class: "big" }, clock("critical", inc.critical_at, end))]
      : [el("dt", {}, "已开启"), el("dd", {}, clock("opened", inc.opened_at, end))],
    inc.severity === "critical" ? [el("dt", {}, "回拨"), el("dd", {}, `${inc.callback.attempts}/${inc.callback.max_attempts} 次未接通`,
      inc.status === "open" && inc.callback.window_ends_at ? [" · ", countdown(inc.callback.window_ends_at, "自动上门倒计时 ")] : null)] : null,
  );
}

// what an operator has started on an incident's card and not yet sent: the close outcome
// and note, and the confirmations of close and of "answered, safe"
function draftOf(inc) {
  const id = inc.incident_id;
  const draft = state.drafts.get(id) || { outcome: "", note: "", confirming: false, safe: false, asked: 0 };
  state.drafts.set(id, draft);
  return draft;
}

function closeControl(inc) {
  const id = inc.incident_id;
  const draft = draftOf(inc);
  const keep = (event) => event.stopPropagation();
  if (draft.confirming) {
    return el("span", { class: "confirm", onclick: keep },
      el("button", { class: "danger", "data-action": "confirm-close", onclick: () => {
        if (Date.now() - draft.asked < CONFIRM_MS) return;  // the first press's twin
        draft.confirming = false;
        state.drafts.delete(id);
        act(inc, "close", draft.note ? { outcome: draft.outcome, note: draft.note } : { outcome: draft.outcome }, `结案：${label(draft.outcome)}`);
      } }, `确认结案：${label(draft.outcome)}`),
      el("button", { "data-action": "cancel-close", onclick: () => { draft.confirming = false; renderBoard(); } }, "取消"));
  }
  const select = el("select", { "data-field": "outcome", "data-for": id, onchange: (e) => { draft.outcome = e.target.value; renderBoard(); } },
    el("option", { value: "", disabled: true, selected: !draft.outcome }, "结案结果…"),
    CLOSE_OUTCOMES.map((o) => el("option", { value: o, selected: draft.outcome === o }, label(o))));
  const note = el("input", { placeholder: "备注", "data-field": "note", "data-for": id, maxlength: "200", value: draft.note,
    oninput: (e) => { draft.note = e.target.value; } });
  return el("span", { class: "close-control", onclick: keep }, select, note,
    el("button", { "data-action": "close", disabled: !draft.outcome, title: draft.outcome ? "" : "先选择结案结果",
      onclick: () => { Object.assign(draft, { confirming: true, asked: Date.now() }); renderBoard(); } }, "结案"));
}

// whether the incident's last action holds its buttons (PENDING_MS, REPEAT_MS)
function pending(inc) {
  const fb = state.feedback.get(inc.incident_id);
  if (!fb || !fb.since) return false;
  const age = Date.now() - fb.since;
  return age < REPEAT_MS || (fb.status === "sent" && age < PENDING_MS);
}

// only the actions that apply to the incident's state
function actionBar(inc) {
  if (inc.status === "closed") return null;
  const stop = (fn) => (event) => { event.stopPropagation(); fn(); };
  const buttons = [];
  if (alarming(inc)) {
    buttons.push(el("button", { class: "alarm", "data-action": "acknowledge",
      onclick: stop(() => act(inc, "acknowledge", { alerts: inc.alerts }, ACTION_LABEL.acknowledge)) }, "确认警报（我来处理）"));
  }
  if (inc.status === "open" && inc.severity === "critical") {
    const draft = state.drafts.get(inc.incident_id);
    for (const r of ["no_answer", "busy", "answered_safe", "answered_at_risk"]) {
      if (r === "answered_safe" && draft && draft.safe) {
        // "safe" closes the incident: it asks once more, as closing does
        buttons.push(el("span", { class: "confirm", onclick: (e) => e.stopPropagation() },
          el("button", { class: "danger", "data-action": "confirm-answered_safe", onclick: () => {
            if (Date.now() - draft.asked < CONFIRM_MS) return;  // the first press's twin
            draft.safe = false;
            act(inc, "callback", { result: r }, ACTION_LABEL[r]);
          } }, "确认：接通·已安全（结案，不再上门）"),
          el("button", { "data-action": "cancel-answered_safe", onclick: () => { draft.safe = false; renderBoard(); } }, "取消")));
        continue;
      }
      const press = r === "answered_safe"
        ? () => { Object.assign(draftOf(inc), { safe: true, asked: Date.now() }); renderBoard(); }
        : () => act(inc, "callback", { result: r }, ACTION_LABEL[r]);
      buttons.push(el("button", { "data-action": r, onclick: stop(press) }, label(r)));
    }
  }
  if (inc.status === "open") {
    // a resident not in the registry has no door to knock on: escalating sends police
    const word = inc.subscriber.known ? ACTION_LABEL.escalate : ACTION_LABEL.police;
    buttons.push(el("button", { class: "danger", "data-action": "escalate", onclick: stop(() => act(inc, "escalate", {}, word)) }, word));
  } else if (inc.alerts.some((a) => a === "no_address" || a === "unknown_subscriber")
             && !inc.dispatches.some((d) => d.role === "police")) {
    // no door to knock on: the operator may still send the station's police
    buttons.push(el("button", { class: "danger", "data-action": "police", onclick: stop(() => act(inc, "escalate", {}, ACTION_LABEL.police)) }, "派民警"));
  }
  const busy = pending(inc);
  if (busy) for (const button of buttons) button.disabled = true;
  const close = closeControl(inc);
  if (busy) for (const control of close.querySelectorAll("button")) control.disabled = true;
  return el("div", { class: "actions" }, buttons, close);
}

function dispatchSummary(inc) {
  const shown = inc.dispatches.filter((d) => d.status !== "notified");
  if (!shown.length) return null;
  return el("p", { class: "dispatches" }, shown.map((d, i) => el("span", { class: `d ${d.status}` }, i ? "；" : "",
    `${d.unit_name} ${dispatchWord(d)}`, d.status === "offered" && d.expires_at && inc.status !== "closed" ? ["（", countdown(d.expires_at), "）"] : null,
    d.outcome ? `：${label(d.outcome)}` : "")));
}

// the word on a card's badge and its detail's: the same everywhere
function badgeWord(inc) {
  if (deadEnd(inc)) {
    if (alarming(inc)) return "无法自动处置";
    // who took it on: the other operators need not ask
    const taken = [...inc.timeline].reverse().find((t) => t.kind === "acknowledged");
    return taken ? `${who(taken.by)} 已确认·人工处置中` : "已确认·人工处置中";
  }
  return statusWord(inc);
}

// a dispatch's state in a word; one stood down at the close after its unit got there
// says so, not only 已撤回
function dispatchWord(d) {
  if (d.status === "cancelled" && d.arrived_at) return "已到达（结案时撤回）";
  if (d.status === "cancelled" && d.accepted_at) return "已接警（结案时撤回）";
  return label(d.status);
}

function statusWord(inc) {
  if (inc.status === "closed") return label(inc.outcome);
  if (inc.status === "escalated") return "上门处置中";
  return inc.severity === "critical" ? "紧急·待回拨" : "预警·关注中";
}

function group(inc) {
  if (deadEnd(inc)) return 0;
  if (inc.status === "open" && inc.severity === "critical") return 1;
  if (inc.status === "escalated") return 2;
  return 3;
}
const groupClass = ["deadend", "awaiting", "running", ""];
const newest = (a, b) => (b.critical_at || b.opened_at).localeCompare(a.critical_at || a.opened_at);

function card(inc) {
  const g = group(inc);
  const badge = badgeWord(inc);
  const node = el("article", { class: `card ${groupClass[g]}${alarming(inc) ? " alarming" : ""}`, "data-incident": inc.incident_id,
                               onclick: () => select(inc.incident_id) },
    el("h3", {}, inc.incident_id, el("span", { class: `badge ${groupClass[g]}` }, badge)),
    inc.alerts.length ? el("ul", { class: "alerts" }, inc.alerts.map((a) => el("li", { "data-alert": a }, alertText(a, inc)))) : null,
    residentFacts(inc, false),
    dispatchSummary(inc),
    feedbackLine(inc),
    actionBar(inc));
  if (!state.first && !state.seen.has(inc.incident_id)) {
    node.classList.add("new");
    if (!alarming(inc)) beep(false);
  }
  state.seen.add(inc.incident_id);
  return node;
}

function row(inc, closed) {
  const status = closed ? label(inc.outcome) : "预警·关注中";
  return el("div", { class: "row", "data-incident": inc.incident_id, onclick: () => select(inc.incident_id) },
    el("span", {}, inc.incident_id), el("span", {}, inc.subscriber.display_name || inc.subscriber.msisdn),
    el("span", {}, `${inc.counterpart}（${inc.category_label || "未分类"}）`),
    el("span", {}, `${Math.round(inc.duration_s)}秒`), el("span", { class: `row-status ${closed ? inc.outcome : ""}` }, status),
    closed ? el("span", {}, `结案 ${time(inc.closed_at)}`) : null,
    closed && inc.note ? el("span", { class: "row-note" }, `备注：${inc.note}`) : null,
    // closed with a dead end nobody took on (a loss reported as the police offers ran out,
    // say): the incident is over, what it needed is not
    closed && !acknowledged(inc) ? el("span", { class: "tag unhandled", "data-unhandled": inc.alerts.join(" ") },
      `⚠ 结案时仍有未处置警报：${inc.alerts.map((a) => alertText(a)).join("；")}`) : null);
}

function renderBoard() {
  const focus = document.activeElement;
  const refocus = focus && focus.dataset && focus.dataset.for && focus.dataset.field
    ? [focus.dataset.for, focus.dataset.field, focus.selectionStart] : null;
  const all = [...state.incidents.values()];
  all.forEach(applied);
  const cards = all.filter((i) => i.status !== "closed" && group(i) < 3);
  cards.sort((a, b) => group(a) - group(b) || newest(a, b));
  const warnings = all.filter((i) => i.status !== "closed" && group(i) === 3).sort(newest);
  const closed = all.filter((i) => i.status === "closed")
    .sort((a, b) => (b.closed_at || "").localeCompare(a.closed_at || "")).slice(0, 20);
  $("#critical").replaceChildren(...(cards.length ? cards.map(card)
    : [el("p", { class: "empty" }, "当前没有需要处置的事件：新的紧急预警会在这里出现并响铃")]));
  noteMoves();
  $("#warnings").replaceChildren(...(warnings.length ? warnings.map((i) => row(i, false)) : [el("p", { class: "empty-quiet" }, "无")]));
  $("#closed").replaceChildren(...closed.map((i) => row(i, true)));
  state.first = false;
  setAlarm(all.some(alarming));
  renderDetail();
  if (refocus) {
    const again = document.querySelector(`[data-for="${CSS.escape(refocus[0])}"][data-field="${refocus[1]}"]`);
    if (again) { again.focus(); if (refocus[2] != null && again.setSelectionRange) again.setSelectionRange(refocus[2], refocus[2]); }
  }
}

// the detail panel takes its width from the board: the cards it moves, the operator moved
function select(id) { state.selected = id; renderDetail(); noteMoves(true); }
window.addEventListener("resize", () => noteMoves(true));

// each card's place on the page; one that is elsewhere than at the last render, or was not
// on the board then, is under the operator's hand unawares (MOVED_MS). ``own``: the operator
// moved them (opened or closed the detail, resized the window): their places are only noted
function noteMoves(own = false) {
  const tops = new Map();
  const arrived = [];
  let shifted = false;
  const now = Date.now();
  for (const node of document.querySelectorAll("#critical article[data-incident]")) {
    const id = node.dataset.incident;
    const box = node.getBoundingClientRect();  // the board is a grid: rows and columns
    const at = [Math.round(box.left + window.scrollX), Math.round(box.top + window.scrollY)];
    tops.set(id, at);
    const before = state.tops.get(id);
    if (before === undefined) {
      if (!state.first) arrived.push(id);
    } else if (!own && (Math.abs(before[0] - at[0]) > 2 || Math.abs(before[1] - at[1]) > 2)) {
      state.moved.set(id, now);
      shifted = true;
    }
  }
  // a card that came in where another was (it pushed the others on) is under a hand that
  // was aimed at that other one; one that came onto an empty place is not
  if (shifted) for (const id of arrived) state.moved.set(id, now);
  state.tops = tops;
}

// an entry's text without the name the line already starts with ("李师傅 李师傅已接警",
// "接线员 op-01 接线员结案")
function entryText(t) {
  const text = readable(t.text);
  const name = who(t.by);
  if (text.startsWith(name)) return text.slice(name.length);
  if (t.by && t.by.startsWith("operator/") && text.startsWith("接线员")) return text.slice(3);
  return text;
}

function timeline(inc) {
  const missing = inc.timeline_from > 0
    ? el("li", { class: "missing" }, `此前还有${inc.timeline_from}条记录本台未收到（本台未接调度数据库）`) : null;
  return el("ol", { class: "timeline" }, missing, inc.timeline.map((t) =>
    el("li", { "data-kind": t.kind, class: t.kind === "alert" || t.kind === "acknowledged" ? t.kind : "" },
      el("time", {}, time(t.at)), el("b", {}, who(t.by)), " ", entryText(t))));
}

function renderDetail() {
  const box = $("#detail");
  const inc = state.selected && (state.incidents.get(state.selected) || state.viewed.get(state.selected));
  if (!inc) { box.hidden = true; return; }
  box.hidden = false;
  const accepted = inc.dispatches.map((d) => d.accepted_at).filter(Boolean).sort()[0];
  const arrived = inc.dispatches.map((d) => d.arrived_at).filter(Boolean).sort()[0];
  box.replaceChildren(...[
    el("div", { class: "detail-head" },
      el("h2", {}, inc.incident_id, " ", el("span", { class: `badge ${inc.status} ${inc.outcome || ""}` }, badgeWord(inc))),
      el("button", { class: "close-detail", title: "关闭详情", "aria-label": "关闭详情", onclick: () => select(null) }, "×")),
    inc.alerts.length ? el("ul", { class: "alerts" }, inc.alerts.map((a) => el("li", {}, alertText(a, inc)))) : null,
    residentFacts(inc, true),
    // a warning is a row, not a card: its actions (escalate at any severity, close) are here
    inc.status !== "closed" && group(inc) === 3 ? [feedbackLine(inc), actionBar(inc)] : null,
    el("dl", { class: "facts" },
      el("dt", {}, "开启"), el("dd", {}, stamp(inc.opened_at), inc.closed_at ? ` · 结案 ${stamp(inc.closed_at)}` : ""),
      el("dt", {}, "预警→紧急"), el("dd", {}, between(inc.opened_at, inc.critical_at)),
      el("dt", {}, "→上门派单"), el("dd", {}, between(inc.critical_at || inc.opened_at, inc.escalated_at)),
      el("dt", {}, "→首位接警"), el("dd", {}, between(inc.escalated_at, accepted)),
      el("dt", {}, "→首位到达"), el("dd", {}, between(inc.escalated_at, arrived))),
    inc.dispatches.length ? [el("h3", {}, "派单"),
      el("table", { id: "dispatch-table" }, el("tr", {}, ["单位", "状态", "派单", "接警", "到达", "结果"].map((h) => el("th", {}, h))),
        inc.dispatches.map((d) => el("tr", { "data-unit": d.unit, "data-status": d.status },
          el("td", {}, d.unit_name, el("small", {}, ` ${label(d.role)}`)),
          el("td", {}, dispatchWord(d), d.status === "offered" && d.expires_at && inc.status !== "closed" ? [" ", countdown(d.expires_at)] : null),
          el("td", {}, time(d.offered_at)), el("td", {}, time(d.accepted_at)), el("td", {}, time(d.arrived_at)),
          el("td", {}, d.outcome ? label(d.outcome) : "—"))))] : null,
    el("h3", {}, "时间线"),
    timeline(inc),
  ].flat().filter(Boolean));
}

function renderUnits() {
  $("#unit-table tbody").replaceChildren(...state.units.map((u) => el("tr", { "data-unit": u.id },
    el("td", {}, u.id), el("td", {}, u.name), el("td", {}, label(u.kind)),
    el("td", { class: u.presence }, label(u.presence)), el("td", {}, u.busy ? "处置中" : "空闲"),
    el("td", {}, u.incident || ""))));
}

// ---- history ------------------------------------------------------------------------------

const filters = () => new URLSearchParams(new FormData($("#search")));
async function search(event) {
  if (event) event.preventDefault();
  const query = filters();
  $("#export").href = `/api/history.csv?${query}`;
  const response = await fetch(`/api/history?${query}`, { credentials: "same-origin" });
  if (!response.ok) { toast(await response.text()); return; }
  const { incidents } = await response.json();
  $("#history-table tbody").replaceChildren(...incidents.map((i) => el("tr", { "data-incident": i.incident_id, class: "clickable", onclick: () => view(i.incident_id) },
    el("td", {}, i.incident_id), el("td", {}, i.closed.slice(0, 19)), el("td", {}, `${i.name} ${i.subscriber}`),
    el("td", {}, i.counterpart), el("td", {}, label(i.severity)), el("td", {}, label(i.outcome)), el("td", {}, i.note))));
}
async function view(id) {
  const response = await fetch(`/api/incidents/${encodeURIComponent(id)}`, { credentials: "same-origin" });
  if (!response.ok) { toast(await response.text()); return; }
  const { incident } = await response.json();
  state.viewed.set(id, incident);
  select(id);
}

// ---- statistics: the figures of antifraud stats, each a link to the incidents behind it ----

const ROLE_LABEL = { guard: "保安", police: "民警", quick_police: "快警平台", grid_worker: "网格员" };
const outcomeWord = (code) => code === "open" ? "未结案" : label(code);
const statsState = { data: null };
async function loadStats(event) {
  if (event) event.preventDefault();
  const query = new URLSearchParams(new FormData($("#stats-form")));
  const response = await fetch(`/api/stats?${query}`, { credentials: "same-origin" });
  if (!response.ok) { toast(await response.text()); return; }
  statsState.data = await response.json();
  renderStats();
}
// a count that opens the list of the incidents behind it
function figureLink(key, title, value) {
  const ids = (statsState.data.behind[key] || []);
  if (!ids.length) return el("span", { class: "figure-none" }, String(value));
  return el("a", { href: "#behind", class: "figure", "data-figure": key,
    onclick: (e) => { e.preventDefault(); showBehind(key, title); } }, String(value));
}
function chart(box, svgText, titleOf) {
  const doc = new DOMParser().parseFromString(svgText, "image/svg+xml");
  const svg = document.importNode(doc.documentElement, true);
  svg.querySelectorAll("g.bar").forEach((bar) => {
    const key = bar.getAttribute("data-figure");
    if (!(statsState.data.behind[key] || []).length) return;
    bar.classList.add("clickable");
    bar.setAttribute("tabindex", "0");
    bar.setAttribute("role", "link");
    const open = () => showBehind(key, titleOf(key, bar));
    bar.addEventListener("click", open);
    bar.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  });
  box.replaceChildren(svg);
}
const barTitle = (prefix) => (key, bar) => `${prefix}：${bar.querySelector("title").textContent}`;
function statsTable(title, head, rows) {
  return el("section", { class: "stats-table" }, el("h3", {}, title),
    el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
      el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c)))))));
}
function renderStats() {
  const { figures: f, charts } = statsState.data;
  const period = `${f.from || "最早"} 至 ${f.to || "最近"}`;
  const door = f.warning_to_first_arrival;
  const sec = (v) => v === null || v === undefined ? "—" : span(v);
  $("#stats-summary").replaceChildren(`${period}（时区 ${f.timezone}）：共 `,
    figureLink("all", `${period} 的全部事件`, f.incidents), " 起事件；预警→首位到达门口 中位 ",
    sec(door.p50), "，P90 ", sec(door.p90), "，最长 ", sec(door.max), "（", figureLink("arrived", "有单位到达的事件", door.count), " 起有单位到达）");
  chart($("#chart-outcomes"), charts.outcomes, barTitle("按结果"));
  chart($("#chart-arrival"), charts.arrival, barTitle("预警→首位到达"));
  chart($("#chart-daily"), charts.daily, barTitle("每日"));
  const ruleName = (id) => state.vocab.rules[id] || id;
  const unitName = (id) => state.vocab.unit_names[id] || id;
  const rules = Object.entries(f.rules).map(([id, r]) => [ruleName(id),
    figureLink(`rule:${id}`, `规则「${ruleName(id)}」的事件`, r.incidents),
    ...["prevented", "loss", "false_alarm"].map((o) => figureLink(`rule:${id}:${o}`, `规则「${ruleName(id)}」${outcomeWord(o)}的事件`, r.outcomes[o] || 0)),
    r.precision === null ? "—" : `${Math.round(r.precision * 100)}%`]);
  const unitCells = (u) => [u.offers, u.accepted, u.declined, u.expired, u.withdrawn, sec(u.to_accept.p50), sec(u.to_arrive.p50), sec(u.to_arrive.p90)].map(String);
  const unitHead = ["派单", "接警", "拒绝", "超时", "撤回", "接警用时中位", "到达用时中位", "到达 P90"];
  const units = Object.entries(f.units).map(([id, u]) => [
    figureLink(`unit:${id}`, `${unitName(id)} 参与的事件`, `${unitName(id)}（${ROLE_LABEL[u.role] || u.role}）`), ...unitCells(u)]);
  const roles = Object.entries(f.roles).map(([role, r]) => [
    figureLink(`role:${role}`, `${ROLE_LABEL[role] || role} 参与的事件`, ROLE_LABEL[role] || role), ...unitCells(r)]);
  const days = f.daily.map((d) => [figureLink(`day:${d.date}`, `${d.date} 开启的事件`, d.date), String(d.incidents), String(d.critical), String(d.escalated),
    ...["prevented", "loss", "false_alarm"].map((o) => String(d.outcomes[o] || 0))]);
  $("#stats-tables").replaceChildren(
    statsTable("按规则", ["规则", "事件数", "已阻止", "已被骗", "误报", "准确率"], rules),
    statsTable("按单位", ["单位", ...unitHead], units),
    statsTable("按单位类别", ["类别", ...unitHead], roles),
    statsTable("每日趋势", ["日期", "事件数", "转紧急", "上门派单", "已阻止", "已被骗", "误报"], days));
  $("#behind").hidden = true;
}
function showBehind(key, title) {
  const { behind, incidents } = statsState.data;
  const ids = behind[key] || [];
  $("#behind-title").textContent = `${title}（${ids.length} 起，点击查看详情）`;
  $("#behind-table tbody").replaceChildren(...ids.map((id) => {
    const inc = incidents[id] || {};
    return el("tr", { "data-incident": id, class: "clickable", onclick: () => view(id) },
      el("td", {}, id), el("td", {}, inc.opened || "—"), el("td", {}, state.vocab.rules[inc.rule] || inc.rule || "—"),
      el("td", {}, outcomeWord(inc.outcome)));
  }));
  $("#behind").hidden = false;
  $("#behind").scrollIntoView({ block: "nearest" });
}

// ---- connection ---------------------------------------------------------------------------

// The board is a snapshot (load) and the frames since: every time the socket opens the
// board is loaded again, and frames that come while a load is under way wait for it and are
// applied after it, so nothing said between a snapshot and the socket is ever missed (a new
// critical case announced in that moment would stay off the board until it next changed)
let loads = 0;
let held = [];
async function reload() {
  loads += 1;
  try {
    return await load();
  } finally {
    loads -= 1;
    if (!loads) { const frames = held; held = []; frames.forEach(apply); }
  }
}

function apply({ kind, data, time: at }) {
  if (at) learnClock(at);
  if (kind === "incident") {
    const before = state.incidents.get(data.incident_id);
    state.incidents.set(data.incident_id, data);
    if (data.status === "closed" && (!before || before.status !== "closed")) closedUnhandled(data);
    renderBoard();
  }
  else if (kind === "units") { state.units = data; renderUnits(); }
  else if (kind === "refused") refused(data);
  else if (kind === "connection") setLink(data.feed);
  else if (kind === "dispatcher") {
    state.serving = data.instance ? { instance: data.instance, since: data.since } : null;
    setDispatcher(data.state);
  }
}

// an incident that closed by itself (every unit reported) with a dead end nobody took on:
// its card leaves the board, so the operator is told, once, with the alarm's tone
function closedUnhandled(inc) {
  if (!inc.alerts.length || acknowledged(inc)) return;
  const open = inc.alerts.filter((a) => !(inc.acknowledged || []).includes(a));
  toast(`⚠ ${inc.incident_id} 已结案（${label(inc.outcome)}），但仍有未处置警报：${open.map((a) => alertText(a)).join("；")}`);
  beep(true);
}

function connect() {
  const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onopen = () => { reload(); };
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    if (loads) held.push(frame); else apply(frame);
  };
  socket.onclose = () => { state.live = false; setLink("page"); setTimeout(connect, 2000); };
}

function setLink(feed) {
  // the board is only current while the console's own feed is live and this page hears it
  state.feed = feed;
  const link = $("#link");
  const up = feed === "live";
  link.textContent = {
    live: "已连接", stopped: "消息中断：看板已停止更新", page: "与调度台断开：看板已停止更新",
  }[feed] || "未连接：正在重连，看板可能不是最新";
  link.className = `link ${up ? "up" : "down"}`;
  $("#stale").hidden = up;
  document.body.classList.toggle("stale-board", !up);
  setDispatcher(state.dispatcher);
}

function setDispatcher(presence) {
  // an operator must see at once when nobody is dispatching: incidents then wait on them;
  // while this console cannot hear the broker it cannot know, and says only that
  state.dispatcher = presence;
  const node = $("#dispatcher");
  if (state.feed !== "live") {
    node.textContent = "无法获知：本台未连上消息服务器";
    node.className = "link unknown";
    $("#dispatcher-down").hidden = true;  // the stale banner says what is known
    return;
  }
  node.textContent = { online: "调度服务运行中", offline: "调度服务已停止：预警不会自动处置" }[presence]
    || "调度服务状态未知";
  node.className = `link ${presence === "online" ? "up" : "down"}`;
  // nobody dispatching is the board's emergency: a banner across it, as for a lost broker
  $("#dispatcher-down").hidden = presence !== "offline";
  // with active/standby, which instance serves and since when: a takeover shows here
  const serving = state.serving;
  node.title = "";
  if (serving && presence === "online") {
    const since = serving.since ? new Date(serving.since) : null;
    const at = since && !isNaN(since) ? since.toLocaleTimeString("zh-CN", { hour12: false }) : "";
    // the host for the operator; the whole instance (host:pid:random) for the engineer
    const host = serving.instance.split(":")[0];
    node.textContent += at ? `（${host}，${at} 起）` : `（${host}）`;
    node.title = `当前由 ${serving.instance} 提供调度服务` + (at ? `，${at} 接手` : "");
  }
}

async function load() {
  const response = await fetch("/api/state", { credentials: "same-origin" });
  if (response.status === 401) { location.href = "/login"; return false; }
  const data = await response.json();
  learnClock(data.dispatcher_now);
  Object.assign(state, { operator: data.operator, csrf: data.csrf, units: data.units });
  state.vocab = { timezone: data.timezone, outcomes: data.outcomes, alert_text: data.alert_text,
                  rules: data.rules, stations: data.stations, unit_names: data.unit_names };
  setZone(data.timezone);
  for (const inc of data.incidents) state.incidents.set(inc.incident_id, inc);
  state.live = true;
  $("#operator").textContent = `接线员 ${data.operator}`;
  $("#zone").textContent = `时区 ${data.timezone}`;
  $("#stats-zone").textContent = `时区 ${data.timezone}`;
  const outcome = $("#search select[name=outcome]");
  outcome.replaceChildren(el("option", { value: "" }, "全部结果"),
    [...CLOSE_OUTCOMES, "resolved_by_callback"].map((o) => el("option", { value: o }, label(o))));
  state.dispatcher = data.dispatcher;
  state.serving = data.dispatcher_serving && data.dispatcher_serving.instance
    ? data.dispatcher_serving : null;
  setLink(data.feed);
  renderBoard();
  renderUnits();
  return true;
}

function toast(text) {
  const box = $("#toast");
  box.textContent = text;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.hidden = true; }, 8000);
}

async function start() {
  connect();  // first: what is said while the board loads waits for it (reload)
  if (!await reload()) return;
  setInterval(() => {
    document.querySelectorAll("[data-clock]").forEach(tickClock);
    document.querySelectorAll("[data-until]").forEach(tickCountdown);
  }, 1000);
}

document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".pane").forEach((pane) => { pane.hidden = pane.id !== tab.dataset.tab; });
  if (tab.dataset.tab === "history") search();
  if (tab.dataset.tab === "stats") loadStats();
}));
$("#stats-form").addEventListener("submit", loadStats);
$("#search").addEventListener("submit", search);
// the list and the export always follow the filters as they stand in the form
let searching = null;
$("#search").addEventListener("input", () => {
  $("#export").href = `/api/history.csv?${filters()}`;
  clearTimeout(searching);
  searching = setTimeout(search, 300);
});
$("#export").addEventListener("click", () => { $("#export").href = `/api/history.csv?${filters()}`; });
$("#logout").addEventListener("click", async () => {
  await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": state.csrf }, credentials: "same-origin" });
  location.href = "/login";
});
start();
