// Runs resources/web/tokenizer.js for tests/web/test_tokenizer_js.py: `node tokenizer_driver.mjs CASES.json`
// where CASES.json is {data, texts, idLists, stepLists?, bench?}; prints {encoded, decoded, streamed, pieces, steps,
// benchMs} as JSON: encode(text) per text, decode(ids) and the StreamDecoder's concatenated output per id list,
// idToPiece of every id, each push()'s and the flush()'s output per step list, and (with bench: {text, repeat}) the
// median milliseconds of encode(bench.text).
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const { Tokenizer, StreamDecoder } = await import(path.join(here, "../../src/storygpt/resources/web/tokenizer.js"));
const cases = JSON.parse(readFileSync(process.argv[2], "utf8"));
const tok = new Tokenizer(cases.data);
const result = {
  vocabSize: tok.vocabSize, eosId: tok.eosId, bosId: tok.bosId,
  encoded: (cases.texts || []).map((t) => tok.encode(t)),
  decoded: (cases.idLists || []).map((ids) => tok.decode(ids)),
  streamed: (cases.idLists || []).map((ids) => {
    const s = new StreamDecoder(tok);
    return ids.map((id) => s.push(id)).join("") + s.flush();
  }),
  pieces: Array.from({ length: tok.vocabSize }, (_, i) => tok.idToPiece(i)),
  steps: (cases.stepLists || []).map((ids) => {
    const s = new StreamDecoder(tok);
    return [...ids.map((id) => s.push(id)), s.flush()];
  }),
};
if (cases.bench) {
  const times = [];
  for (let r = 0; r < cases.bench.repeat; r++) {
    const t0 = performance.now();
    tok.encode(cases.bench.text);
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  result.benchMs = times[times.length >> 1];
}
process.stdout.write(JSON.stringify(result));
