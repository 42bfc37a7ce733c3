// storygpt in the browser: loads the ONNX model with onnxruntime-web (WebAssembly) and writes a story token by
// token, the KV cache fed back at each step (the graph of storygpt/convert/onnx_graph.py).
//
// window.storygpt (for scripts and tests): ready (a promise of the model's facts), generate(options), stop(),
// last ({ids, text, stats} of the last story; ids: the new tokens, the end-of-story token included when taken).
import { StreamDecoder, Tokenizer } from './tokenizer.js';
import { randomSeed, sampleNext, seededRandom } from './sampling.js';

export const MAX_MODEL_BYTES = 1024 ** 3; // 1 GiB: what a 32-bit WebAssembly heap (4 GiB at most) holds with room to spare
const MAX_NEW_TOKENS = 4096;
const FEATURES = ['Dialogue', 'BadEnding', 'MoralValue', 'Twist', 'Foreshadowing', 'Conflict'];
const MAX_WORDS = 8;
const MAX_FIELD_CHARS = 1000;
const $ = (id) => document.getElementById(id);

class PageError extends Error {}

const state = { site: null, meta: null, tokenizer: null, session: null, threads: 1, run: null };
const last = { ids: [], text: '', stats: null };

// ---------------------------------------------------------------------------------------------------------------
// The instruction of an instruct model, as storygpt builds it (text/instruct.py header_prompt, StoryModel._story)
// ---------------------------------------------------------------------------------------------------------------
function oneLine(text, what) {
  const line = text.trim().split(/\s+/).join(' ');
  if (line.length > MAX_FIELD_CHARS) throw new PageError(`the ${what} is longer than ${MAX_FIELD_CHARS} characters`);
  return line;
}

function normalizeWords(text) {
  const parts = text.split(',');
  const words = parts.map((w) => w.trim()).filter(Boolean);
  if (words.length !== parts.length) {
    throw new PageError('the word list holds empty words: give words such as dog, ball, happy');
  }
  if (words.length > MAX_WORDS) throw new PageError(`at most ${MAX_WORDS} words, got ${words.length}`);
  for (const w of words) {
    if (!/^[A-Za-z][A-Za-z'-]*$/.test(w)) throw new PageError(`"${w}" is not a word (letters only, one word each)`);
  }
  return words;
}

/** The text the model reads and what the story shown starts with: {modelText, start, trimStart}.
 *  words: comma-separated text, sentence: text, features: names of FEATURES, in the order given ("" / [] = not
 *  asked). */
export function storyPlan(prompt, { words = '', sentence = '', features = [] } = {}) {
  const fields = [];
  for (const f of features) if (!FEATURES.includes(f)) throw new PageError(`unknown feature "${f}"; choose from ${FEATURES.join(', ')}`);
  if (features.length) fields.push(`Features: ${features.filter((f, i) => features.indexOf(f) === i).join(', ')}`);
  if (words.trim()) fields.push(`Words: ${normalizeWords(words).join(', ')}`);
  if (sentence.trim()) fields.push(`Random sentence: ${oneLine(sentence, 'sentence')}`);
  if (!fields.length) return { modelText: prompt, start: prompt, trimStart: false };
  const start = prompt.trimStart();
  return { modelText: `${fields.join('\n')}\nStory:${start ? ` ${start}` : ''}`, start, trimStart: !start };
}

// ---------------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------------
function progress(label, value, max) {
  $('progress-label').textContent = label;
  const bar = $('progress');
  if (max) {
    bar.max = max;
    bar.value = value;
  } else {
    bar.removeAttribute('value');
  }
}

async function getJSON(url) {
  const res = await fetch(url);
  if (!res.ok) throw new PageError(`${url}: the server answered ${res.status} ${res.statusText}`);
  return res.json();
}

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

function tooLarge(bytes) {
  return new PageError(`The model is ${mb(bytes)}: more than the ${mb(MAX_MODEL_BYTES)} (1 GiB) this page loads into `
    + "the browser's 32-bit WebAssembly memory. Build the site with a smaller model, or with --dtype int8.");
}

/** The model file's size before it is downloaded: Content-Length of a HEAD request, else `fallback`. */
async function modelSize(url, fallback) {
  try {
    const res = await fetch(url, { method: 'HEAD' });
    const n = Number(res.headers.get('Content-Length'));
    if (res.ok && n > 0) return n;
  } catch { /* a server without HEAD: the download's own Content-Length is checked next */ }
  return fallback || 0;
}

async function download(url, expected) {
  const controller = new AbortController();
  const res = await fetch(url, { signal: controller.signal });
  if (!res.ok) throw new PageError(`${url}: the server answered ${res.status} ${res.statusText}`);
  const total = Number(res.headers.get('Content-Length')) || expected;
  if (total > MAX_MODEL_BYTES) {
    controller.abort();
    throw tooLarge(total);
  }
  const reader = res.body.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.length;
    if (loaded > MAX_MODEL_BYTES) {
      controller.abort();
      throw tooLarge(loaded);
    }
    progress(`Downloading the model: ${mb(loaded)} of ${total ? mb(total) : '?'}`, loaded, total);
  }
  const bytes = new Uint8Array(loaded);
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return bytes;
}

function threadCount() {
  if (!globalThis.crossOriginIsolated) return 1; // no SharedArrayBuffer: onnxruntime-web runs on one thread
  const asked = Number(new URLSearchParams(location.search).get('threads'));
  const cores = navigator.hardwareConcurrency || 1;
  return Math.max(1, Math.min(asked > 0 ? asked : Math.min(cores, 4), cores));
}

async function load() {
  progress('Loading the page…');
  const site = state.site = await getJSON('site.json');
  const files = site.files;
  const [meta, tokenizerData] = await Promise.all([getJSON(files.meta), getJSON(files.tokenizer)]);
  state.meta = meta;
  state.tokenizer = new Tokenizer(tokenizerData);
  const size = await modelSize(files.model, meta.bytes);
  if (size > MAX_MODEL_BYTES) throw tooLarge(size);
  progress('Loading onnxruntime-web…');
  let ort;
  try {
    ort = await import(`./${files.runtime}`);
  } catch (e) {
    throw new PageError(`onnxruntime-web did not load (${files.runtime}): ${e.message}`);
  }
  state.ort = ort;
  state.threads = threadCount();
  ort.env.wasm.numThreads = state.threads;
  ort.env.wasm.wasmPaths = new URL(files.wasm_dir, location.href).href;
  const bytes = await download(files.model, size);
  progress(`Starting the model (WebAssembly, ${state.threads} thread${state.threads > 1 ? 's' : ''})…`);
  try {
    state.session = await ort.InferenceSession.create(bytes, {
      executionProviders: ['wasm'], graphOptimizationLevel: 'all',
    });
  } catch (e) {
    throw new PageError(`onnxruntime-web could not load the model: ${e.message || e}`);
  }
  const facts = {
    params: meta.params, context: meta.context, dtype: meta.dtype, bytes: size, instruct: Boolean(meta.instruct),
    threads: state.threads, crossOriginIsolated: Boolean(globalThis.crossOriginIsolated), ort: site.ort.version,
    source: site.model.source,
  };
  $('facts').textContent = `${(meta.params / 1e6).toFixed(1)}M parameters (${meta.dtype}, ${mb(size)}), context `
    + `${meta.context} tokens · onnxruntime-web ${site.ort.version}, WebAssembly, ${state.threads} thread`
    + `${state.threads > 1 ? 's' : ''}${globalThis.crossOriginIsolated ? '' : ' (the page is not cross-origin isolated)'}`;
  $('built').textContent = `Model: ${site.model.source}, built ${site.built} with storygpt ${site.storygpt}.`;
  return facts;
}

// ---------------------------------------------------------------------------------------------------------------
// Writing a story
// ---------------------------------------------------------------------------------------------------------------
const channel = new MessageChannel();
/** Give the browser a turn (to paint, to take a click on Stop) without setTimeout's 4 ms clamp. */
function nextTask() {
  return new Promise((resolve) => {
    channel.port1.onmessage = () => resolve();
    channel.port2.postMessage(null);
  });
}

function checkNumber(name, value, ok, rule) {
  if (typeof value !== 'number' || Number.isNaN(value) || !ok(value)) throw new PageError(`${name} must be ${rule}, got ${value}`);
}

/** Write a story. options: prompt, words, sentence, features, maxNewTokens (256), temperature (0.8), topK (0),
 *  topP (0.95), seed (null: a random one), ignoreEos (false), onText(piece). Resolves to {text, ids, stats}. */
async function generate(options = {}) {
  const o = { prompt: '', maxNewTokens: 256, temperature: 0.8, topK: 0, topP: 0.95, seed: null, ignoreEos: false, ...options };
  if (!state.session) throw new PageError('the model is not loaded');
  if (state.run) throw new PageError('a story is being written: stop it first');
  checkNumber('new tokens', o.maxNewTokens, (v) => Number.isInteger(v) && v >= 1 && v <= MAX_NEW_TOKENS, `a whole number in [1, ${MAX_NEW_TOKENS}]`);
  checkNumber('temperature', o.temperature, (v) => v >= 0 && v <= 10, 'in [0, 10]');
  checkNumber('top-k', o.topK, (v) => Number.isInteger(v) && v >= 0, 'a whole number >= 0 (0 = off)');
  checkNumber('top-p', o.topP, (v) => v > 0 && v <= 1, 'in (0, 1]');
  const seed = o.seed ?? randomSeed();
  const random = seededRandom(seed);
  const { meta, tokenizer, session } = state;
  const ort = state.ort;
  const plan = storyPlan(o.prompt, o);
  if (plan.modelText !== o.prompt && !meta.instruct) {
    throw new PageError('this model is not instruction-tuned: it takes no words, sentence or features');
  }
  const promptIds = [meta.bos_id, ...tokenizer.encode(plan.modelText)];
  const room = meta.context - promptIds.length;
  if (room < 1) {
    throw new PageError(`the prompt takes ${promptIds.length - 1} tokens; the model's context is ${meta.context}: `
      + `shorten it to at most ${meta.context - 2} tokens`);
  }
  const maxNew = Math.min(o.maxNewTokens, room);
  const decoder = new StreamDecoder(tokenizer);
  for (const id of promptIds) decoder.push(id); // the prompt's text is known: only what follows is shown
  const run = state.run = { stop: false };
  const ids = [];
  let text = plan.start;
  let started = !plan.trimStart;
  const emit = (piece) => {
    if (!started) {
      piece = piece.trimStart();
      started = piece.length > 0;
    }
    if (piece) {
      text += piece;
      if (o.onText) o.onText(piece);
    }
  };
  if (o.onText && plan.start) o.onText(plan.start);
  const V = meta.vocab_size;
  const emptyPast = () => new ort.Tensor('float32', new Float32Array(0), [1, meta.kv_heads, 0, meta.head_dim]);
  let past = Array.from({ length: 2 * meta.n_layers }, emptyPast);
  const names = meta.inputs.slice(1);
  const presentNames = meta.outputs.slice(1);
  let feed = promptIds;
  let reason = 'length';
  const t0 = performance.now();
  let firstToken = null;
  try {
    while (ids.length < maxNew) {
      if (run.stop) {
        reason = 'stopped';
        break;
      }
      const feeds = { input_ids: new ort.Tensor('int64', BigInt64Array.from(feed, BigInt), [1, feed.length]) };
      names.forEach((name, i) => { feeds[name] = past[i]; });
      const out = await session.run(feeds);
      let row = out.logits.data.subarray(out.logits.data.length - V);
      if (o.ignoreEos) {
        row = Float32Array.from(row);
        row[meta.eos_id] = -Infinity;
      }
      const next = sampleNext(row, o, random);
      past = presentNames.map((name) => out[name]);
      ids.push(next);
      if (firstToken === null) firstToken = performance.now() - t0;
      emit(decoder.push(next));
      if (next === meta.eos_id && !o.ignoreEos) {
        reason = 'stop';
        break;
      }
      feed = [next];
      await nextTask();
    }
    emit(decoder.flush());
  } finally {
    state.run = null;
  }
  const seconds = (performance.now() - t0) / 1000;
  const stats = {
    new_tokens: ids.length, seconds, tokens_per_s: ids.length / seconds, time_to_first_token_s: (firstToken ?? 0) / 1000,
    prompt_tokens: promptIds.length - 1, finish_reason: reason, seed, threads: state.threads,
  };
  Object.assign(last, { ids, text, stats });
  return { text, ids, stats };
}

function stop() {
  if (state.run) state.run.stop = true;
}

// ---------------------------------------------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------------------------------------------
function showError(e) {
  const box = $('error');
  box.textContent = e instanceof PageError ? e.message : `Something went wrong: ${e && e.message ? e.message : e}`;
  box.hidden = false;
}

function formOptions() {
  const num = (id) => ($(id).value.trim() === '' ? null : Number($(id).value));
  return {
    prompt: $('prompt').value, words: $('words').value, sentence: $('sentence').value,
    features: [...document.querySelectorAll('#features input:checked')].map((box) => box.value),
    maxNewTokens: num('max-new-tokens'), temperature: num('temperature'), topK: num('top-k') ?? 0,
    topP: num('top-p') ?? 1, seed: num('seed'),
  };
}

async function write(event) {
  event.preventDefault();
  const story = $('story');
  $('error').hidden = true;
  $('stats').textContent = '';
  const options = formOptions();
  if (!state.meta.instruct) Object.assign(options, { words: '', sentence: '', features: [] });
  const textNode = document.createTextNode('');
  story.replaceChildren(textNode);
  story.dataset.state = 'running';
  $('write').disabled = true;
  $('stop').disabled = false;
  try {
    const { stats } = await generate({ ...options, onText: (piece) => textNode.appendData(piece) });
    const why = { stop: 'the story ended', length: 'token limit', stopped: 'stopped' }[stats.finish_reason];
    $('stats').textContent = `${stats.new_tokens} tokens in ${stats.seconds.toFixed(2)} s: ${stats.tokens_per_s.toFixed(1)} `
      + `tokens/s, first token after ${(1000 * stats.time_to_first_token_s).toFixed(0)} ms · seed ${stats.seed} · ${why}`;
    story.dataset.state = stats.finish_reason === 'stopped' ? 'stopped' : 'done';
  } catch (e) {
    story.dataset.state = 'error';
    showError(e);
  } finally {
    $('write').disabled = false;
    $('stop').disabled = true;
  }
}

function setUp(facts) {
  $('features').replaceChildren(...FEATURES.map((f) => {
    const label = document.createElement('label');
    const box = Object.assign(document.createElement('input'), { type: 'checkbox', value: f });
    label.append(box, ` ${f}`);
    return label;
  }));
  $('instruct').hidden = !facts.instruct;
  $('max-new-tokens').max = String(Math.min(MAX_NEW_TOKENS, facts.context - 1));
  $('form').addEventListener('submit', write);
  $('stop').addEventListener('click', stop);
  $('prompt').addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) $('form').requestSubmit();
  });
  $('write').disabled = false;
}

const ready = load().then((facts) => {
  setUp(facts);
  $('loading').hidden = true;
  document.body.dataset.state = 'ready';
  return facts;
}, (e) => {
  $('loading').hidden = true;
  $('facts').textContent = '';
  document.body.dataset.state = 'error';
  showError(e);
  throw e;
});
ready.catch(() => {}); // shown on the page; window.storygpt.ready still rejects for scripts

window.storygpt = { ready, generate, stop, last, storyPlan, MAX_MODEL_BYTES };
