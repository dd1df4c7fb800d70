// The page: generate with streamed tokens, next-token bars, and the views in views.js.
// The data comes from the server's own JSON endpoints: /v1/completions (streamed, with logprobs),
// /api/next, /api/attention, /api/lens and /api/model.
"use strict";

const $ = (id) => document.getElementById(id);

const state = {
  model: null,           // /api/model
  generated: "",         // text generated after the prompt so far
  abort: null,           // AbortController of the generation under way
  view: null,            // the open tab: "attention" | "lens" | "params" | null
};

// --- small helpers -----------------------------------------------------------------------------

// Spaces, newlines and tabs made visible in a token label.
function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

// A logprobs token ("bytes:\xe3\x81" for part of a character) as a label: <e3 81>.
function tokenLabel(token) {
  if (token.startsWith("bytes:")) {
    const hex = token.slice(6).split("\\x").filter(Boolean);
    return "<" + hex.join(" ") + ">";
  }
  return visible(token);
}

function percent(p) {
  if (p >= 0.1) return (100 * p).toFixed(1) + "%";
  if (p >= 0.001) return (100 * p).toFixed(2) + "%";
  return (100 * p).toExponential(1) + "%";
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // never innerHTML: model text is not markup
  return node;
}

// A server started with --api-key asks for it (401): ask the reader once, keep it for this tab.
async function apiFetch(path, options = {}) {
  const send = () => {
    const headers = {...(options.headers || {})};
    const key = sessionStorage.getItem("tegaki-api-key");
    if (key) headers.Authorization = `Bearer ${key}`;
    return fetch(path, {...options, headers});
  };
  let response = await send();
  if (response.status === 401) {
    const key = window.prompt(t("api_key"));
    if (key) {
      sessionStorage.setItem("tegaki-api-key", key.trim());
      response = await send();
    }
  }
  return response;
}

async function postJSON(path, body, signal) {
  const response = await apiFetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body), signal,
  });
  const data = await response.json();
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

function currentText() {
  return $("prompt").value + state.generated;
}

function samplingSettings() {
  const topK = parseInt($("top-k").value, 10);
  const topP = parseFloat($("top-p").value);
  return {
    temperature: parseFloat($("temperature").value),
    top_k: topK > 0 ? topK : null,
    top_p: topP < 1 ? topP : null,
  };
}

function showStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

// --- generation: /v1/completions streamed as server-sent events ----------------------------------

// Yield the data of each server-sent event. TextDecoder's stream mode keeps a character whose bytes
// arrive in two network reads whole.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) if (line.startsWith("data: ")) yield line.slice(6);
    }
  }
}

async function generate() {
  if (state.abort) return;
  state.generated = "";
  $("generated").replaceChildren();
  $("output-prompt").textContent = $("prompt").value;
  $("token-info").replaceChildren();
  state.abort = new AbortController();
  $("generate-button").disabled = true;
  $("stop-button").disabled = false;
  showStatus(t("generating"));
  const started = performance.now();
  let count = 0;
  const body = {
    model: state.model.name, prompt: $("prompt").value, stream: true, logprobs: 5,
    max_tokens: parseInt($("max-tokens").value, 10) || 60, ...samplingSettings(),
  };
  const seed = parseInt($("seed").value, 10);
  if (!Number.isNaN(seed)) body.seed = seed;
  try {
    const response = await apiFetch("/v1/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
      signal: state.abort.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    const pending = [];  // tokens whose text is still held back (part of a character)
    for await (const data of serverSentEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      const lp = choice.logprobs;
      if (lp && lp.tokens.length) {
        count += 1;
        pending.push({token: lp.tokens[0], logprob: lp.token_logprobs[0], top: lp.top_logprobs[0]});
      }
      if (choice.text) addTokenSpan(choice.text, pending.splice(0));
    }
    showStatus(t("done", count, ((performance.now() - started) / 1000).toFixed(2)));
  } catch (error) {
    const stopped = error.name === "AbortError";
    showStatus(stopped ? t("stopped") : `${t("error")}: ${error.message}`, !stopped);
  } finally {
    state.abort = null;
    $("generate-button").disabled = false;
    $("stop-button").disabled = true;
    refreshAll();
  }
}

// One span of generated text with the tokens that produced it (several when a character took
// several tokens), hoverable for their probabilities.
function addTokenSpan(text, tokens) {
  state.generated += text;
  const span = el("span", "token", text);
  span.tokens = tokens;
  span.addEventListener("mouseenter", (e) => showTooltip(span, e));
  span.addEventListener("mousemove", (e) => placeTooltip(e));
  span.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  span.addEventListener("click", () => {
    for (const s of document.querySelectorAll(".token.pinned")) s.classList.remove("pinned");
    span.classList.add("pinned");
    $("token-info").replaceChildren(tokenDetails(span.tokens));
  });
  $("generated").append(span);
}

function tokenDetails(tokens) {
  const box = el("div", "details");
  for (const tok of tokens) {
    const p = Math.exp(tok.logprob);
    const head = `${t("chosen")}: ${tokenLabel(tok.token)}   ${t("probability")} ${percent(p)}`;
    box.append(el("div", "details-head", head));
    box.append(el("div", "muted", t("alternatives")));
    const alternatives = Object.entries(tok.top || {}).sort((a, b) => b[1] - a[1]);
    for (const [token, logprob] of alternatives) {
      box.append(barRow(tokenLabel(token), Math.exp(logprob), null, token === tok.token));
    }
  }
  return box;
}

function showTooltip(span, event) {
  const tip = $("tooltip");
  tip.replaceChildren(tokenDetails(span.tokens || []));
  tip.hidden = false;
  placeTooltip(event);
}

function placeTooltip(event) {
  const tip = $("tooltip");
  tip.style.left = Math.min(event.pageX + 14, window.scrollX + window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = event.pageY + 18 + "px";
}

// --- next-token bars ---------------------------------------------------------------------------

// One labelled bar: width = p (what is sampled from); a thin mark at marker (the model's own).
function barRow(label, p, marker, highlight) {
  const row = el("div", "bar-row" + (highlight ? " highlight" : ""));
  row.append(el("span", "bar-label", label));
  const track = el("span", "bar-track");
  const fill = el("span", "bar-fill");
  fill.style.width = (100 * p).toFixed(2) + "%";
  track.append(fill);
  if (marker !== null && marker !== undefined) {
    const mark = el("span", "bar-mark");
    mark.style.left = (100 * marker).toFixed(2) + "%";
    track.append(mark);
  }
  row.append(track, el("span", "bar-value", percent(p)));
  return row;
}

let barsRequest = null;

async function refreshBars() {
  if (barsRequest) barsRequest.abort();  // a slider moves faster than requests finish
  barsRequest = new AbortController();
  try {
    const data = await postJSON("/api/next", {prompt: currentText(), count: 15, ...samplingSettings()},
      barsRequest.signal);
    const rows = data.tokens.map((tok) => barRow(visible(tok.text), tok.sample_prob, tok.prob, false));
    $("bars").replaceChildren(...rows);
    $("bars").dataset.settings = JSON.stringify(samplingSettings());
    $("bars-note").textContent = samplingSettings().temperature === 0 ? t("greedy") : t("candidates", data.candidates);
  } catch (error) {
    if (error.name !== "AbortError") $("bars-note").textContent = `${t("error")}: ${error.message}`;
  }
}

const refreshBarsSoon = debounce(refreshBars, 120);

function refreshAll() {
  refreshBars();
  if (state.view) openView(state.view);
}

// --- tabs --------------------------------------------------------------------------------------

function openView(name) {
  state.view = name;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `${name}-view`;
  if (name === "attention") Views.attention(currentText());
  if (name === "lens") Views.lens(currentText());
  if (name === "params") Views.params(state.model);
}

// --- start ---------------------------------------------------------------------------------------

function bindControls() {
  for (const [input, output] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
    $(input).addEventListener("input", () => {
      $(output).textContent = parseFloat($(input).value).toFixed(2);
      refreshBarsSoon();
    });
  }
  $("top-k").addEventListener("input", refreshBarsSoon);
  $("prompt").addEventListener("input", debounce(() => {
    if ($("prompt").value === $("output-prompt").textContent) return;  // already shown (Generate was quicker)
    state.generated = "";
    $("generated").replaceChildren();
    $("output-prompt").textContent = $("prompt").value;
    refreshAll();
  }, 300));
  $("generate-button").addEventListener("click", generate);
  $("stop-button").addEventListener("click", () => state.abort && state.abort.abort());
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => openView(tab.dataset.view));
  for (const b of document.querySelectorAll("[data-lang]")) {
    b.addEventListener("click", () => setLanguage(b.dataset.lang));
  }
  document.addEventListener("languagechange", () => { if (state.model) refreshAll(); });
}

async function start() {
  bindControls();
  setLanguage(initialLanguage());
  const response = await apiFetch("/api/model");
  state.model = await response.json();
  const c = state.model.config;
  $("model-name").textContent = state.model.name;
  $("model-summary").textContent =
    `${c.n_layer} layers · ${c.n_head} heads · ${c.n_embd} wide · ${c.block_size} context · ${state.model.dtype}`;
  Views.setup(state.model);
  if (!$("prompt").value) $("prompt").value = new URLSearchParams(location.search).get("prompt") || "";
  $("output-prompt").textContent = $("prompt").value;
  document.body.dataset.ready = "true";  // the browser test waits for this
  refreshBars();
}

start();
