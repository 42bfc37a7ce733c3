"""Decoding speed side by side: storygpt vs transformers generate() vs llama2.c's run.c vs llama.cpp, same weights.

    python benchmarks/decode.py [--model DIR] [--llama2c ../peers/llama2.c] [--rounds 3] [--heldout FILE] [--smoke]
                                [--no-llama-cpp] [--llama-cpp-sdist PATH]

Greedy, an empty prompt (the start-of-story token only, so every contender starts from the same
token whatever its tokenizer does), 256 new tokens, the end-of-story token never taken (storygpt
ignore_eos=True, transformers min_new_tokens, run.c built from a copy with its one-line
`if (next == 1) break;` removed), so each contender does the same work every round.

- storygpt: `storygpt.load(dtype=...)`, eager and `compile=True`, in fp32, (where the CPU computes
  it natively) bf16, and int8 (weight-only int8 matrices, fp32 activations: storygpt.quantize).
- transformers: the model exported with `storygpt export --format hf`, `LlamaForCausalLM.generate()`
  in the same dtypes.
- run.c: `storygpt export --format llama2c` (fp32, run.c's only format) built with
  `gcc -O3 -march=native -fopenmp`; its own "achieved tok/s". It decodes one story at a time, so
  its batch-8 throughput is its batch-1 throughput.
- llama.cpp: `storygpt export --format gguf` in f32, f16 and q8_0, run by llama-cpp-python (`Llama`, n_ctx the
  model's context, storygpt's torch thread count, flash attention on as llama.cpp's "auto" picks on a CPU,
  its default f16 KV cache; the end token barred by a logit-bias sampler ahead of the greedy one) on
  llama.cpp built from the source the llama-cpp-python sdist vendors (benchmarks/llamacpp.py: built once into a
  cache, skipped with one line where there is no compiler; --no-llama-cpp leaves it out; --smoke only uses a
  build already cached). Each token: `Llama.eval` of the last token, then llama.cpp's greedy sampler; batch 1.
  Its f32 greedy story is checked against storygpt fp32's: how many of the tokens agree (storygpt's argmax,
  teacher-forced on llama.cpp's tokens), and, where they part, both logits there (a near-tie or not).

tokens/s counts every new token of every row over the wall time of the call (prompt included);
time to first token is the wall time of a call for one new token. Contenders alternate round by
round; medians are reported, with ratios against transformers at the same dtype, against run.c, against
llama.cpp at batch 1 in the nearest format (fp32: f32, bf16: f16, int8: q8_0), and (int8) against storygpt
fp32 run the same way. The weights' memory is reported for the storygpt rows,
and the held-out bits/byte of fp32 and int8 (default: ../shared/data/tinystories/heldout.txt, where it
exists; --heldout none skips it; --smoke scores its first few stories): scored by `evaluate` (whole windows), and
for the compiled bf16 and int8 paths also token by token through their batch-1 decoding graphs, the kernels timed
here (the same stream and windows; --smoke: the eager paths).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import alternate, header, median, run_main, save, table
from llamacpp import add_arguments, from_args

import storygpt
from storygpt.convert.export import export_hf, export_llama2c
from storygpt.convert.gguf import GGUF_FILE, export_gguf
from storygpt.eval import evaluate
from storygpt.eval.bpb import text_stream, windows
from storygpt.generate.batching import Batcher
from storygpt.model import DTYPES, pick_dtype
from storygpt.model.quantize import weight_bytes
from storygpt.text import EOS_TEXT, expand_inputs, iter_stories

HELDOUT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinystories" / "heldout.txt"


def storygpt_contender(path, dtype: str, compile: bool, new_tokens: int):
    model = storygpt.load(path, dtype=dtype, compile=compile)

    def run(batch: int, n: int = new_tokens) -> float:
        model.generate("", num_samples=batch, temperature=0, max_new_tokens=n, ignore_eos=True)
        return model.last_stats["new_tokens"] / model.last_stats["seconds"]

    return model, run


def heldout_bpb(path, heldout: Path, work: Path, stories: int | None, decoders: dict) -> dict[str, float]:
    """Held-out bits per byte of the fp32 and int8 weights (`evaluate`: whole windows at once), and of each of
    `decoders` (name -> StoryModel) token by token as it decodes (`stories`: only the first ones)."""
    if stories is not None:
        first = [s for _, s in zip(range(stories), iter_stories(expand_inputs([heldout])))]
        heldout = work / "heldout.txt"
        heldout.write_text("".join(f"{s}\n{EOS_TEXT}\n" for s in first), encoding="utf-8")
    bpb = {dt: evaluate(path, text=[heldout], device="cpu", dtype=dt)["bits_per_byte"] for dt in ("fp32", "int8")}
    return bpb | {f"{name}, token by token": stepwise_bpb(model, heldout) for name, model in decoders.items()}


@torch.inference_mode()
def stepwise_bpb(model, heldout: Path) -> float:
    """Held-out bits per byte of a model as it decodes: `evaluate`'s token stream and windows, each window's tokens
    fed one at a time through a one-slot Batcher (a compiled model: its batch-1 graphs, the kernels timed above)."""
    tokens, nbytes = text_stream(model.tokenizer, [heldout])
    batcher, nats = Batcher(model, slots=1), 0.0
    for start, end, scored_after in windows(len(tokens), model.context, model.context // 2):
        for j, p in enumerate(range(start, end)):
            logits = batcher.forward([0], [int(tokens[p])], [j])[0][0].float()
            if p + 1 > scored_after:
                nats -= torch.log_softmax(logits, dim=-1)[tokens[p + 1]].item()
    return nats / math.log(2) / nbytes


def hf_contender(hf_dir: Path, dtype: torch.dtype, start_id: int, new_tokens: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()

    def run(batch: int, n: int = new_tokens) -> float:
        ids = torch.full((batch, 1), start_id)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=start_id, eos_token_id=start_id)
        seconds = time.perf_counter() - t
        assert out.shape == (batch, 1 + n), out.shape
        return batch * n / seconds

    return model, run


def build_run_c(llama2c: Path, work: Path) -> Path:
    """run.c from the checkout, without its end-of-story break, built as llama2.c's README says."""
    src = (llama2c / "run.c").read_text()
    patched, count = re.subn(r"\n\s*if \(next == 1\) \{ break; \}", "", src)
    if count != 1:
        raise SystemExit(f"{llama2c / 'run.c'}: did not find run.c's end-of-story break to remove")
    (work / "run.c").write_text(patched)
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(work / "run"), str(work / "run.c"), "-lm"],
                   check=True)
    return work / "run"


def run_c_contender(binary: Path, l2c_dir: Path, new_tokens: int):
    def greedy(n: int) -> subprocess.CompletedProcess:
        # -n counts forward passes: from the start token, n of them make n new tokens
        return subprocess.run([str(binary), str(l2c_dir / "model.bin"), "-z", str(l2c_dir / "tokenizer.bin"),
                               "-t", "0", "-n", str(n)], capture_output=True, text=True, check=True)

    def run(batch: int, n: int = new_tokens) -> float:
        return float(re.search(r"achieved tok/s: ([\d.]+)", greedy(n).stderr).group(1))

    return run, lambda n: greedy(n).stdout


LLAMA_CPP_FORMATS = {"f32": "fp32", "f16": "bf16", "q8_0": "int8"}  # gguf dtype -> the storygpt dtype it is set against


def llama_cpp_contender(llama_cpp, gguf: Path, ctx: int, threads: int, new_tokens: int):
    """llama-cpp-python on `gguf`: run(batch, n) -> tokens/s, and tokens(n, logits=None) -> the greedy ids."""
    llm = llama_cpp.Llama(str(gguf), n_ctx=ctx, n_batch=ctx, n_threads=threads, n_threads_batch=threads,
                          flash_attn=True, verbose=False)
    start, vocab = llm.token_bos(), llm.n_vocab()
    greedy = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    barred = (llama_cpp.llama_logit_bias * 1)(llama_cpp.llama_logit_bias(llm.token_eos(), float("-inf")))
    llama_cpp.llama_sampler_chain_add(greedy, llama_cpp.llama_sampler_init_logit_bias(vocab, 1, barred))
    llama_cpp.llama_sampler_chain_add(greedy, llama_cpp.llama_sampler_init_greedy())

    def tokens(n: int, logits: list | None = None) -> list[int]:
        """n forward passes from the start token, n new tokens, the end token barred (as storygpt's
        ignore_eos and transformers' min_new_tokens do); `logits`: each pass's logits appended."""
        llm.reset()
        llm.eval([start])
        out = []
        while True:
            if logits is not None:
                row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                logits.append(np.ctypeslib.as_array(row, shape=(vocab,)).copy())
            out.append(llama_cpp.llama_sampler_sample(greedy, llm.ctx, -1))
            if len(out) == n:
                return out
            llm.eval(out[-1:])

    def run(batch: int, n: int = new_tokens) -> float:
        assert batch == 1
        t = time.perf_counter()
        tokens(n)
        return n / (time.perf_counter() - t)

    return run, tokens


def gguf_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors)


def greedy_agreement(base, tokens, n: int) -> dict:
    """llama.cpp's f32 greedy ids against storygpt fp32: storygpt's logits teacher-forced on llama.cpp's
    tokens (one forward), so its argmax at i (the end token barred) is its greedy choice after llama.cpp's
    first i tokens; `agree` leading tokens are the same; |logit difference| over the tokens up to there. At
    the first that is not (if any): |logit difference| there, and the top two tokens of each with their
    margin. Also whether storygpt's own greedy story (generate) is the same text."""
    theirs_logits: list = []
    ids = tokens(n, theirs_logits)
    seq = torch.tensor([[base.tokenizer.bos_id] + ids[:-1]])
    with torch.no_grad():
        ours = base.model(seq, targets=seq)[0][0].float()
    theirs = torch.from_numpy(np.stack(theirs_logits)).float()
    diff = (ours - theirs).abs().amax(-1)
    ours[:, base.tokenizer.eos_id] = theirs[:, base.tokenizer.eos_id] = float("-inf")  # barred, as in decoding
    mine = ours.argmax(-1).tolist()
    agree = next((i for i, (a, b) in enumerate(zip(mine, ids)) if a != b), n)
    text = base.generate("", temperature=0, max_new_tokens=n, ignore_eos=True)
    out = {"tokens": n, "agree": agree, "text_matches": base.tokenizer.decode(ids).strip() == text.strip(),
           "max_abs_logit_diff": round(diff[:agree + 1].max().item(), 6)}
    if agree < n:
        def top2(row):
            v, i = row.topk(2)
            return {"ids": i.tolist(), "margin": round((v[0] - v[1]).item(), 6)}
        out["at_divergence"] = {"position": agree, "storygpt": top2(ours[agree]), "llama_cpp": top2(theirs[agree]),
                                "max_abs_logit_diff": round(diff[agree].item(), 6)}
    return out


def agreement_line(a: dict) -> str:
    line = (f"llama.cpp f32 greedy vs storygpt fp32: {a['agree']} of the first {a['tokens']} tokens agree, "
            f"text {'identical' if a['text_matches'] else 'differs'}, max |logit difference| "
            f"{a['max_abs_logit_diff']:.2g}")
    if d := a.get("at_divergence"):
        line += (f"; they part at token {d['position']}: storygpt's top two {d['storygpt']['ids']} "
                 f"(margin {d['storygpt']['margin']:.2g}), llama.cpp's {d['llama_cpp']['ids']} (margin "
                 f"{d['llama_cpp']['margin']:.2g}), |logit difference| there {d['max_abs_logit_diff']:.2g}")
    return line


def first_token(run, batch: int):
    """A call for one new token, timed by `alternate` (it returns None)."""
    return lambda: run(batch, 1) and None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    ap.add_argument("--llama2c", type=Path, help="a llama2.c checkout (run.c is built from it)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd storygpt rows")
    ap.add_argument("--heldout", default=str(HELDOUT) if HELDOUT.exists() else "none",
                    help="stories for the held-out bits/byte of fp32 vs int8 (none: skip)")
    ap.add_argument("--smoke", action="store_true", help="a few tokens, one round (checks the script works)")
    add_arguments(ap)
    args = ap.parse_args()
    if args.smoke:
        args.new_tokens, args.rounds, args.no_compile = 8, 1, True
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="storygpt-decode-"))
    try:
        base = storygpt.load(args.model, dtype="fp32")
        path, start_id = base.path, base.tokenizer.eos_id
        if args.llama2c and args.new_tokens > base.model.cfg.max_seq_len:
            raise SystemExit(f"run.c stops at the model's context: --new-tokens must be <= {base.model.cfg.max_seq_len}")
        dtypes = ["fp32"] + (["bf16"] if pick_dtype(torch.device("cpu"), "auto") == "bf16" else [])
        export_hf(base.model, base.tokenizer, work / "hf")

        contenders: dict[str, tuple[str, object]] = {}  # name -> (dtype, run(batch, n))
        weights: dict[str, int] = {}  # storygpt contender -> bytes of its weights
        decoders: dict = {}  # the fastest storygpt paths (compiled bf16 and int8), scored on held-out text as they decode
        for dt in dtypes + ["int8"]:
            for compiled in ([False] if args.no_compile else [False, True]):
                name = f"storygpt {dt}" + (" compiled" if compiled else "")
                model, run = storygpt_contender(path, dt, compiled, args.new_tokens)
                contenders[name], weights[name] = (dt, run), weight_bytes(model.model)
                if dt != "fp32" and compiled != args.smoke:  # --smoke: eager ones, to check the scoring runs
                    decoders[name] = model
            if dt != "int8":
                contenders[f"transformers {dt}"] = (dt, hf_contender(work / "hf", DTYPES[dt], start_id, args.new_tokens)[1])
        bpb = None
        if args.heldout != "none":
            bpb = heldout_bpb(path, Path(args.heldout), work, 5 if args.smoke else None, decoders)
        check = None
        if args.llama2c:
            binary = build_run_c(args.llama2c, work)
            export_llama2c(base.model, base.tokenizer, work / "l2c")
            run_c, run_c_text = run_c_contender(binary, work / "l2c", args.new_tokens)
            contenders["llama2.c run.c fp32"] = ("fp32", run_c)
            # same weights, same greedy story
            n = min(64, base.model.cfg.max_seq_len)
            ours = base.generate("", temperature=0, max_new_tokens=n, ignore_eos=True)
            check = run_c_text(n).strip() == ours.strip()
        agreement, llama = None, from_args(args, build=not args.smoke)  # smoke: only a build already cached
        if llama is not None:
            if args.new_tokens > base.model.cfg.max_seq_len - 1:
                raise SystemExit(f"llama.cpp stops at the model's context: --new-tokens must be < {base.model.cfg.max_seq_len}")
            llama_cpp = llama.llama_cpp()
            for fmt in LLAMA_CPP_FORMATS:
                gguf = export_gguf(base.model, base.tokenizer, work / f"gguf-{fmt}", fmt) / GGUF_FILE
                name = f"llama.cpp {fmt} (llama-cpp-python)"
                run, tokens = llama_cpp_contender(llama_cpp, gguf, base.model.cfg.max_seq_len, torch.get_num_threads(),
                                                  args.new_tokens)
                contenders[name], weights[name] = (fmt, run), gguf_bytes(gguf)
                if fmt == "f32":
                    agreement = greedy_agreement(base, tokens, args.new_tokens)

        rows = []
        for batch in batches:
            runs = {name: (lambda run=run, batch=batch: run(batch)) for name, (_, run) in contenders.items()
                    if batch == 1 or not name.startswith(("llama2.c", "llama.cpp"))}
            for run in runs.values():
                run()  # warm-up (and the compile, for the compiled rows)
            speeds = alternate(runs, args.rounds)
            firsts = alternate({name: first_token(contenders[name][1], batch) for name in runs
                                if not name.startswith("llama2.c")}, args.rounds)  # run.c: a process per story
            for name in runs:
                rows.append({"contender": name, "dtype": contenders[name][0], "batch": batch,
                             "tokens_per_s": round(median(speeds[name]), 1),
                             "time_to_first_token_ms": round(1000 * median(firsts[name]), 1) if name in firsts else None})
        run_c = next((r["tokens_per_s"] for r in rows if r["contender"].startswith("llama2.c")), None)
        llama_rows = {LLAMA_CPP_FORMATS[r["dtype"]]: r["tokens_per_s"] for r in rows if r["contender"].startswith("llama.cpp")}
        for r in rows:
            theirs = llama_rows.get(r["dtype"]) if r["batch"] == 1 and r["contender"].startswith("storygpt") else None
            r["vs_llama_cpp"] = round(r["tokens_per_s"] / theirs, 2) if theirs else None
            hf = next((x["tokens_per_s"] for x in rows if x["contender"] == f"transformers {r['dtype']}"
                       and x["batch"] == r["batch"]), None)
            r["vs_transformers"] = round(r["tokens_per_s"] / hf, 2) if hf else None
            r["vs_run_c"] = round(r["tokens_per_s"] / run_c, 2) if run_c else None
            fp32 = next((x["tokens_per_s"] for x in rows if x["contender"] == r["contender"].replace("int8", "fp32")
                         and x["batch"] == r["batch"]), None) if r["dtype"] == "int8" else None
            r["vs_storygpt_fp32"] = round(r["tokens_per_s"] / fp32, 2) if fp32 else None
            r["weights_mb"] = round(weights[r["contender"]] / 1e6, 1) if r["contender"] in weights else None
        result = header("decode", model=path, params=base.model.num_params(), new_tokens=args.new_tokens,
                        rounds=args.rounds, run_c_matches_storygpt=check, torch_threads=torch.get_num_threads(),
                        llama_cpp=llama and llama.version, llama_cpp_threads=llama and torch.get_num_threads(),
                        llama_cpp_greedy_vs_storygpt_fp32=agreement,
                        omp_threads=os.environ.get("OMP_NUM_THREADS"), heldout=None if bpb is None else args.heldout,
                        heldout_bits_per_byte=bpb, rows=rows)
        save(result, "decode", args.smoke)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{base.model.num_params() / 1e6:.2f}M-parameter model, greedy, {args.new_tokens} new tokens after the "
          f"start token, median of {args.rounds} alternating rounds")
    if check is not None:
        print(f"run.c's greedy story {'matches' if check else 'DOES NOT match'} storygpt's (fp32, same weights)")
    if llama is not None:
        print(f"{llama.version}; {torch.get_num_threads()} threads")
        print(agreement_line(agreement))
    if bpb is not None:
        change = bpb["int8"] - bpb["fp32"]
        print(f"held-out bits/byte ({args.heldout}{', first 5 stories' if args.smoke else ''}): fp32 {bpb['fp32']:.5f}, "
              f"int8 {bpb['int8']:.5f} ({change:+.5f}, {100 * change / bpb['fp32']:+.3f}%)")
        for name, value in bpb.items():
            if name not in ("fp32", "int8"):
                print(f"  {name}: {value:.5f} ({value - bpb['fp32']:+.5f} against fp32)")
    print(table(rows, {
        "contender": lambda r: r["contender"], "batch": lambda r: str(r["batch"]),
        "tokens/s": lambda r: f"{r['tokens_per_s']:,.0f}",
        "time to first token": lambda r: f"{r['time_to_first_token_ms']:.0f} ms" if not r["contender"].startswith("llama2.c")
        else "—",
        "× transformers (same dtype)": lambda r: f"{r['vs_transformers']:.2f}" if r["vs_transformers"] else "—",
        "× run.c": lambda r: f"{r['vs_run_c']:.2f}" if r["vs_run_c"] else "—",
        "× llama.cpp (f32/f16/q8_0)": lambda r: f"{r['vs_llama_cpp']:.2f}" if r["vs_llama_cpp"] else "—",
        "× storygpt fp32": lambda r: f"{r['vs_storygpt_fp32']:.2f}" if r["vs_storygpt_fp32"] else "—",
        "weights": lambda r: f"{r['weights_mb']:.1f} MB" if r["weights_mb"] is not None else "—",
    }))


if __name__ == "__main__":
    run_main(main)
