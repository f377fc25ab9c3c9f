// pocketlm's chat page: talks to this server's /v1/chat/completions with streaming.
// Model output is only ever put into the page as text nodes (textContent), never parsed as HTML,
// so whatever the model writes, no markup or script from it runs.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // {role, content}, the system prompt excluded
let controller = null;    // the AbortController of the answer being streamed

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// --- markdown, built as DOM nodes ------------------------------------------------------------------

function renderInline(parent, text) {
  // `code`, **bold**, *italic*; everything else stays text
  const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parent.appendChild(document.createTextNode(text.slice(last, match.index)));
    const token = match[0];
    if (token.startsWith("`")) parent.appendChild(element("code", "", token.slice(1, -1)));
    else if (token.startsWith("**")) parent.appendChild(element("strong", "", token.slice(2, -2)));
    else parent.appendChild(element("em", "", token.slice(1, -1)));
    last = match.index + token.length;
  }
  if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
}

function renderMarkdown(container, text) {
  container.replaceChildren();
  const lines = text.split("\n");
  let i = 0, paragraph = [], list = null;
  const flush = () => {
    if (paragraph.length) {
      const p = element("p");
      renderInline(p, paragraph.join("\n"));
      container.appendChild(p);
      paragraph = [];
    }
    list = null;
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)\s*$/);
    if (fence) {  // a code block runs to the closing fence, or to the end while still streaming
      flush();
      const code = [];
      i++;
      while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
      i++;
      const pre = element("pre");
      const block = element("code", fence[1] ? `language-${fence[1]}` : "", code.join("\n"));
      pre.appendChild(block);
      container.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/);
    if (heading) {
      flush();
      const h = element(`h${Math.min(6, heading[1].length + 2)}`);
      renderInline(h, heading[2]);
      container.appendChild(h);
    } else if (item) {
      if (paragraph.length) flush();
      const ordered = item[1] !== undefined;
      if (!list || (list.tagName === "OL") !== ordered) {
        list = element(ordered ? "ol" : "ul");
        container.appendChild(list);
      }
      const li = element("li");
      renderInline(li, item[2]);
      list.appendChild(li);
    } else if (!line.trim()) {
      flush();
    } else {
      if (list) list = null;
      paragraph.push(line);
    }
    i++;
  }
  flush();
}

// --- probabilities ---------------------------------------------------------------------------------

function probabilityColour(p) {  // red (unlikely) through yellow to green (likely)
  const hue = Math.round(120 * p);
  return `hsl(${hue}, 75%, 82%)`;
}

function renderTokens(container, tokens) {
  container.replaceChildren();
  for (const t of tokens) {
    const span = element("span", "token", t.token);
    const p = Math.exp(t.logprob);
    span.style.backgroundColor = probabilityColour(p);
    const alternatives = (t.top_logprobs || []).map(
      (a) => `${JSON.stringify(a.token)}  ${(100 * Math.exp(a.logprob)).toFixed(1)}%`);
    span.title = `p = ${(100 * p).toFixed(1)}%` + (alternatives.length ? "\n" + alternatives.join("\n") : "");
    container.appendChild(span);
  }
}

// --- talking to the server -------------------------------------------------------------------------

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function addMessage(role, text) {
  const node = element("div", `message ${role}`);
  if (role === "user") node.textContent = text;
  $("messages").appendChild(node);
  node.scrollIntoView({block: "end"});
  return node;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  conversation.push({role: "user", content: text});
  addMessage("user", text);
  const node = addMessage("assistant", "");
  const showProbs = $("show-probs").checked;
  if (showProbs) node.classList.add("probs");
  const body = {
    messages: messages.concat(conversation), stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value) || undefined,
  };
  if (showProbs) { body.logprobs = true; body.top_logprobs = 5; }
  controller = new AbortController();
  setBusy(true);
  let answer = "";
  const tokens = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || `the server answered ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) answer += choice.delta.content;
        if (choice.logprobs && choice.logprobs.content) tokens.push(...choice.logprobs.content);
        if (showProbs) renderTokens(node, tokens); else renderMarkdown(node, answer);
        node.scrollIntoView({block: "end"});
      }
    }
    $("status").textContent = "";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      node.classList.add("error");
      node.textContent = `error: ${e.message}`;
      $("status").textContent = "";
      conversation.pop();  // the question got no answer: it leaves the history with its error
      answer = null;
    }
  } finally {
    if (answer !== null) conversation.push({role: "assistant", content: answer});
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  if (busy) $("status").textContent = "writing…";
}

async function showModel() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    $("model").textContent = health.model ? `model: ${health.model}` : `server: ${health.status}`;
    if (health.status !== "ok") setTimeout(showModel, 1000);
  } catch (e) {
    $("model").textContent = "the server is not reachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("pocketlm-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("pocketlm-api-key", $("api-key").value));
  $("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation.length = 0;
    $("messages").replaceChildren();
  });
  showModel();
});
