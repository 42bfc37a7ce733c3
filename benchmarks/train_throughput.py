"""Training-step throughput, side by side: storygpt vs transformers' LlamaForCausalLM vs nanoGPT.

Same shape for all (the `small` preset: dim 256, 6 layers, 4 heads, 4K vocab; T=512, batch 8), same
random tokens, same step (autocast forward, backward, grad-norm clipping, AdamW step), in fp32 and
bf16 (where the CPU has native bf16), eager and torch.compile'd:
- storygpt: `Transformer` + the optimizer of `storygpt train` (fused AdamW);
- transformers: `LlamaForCausalLM` with the same config, trained with a plain `torch.optim.AdamW` loop;
- nanoGPT: its `GPT` model (GPT-2: LayerNorm, GELU, learned positions, biases) and its own
  `configure_optimizers`, loaded from a checkout given with --nanogpt DIR (used by this run only;
  never part of storygpt); it is compared with storygpt's own GPT-2 architecture (`arch=gpt2`) of the
  same shape, "storygpt-gpt2", as well as with the LLaMA one.
Contenders are measured in alternating rounds after warm-up steps (which absorb compile time); the
median round counts. MFU = model FLOPs per token (6 N + attention) x tokens/s / the matmul peak
measured here in the same dtype.

    python benchmarks/train_throughput.py [--nanogpt ../nanoGPT] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
from dataclasses import replace
from pathlib import Path

import torch
from common import alternate, header, matmul_peak, median, run_main, save, table

from storygpt.model import ModelConfig, Transformer
from storygpt.model.device import DTYPES, autocast, cpu_has_native_bf16
from storygpt.train.config import preset as get_preset
from storygpt.train.loop import make_optimizer

CPU = torch.device("cpu")


def flops_per_token(n_matmul_params: int, cfg: ModelConfig, seq_len: int) -> float:
    """6 N (N: every weight used in a matmul, the output layer included) + causal attention."""
    return 6 * n_matmul_params + 6 * cfg.n_layers * cfg.dim * seq_len


def storygpt_model(cfg: ModelConfig, lr: float):
    model = Transformer(cfg)
    tc = replace(get_preset("small").train, lr=lr)
    n = model.num_params(exclude_embeddings=True) + model.output.weight.numel()
    return model, make_optimizer(model, tc, CPU), lambda x, y: model(x, y)[1], n


def transformers_model(cfg: ModelConfig, lr: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.mlp_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=True,
                         attention_bias=False, mlp_bias=False)
    model = LlamaForCausalLM(hf_cfg)
    model.config._attn_implementation = "sdpa"
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    n += model.lm_head.weight.numel()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, lambda x, y: model(input_ids=x, labels=y).loss, n


def nanogpt_model(cfg: ModelConfig, lr: float, checkout: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", checkout / "model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt_model"] = mod  # torch.compile looks modules up by name
    spec.loader.exec_module(mod)
    gcfg = mod.GPTConfig(block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layers,
                         n_head=cfg.n_heads, n_embd=cfg.dim, dropout=0.0, bias=True)  # GPT-2, as storygpt's gpt2 arch
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter counts
        model = mod.GPT(gcfg)
        opt = model.configure_optimizers(0.1, lr, (0.9, 0.95), "cpu")
    # without the position embeddings; the token embedding is counted once, as the (tied) output matmul
    n = model.get_num_params(non_embedding=True)
    return model, opt, lambda x, y: model(x, y)[1], n


def make_step(build, amp: str, compiled: bool, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model, opt, loss_fn, n = build()
    model.train()
    if compiled:
        loss_fn = torch.compile(loss_fn)

    def step():
        with autocast(CPU, amp):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=4)  # a multiple of the 4 contenders: each runs first once
    ap.add_argument("--nanogpt", type=Path, default=None, help="a nanoGPT checkout (its model.py is used)")
    ap.add_argument("--no-compile", action="store_true", help="eager modes only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step, eager: checks the script runs")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batch_size, args.seq_len, args.steps, args.rounds = "tiny", 2, 32, 1, 1
        args.no_compile = True
    B, T = args.batch_size, args.seq_len
    cfg = replace(get_preset(args.preset).model, max_seq_len=T, dropout=0.0)
    lr = get_preset(args.preset).train.lr
    builders = {"storygpt": lambda: storygpt_model(cfg, lr), "transformers": lambda: transformers_model(cfg, lr)}
    if args.nanogpt is not None:
        if not (args.nanogpt / "model.py").is_file():
            sys.exit(f"{args.nanogpt}: not a nanoGPT checkout (no model.py)")
        # nanoGPT's model is GPT-2: compare it with storygpt's GPT-2 architecture, same shape, too
        builders["storygpt-gpt2"] = lambda: storygpt_model(replace(cfg, arch="gpt2"), lr)
        builders["nanoGPT"] = lambda: nanogpt_model(cfg, lr, args.nanogpt)

    dtypes = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    modes = [(amp, c) for c in ([False] if args.no_compile else [False, True]) for amp in dtypes]
    peaks = {amp: 0.0 for amp in dtypes}  # the best of several measurements: a busy moment only lowers it
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)

    rows = []
    for amp, compiled in modes:  # per mode, the contenders alternate round by round
        peaks[amp] = max(peaks[amp], matmul_peak(DTYPES[amp], n=256 if args.smoke else 2048))
        steps, flops = {}, {}
        for name, build in builders.items():
            step, n = make_step(build, amp, compiled, x, y)
            for _ in range(1 if args.smoke else (3 if compiled else 1)):  # warm-up (compiles)
                step()
            steps[name], flops[name] = step, flops_per_token(n, cfg, T)

        def timed(step):
            return lambda: [step() for _ in range(args.steps)] and None

        times = alternate({name: timed(step) for name, step in steps.items()}, args.rounds)
        peaks[amp] = max(peaks[amp], matmul_peak(DTYPES[amp], n=256 if args.smoke else 2048))
        mode_rows = [{"contender": name, "dtype": amp, "compiled": compiled,
                      "tokens_per_s": round(B * T * args.steps / median(ts), 1), "flops_per_token": flops[name]}
                     for name, ts in times.items()]
        speed = {r["contender"]: r["tokens_per_s"] for r in mode_rows}
        for r in mode_rows:  # storygpt vs each peer, architecture for architecture
            ours = "storygpt-gpt2" if r["contender"] in ("nanoGPT", "storygpt-gpt2") else "storygpt"
            r["storygpt_speedup"] = round(speed[ours] / r["tokens_per_s"], 3)
        rows += mode_rows
    for r in rows:
        r["matmul_peak_gflops"] = round(peaks[r["dtype"]] / 1e9, 1)
        r["mfu"] = round(r["tokens_per_s"] * r["flops_per_token"] / peaks[r["dtype"]], 4)
    result = header("train_throughput", preset=args.preset, batch_size=B, seq_len=T,
                    params=Transformer(cfg).num_params(), rows=rows)
    save(result, "train_throughput", args.smoke)
    print(f"training step, preset {args.preset} shape, batch {B} x {T} tokens, {result['machine']}")
    print(table(rows, {
        "contender": lambda r: r["contender"], "dtype": lambda r: r["dtype"],
        "compiled": lambda r: "yes" if r["compiled"] else "no", "tokens/s": lambda r: f"{r['tokens_per_s']:,.0f}",
        "MFU": lambda r: f"{100 * r['mfu']:.0f}%",
        "storygpt (same arch) is": lambda r: f"{r['storygpt_speedup']:.2f}x",
    }))


if __name__ == "__main__":
    run_main(main)
