// The gateway's page: chat and image views over the gateway's own OpenAI-compatible API,
// and a panel of what crossed the wire for the last request (GET /lambdasplit/requests/ID).
"use strict";

const $ = (id) => document.getElementById(id);
let config = null;
let conversation = [];

async function loadConfig() {
  config = await (await fetch("/lambdasplit/config")).json();
  const t = config.text;
  $("setting").textContent = t
    ? `${t.model} · ${t.mode}` + (t.split ? ` · split ${t.split} · ${t.codec}` : "") +
      (t.servers.length ? ` · body on ${t.servers.join(", ")}` : "")
    : "no text model";
  if (!config.image) { $("tab-image").disabled = true; $("tab-image").title = "start the gateway with --image-model"; }
  if (t) showPrivacy(t.privacy);
}

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  $("view-chat").classList.toggle("hidden", view !== "chat");
  $("view-image").classList.toggle("hidden", view !== "image");
  const engine = view === "chat" ? config && config.text : config && config.image;
  if (engine) showPrivacy(engine.privacy);
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Server-sent events over a POST: read the body stream, split on blank lines, parse `data:` lines.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || !config.text) return;
  $("chat-input").value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  $("chat-send").disabled = true;
  setStatus("streaming…");
  let tokens = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: config.text.model, messages: conversation, stream: true,
        max_tokens: Number($("max-tokens").value), temperature: Number($("temperature").value),
        stream_options: { include_usage: true } }),
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const requestId = response.headers.get("X-Lambdasplit-Request-Id");
    for await (const data of sse(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && choice.delta.content) {
        answer.textContent += choice.delta.content;
        tokens += 1;
        setStatus(`streaming… ${tokens} pieces so far`);
      }
      if (chunk.lambdasplit) showSummary(chunk.lambdasplit);
    }
    conversation.push({ role: "assistant", content: answer.textContent });
    await showRequest(requestId);
  } catch (error) {
    answer.classList.add("error");
    answer.textContent = `error: ${error.message}`;
    conversation.pop();
    setStatus(`error: ${error.message}`);
  } finally {
    $("chat-send").disabled = false;
  }
}

async function sendImage(event) {
  event.preventDefault();
  $("image-send").disabled = true;
  $("image-status").textContent = "denoising…";
  setStatus("denoising…");
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: config.image.model, prompt: $("image-prompt").value,
        seed: Number($("image-seed").value), response_format: "b64_json" }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error.message);
    $("image-result").src = `data:image/png;base64,${body.data[0].b64_json}`;
    $("image-result").classList.remove("hidden");
    $("image-status").textContent = plural(body.lambdasplit.round_trips, "round trip");
    await showRequest(body.lambdasplit.request_id);
  } catch (error) {
    $("image-status").textContent = `error: ${error.message}`;
    setStatus(`error: ${error.message}`);
  } finally {
    $("image-send").disabled = false;
  }
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

function setStatus(text) { $("panel-status").textContent = text; }

function showSummary(s) {
  $("panel-mode").textContent = s.mode;
  $("panel-split").textContent = s.split || "–";
  $("panel-codec").textContent = s.codec || "–";
  $("panel-round-trips").textContent = s.round_trips;
  $("panel-bytes-up").textContent = s.bytes_up.toLocaleString("en");
  $("panel-bytes-down").textContent = s.bytes_down.toLocaleString("en");
}

async function showRequest(requestId) {
  const view = await (await fetch(`/lambdasplit/requests/${requestId}`)).json();
  showSummary(view);
  setStatus(`request ${view.id}`);
  const capture = view.capture;
  drawChart(capture ? capture.steps_up : [], capture ? capture.steps_down : []);
  $("hex-label").textContent = capture ? capture.hex_frame || "–" : "nothing (local mode)";
  $("hex").textContent = capture ? capture.hex : "";
  if (capture && capture.picture) {
    $("picture").src = capture.picture;
    $("picture").classList.remove("hidden");
    $("picture-label").textContent = capture.picture_label || "Transmitted hidden state (positions down, channels across)";
  } else {
    $("picture").classList.add("hidden");
  }
  $("cloud-hex").textContent = view.cloud_only.hex;
  $("cloud-note").textContent = `(${view.cloud_only.note})`;
  showSearch(capture ? capture.search : [], view.cloud_only.search);
  showPrivacy(view.privacy);
  document.body.dataset.lastRequest = view.id;
}

function verdict(row) {
  if (!row) return "<td>–</td>";
  const found = row.verbatim || row.token_id_runs || row.longest.length >= 4;
  const what = row.verbatim ? "found verbatim" : row.longest ? `found “${escape(row.longest)}”`
    : row.token_id_runs ? "token ids found" : "not found";
  return `<td class="${found ? "found" : "notfound"}">${what}</td>`;
}

function showSearch(captured, cloud) {
  const key = (r) => `${r.secret}/${r.direction}`;
  const cloudBy = Object.fromEntries(cloud.map((r) => [key(r), r]));
  const rows = (captured.length ? captured : cloud).map((r) =>
    `<tr><td>${r.secret}</td><td>${r.direction}</td>${captured.length ? verdict(r) : "<td>nothing sent</td>"}` +
    `${verdict(cloudBy[key(r)])}</tr>`);
  document.querySelector("#search tbody").innerHTML = rows.join("");
}

function showPrivacy(p) {
  const list = (items, cls) => items.length ? `<ul class="${cls}">${items.map((i) => `<li>${escape(i)}</li>`).join("")}</ul>` : "";
  const measured = p.measured
    ? `<small>measured: <code>${escape(p.measured.command)}</code>${p.measured.setting ? ` (${escape(p.measured.setting)})` : ""}; see ${escape(p.source)}</small>`
    : `<small>see ${escape(p.source)}</small>`;
  $("privacy").innerHTML = list(p.protects, "good") + list(p.does_not_protect, "bad") + measured;
}

function drawChart(up, down) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const n = Math.max(up.length, down.length);
  if (!n) return;
  // log scale: the first step carries the whole prompt, every later step one position
  const top = Math.log10(Math.max(...up, ...down, 10));
  const width = canvas.width / n;
  const bar = (values, offset, color) => {
    ctx.fillStyle = color;
    values.forEach((v, i) => {
      const h = (Math.log10(Math.max(v, 1)) / top) * (canvas.height - 14);
      ctx.fillRect(i * width + offset * width / 2, canvas.height - h, Math.max(width / 2 - 1, 1), h);
    });
  };
  bar(up, 0, "#0a84ff");
  bar(down, 1, "#ff9f0a");
  ctx.fillStyle = "#666";
  ctx.font = "10px sans-serif";
  ctx.fillText(`${n} steps, max ${Math.max(...up, ...down).toLocaleString("en")} B (log scale)`, 4, 10);
}

function escape(text) {
  return String(text).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

document.addEventListener("DOMContentLoaded", async () => {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("chat-form").addEventListener("submit", sendChat);
  $("image-form").addEventListener("submit", sendImage);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-new").addEventListener("click", () => { conversation = []; $("messages").innerHTML = ""; });
  await loadConfig();
  document.body.dataset.ready = "1";
});
