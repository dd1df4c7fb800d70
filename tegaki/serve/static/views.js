// The page's three views of the model's insides: attention maps, the logit lens, the parameter table.
"use strict";

const Views = (() => {
  const $ = (id) => document.getElementById(id);
  let attention = null;   // the last /api/attention answer
  let head = 0;

  // Attention weight 0..1 -> a colour from dark blue to yellow (brighter = more attention).
  function heat(w) {
    const x = Math.sqrt(Math.max(0, Math.min(1, w)));  // sqrt: small weights stay visible
    const r = Math.round(20 + 235 * x), g = Math.round(30 + 200 * x), b = Math.round(90 + 40 * (1 - x));
    return `rgb(${r},${g},${b})`;
  }

  function drawHeatmap(canvas, weights, cell, labels) {
    const T = weights.length;
    const margin = labels ? 90 : 0;
    canvas.width = margin + T * cell;
    canvas.height = margin + T * cell;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#0c1020";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    for (let q = 0; q < T; q++) {
      for (let k = 0; k < T; k++) {
        ctx.fillStyle = heat(weights[q][k]);
        ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
      }
    }
    if (!labels) return;
    ctx.fillStyle = "#333";
    ctx.font = `${Math.min(13, cell - 2)}px sans-serif`;
    ctx.textBaseline = "middle";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, margin, canvas.height);
    ctx.fillRect(0, 0, canvas.width, margin);
    ctx.fillStyle = "#222";
    for (let i = 0; i < T; i++) {
      const text = visible(labels[i]).slice(0, 12);
      ctx.textAlign = "right";
      ctx.fillText(text, margin - 4, margin + i * cell + cell / 2);   // rows: the reading token
      ctx.save();                                                       // columns: the token read
      ctx.translate(margin + i * cell + cell / 2, margin - 4);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left";
      ctx.fillText(text, 0, 0);
      ctx.restore();
    }
  }

  function drawAttention() {
    if (!attention) return;
    const T = attention.tokens.length;
    const cell = Math.max(3, Math.min(28, Math.floor(640 / Math.max(T, 1))));
    drawHeatmap($("attention-canvas"), attention.weights[head], cell, cell >= 9 ? attention.tokens : null);
    for (const [i, box] of [...$("head-grid").children].entries()) box.classList.toggle("active", i === head);
    $("attention-head").value = String(head);
  }

  function drawHeadGrid() {
    const T = attention.tokens.length;
    const cell = Math.max(1, Math.floor(96 / Math.max(T, 1)));
    const boxes = attention.weights.map((weights, h) => {
      const box = document.createElement("figure");
      box.className = "head";
      const canvas = document.createElement("canvas");
      drawHeatmap(canvas, weights, cell, null);
      const caption = document.createElement("figcaption");
      caption.textContent = `${t("head")} ${h}`;
      box.append(canvas, caption);
      box.addEventListener("click", () => { head = h; drawAttention(); });
      return box;
    });
    $("head-grid").replaceChildren(...boxes);
  }

  function cell(tag, text) {
    const node = document.createElement(tag);
    node.textContent = text;  // never innerHTML: token text is not markup
    return node;
  }

  function options(select, count, label) {
    const current = select.value;
    select.replaceChildren(...Array.from({length: count}, (_, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = label(i);
      return option;
    }));
    if (current) select.value = current;
  }

  async function showAttention(text) {
    const layer = parseInt($("attention-layer").value || "0", 10);
    try {
      attention = await postJSON("/api/attention", {prompt: text, layer});
      head = Math.min(head, attention.n_head - 1);
      drawHeadGrid();
      drawAttention();
      $("attention-view").dataset.rendered = String(attention.tokens.length);
    } catch (error) {
      $("head-grid").replaceChildren(document.createTextNode(`${t("error")}: ${error.message}`));
    }
  }

  async function showLens(text) {
    const table = $("lens-table");
    try {
      const data = await postJSON("/api/lens", {prompt: text, top: 3});
      const header = document.createElement("tr");
      header.append(document.createElement("th"));
      for (const token of data.tokens) header.append(cell("th", visible(token)));
      const rows = [header];
      for (let layer = data.layers.length - 1; layer >= 0; layer--) {  // the real prediction on top
        const row = document.createElement("tr");
        row.append(cell("th", t("after_layer", layer)));
        for (const guesses of data.layers[layer]) {
          const best = guesses[0];
          const td = document.createElement("td");
          td.textContent = visible(best.text);
          td.style.background = `rgba(40, 110, 220, ${(0.08 + 0.8 * best.prob).toFixed(3)})`;
          td.title = guesses.map((g) => `${visible(g.text)}  ${percent(g.prob)}`).join("\n");
          row.append(td);
        }
        rows.push(row);
      }
      table.replaceChildren(...rows);
    } catch (error) {
      table.replaceChildren(document.createTextNode(`${t("error")}: ${error.message}`));
    }
  }

  function showParams(model) {
    const info = model.parameters;
    const header = document.createElement("tr");
    for (const key of ["part", "shape", "count", "share"]) header.append(cell("th", t(key)));
    const rows = [header];
    for (const part of info.parts) {
      const row = document.createElement("tr");
      const shapes = part.shapes.map((s) => s.join("×")).join(" + ");
      for (const value of [part.label, shapes, part.count.toLocaleString(), (100 * part.share).toFixed(1) + "%"]) {
        row.append(cell("td", value));
      }
      rows.push(row);
    }
    $("params-table").replaceChildren(...rows);
    $("params-total").textContent = t("total", info.total.toLocaleString(), (info.memory_bytes.fp32 / 1e6).toFixed(1));
  }

  function setup(model) {
    options($("attention-layer"), model.config.n_layer, (i) => String(i));
    options($("attention-head"), model.config.n_head, (i) => String(i));
    $("attention-layer").addEventListener("change", () => showAttention(currentText()));
    $("attention-head").addEventListener("change", () => {
      head = parseInt($("attention-head").value, 10);
      drawAttention();
    });
  }

  return {setup, attention: showAttention, lens: showLens, params: showParams};
})();
