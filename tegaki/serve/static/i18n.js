// The page's words in English and Japanese. An element with data-i18n="key" gets STRINGS[lang][key].
"use strict";

const STRINGS = {
  en: {
    prompt: "Prompt",
    temperature: "Temperature",
    zero_is_off: "0 = off",
    max_tokens: "Max tokens",
    seed: "Seed",
    generate: "Generate",
    stop: "Stop",
    hover_hint: "Hover over a generated token to see its probability and the alternatives; " +
      "click it to keep them below.",
    next_token: "Next token",
    bars_hint: "The most likely next tokens after the text above. The bar is the probability the current " +
      "temperature, top-k and top-p sample with; the thin mark is the model's own.",
    attention: "Attention",
    lens: "Logit lens",
    parameters: "Parameters",
    attention_hint: "Row: the token reading; column: the earlier token it reads. Brighter means more attention. " +
      "Pick a layer, then a head from the grid.",
    lens_hint: "What the model would predict at each position if it stopped after each layer (the final norm and " +
      "the LM head applied early). The top row is the model's real prediction.",
    params_hint: "Where the parameters are: the same numbers as `tegaki params`.",
    layer: "Layer",
    head: "Head",
    generating: "generating…",
    done: (n, s) => `${n} tokens in ${s} s`,
    stopped: "stopped",
    api_key: "This server asks for an API key (tegaki serve --api-key). Key:",
    chosen: "chosen",
    probability: "probability",
    alternatives: "alternatives at this step",
    candidates: (n) => `${n} token(s) can be drawn with these settings.`,
    greedy: "temperature 0: always the most likely token.",
    after_layer: (i) => `after layer ${i}`,
    position: "position",
    part: "part",
    shape: "shape",
    count: "parameters",
    share: "share",
    total: (n, mb) => `total ${n} parameters; ${mb} MB in fp32`,
    error: "error",
  },
  ja: {
    prompt: "プロンプト",
    temperature: "温度",
    zero_is_off: "0 = 制限なし",
    max_tokens: "最大トークン数",
    seed: "シード",
    generate: "生成",
    stop: "停止",
    hover_hint: "生成されたトークンにマウスを乗せると、その確率と他の候補が見えます。クリックすると下に残ります。",
    next_token: "次のトークン",
    bars_hint: "上の文の次に来そうなトークン。棒は今の温度・top-k・top-p で実際にサンプリングされる確率、" +
      "細い印はモデル自身の確率です。",
    attention: "アテンション",
    lens: "ロジットレンズ",
    parameters: "パラメータ",
    attention_hint: "行は読む側のトークン、列は読まれる前のトークン。明るいほど強く注目しています。" +
      "層を選び、グリッドからヘッドを選んでください。",
    lens_hint: "各層の直後で止めたら、各位置でモデルが何を予測するか（最終正規化と LM ヘッドを途中で適用）。" +
      "一番上の行がモデル本来の予測です。",
    params_hint: "パラメータの内訳。`tegaki params` と同じ数字です。",
    layer: "層",
    head: "ヘッド",
    generating: "生成中…",
    done: (n, s) => `${n} トークン、${s} 秒`,
    stopped: "停止しました",
    api_key: "このサーバーは API キーを求めています（tegaki serve --api-key）。キー：",
    chosen: "選ばれたトークン",
    probability: "確率",
    alternatives: "このステップの候補",
    candidates: (n) => `この設定でサンプリングされうるトークン: ${n} 個`,
    greedy: "温度 0: 常に最も確率の高いトークンを選びます。",
    after_layer: (i) => `${i} 層の後`,
    position: "位置",
    part: "部分",
    shape: "形",
    count: "パラメータ数",
    share: "割合",
    total: (n, mb) => `合計 ${n} パラメータ、fp32 で ${mb} MB`,
    error: "エラー",
  },
};

let LANG = "en";

function t(key, ...args) {
  const value = (STRINGS[LANG] || STRINGS.en)[key] ?? STRINGS.en[key] ?? key;
  return typeof value === "function" ? value(...args) : value;
}

function setLanguage(lang) {
  LANG = STRINGS[lang] ? lang : "en";
  document.documentElement.lang = LANG;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const b of document.querySelectorAll("[data-lang]")) b.classList.toggle("active", b.dataset.lang === LANG);
  try { localStorage.setItem("tegaki-lang", LANG); } catch (e) { /* private mode: not remembered */ }
  document.dispatchEvent(new Event("languagechange"));
}

function initialLanguage() {
  const asked = new URLSearchParams(location.search).get("lang");
  let saved = null;
  try { saved = localStorage.getItem("tegaki-lang"); } catch (e) { /* ignore */ }
  return asked || saved || ((navigator.language || "").startsWith("ja") ? "ja" : "en");
}
