// The page's views of the model at work: the next-token bars of a step, and the attention maps of
// the text so far (ideas and colours from tegaki/serve/static/views.js).
"use strict";

const Views = (() => {
  const $ = (id) => document.getElementById(id);
  const percent = (p) => (100 * p).toFixed(p < 0.001 ? 3 : 1) + "%";
  // Whitespace and control characters made visible, so a token of spaces or a newline shows.
  const visible = (text) => text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";

  function cell(tag, text, className) {
    const node = document.createElement(tag);
    node.textContent = text;  // never innerHTML: token text is not markup
    if (className) node.className = className;
    return node;
  }

  // step: {top: [{text, p, model_p}], chosen: index into top or -1}
  function bars(step) {
    const rows = step.top.map((entry, i) => {
      const row = document.createElement("div");
      row.className = "bar-row" + (i === step.chosen ? " highlight" : "");
      const track = document.createElement("div");
      track.className = "bar-track";
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = percent(entry.p);
      const mark = document.createElement("div");
      mark.className = "bar-mark";
      mark.style.left = percent(entry.model_p);
      track.append(fill, mark);
      row.append(cell("div", visible(entry.text), "bar-label"), track, cell("div", percent(entry.p), "bar-value"));
      return row;
    });
    $("bars").replaceChildren(...rows);
  }

  // Attention weight 0..1 -> dark blue to yellow (brighter = more attention).
  function heat(w) {
    const x = Math.sqrt(Math.max(0, Math.min(1, w)));  // sqrt: small weights stay visible
    return [Math.round(20 + 235 * x), Math.round(30 + 200 * x), Math.round(90 + 40 * (1 - x))];
  }

  // rows[q] = the weights query q gave keys 0..q (the causal triangle); drawn pixel by pixel.
  function heatmap(canvas, rows, cell) {
    const T = rows.length;
    canvas.width = canvas.height = Math.max(1, T * cell);
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(canvas.width, canvas.height);
    for (let q = 0; q < T; q++) {
      for (let k = 0; k < T; k++) {
        const [r, g, b] = k <= q ? heat(rows[q][k]) : [12, 16, 32];
        for (let y = q * cell; y < (q + 1) * cell; y++) {
          for (let x = k * cell; x < (k + 1) * cell; x++) {
            const at = 4 * (y * canvas.width + x);
            image.data.set([r, g, b, 255], at);
          }
        }
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  const LAST = 160;  // the attention maps show the last LAST tokens at most

  // record[t][layer]: the (H, t+1) weights of token t, flat. Returns head h's rows over the window.
  function headRows(record, layer, h) {
    const first = Math.max(0, record.length - LAST);
    return record.slice(first).map((layers, i) => {
      const t = first + i, w = layers[layer];
      return w.subarray(h * (t + 1) + first, (h + 1) * (t + 1));
    });
  }

  let head = 0;

  function attention(record, nHead) {
    if (!record.length) return;
    const layer = parseInt($("attention-layer").value || "0", 10);
    head = Math.min(head, nHead - 1);
    const T = Math.min(record.length, LAST);
    const small = Math.max(1, Math.floor(96 / T));
    const boxes = Array.from({length: nHead}, (_, h) => {
      const box = document.createElement("figure");
      box.className = "head" + (h === head ? " active" : "");
      const canvas = document.createElement("canvas");
      heatmap(canvas, headRows(record, layer, h), small);
      box.append(canvas, cell("figcaption", `head ${h}`));
      box.addEventListener("click", () => { head = h; $("attention-head").value = String(h); attention(record, nHead); });
      return box;
    });
    $("head-grid").replaceChildren(...boxes);
    heatmap($("attention-canvas"), headRows(record, layer, head), Math.max(3, Math.min(24, Math.floor(640 / T))));
    $("attention-head").value = String(head);
    $("attention-view").dataset.rendered = String(T);
  }

  function options(select, count) {
    select.replaceChildren(...Array.from({length: count}, (_, i) => {
      const option = cell("option", String(i));
      option.value = String(i);
      return option;
    }));
  }

  function setup(config, redraw) {
    options($("attention-layer"), config.n_layer);
    options($("attention-head"), config.n_head);
    $("attention-layer").addEventListener("change", redraw);
    $("attention-head").addEventListener("change", () => { head = parseInt($("attention-head").value, 10); redraw(); });
  }

  return {bars, attention, setup, visible, LAST};
})();
