// Choosing the next token: the filters of storygpt's generate/sampling.py, and a seeded generator.
//
// Same semantics as storygpt: temperature 0 is argmax (the lowest index wins a tie, as torch.argmax);
// otherwise the logits are shifted so that the largest is 0 and divided by the temperature, top-k keeps
// every logit at least as large as the k-th largest (ties at the k-th value kept; 0 = off), and top-p
// (nucleus) keeps the smallest set of most likely tokens whose probability reaches p, the most likely
// token always kept (1 = off). The draw uses this page's own generator: a seed gives the same story on
// every reload, but not the story storygpt's torch generator gives for that seed.

const TINY = 1.1754943508222875e-38; // float32's smallest normal number, storygpt's floor for the temperature

/** The index of the largest value (the first one on a tie). */
export function argmax(values) {
  let best = 0;
  for (let i = 1; i < values.length; i++) if (values[i] > values[best]) best = i;
  return best;
}

/** Scaled logits: (x - max) / temperature, as a new Float64Array. */
export function scaled(logits, temperature) {
  let max = -Infinity;
  for (const x of logits) if (x > max) max = x;
  const t = Math.max(temperature, TINY);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = (logits[i] - max) / t;
  return out;
}

/** Keep the k largest (and everything equal to the k-th), -Infinity elsewhere; in place. k <= 0: off. */
export function topK(x, k) {
  if (k <= 0 || k >= x.length) return x;
  const kth = Float64Array.from(x).sort()[x.length - k]; // ascending: the k-th largest
  for (let i = 0; i < x.length; i++) if (x[i] < kth) x[i] = -Infinity;
  return x;
}

/** Nucleus: keep the smallest set of most likely tokens whose probability reaches p; in place. p >= 1: off. */
export function topP(x, p) {
  if (p >= 1) return x;
  const order = [];
  for (let i = 0; i < x.length; i++) if (x[i] > -Infinity) order.push(i);
  order.sort((a, b) => x[b] - x[a] || a - b); // most likely first, the lower index first on a tie
  let total = 0;
  for (const i of order) total += Math.exp(x[i] - x[order[0]]);
  let before = 0; // probability of the tokens ranked above
  for (let r = 0; r < order.length; r++) {
    const i = order[r];
    const prob = Math.exp(x[i] - x[order[0]]) / total;
    if (r > 0 && before >= p) x[i] = -Infinity; // enough mass without it (the top token always stays)
    before += prob;
  }
  return x;
}

/** The probabilities sampling draws from (temperature > 0), as a Float64Array summing to 1. */
export function samplingProbs(logits, temperature, k = 0, p = 1) {
  const x = topP(topK(scaled(logits, temperature), k), p);
  let max = -Infinity;
  for (const v of x) if (v > max) max = v;
  let sum = 0;
  for (let i = 0; i < x.length; i++) {
    x[i] = x[i] === -Infinity ? 0 : Math.exp(x[i] - max);
    sum += x[i];
  }
  for (let i = 0; i < x.length; i++) x[i] /= sum;
  return x;
}

/** The next token from a row of logits: options {temperature, topK, topP}, random() in [0, 1). */
export function sampleNext(logits, options, random) {
  if (options.temperature === 0) return argmax(logits);
  const probs = samplingProbs(logits, options.temperature, options.topK || 0, options.topP ?? 1);
  const u = random();
  let cum = 0;
  let last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] === 0) continue;
    cum += probs[i];
    last = i;
    if (u < cum) return i;
  }
  return last; // u above the rounded total
}

function mix32(z) {
  z = Math.imul(z ^ (z >>> 16), 0x21f0aaad);
  z = Math.imul(z ^ (z >>> 15), 0x735a2d97);
  return (z ^ (z >>> 15)) >>> 0;
}

/** A seeded generator of numbers in [0, 1): a 32-bit counter (Weyl sequence) through an integer hash.
 *  The seed is an integer in [0, 2^53); the same seed gives the same numbers in every browser. */
export function seededRandom(seed) {
  if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`the seed must be a whole number >= 0, got ${seed}`);
  let state = mix32((seed % 0x100000000) ^ mix32(Math.floor(seed / 0x100000000) + 0x6a09e667));
  return () => {
    state = (state + 0x9e3779b9) >>> 0;
    return mix32(state) / 0x100000000;
  };
}

/** A fresh seed from the browser's random source, for a story without a seed (shown, so it can be repeated). */
export function randomSeed() {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0];
}
