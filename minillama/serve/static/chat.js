// The chat page: the conversation lives here, each answer streams from /v1/chat/completions as server-sent
// events, and Stop aborts the fetch, which closes the connection: the server cancels the request.
"use strict";
const $ = (id) => document.getElementById(id);
const messages = [];  // {role, content}: what the next request sends, the system prompt excepted
let controller = null;  // the AbortController of the answer being written

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.appendChild(span);
}

async function checkHealth() {
  try {
    const r = await fetch("/health");
    if (r.ok) {
      $("status").textContent = "ready";
      $("status").className = "ready";
      const models = await (await fetch("/v1/models", {headers: headers()})).json();
      if (models.data) $("model").textContent = models.data[0].id;
      return;
    }
  } catch (e) { /* not up yet */ }
  setTimeout(checkHealth, 1000);
}

// Parse a server-sent event stream: yields the JSON of each `data:` line until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        yield JSON.parse(payload);
      }
    }
  }
}

async function send(text) {
  messages.push({role: "user", content: text});
  bubble("user", text);
  const div = bubble("assistant streaming", "");
  const system = $("system").value.trim();
  const body = {
    messages: (system ? [{role: "system", content: system}] : []).concat(messages),
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) || undefined,
    stream: true, stream_options: {include_usage: true},
  };
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  let answer = "", chunks = 0, first = null;
  const start = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers: headers(),
                                                          body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || response.statusText);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {  // the last chunk: exact token count
        const seconds = (performance.now() - (first || start)) / 1000;
        $("speed").textContent = `${chunk.usage.completion_tokens} tokens · ` +
          `${(chunk.usage.completion_tokens / Math.max(seconds, 1e-3)).toFixed(1)} tok/s`;
        continue;
      }
      const delta = chunk.choices[0].delta.content;
      if (!delta) continue;
      first = first || performance.now();
      answer += delta;
      chunks += 1;
      div.textContent = answer;
      div.scrollIntoView({block: "end"});
      const seconds = (performance.now() - first) / 1000;
      $("speed").textContent = `~${chunks} tokens · ${(chunks / Math.max(seconds, 1e-3)).toFixed(1)} tok/s`;
    }
  } catch (e) {
    if (e.name === "AbortError") {
      note(div, "(stopped)");
    } else {
      div.classList.add("error");
      note(div, "error: " + e.message);
    }
  } finally {
    div.classList.remove("streaming");
    messages.push({role: "assistant", content: answer});
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  $("messages").replaceChildren();
  $("speed").textContent = "";
});
checkHealth();
