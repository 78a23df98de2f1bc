// The page of `sharnn serve`: generation streamed from POST /v1/generate, surprisal from POST /v1/score,
// attention from POST /v1/attention. Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const LN2 = Math.log(2);
let vocabKind = "bytes";
let scored = null;      // {text, groups}: the text shown in the surprisal view
let attention = null;   // the last answer of /v1/attention, and the group it was asked for

function setStatus(id, text, error = false) {
  const el = $(id);
  el.textContent = text;
  el.classList.toggle("error", error);
}

// POST a JSON body; the answer's JSON, or an Error with the server's one-line message.
async function api(path, body, signal) {
  const resp = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
  });
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp;
}

async function errorOf(resp) {
  try { return `${resp.status}: ${(await resp.json()).error}`; } catch { return `HTTP ${resp.status}`; }
}

// --- the model -------------------------------------------------------------------------------------------------

async function loadModel() {
  try {
    const resp = await fetch("/v1/model");
    const m = await resp.json();
    vocabKind = m.vocabulary.kind;
    const c = m.config;
    $("model-info").textContent = `${m.checkpoint} · ${m.parameters.toLocaleString("en")} parameters · ` +
      `${c.model} ×${c.nlayers}, emsize ${c.emsize}, attention span ${c.attn_span} (${c.attn_window}) · ` +
      `${m.vocabulary.kind} vocabulary of ${m.vocabulary.size} · weights sha256 ${m.sha256.slice(0, 12)}… · ` +
      `${m.step_rows} generation slots`;
    const select = $("attention-block");
    for (const b of m.attention_blocks) select.add(new Option(String(b), String(b)));
    if (!m.attention_blocks.length) setStatus("attention-status", "This model has no attention block.");
  } catch (e) {
    setStatus("generate-status", `cannot read /v1/model: ${e.message}`, true);
  }
}

// --- generation: server-sent events read from a POST -----------------------------------------------------------

async function* serverEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
    }
  }
}

function optionalNumber(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? null : parse(v);
}

let controller = null;

async function generate() {
  const body = {prompt: $("prompt").value, length: parseInt($("length").value, 10),
                temperature: parseFloat($("temperature").value), stream: true};
  const topK = optionalNumber("top-k", (v) => parseInt(v, 10));
  const topP = optionalNumber("top-p", parseFloat);
  const seed = optionalNumber("seed", Number);
  if (topK !== null) body.top_k = topK;
  if (topP !== null) body.top_p = topP;
  if (seed !== null) {
    if (!Number.isSafeInteger(seed)) { setStatus("generate-status", "the seed must be a whole number below 2^53", true); return; }
    body.seed = seed;
  }
  $("generated-prompt").textContent = body.prompt;
  $("generated-text").textContent = "";
  setStatus("generate-status", "generating…");
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    const resp = await api("/v1/generate", body, controller.signal);
    for await (const {event, data} of serverEvents(resp)) {
      if (event === "error") throw new Error(data.error);
      if (event === "done") {
        $("generate-status").dataset.seed = String(data.seed);
        setStatus("generate-status", `done: ${data.tokens} bytes in ${data.seconds.toFixed(2)} s, seed ${data.seed}`);
      } else {
        $("generated-text").textContent += data.text;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") setStatus("generate-status", "stopped");
    else setStatus("generate-status", e.message, true);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

// --- surprisal --------------------------------------------------------------------------------------------------

// Bytes come back one per token; characters of several bytes (UTF-8) are shown as one, their bits summed.
function groupTokens(perToken) {
  const groups = [];
  const bytes = vocabKind === "bytes";
  for (let i = 0; i < perToken.length;) {
    let n = 1;
    if (bytes) {
      const b = perToken[i].id;
      const want = b >= 0xf0 && b < 0xf8 ? 4 : b >= 0xe0 && b < 0xf0 ? 3 : b >= 0xc0 && b < 0xe0 ? 2 : 1;
      while (n < want && i + n < perToken.length && (perToken[i + n].id & 0xc0) === 0x80) n++;
    }
    const tokens = perToken.slice(i, i + n);
    const text = bytes ? new TextDecoder().decode(new Uint8Array(tokens.map((t) => t.id))) : tokens[0].token;
    const bits = tokens.reduce((s, t) => s - t.logprob / LN2, 0);
    groups.push({text, first: i, last: i + n - 1, bits, tokens});
    i += n;
  }
  return groups;
}

function surprisalColour(bits) {
  const x = Math.min(Math.max(bits, 0), 10) / 10;
  return `hsl(${Math.round(120 * (1 - x))}, ${70 + 15 * x}%, ${85 - 23 * x}%)`;
}

function label(token) {
  if (vocabKind !== "bytes") return token.token;
  const b = token.id;
  if (b === 10) return "\\n";
  if (b === 9) return "\\t";
  if (b === 32) return "␣";
  if (b < 32 || b >= 127) return `\\x${b.toString(16).padStart(2, "0")}`;
  return String.fromCharCode(b);
}

function tipText(group) {
  const lines = [`${JSON.stringify(group.text)}  ${group.bits.toFixed(2)} bits`];
  for (const t of group.tokens) {
    if (group.tokens.length > 1) lines.push(`byte ${label(t)}: ${(-t.logprob / LN2).toFixed(2)} bits`);
    if (t.top) {
      lines.push("guesses:");
      for (const g of t.top) lines.push(`  ${label(g).padEnd(4)} ${(100 * Math.exp(g.logprob)).toFixed(1)}%`);
    }
  }
  return lines.join("\n");
}

async function score() {
  const text = $("score-text").value;
  setStatus("score-status", "scoring…");
  $("score").disabled = true;
  try {
    const resp = await api("/v1/score", {text, per_token: true, top_k: 5});
    const result = (await resp.json()).results[0];
    const groups = groupTokens(result.per_token);
    scored = {text, groups};
    const view = $("surprisal");
    view.replaceChildren(...groups.map((g, k) => {
      const span = document.createElement("span");
      span.textContent = g.text;
      span.style.background = surprisalColour(g.bits);
      span.dataset.group = String(k);
      span.dataset.bits = g.bits.toFixed(2);
      return span;
    }));
    setStatus("score-status", `${result.tokens} tokens, ${(-result.log2prob).toFixed(1)} bits in all: ` +
      `${result.bpc.toFixed(3)} bits per ${vocabKind === "words" ? "word" : "byte"}`);
  } catch (e) {
    setStatus("score-status", e.message, true);
  } finally {
    $("score").disabled = false;
  }
}

function showTip(ev) {
  const span = ev.target.closest("#surprisal span");
  const tip = $("tip");
  if (!span || !scored) { tip.hidden = true; return; }
  tip.textContent = tipText(scored.groups[Number(span.dataset.group)]);
  tip.hidden = false;
  tip.style.left = `${Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8)}px`;
  tip.style.top = `${ev.clientY + 16}px`;
}

// --- attention --------------------------------------------------------------------------------------------------

async function chooseAttention(ev) {
  const span = ev.target.closest("#surprisal span");
  if (!span || !scored || !$("attention-block").options.length) return;
  const k = Number(span.dataset.group);
  const group = scored.groups[k];
  document.querySelectorAll("#surprisal span.chosen").forEach((s) => s.classList.remove("chosen"));
  span.classList.add("chosen");
  setStatus("attention-status", "reading…");
  try {
    const resp = await api("/v1/attention", {text: scored.text, position: group.last});
    attention = {answer: await resp.json(), group: k};
    drawAttention();
  } catch (e) {
    setStatus("attention-status", e.message, true);
  }
}

function drawAttention() {
  if (!attention || !scored) return;
  const block = Number($("attention-block").value);
  const map = attention.answer.blocks.find((b) => b.block === block) || attention.answer.blocks[0];
  const groups = scored.groups.slice(0, attention.group + 1);
  const weightOf = (g) => {
    let w = 0;
    for (let t = g.first; t <= g.last; t++) {
      const j = t - map.key_start;
      if (j >= 0 && j < map.weights.length) w += map.weights[j];
    }
    return w;
  };
  const weights = groups.map(weightOf);
  const top = Math.max(...weights, 1e-12);
  $("attention").replaceChildren(...groups.map((g, k) => {
    const span = document.createElement("span");
    span.textContent = g.text;
    span.dataset.weight = weights[k].toFixed(4);
    span.style.background = `rgba(47, 111, 179, ${(0.85 * weights[k] / top).toFixed(3)})`;
    if (k === groups.length - 1) span.classList.add("chosen");
    return span;
  }));
  const best = weights.indexOf(top);
  setStatus("attention-status", `block ${map.block}, from ${JSON.stringify(groups[groups.length - 1].text)} ` +
    `(position ${attention.answer.position}): most weight on ${JSON.stringify(groups[best].text)}, ` +
    `${groups.length - 1 - best} characters back (${(100 * top).toFixed(1)}%)`);
}

document.addEventListener("DOMContentLoaded", () => {
  loadModel();
  $("generate-form").addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("score-form").addEventListener("submit", (ev) => { ev.preventDefault(); score(); });
  $("surprisal").addEventListener("mousemove", showTip);
  $("surprisal").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  $("surprisal").addEventListener("click", chooseAttention);
  $("attention-block").addEventListener("change", drawAttention);
});
