// tegaki's byte-level BPE (tegaki/tokenizer/bpe.py) in the browser: the same three steps.
//
//   1. Pre-tokenize: the regex cuts the text into chunks; merges never cross a chunk boundary.
//   2. Bytes: each chunk becomes its UTF-8 bytes, each byte a token of its own.
//   3. Merge: fuse the adjacent pair merged earliest in training (the smallest merged id), again
//      and again, until no adjacent pair has a merge.
//
// Special tokens ("<|endoftext|>") in the text become their one id, as tegaki's `encode` does.
// Decoding streams: a character split across tokens is held back until its last byte arrives, so
// no half character is ever shown as U+FFFD (TextDecoder's stream mode keeps the incomplete tail;
// tegaki/tokenizer/stream.py is the twin).
"use strict";

const Tokenizer = (() => {
  // GPT-2's printable form of each byte (bpe.py bytes_to_unicode), read backwards.
  function unicodeToBytes() {
    const printable = [];
    const range = (a, b) => { for (let i = a; i <= b; i++) printable.push(i); };
    range(33, 126); range(161, 172); range(174, 255);
    const table = new Map(printable.map((b) => [String.fromCodePoint(b), b]));
    let shifted = 0;
    for (let b = 0; b < 256; b++) {
      if (!printable.includes(b)) table.set(String.fromCodePoint(256 + shifted++), b);
    }
    return table;
  }

  const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

  class BPE {
    // spec: the tokenizer file that tegaki/web/export.py writes (web_tokenizer)
    constructor(spec) {
      const table = unicodeToBytes();
      this.name = spec.name;
      this.pattern = new RegExp(spec.pattern, "gu");
      this.vocab = spec.vocab.map((s) => (s === null ? null : Uint8Array.from([...s], (ch) => table.get(ch))));
      this.byteIds = new Int32Array(256);  // the id of each one-byte token (GPT-2 does not number them 0..255)
      this.vocab.forEach((bytes, id) => { if (bytes && bytes.length === 1) this.byteIds[bytes[0]] = id; });
      this.special = spec.special_tokens;
      for (const [text, id] of Object.entries(this.special)) this.vocab[id] = new TextEncoder().encode(text);
      this.eot_id = spec.eot_id;
      this.n = this.vocab.length;
      this.merges = new Map();  // left * n + right -> merged id (a smaller id: an earlier merge)
      for (let i = 0; i < spec.merges.length; i += 3) this.merges.set(spec.merges[i] * this.n + spec.merges[i + 1], spec.merges[i + 2]);
      const names = Object.keys(this.special).sort((a, b) => b.length - a.length);  // longest first
      this.specialPattern = names.length ? new RegExp(names.map(escape).join("|"), "g") : null;
    }

    // bpe.py encode_chunk: the readable merge loop on one chunk's bytes
    encodeChunk(bytes) {
      let ids = Array.from(bytes, (b) => this.byteIds[b]);
      while (ids.length >= 2) {
        let best = Infinity, pair = -1;
        for (let i = 0; i + 1 < ids.length; i++) {
          const merged = this.merges.get(ids[i] * this.n + ids[i + 1]);
          if (merged !== undefined && merged < best) { best = merged; pair = ids[i] * this.n + ids[i + 1]; }
        }
        if (pair < 0) break;  // no adjacent pair was ever merged: done
        const out = [];
        for (let i = 0; i < ids.length; i++) {  // every occurrence, left to right (bpe.py merge)
          if (i + 1 < ids.length && ids[i] * this.n + ids[i + 1] === pair) { out.push(best); i++; }
          else out.push(ids[i]);
        }
        ids = out;
      }
      return ids;
    }

    encodeOrdinary(text) {
      const ids = [], encoder = new TextEncoder();
      for (const [chunk] of text.matchAll(this.pattern)) ids.push(...this.encodeChunk(encoder.encode(chunk)));
      return ids;
    }

    // Text -> ids, special tokens in the text included (tegaki's encode, allowed_special="all").
    encode(text) {
      if (!this.specialPattern) return this.encodeOrdinary(text);
      const ids = [];
      let start = 0;
      for (const match of text.matchAll(this.specialPattern)) {
        ids.push(...this.encodeOrdinary(text.slice(start, match.index)), this.special[match[0]]);
        start = match.index + match[0].length;
      }
      ids.push(...this.encodeOrdinary(text.slice(start)));
      return ids;
    }

    tokenBytes(id) { return this.vocab[id] || new Uint8Array(0); }

    // A streaming decoder: push(id) returns the text that is now complete ("" while a character waits).
    decoder() {
      const utf8 = new TextDecoder("utf-8");
      return {
        push: (id) => utf8.decode(this.tokenBytes(id), {stream: true}),
        flush: () => utf8.decode(),
      };
    }

    decode(ids) {
      const d = this.decoder();
      return ids.map((id) => d.push(id)).join("") + d.flush();
    }
  }

  async function load(url) {
    const response = await fetch(url);
    if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
    return new BPE(await response.json());
  }

  return {load, BPE};
})();
