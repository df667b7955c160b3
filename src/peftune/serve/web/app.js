// peftune's chat page: plain JavaScript, no CDN (works offline). Talks to the same /v1 API as any client.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { messages: [], controller: null };
const KEY = "peftune.apiKey";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text || ""; }

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

// Markdown-lite: ``` fences become <pre><code>, `inline` becomes <code>; everything else is escaped text.
function render(text) {
  const parts = text.split(/```/);
  return parts.map((part, i) => {
    if (i % 2 === 1) {
      const nl = part.indexOf("\n");
      const lang = nl > 0 ? part.slice(0, nl).trim() : "";
      const code = nl >= 0 && /^[\w+-]*$/.test(lang) ? part.slice(nl + 1) : part;
      return `<pre><code${lang ? ` data-lang="${escapeHtml(lang)}"` : ""}>${escapeHtml(code)}</code></pre>`;
    }
    if (i > 0) part = part.replace(/^\n/, "");  // the line break after a closing fence
    if (i < parts.length - 1) part = part.replace(/\n$/, "");  // and before an opening one
    return escapeHtml(part).replace(/`([^`\n]+)`/g, "<code>$1</code>");
  }).join("");
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = role === "user" ? "you" : role === "assistant" ? $("model").value : "error";
  div.innerHTML = `<span class="who">${escapeHtml(who)}</span><span class="body"></span>`;
  div.querySelector(".body").innerHTML = render(text);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function redraw() {
  $("log").innerHTML = "";
  for (const m of state.messages) addMessage(m.role, m.content);
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (r.status === 401) { $("keybox").open = true; setStatus("Enter the server's API key."); return; }
    const data = await r.json();
    const select = $("model");
    const keep = select.value || sessionStorage.getItem("peftune.model");
    select.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = m.id;
      opt.textContent = m.parent ? `${m.id} (adapter)` : `${m.id} (base)`;
      select.appendChild(opt);
    }
    if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
    setStatus("");
  } catch (e) { setStatus("Cannot reach the server: " + e); }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    temperature: Number($("temperature").value),
    max_tokens: Number($("max_tokens").value),
    stream: true,
  };
  const div = addMessage("assistant", "");
  const out = div.querySelector(".body");
  let answer = "";
  state.controller = new AbortController();
  busy(true);
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      if (r.status === 401) $("keybox").open = true;
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          answer += delta.content;
          out.innerHTML = render(answer);
          $("log").scrollTop = $("log").scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") addMessage("error", String(e.message || e));
  } finally {
    state.messages.push({ role: "assistant", content: answer });
    sessionStorage.setItem("peftune.conversation", JSON.stringify(state.messages));
    state.controller = null;
    busy(false);
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  sessionStorage.removeItem("peftune.conversation");
  redraw();
});
$("model").addEventListener("change", () => sessionStorage.setItem("peftune.model", $("model").value));
$("savekey").addEventListener("click", () => {
  const key = $("apikey").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  $("apikey").value = "";
  $("keybox").open = false;
  loadModels();
});

state.messages = JSON.parse(sessionStorage.getItem("peftune.conversation") || "[]");
redraw();
loadModels();
