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
    $("max-tokens").placeholder = maxModelLen ? `auto (context: ${maxModelLen} tokens)` : "auto";
    setStatus("");
  } catch (e) {
    $("model").textContent = "not connected";
    setStatus(e.message);
  }
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
// a chat template refuses. It stays on the page, dimmed, with the error under it.
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

function showTab(chat) {
  $("chat-view").hidden = !chat;
  $("complete-view").hidden = chat;
  $("tab-chat").classList.toggle("active", chat);
  $("tab-complete").classList.toggle("active", !chat);
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
  loadModel();
}

init();
