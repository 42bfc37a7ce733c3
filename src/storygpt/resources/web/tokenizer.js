// storygpt's SentencePiece tokenizer in the browser: encodes and decodes exactly as storygpt's Python
// `Tokenizer` (src/storygpt/text/tokenizer.py, i.e. sentencepiece 0.2) does. No dependencies; an ES module
// for browsers and Node. Its data comes from storygpt.convert.web_tokenizer.tokenizer_data (tokenizer.json).
//
// Encoding, as SentencePiece's C++ does it:
// 1. storygpt: the text is split on "<|endoftext|>", which becomes eos_id; "\n"s after it are dropped.
// 2. Normalizer (identity rule only): with remove_extra_whitespaces, leading and trailing spaces go and runs of
//    spaces become one; the dummy prefix U+2581 is put in front (or at the end with
//    treat_whitespace_as_suffix); " " becomes U+2581. User-defined symbols are matched first, longest first.
// 3. Model, over Unicode code points:
//    unigram: Viterbi over the lattice of all pieces (a trie), best path by summed piece score, as in
//      SentencePiece's optimized encoder: path scores are summed and compared in float32 (as the compiled
//      sentencepiece does; in double, near-ties such as "r"+"rr" against "rr"+"r" would go the other way),
//      the first best candidate for an end position wins ties, a user-defined symbol scores
//      utf8_len * max_score - 0.1 (max_score starts at FLT_MIN, so about -0.1),
//      an unused piece is skipped, and a character with no one-character piece becomes the unknown piece
//      scoring min_score - 10.
//    bpe: characters (user-defined symbols are frozen wholes) merged pairwise, the pair whose merged piece
//      has the highest score first (leftmost on ties); unused pieces are split back into what they merged.
//    char: one piece per character (or user-defined symbol).
//    (bpe and char: an unused piece left in the output counts as unknown, as the sentencepiece storygpt uses,
//    0.2.3, does.)
// 4. Byte fallback: an unknown piece becomes the <0xNN> pieces of its UTF-8 bytes (without byte fallback,
//    runs of unknown pieces become one unknown id).
// Decoding: eos/bos ids are dropped (storygpt), control pieces decode to "", the unknown piece to
// trainer_spec.unk_surface, U+2581 in other pieces to " " (bytes E2 96 81 stay U+2581). add_dummy_prefix: while no
// text has been output, one piece starting with U+2581 loses it (with remove_extra_whitespaces, each such piece).
// Runs of byte pieces are read as UTF-8 where each byte that does not start a valid character becomes U+FFFD
// (SentencePiece's rule, not TextDecoder's: a truncated 3-byte sequence gives two U+FFFD).
// StreamDecoder runs the same decoder one id at a time, holding back bytes that may still complete a character.
//
// tests/web/test_tokenizer_js.py checks all of this against the Python tokenizer (sentencepiece itself).

const SPACE = 0x2581;
const NORMAL = 1, UNKNOWN = 2, CONTROL = 3, USER_DEFINED = 4, UNUSED = 5, BYTE = 6;
const FLT_MIN = 1.1754943508222875e-38; // SentencePiece starts max_score at FLT_MIN
const UNK_PENALTY = 10;

function codePoints(text) {
  const out = [];
  for (let i = 0; i < text.length; i++) {
    let c = text.charCodeAt(i);
    if (c >= 0xd800 && c < 0xdc00 && i + 1 < text.length) {
      const d = text.charCodeAt(i + 1);
      if (d >= 0xdc00 && d < 0xe000) { c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00); i++; }
    }
    out.push(c >= 0xd800 && c < 0xe000 ? 0xfffd : c); // a lone surrogate: U+FFFD, as TextEncoder does
  }
  return out;
}

const utf8Len = (c) => (c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4);

function utf8Bytes(cps) {
  const out = [];
  for (const c of cps) {
    if (c < 0x80) out.push(c);
    else if (c < 0x800) out.push(0xc0 | (c >> 6), 0x80 | (c & 63));
    else if (c < 0x10000) out.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
    else out.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 63), 0x80 | ((c >> 6) & 63), 0x80 | (c & 63));
  }
  return out;
}

const isTrail = (b) => (b & 0xc0) === 0x80;
const validCp = (c) => c < 0xd800 || (c >= 0xe000 && c <= 0x10ffff);

// SentencePiece's DecodeUTF8 on bytes[i..]: [code point or -1 if invalid, bytes consumed (1 if invalid)].
function decodeUtf8(b, i) {
  const n = b.length - i, b0 = b[i];
  if (b0 < 0x80) return [b0, 1];
  if (n >= 2 && (b0 & 0xe0) === 0xc0) {
    const c = ((b0 & 0x1f) << 6) | (b[i + 1] & 0x3f);
    if (isTrail(b[i + 1]) && c >= 0x80 && validCp(c)) return [c, 2];
  } else if (n >= 3 && (b0 & 0xf0) === 0xe0) {
    const c = ((b0 & 0x0f) << 12) | ((b[i + 1] & 0x3f) << 6) | (b[i + 2] & 0x3f);
    if (isTrail(b[i + 1]) && isTrail(b[i + 2]) && c >= 0x800 && validCp(c)) return [c, 3];
  } else if (n >= 4 && (b0 & 0xf8) === 0xf0) {
    const c = ((b0 & 0x07) << 18) | ((b[i + 1] & 0x3f) << 12) | ((b[i + 2] & 0x3f) << 6) | (b[i + 3] & 0x3f);
    if (isTrail(b[i + 1]) && isTrail(b[i + 2]) && isTrail(b[i + 3]) && c >= 0x10000 && validCp(c)) return [c, 4];
  }
  return [-1, 1];
}

// The length a lead byte announces (SentencePiece's tests, in the same order).
const announced = (b0) => (b0 < 0x80 ? 1 : (b0 & 0xe0) === 0xc0 ? 2 : (b0 & 0xf0) === 0xe0 ? 3 : (b0 & 0xf8) === 0xf0 ? 4 : 1);

// A trie over code points: node = {next: Map(code point -> node) | null, id}.
function makeTrie(entries) {
  const root = { next: null, id: -1 };
  for (const [cps, id] of entries) {
    let node = root;
    for (const c of cps) {
      if (node.next === null) node.next = new Map();
      let child = node.next.get(c);
      if (child === undefined) { child = { next: null, id: -1 }; node.next.set(c, child); }
      node = child;
    }
    if (node.id < 0) node.id = id;
  }
  return root;
}

// A binary max-heap of BPE merge candidates: higher score first, then the leftmost.
const better = (a, b) => a.score > b.score || (a.score === b.score && a.left < b.left);
function heapPush(h, x) {
  h.push(x);
  let i = h.length - 1;
  while (i > 0) {
    const p = (i - 1) >> 1;
    if (!better(h[i], h[p])) break;
    [h[i], h[p]] = [h[p], h[i]];
    i = p;
  }
}
function heapPop(h) {
  const top = h[0], last = h.pop();
  if (h.length) {
    h[0] = last;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < h.length && better(h[l], h[m])) m = l;
      if (r < h.length && better(h[r], h[m])) m = r;
      if (m === i) break;
      [h[i], h[m]] = [h[m], h[i]];
      i = m;
    }
  }
  return top;
}

export class Tokenizer {
  constructor(data) {
    if (!data || data.format !== "storygpt-sentencepiece" || data.version !== 1) {
      throw new Error("not storygpt tokenizer data (format storygpt-sentencepiece, version 1)");
    }
    if (!["unigram", "bpe", "char"].includes(data.model_type)) throw new Error(`unsupported model type ${data.model_type}`);
    const n = data.pieces.length;
    this.data = data;
    this.type = data.model_type;
    this.pieces = new Array(n);
    this.scores = new Float64Array(n);
    this.types = new Uint8Array(n);
    this.byteOf = new Int16Array(n).fill(-1);
    this.normal = new Map(); // SentencePiece's pieces_: normal, user-defined and unused pieces
    this.reserved = new Map(); // control, unknown and byte pieces
    const userDefined = [];
    let minScore = 3.4028234663852886e38, maxScore = FLT_MIN;
    data.pieces.forEach(([piece, score, type], i) => {
      this.pieces[i] = piece;
      this.scores[i] = Math.fround(score);
      this.types[i] = type;
      const map = type === NORMAL || type === USER_DEFINED || type === UNUSED ? this.normal : this.reserved;
      if (!map.has(piece)) map.set(piece, i);
      if (type === USER_DEFINED) userDefined.push([codePoints(piece), i]);
      if (type === BYTE) this.byteOf[i] = parseInt(piece.slice(3, 5), 16);
      if (type === NORMAL) { minScore = Math.min(minScore, this.scores[i]); maxScore = Math.max(maxScore, this.scores[i]); }
    });
    this.unkId = data.unk_id;
    this.maxScore = maxScore;
    this.unkScore = Math.fround(minScore - UNK_PENALTY);
    this.userTrie = makeTrie(userDefined);
    this.byteId = new Int32Array(256);
    for (let b = 0; b < 256; b++) this.byteId[b] = this.pieceToId(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    if (this.type === "unigram") this.trie = makeTrie([...this.normal].map(([piece, id]) => [codePoints(piece), id]));
  }

  get eosId() { return this.data.eos_id; }
  get bosId() { return this.data.bos_id; }
  get vocabSize() { return this.pieces.length; }

  idToPiece(id) {
    if (!Number.isInteger(id) || id < 0 || id >= this.pieces.length) throw new RangeError(`piece id ${id} is out of range`);
    return this.pieces[id];
  }

  pieceToId(piece) {
    const r = this.reserved.get(piece);
    if (r !== undefined) return r;
    const n = this.normal.get(piece);
    return n !== undefined ? n : this.unkId;
  }

  // Token ids of `text`, as Python's Tokenizer.encode(text).
  encode(text) {
    const ids = [];
    text.split(this.data.eos_text).forEach((part, i) => {
      if (i) { ids.push(this.eosId); part = part.replace(/^\n+/, ""); }
      if (part) for (const id of this.encodePiece(part)) ids.push(id);
    });
    return ids;
  }

  // SentencePiece's own encode (no <|endoftext|> handling).
  encodePiece(text) {
    const norm = this.normalize(codePoints(text));
    if (!norm.length) return [];
    const found = this.type === "unigram" ? this.viterbi(norm) : this.type === "bpe" ? this.bpe(norm) : this.chars(norm);
    const ids = [];
    let prevUnk = false;
    for (const [id, cps] of found) {
      const unk = id === this.unkId;
      if (unk && this.data.byte_fallback) for (const b of utf8Bytes(cps)) ids.push(this.byteId[b]);
      else if (!(unk && prevUnk)) ids.push(id); // without byte fallback a run of unknowns is one piece
      prevUnk = unk;
    }
    return ids;
  }

  // Length of the longest user-defined symbol at cps[i], or 0.
  userMatch(cps, i) {
    let node = this.userTrie, len = 0;
    for (let k = i; k < cps.length && node.next !== null; k++) {
      node = node.next.get(cps[k]);
      if (node === undefined) break;
      if (node.id >= 0) len = k + 1 - i;
    }
    return len;
  }

  normalize(cps) {
    const d = this.data, rew = d.remove_extra_whitespaces, n = cps.length;
    const space = d.escape_whitespaces ? SPACE : 0x20;
    let i = 0;
    if (rew) while (i < n && cps[i] === 0x20 && this.userMatch(cps, i) <= 1) i++;
    if (i === n) return [];
    const out = [];
    if (d.add_dummy_prefix && !d.treat_whitespace_as_suffix) out.push(space);
    let prevSpace = rew;
    while (i < n) {
      const end = i + Math.max(1, this.userMatch(cps, i));
      let s = i;
      while (prevSpace && s < end && cps[s] === 0x20) s++;
      if (s < end) {
        for (let k = s; k < end; k++) out.push(cps[k] === 0x20 ? space : cps[k]);
        prevSpace = cps[end - 1] === 0x20;
      }
      i = end;
      if (!rew) prevSpace = false;
    }
    if (rew) while (out.length && out[out.length - 1] === space) out.pop();
    if (d.add_dummy_prefix && d.treat_whitespace_as_suffix) out.push(space);
    return out;
  }

  // Unigram: [[id, code points], ...] of the best segmentation.
  viterbi(cps) {
    const n = cps.length, types = this.types, scores = this.scores;
    const best = new Float64Array(n + 1), from = new Int32Array(n + 1).fill(-1), ids = new Int32Array(n + 1);
    for (let s = 0; s < n; s++) {
      const base = best[s];
      let node = this.trie, bytes = 0, single = false;
      for (let k = s; k < n && node.next !== null; k++) {
        node = node.next.get(cps[k]);
        if (node === undefined) break;
        bytes += utf8Len(cps[k]);
        const id = node.id;
        if (id < 0 || types[id] === UNUSED) continue;
        const score = types[id] === USER_DEFINED ? Math.fround(Math.fround(bytes * this.maxScore) - 0.1) : scores[id];
        const cand = Math.fround(score + base), e = k + 1;
        if (from[e] === -1 || cand > best[e]) { best[e] = cand; from[e] = s; ids[e] = id; }
        if (e === s + 1) single = true;
      }
      if (!single) {
        const cand = Math.fround(this.unkScore + base), e = s + 1;
        if (from[e] === -1 || cand > best[e]) { best[e] = cand; from[e] = s; ids[e] = this.unkId; }
      }
    }
    const out = [];
    for (let e = n; e > 0; e = from[e]) out.push([ids[e], cps.slice(from[e], e)]);
    return out.reverse();
  }

  // BPE: [[id, code points], ...] after merging by piece score.
  bpe(cps) {
    const syms = [];
    for (let i = 0; i < cps.length;) {
      const m = this.userMatch(cps, i), len = Math.max(1, m);
      syms.push({ text: String.fromCodePoint(...cps.slice(i, i + len)), prev: syms.length - 1, next: -1, freeze: m > 0 });
      if (syms.length > 1) syms[syms.length - 2].next = syms.length - 1;
      i += len;
    }
    const heap = [], revMerge = new Map();
    const addPair = (left, right) => {
      if (left === -1 || right === -1 || syms[left].freeze || syms[right].freeze) return;
      const text = syms[left].text + syms[right].text, id = this.normal.get(text);
      if (id === undefined) return;
      heapPush(heap, { left, right, score: this.scores[id], size: text.length });
      if (this.types[id] === UNUSED) revMerge.set(text, [syms[left].text, syms[right].text]);
    };
    for (let i = 1; i < syms.length; i++) addPair(i - 1, i);
    while (heap.length) {
      const top = heapPop(heap), l = syms[top.left], r = syms[top.right];
      if (!l.text || !r.text || l.text.length + r.text.length !== top.size) continue; // stale
      l.text += r.text;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = top.left;
      r.text = "";
      addPair(l.prev, top.left);
      addPair(top.left, l.next);
    }
    const out = [];
    const resegment = (w) => {
      const id = this.pieceToId(w), split = this.types[id] === UNUSED ? revMerge.get(w) : undefined;
      if (split === undefined) out.push([this.types[id] === UNUSED ? this.unkId : id, codePoints(w)]);
      else { resegment(split[0]); resegment(split[1]); }
    };
    for (let i = 0; i !== -1; i = syms[i].next) resegment(syms[i].text);
    return out;
  }

  chars(cps) {
    const out = [];
    for (let i = 0; i < cps.length;) {
      const len = Math.max(1, this.userMatch(cps, i)), piece = cps.slice(i, i + len);
      const id = this.pieceToId(String.fromCodePoint(...piece));
      out.push([this.types[id] === UNUSED ? this.unkId : id, piece]);
      i += len;
    }
    return out;
  }

  // Text of `ids`, as Python's Tokenizer.decode(ids).
  decode(ids) {
    const stream = new StreamDecoder(this);
    let text = "";
    for (const id of ids) text += stream.push(id);
    return text + stream.flush();
  }
}

// Decodes one id at a time: the concatenation of every push() and the final flush() is tokenizer.decode(ids).
export class StreamDecoder {
  constructor(tokenizer) {
    this.tok = tokenizer;
    this.bytes = []; // byte pieces not yet turned into text
    this.bosWs = true; // the next piece may still lose a leading U+2581 (add_dummy_prefix)
    this.bosWsSeen = false;
    this.started = false; // some text has been output
  }

  push(id) {
    const t = this.tok;
    if (!Number.isInteger(id) || id < 0 || id >= t.pieces.length) throw new RangeError(`piece id ${id} is out of range`);
    if (id === t.eosId || id === t.bosId) return "";
    if (t.types[id] === BYTE) {
      this.bytes.push(t.byteOf[id]);
      return this.drain(false);
    }
    let out = this.drain(true);
    if (this.bosWsSeen || this.started) this.bosWs = false;
    const [text, seen] = this.piece(id);
    this.bosWsSeen = seen;
    if (text) this.started = true;
    return out + text;
  }

  flush() {
    return this.drain(true);
  }

  // [surface, whether a leading dummy-prefix U+2581 was consumed] of a non-byte piece.
  piece(id) {
    const t = this.tok, d = t.data, type = t.types[id];
    if (type === CONTROL) return ["", false];
    if (type === UNKNOWN) return [d.unk_surface, false];
    let piece = t.pieces[id], seen = false;
    if (this.bosWs && (d.add_dummy_prefix || d.remove_extra_whitespaces) && piece.startsWith("\u2581")) {
      piece = piece.slice(1);
      seen = !d.remove_extra_whitespaces;
    }
    return [piece.replaceAll("\u2581", " "), seen];
  }

  // Text of the pending bytes; unless `final`, bytes that may still become a character stay pending.
  drain(final) {
    const b = this.bytes;
    let out = "", i = 0;
    while (i < b.length) {
      const need = announced(b[i]);
      if (!final && b.length - i < need) {
        let open = true;
        for (let k = i + 1; k < b.length; k++) open = open && isTrail(b[k]);
        if (open) break;
      }
      const [c, len] = decodeUtf8(b, i);
      out += c < 0 ? "\ufffd" : String.fromCodePoint(c);
      i += len;
    }
    b.splice(0, i);
    if (out) this.started = true;
    return out;
  }
}
