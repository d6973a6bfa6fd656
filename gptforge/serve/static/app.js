// The web chat page: streams replies from the server's OpenAI-compatible routes over fetch + ReadableStream
// (EventSource cannot POST or send an Authorization header). Model output is only ever set as textContent,
// so whatever a model writes is shown as text, never run as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "gptforge.apiKey";
let modelName = null;
let maxModelLen = null;  // the model's context (prompt + reply tokens), from /v1/models when the server says
let history = [];        // the conversation so far, without the system prompt (read fresh on every send)
let controller = null;   // the AbortController of the request in flight, if any
let run = null;          // the last /v1/run answer shown (the served step, the loss curve), null when none
let runTicket = 0;       // bumped by every fresh load, so a poll of an older load (another API key) stops
let pollTimer = null;
// The page polls /v1/run this often while the server follows the run; ?poll=MS overrides it (the tests poll fast).
const POLL_MS = pollInterval(new URLSearchParams(location.search).get("poll"));
// The SVG namespace is a name, not an address: nothing is fetched from it.
const SVG_NS = "http://www.w3.org/2000/svg";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function sampling() {
  const body = {};
  const num = (id, field, parse) => {
    const v = parse($(id).value);
    if (Number.isFinite(v)) body[field] = v;
  };
  num("temperature", "temperature", parseFloat);
  num("top-p", "top_p", parseFloat);
  // Max tokens is a ceiling: empty sends null, and the server fits the reply into the room the prompt leaves;
  // a number is cut to what the context can ever hold (a turn the prompt leaves less room is asked again)
  const max = parseInt($("max-tokens").value, 10);
  body.max_tokens = !Number.isFinite(max) ? null : maxModelLen ? Math.min(max, maxModelLen - 1) : max;
  if (modelName) body.model = modelName;
  return body;
}

function setStatus(text) { $("status").textContent = text; }

// The server's error is OpenAI's {"error": {"message", "param", "code"}}; anything else is the HTTP status.
async function errorOf(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error;
  } catch (e) { /* not JSON */ }
  return { message: "HTTP " + res.status };
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    if (!res.ok) throw new Error((await errorOf(res)).message);
    const body = await res.json();
    const model = body.data && body.data.length ? body.data[0] : null;
    modelName = model ? model.id : null;
    maxModelLen = model && Number.isInteger(model.max_model_len) ? model.max_model_len : null;
    $("model").textContent = modelName || "no model";
    $("model-context").textContent = maxModelLen ? `context ${maxModelLen} tokens` : "";
    $("max-tokens").placeholder = maxModelLen ? `auto (context: ${maxModelLen} tokens)` : "auto";
    setStatus("");
  } catch (e) {
    $("model").textContent = "not connected";
    $("model-context").textContent = "";
    setStatus(e.message);
  }
  startRun();
}

// POST `body` with the settings and stream: true; the response, or an Error with the server's message. A
// max_tokens the prompt leaves no room for is asked again as null: the server fits the reply to the room left.
async function post(url, body) {
  const send = (b) => fetch(url, { method: "POST", headers: headers(), signal: controller.signal,
                                   body: JSON.stringify(b) });
  const full = { ...body, ...sampling(), stream: true };
  let res = await send(full);
  if (res.ok) return res;
  let error = await errorOf(res);
  if (error.code === "context_length_exceeded" && error.param === "max_tokens" && full.max_tokens !== null) {
    res = await send({ ...full, max_tokens: null });
    if (res.ok) return res;
    error = await errorOf(res);
  }
  throw Object.assign(new Error(error.message), { code: error.code, param: error.param });
}

// Stream a reply and call onText with each piece of text as it arrives. Resolves to the finish_reason, or
// "stopped" when the user pressed stop. SSE events are separated by a blank line; a read may end mid-event,
// so the unfinished tail is kept for the next read.
async function stream(url, body, pick, onText) {
  controller = new AbortController();
  let finish = null;
  try {
    const res = await post(url, body);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();  // stream mode: a character split across reads is joined
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the server closed the stream before the reply was complete");
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart()).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return finish;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || "server error");
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;  // the usage chunk has no choices
        const text = pick(choice);
        if (text) onText(text);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return "stopped";
    throw e;
  } finally {
    controller = null;
  }
}

function busy(on, sendId, stopId) {
  $(sendId).disabled = on;
  $(stopId).disabled = !on;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function sendMessage() {
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  const asked = addMessage("user", text);
  const convo = history;  // New chat swaps in a fresh array; a reply still ending belongs to the old one
  const turn = { role: "user", content: text };
  convo.push(turn);
  const system = $("system").value.trim();

  const div = addMessage("assistant", "");
  const out = div.querySelector(".text");
  let reply = "";
  busy(true, "send", "stop");
  setStatus("generating…");
  $("messages").setAttribute("aria-busy", "true");  // a screen reader reads the reply once, not every piece
  try {
    let finish, dropped = 0;
    for (;;) {  // a conversation grown past the model's context loses its oldest exchanges, as `gptforge chat` does
      const messages = system ? [{ role: "system", content: system }, ...convo] : convo.slice();
      try {
        finish = await stream("/v1/chat/completions", { messages }, (c) => c.delta && c.delta.content,
          (piece) => { reply += piece; out.textContent = reply; div.scrollIntoView({ block: "end" }); });
        break;
      } catch (e) {
        if (reply || e.code !== "context_length_exceeded" || e.param !== "messages" || !dropOldest(convo, turn)) throw e;
        dropped += 1;
      }
    }
    const note = dropped ? `the oldest ${dropped > 1 ? dropped + " exchanges were" : "exchange was"} dropped to fit the context` : "";
    const said = finish === "stopped" ? "stopped" : !reply ? "the reply was empty: left out of the conversation"
      : finish === "length" ? "reply cut at max tokens" : "";
    setStatus([said, note].filter(Boolean).join("; "));
  } catch (e) {
    div.classList.add("error");
    out.textContent = reply ? reply + "\n\n" + e.message : e.message;
    setStatus("");
  } finally {
    // what arrived stays in the conversation, so the next turn continues from what the user saw
    if (reply) convo.push({ role: "assistant", content: reply });
    else unanswered(convo, turn, asked, div);
    $("messages").removeAttribute("aria-busy");
    busy(false, "send", "stop");
    $("input").focus();
  }
}

// Drop the oldest exchange (a user turn and the reply to it) before `turn`; false when there is none left.
function dropOldest(convo, turn) {
  if (convo[0] === turn) return false;
  let end = 1;
  while (end < convo.length && convo[end].role !== "user") end += 1;
  convo.splice(0, end);
  return true;
}

// No reply came (an error, a refusal, Stop before the first token, an empty reply): the user's turn leaves the
// conversation, or every later request would hold two user turns in a row (or an empty assistant turn), which
// a chat template refuses. It stays on the page, marked "no reply", with the error under it.
function unanswered(convo, turn, asked, div) {
  const i = convo.lastIndexOf(turn);
  if (i >= 0) convo.splice(i, 1);
  asked.classList.add("unanswered");
  asked.title = "no reply came: not part of the conversation";
  if (!div.classList.contains("error")) div.remove();
}

async function complete() {
  const prompt = $("prompt").value;
  if (!prompt || controller) return;
  const out = $("completion");
  out.textContent = "";
  out.classList.remove("error");
  busy(true, "complete", "complete-stop");
  setStatus("generating…");
  try {
    const finish = await stream("/v1/completions", { prompt }, (c) => c.text,
      (piece) => { out.textContent += piece; });
    setStatus(finish === "length" ? "cut at max tokens" : finish === "stopped" ? "stopped" : "");
  } catch (e) {
    out.classList.add("error");
    out.textContent += (out.textContent ? "\n\n" : "") + e.message;
    setStatus("");
  } finally {
    busy(false, "complete", "complete-stop");
  }
}

function newChat() {
  if (controller) controller.abort();
  history = [];
  $("messages").replaceChildren();
  setStatus("");
  $("input").focus();
}

// The Chat and Completion tabs follow the ARIA tabs pattern: only the selected tab is a Tab stop (so Tab moves
// on to the page instead of through every tab), and the arrow keys, Home and End select another.
function showTab(chat, focus = false) {
  for (const [tab, view, on] of [["tab-chat", "chat-view", chat], ["tab-complete", "complete-view", !chat]]) {
    $(view).hidden = !on;
    $(tab).setAttribute("aria-selected", String(on));
    $(tab).tabIndex = on ? 0 : -1;
  }
  if (focus) $(chat ? "tab-chat" : "tab-complete").focus();
}

function tabKeys(e) {
  const chat = $("tab-chat").getAttribute("aria-selected") === "true";
  const next = { ArrowLeft: !chat, ArrowRight: !chat, Home: true, End: false }[e.key];
  if (next === undefined) return;
  e.preventDefault();
  showTab(next, true);
}

// On narrow screens the settings fold away behind a button in the header (wide ones hide the button and
// always show the settings column, whatever the button's state).
function toggleSettings() {
  const open = $("settings-toggle").getAttribute("aria-expanded") !== "true";
  $("settings-toggle").setAttribute("aria-expanded", String(open));
  $("settings").classList.toggle("open", open);
}

// Escape stops the reply or completion in flight, from anywhere on the page, as Stop does.
function escapeStops(e) {
  if (e.key === "Escape" && controller) {
    e.preventDefault();
    controller.abort();
  }
}

// ----------------------------------------------------------------------------------------------
// The training run: which step is served, and the run's loss curve from its metrics.jsonl, so a learner can
// chat with the model at step 200, then 400, while it trains. GET /v1/run answers
// {model, step, which, follow, training_step, curve: null | {train: [[step, loss]...], val: [...]}}; a server
// without the route (404), a missing key (401) or any error just hides the panel: chat never depends on it.

function pollInterval(asked) {
  const ms = parseInt(asked, 10);
  return Number.isFinite(ms) && ms >= 50 ? ms : 5000;
}

// The run's answer as {body, status}: body null when the server has none to give (status 0: no answer at all).
async function fetchRun() {
  try {
    const res = await fetch("/v1/run", { headers: headers() });
    const body = res.ok ? await res.json() : null;
    return { body: body && typeof body === "object" ? body : null, status: res.status };
  } catch (e) {
    return { body: null, status: 0 };
  }
}

// A server without /v1/run (404) may still say its step in /health.
async function healthStep() {
  try {
    const res = await fetch("/health");
    const body = res.ok ? await res.json() : null;
    return body && Number.isInteger(body.step) ? body.step : null;
  } catch (e) {
    return null;
  }
}

// A fresh start (the page opened, or another API key): forget the old run and stop its polling.
function startRun() {
  clearTimeout(pollTimer);
  run = null;
  showStep(null);
  $("run-panel").hidden = true;
  pollRun(++runTicket, true);
}

async function pollRun(ticket, first) {
  const { body: got, status } = await fetchRun();
  if (ticket !== runTicket) return;  // a newer start took over while this one waited
  if (got) showRun(got, !first);
  else if (first && status === 404) {  // not after a 401: without the key the page shows nothing of the model
    const step = await healthStep();
    if (ticket === runTicket) showStep(step);
  }
  // a failed poll keeps the last picture (the server may be busy or restarting) and tries again
  const known = got || run;
  if (known && known.follow) pollTimer = setTimeout(() => pollRun(ticket, false), POLL_MS);
}

function showStep(step) {
  $("model-step").textContent = Number.isInteger(step) ? `step ${step}` : "";
}

// Show a /v1/run answer; `announce`: say so in the status line when the served step changed since the last one
// (the server switched to a newer checkpoint; the conversation carries on with it).
function showRun(next, announce) {
  const step = Number.isInteger(next.step) ? next.step : null;
  if (announce && run && step !== null && step !== run.step) setStatus(`now serving step ${step}`);
  const changed = JSON.stringify(next) !== JSON.stringify(run);
  run = next;
  showStep(step);
  if (!changed) return;  // polls mostly bring the same answer: keep the chart as it is
  const train = points(next.curve && next.curve.train);
  const val = points(next.curve && next.curve.val);
  $("run-panel").hidden = !(train.length || val.length);
  if ($("run-panel").hidden) return;
  $("run-text").textContent = runText(next, step);
  $("run-chart").replaceChildren(drawChart(train, val, step));
}

function runText(next, step) {
  const served = step === null ? "serving an unknown step" : `serving step ${step}`;
  const of = Number.isInteger(next.training_step) ? ` of ${next.training_step}` : "";
  const which = next.which ? ` (${next.which})` : "";
  const follows = next.follow ? "; switches to new checkpoints as the run saves them" : "";
  return served + of + which + follows;
}

// [step, loss] pairs with finite numbers, in step order; anything else in the curve is skipped.
function points(list) {
  if (!Array.isArray(list)) return [];
  return list.filter((p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]))
    .sort((a, b) => a[0] - b[0]);
}

const fmt = (v) => String(Number(v.toPrecision(3)));  // 4.2, 1.93, 0.0123: short, without trailing zeros

function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// The range [lo, hi] of `values`, widened by 1 each way when they are all equal (a flat line still gets an axis).
function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }  // no spread: a curve may be long
  return lo < hi ? [lo, hi] : [lo - 1, hi + 1];
}

// The loss chart: train loss as a line, val loss as a line with points, a dashed vertical line at the served
// step, and three labels on each axis. Screen readers get a one-sentence summary instead of the drawing.
function drawChart(train, val, step) {
  const W = 224, H = 136, left = 34, right = 8, top = 8, bottom = 20;
  const [x0, x1] = range([...train, ...val].map((p) => p[0]).concat(step === null ? [] : [step]));
  const [y0, y1] = range([...train, ...val].map((p) => p[1]));
  const x = (s) => (left + (s - x0) / (x1 - x0) * (W - left - right)).toFixed(1);
  const y = (v) => (top + (y1 - v) / (y1 - y0) * (H - top - bottom)).toFixed(1);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": chartSummary(train, val, step) });

  for (const v of [y0, (y0 + y1) / 2, y1]) {
    chart.append(svg("line", { class: "chart-grid", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { class: "chart-label", x: left - 4, y: y(v), "text-anchor": "end",
                               "dominant-baseline": "middle" }, fmt(v)));
  }
  for (const [s, anchor] of [[x0, "start"], [(x0 + x1) / 2, "middle"], [x1, "end"]]) {
    chart.append(svg("text", { class: "chart-label", x: x(s), y: H - 4, "text-anchor": anchor }, String(Math.round(s))));
  }
  chart.append(svg("line", { class: "chart-axis", x1: left, x2: left, y1: top, y2: H - bottom }));
  chart.append(svg("line", { class: "chart-axis", x1: left, x2: W - right, y1: H - bottom, y2: H - bottom }));

  const line = (pts, cls) => svg("polyline", { class: cls, points: pts.map((p) => `${x(p[0])},${y(p[1])}`).join(" ") });
  if (train.length) chart.append(line(train, "chart-train"));
  if (val.length) {
    chart.append(line(val, "chart-val"));
    for (const p of val) chart.append(svg("circle", { class: "chart-val-point", cx: x(p[0]), cy: y(p[1]), r: 2.5 }));
  }
  if (step !== null) {
    chart.append(svg("line", { class: "chart-served", x1: x(step), x2: x(step), y1: top, y2: H - bottom,
                               "data-step": step }));
  }
  return chart;
}

// "train loss from 4.2 at step 0 to 1.9 at step 450; val loss 2.1 at step 400; serving step 400"
function chartSummary(train, val, step) {
  const parts = [];
  if (train.length) {
    const [a, b] = [train[0], train[train.length - 1]];
    parts.push(`train loss from ${fmt(a[1])} at step ${a[0]} to ${fmt(b[1])} at step ${b[0]}`);
  }
  if (val.length) {
    const last = val[val.length - 1];
    parts.push(`val loss ${fmt(last[1])} at step ${last[0]}`);
  }
  if (step !== null) parts.push(`serving step ${step}`);
  return parts.join("; ");
}

function init() {
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); sendMessage(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); sendMessage(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("complete-stop").addEventListener("click", () => controller && controller.abort());
  $("complete").addEventListener("click", complete);
  $("new-chat").addEventListener("click", newChat);
  $("tab-chat").addEventListener("click", () => showTab(true));
  $("tab-complete").addEventListener("click", () => showTab(false));
  $("tabs").addEventListener("keydown", tabKeys);
  $("settings-toggle").addEventListener("click", toggleSettings);
  document.addEventListener("keydown", escapeStops);
  loadModel();
}

init();
