// The page: load the kernels, the weights and the tokenizer; generate with temperature, top-k,
// top-p and a seed (tegaki/sampling.py's settings), streaming the text; show the next-token bars
// and the attention of the text.
//
// For tests and measurements: ?prompt=...&greedy=N generates N tokens greedily at once and writes
// the prompt's ids, the generated ids, the first step's logits and the speed into <pre> elements
// (#prompt-ids, #result, #logits, #speed); ?sample=N with temperature, top_k, top_p and seed
// samples instead. ?kernels=js (or wasm) chooses the kernels.
"use strict";

(async () => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const state = {model: null, tokenizer: null, steps: [], attention: [], running: false, stop: false};

  // --- sampling (tegaki/sampling.py): temperature, then top-k, then top-p -----------------------
  function mulberry32(seed) {  // a small seeded generator: the same seed gives the same text here
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = Math.imul(a ^ (a >>> 15), a | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  function softmax(values) {
    let max = -Infinity;
    for (const v of values) max = Math.max(max, v);
    const out = new Float64Array(values.length);
    let sum = 0;
    for (let i = 0; i < values.length; i++) sum += out[i] = Math.exp(values[i] - max);
    for (let i = 0; i < out.length; i++) out[i] /= sum;
    return out;
  }

  function argmax(values) {  // the first of equal maxima, as torch.argmax
    let best = 0;
    for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
    return best;
  }

  // The n largest of values, largest first, in one pass (a sort of the whole vocabulary per token
  // would cost more than the forward pass of a small model).
  function topN(values, n) {
    const best = [];  // indices, values[best[0]] largest
    for (let i = 0; i < values.length; i++) {
      if (best.length === n && values[i] <= values[best[n - 1]]) continue;
      let j = Math.min(best.length, n - 1);
      while (j > 0 && values[best[j - 1]] < values[i]) { best[j] = best[j - 1]; j--; }
      best[j] = i;
    }
    return best;
  }

  // The distribution that settings sample from: {ids, probs} (probs over ids, summing to 1).
  function sampled(logits, {temperature, topK, topP}) {
    if (temperature === 0) return {ids: [argmax(logits)], probs: [1]};
    const probs = softmax(Array.from(logits, (v) => v / temperature));
    let ids = topK > 0 ? topN(probs, topK) : Array.from(probs.keys());
    if (topP < 1 && topK <= 0) ids.sort((a, b) => probs[b] - probs[a]);
    let kept = ids.map((i) => probs[i]);
    const total = kept.reduce((a, b) => a + b, 0);
    kept = kept.map((p) => p / total);
    if (topP < 1) {  // the smallest set whose probability reaches top-p
      let sum = 0, n = 0;
      while (n < kept.length && sum < topP) sum += kept[n++];
      ids = ids.slice(0, n);
      kept = kept.slice(0, n).map((p) => p / sum);
    }
    return {ids, probs: kept, byId: topK <= 0 && topP >= 1};  // byId: ids are 0..V-1 in order
  }

  function draw({ids, probs}, random) {
    let u = random();
    for (let i = 0; i < ids.length; i++) if ((u -= probs[i]) < 0) return ids[i];
    return ids[ids.length - 1];
  }

  // What the bars show for one step: the ten most likely tokens, the sampled and the model's own.
  function describeStep(logits, dist, chosen) {
    const model = softmax(logits);
    const order = topN(model, 10);
    const sample = dist.byId ? null : new Map(dist.ids.map((id, i) => [id, dist.probs[i]]));
    const p = (id) => (dist.byId ? dist.probs[id] : sample.get(id) || 0);
    if (!order.includes(chosen)) order[order.length - 1] = chosen;
    const top = order.map((id) => ({id, text: state.tokenizer.decode([id]), p: p(id), model_p: model[id]}));
    return {top, chosen: order.indexOf(chosen)};
  }

  function settings() {
    const seedText = $("seed").value;
    return {
      temperature: parseFloat($("temperature").value),
      topK: parseInt($("top-k").value || "0", 10),
      topP: parseFloat($("top-p").value),
      maxTokens: parseInt($("max-tokens").value, 10),
      seed: seedText === "" ? Math.floor(Math.random() * 2 ** 31) : parseInt(seedText, 10),
    };
  }

  // Give the browser a moment to paint: a message round trip, not setTimeout (clamped to 4 ms).
  const channel = new MessageChannel();
  const yieldToPage = () => new Promise((resolve) => { channel.port1.onmessage = resolve; channel.port2.postMessage(0); });

  // --- generation ---------------------------------------------------------------------------------
  function forward(token) {
    const logits = state.model.step(token);
    state.attention.push(state.model.attentionWeights.slice());  // per layer, this token's (H, t+1)
    const old = state.attention.length - 1 - Views.LAST;
    if (old >= 0) state.attention[old] = null;  // the view draws the last LAST rows: the rest may go
    return logits;
  }

  async function generate(prompt, s) {
    const {model, tokenizer} = state;
    state.running = true; state.stop = false;
    document.body.dataset.done = "false";
    $("generate-button").disabled = true; $("stop-button").disabled = false;
    model.reset();
    state.steps = []; state.attention = [];
    const ids = tokenizer.encode(prompt);
    $("prompt-ids").textContent = JSON.stringify(ids);
    $("output-prompt").textContent = prompt;
    $("generated").replaceChildren();
    const generated = [], random = mulberry32(s.seed);
    const limit = Math.min(s.maxTokens, model.S - ids.length);
    if (ids.length === 0) throw new Error("the prompt is empty: write at least one character");
    if (limit <= 0) throw new Error(`the prompt fills the context (${model.S} tokens)`);

    const t0 = performance.now();
    let logits;
    for (const id of ids) logits = forward(id);  // the prompt, one token at a time into the cache
    $("logits").textContent = JSON.stringify(Array.from(logits));
    const t1 = performance.now();

    const decoder = tokenizer.decoder();
    let span = null, lastPaint = performance.now();
    for (let n = 0; n < limit && !state.stop; n++) {
      const dist = sampled(logits, s);
      const token = draw(dist, random);
      state.steps.push(describeStep(logits, dist, token));
      generated.push(token);
      // Stream the text: a token that ends inside a character joins the next one's span.
      const piece = decoder.push(token);
      if (!span) { span = document.createElement("span"); span.className = "token"; span.dataset.step = String(n); }
      span.textContent += piece;
      if (piece) { $("generated").append(span); span = null; }
      if (token === tokenizer.eot_id && !params.has("greedy")) break;
      if (state.model.length < state.model.S) logits = forward(token);  // the last one too: its attention is drawn
      if (performance.now() - lastPaint > 50) { await yieldToPage(); lastPaint = performance.now(); }
    }
    const tail = decoder.flush();
    if (span || tail) { span = span || document.createElement("span"); span.className = "token"; span.textContent += tail; $("generated").append(span); }
    const t2 = performance.now();

    const speed = {
      prompt_tokens: ids.length, prompt_ms: t1 - t0,
      generated_tokens: generated.length, generate_ms: t2 - t1,
      tokens_per_s: generated.length / ((t2 - t1) / 1000), kernels: state.kernels.name,
      load_ms: state.loadMs,  // from opening the page to the weights in place
    };
    $("speed").textContent = JSON.stringify(speed);
    $("result").textContent = JSON.stringify(generated);
    $("status").textContent = `${generated.length} tokens at ${speed.tokens_per_s.toFixed(1)} tokens/s ` +
      `(prompt: ${ids.length} tokens in ${speed.prompt_ms.toFixed(0)} ms), ${state.kernels.name}`;
    showStep(state.steps.length - 1);
    Views.attention(state.attention, model.config.n_head);
    state.running = false;
    $("generate-button").disabled = false; $("stop-button").disabled = true;
    document.body.dataset.done = "true";
  }

  function showStep(i) {
    if (i < 0) return;
    Views.bars(state.steps[i]);
    for (const node of document.querySelectorAll("#generated .token")) node.classList.toggle("pinned", node.dataset.step === String(i));
  }

  // --- start ----------------------------------------------------------------------------------------
  try {
    state.kernels = await Kernels.load("kernels.wasm", params.get("kernels"));
    [state.model, state.tokenizer] = await Promise.all([
      WebModel.load("model.safetensors", state.kernels, (received, total) => {
        $("status").textContent = `loading the weights: ${(received / 1e6).toFixed(0)} of ${(total / 1e6).toFixed(0)} MB`;
      }),
      Tokenizer.load("tokenizer.bpe.json"),
    ]);
    const c = state.model.config;
    $("model-name").textContent = state.model.name;
    $("model-summary").textContent = `${(state.model.parameters / 1e6).toFixed(2)}M parameters, ${c.n_layer} layers, ` +
      `${c.n_head} heads, context ${c.block_size}`;
    $("kernels").textContent = state.kernels.name;
    $("status").textContent = "ready";
    Views.setup(c, () => Views.attention(state.attention, c.n_head));
    for (const [slider, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
      $(slider).addEventListener("input", () => { $(out).textContent = parseFloat($(slider).value).toFixed(2); });
    }
    $("generated").addEventListener("click", (event) => {
      const token = event.target.closest(".token");
      if (token) showStep(parseInt(token.dataset.step, 10));
    });
    const run = (prompt, s) => generate(prompt, s).catch((error) => {
      $("status").textContent = `error: ${error.message}`; $("status").classList.add("error");
      $("error").textContent = error.message;
      state.running = false; $("generate-button").disabled = false; $("stop-button").disabled = true;
    });
    $("generate-button").addEventListener("click", () => run($("prompt").value, settings()));
    $("stop-button").addEventListener("click", () => { state.stop = true; });
    $("generate-button").disabled = false;
    state.loadMs = performance.now();
    document.body.dataset.ready = "true";
    $("prompt").value = params.get("prompt") ?? "";
    // The URL may set the controls (temperature, top_k, top_p, seed, max_tokens); with greedy=N
    // or sample=N the page generates N tokens at once (greedy: at temperature 0, to the end).
    const controls = {temperature: "temperature", top_k: "top-k", top_p: "top-p", seed: "seed", max_tokens: "max-tokens"};
    for (const [name, id] of Object.entries(controls)) if (params.has(name)) $(id).value = params.get(name);
    if (params.has("greedy")) $("temperature").value = "0";
    for (const [slider, out] of [["temperature", "temperature-value"], ["top-p", "top-p-value"]]) {
      $(out).textContent = parseFloat($(slider).value).toFixed(2);
    }
    const count = params.get("greedy") ?? params.get("sample");
    if (count !== null) {
      $("max-tokens").value = count;
      await run($("prompt").value, settings());
    }
  } catch (error) {
    $("status").textContent = `could not start: ${error.message}`;
    $("status").classList.add("error");
    $("error").textContent = error.message;
  }
})();
