"""The default model's GPU recipe (issue 26), one command on one CUDA GPU in under 9 minutes of wall time:
teachers and student baselines trained side by side, then students distilled from the teachers, every model
scored on heldout.txt and by the suite's likelihood tests, and the best student packed to come back.

    scripts/gpu_default_model.sh OUT [--smoke]

Inputs (a git-ignored folder that travels with the repository, default gpu_data/, or STORYGPT_GPU_DATA):
    data/        the two shared train files prepared with the shipped tokenizer (`storygpt data prepare`), or
    train.txt train_extra.txt   the text, prepared here when data/ is missing
    heldout.txt  the 200 held-out stories (never trained on)

Runs with PYTHONPATH=src and the packages of a bare GPU machine (torch, sentencepiece, safetensors, numpy,
tqdm, matplotlib, pyyaml). Every phase is bounded by `train.max_time` (the schedule ends there), so the
whole script keeps to its budget whatever the GPU's speed; the logs say how many tokens each run saw.

OUT gets at most 8 files, none over 16 MiB (what comes back from the GPU machine): results.json, runs.tar.gz
(every run's config, log, summary and loss plot), curves.png, and the two students best on their val split
as bf16 weights split into best.N.safetensors and second.N.safetensors (their model configs are in
results.json), so that the suite's generation measures can choose between them before one ships.
`--smoke` runs the same steps with tiny models for seconds on a CPU (CI's test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # run directly, without the .sh's PYTHONPATH
    sys.path.insert(0, str(ROOT / "src"))
H200_PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet); 790e12 measured on one here
PART_BYTES = 15 << 20    # weights come back in files of at most 16 MiB

TEACHER = {"dim": 512, "n_layers": 8, "n_heads": 8, "max_seq_len": 512, "dropout": 0.1}
STUDENT = {"dim": 320, "n_layers": 6, "n_heads": 5, "max_seq_len": 512, "dropout": 0.1}  # the shipped shape
TRAIN = {"seq_len": 512, "batch_size": 64, "schedule": "wsd", "cooldown": 0.2, "sampling": "epochs",
         "ema_decay": 0.998, "weight_decay": 1.0, "warmup_steps": 100, "max_steps": 1_000_000, "eval_interval": 200,
         "eval_iters": 8, "checkpoint_interval": 1000, "log_interval": 20, "compile": True, "dtype": "bf16"}
TEACHER_TRAIN = {"lr": 1.5e-3, "min_lr": 1.5e-5}
STUDENT_TRAIN = {"lr": 2e-3, "min_lr": 2e-5}

# Two phases, each a set of runs trained side by side on the one GPU for `minutes` of wall time.
# Runs of a phase differ from its first student in one lever each (docs/recipe.md's ablations).
PHASES = [
    {"minutes": 3.0, "runs": {
        "teacher_wd1": (TEACHER, TEACHER_TRAIN, []),
        "teacher_wd01": (TEACHER, TEACHER_TRAIN | {"weight_decay": 0.1}, []),
        "student": (STUDENT, STUDENT_TRAIN, []),
        "student_nodrop": (STUDENT | {"dropout": 0.0}, STUDENT_TRAIN, []),
        "student_wd01": (STUDENT, STUDENT_TRAIN | {"weight_decay": 0.1}, []),
    }},
    {"minutes": 3.0, "runs": {
        "distilled": (STUDENT, STUDENT_TRAIN | {"distill_alpha": 0.5}, ["teacher_wd1", "teacher_wd01"]),
        "distilled_a09": (STUDENT, STUDENT_TRAIN | {"distill_alpha": 0.9}, ["teacher_wd1", "teacher_wd01"]),
        "student_random": (STUDENT, STUDENT_TRAIN | {"sampling": "random"}, []),
        "student_cosine": (STUDENT, STUDENT_TRAIN | {"schedule": "cosine"}, []),
    }},
]
# `--ablations`: the levers that PHASES leaves confounded (phase B ran faster than phase A), each against one
# baseline at a fixed number of steps, so that the GPU's share does not decide the tokens seen.
ABLATIONS = {"steps": 1200, "runs": {
    "abl_wsd_epochs": (STUDENT, STUDENT_TRAIN, []),
    "abl_cosine_epochs": (STUDENT, STUDENT_TRAIN | {"schedule": "cosine"}, []),
    "abl_wsd_random": (STUDENT, STUDENT_TRAIN | {"sampling": "random"}, []),
}}
SMOKE = {"model": {"dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
         "train": {"seq_len": 64, "batch_size": 4, "max_steps": 12, "eval_interval": 6, "eval_iters": 2,
                   "warmup_steps": 2, "checkpoint_interval": 6, "log_interval": 2, "compile": False, "dtype": "fp32",
                   "device": "cpu"}}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def storygpt(*args: str, **popen) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "storygpt", *args], env=env, **popen)


def prepare(inputs: Path, work: Path) -> Path:
    """The prepared train data: inputs/data when it travelled, else made here from the two train files."""
    if (inputs / "data" / "meta.json").is_file():
        return inputs / "data"
    texts = [inputs / "train.txt", inputs / "train_extra.txt"]
    missing = [str(t) for t in texts if not t.is_file()]
    if missing:
        raise SystemExit(f"gpu_default_model: no {inputs}/data/ and no {', '.join(missing)}")
    data = work / "data"
    rc = storygpt("data", "prepare", "--input", *map(str, texts), "--tokenizer", str(ROOT / "src/storygpt/default_model"),
                  "--out", str(data), "--quiet").wait()
    if rc:
        raise SystemExit(f"gpu_default_model: data prepare failed (exit {rc})")
    return data


def run_phase(phase: dict, data: Path, work: Path, smoke: bool) -> dict:
    """Start every run of the phase at once; wait for all; {name: summary or {"error": ...}}."""
    procs = {}
    for name, (model, train, teachers) in phase["runs"].items():
        keys = {f"model.{k}": v for k, v in model.items()} | {f"train.{k}": v for k, v in (TRAIN | train).items()}
        keys["train.max_time"] = phase.get("minutes", 0)
        if "steps" in phase:
            keys["train.max_steps"] = phase["steps"]
        if smoke:
            keys |= {f"model.{k}": v for k, v in SMOKE["model"].items()} | {f"train.{k}": v for k, v in SMOKE["train"].items()}
            keys["train.max_time"] = 0
        args = ["train", "--data", str(data), "--out", str(work / name), "--preset", "small", "--quiet"]
        args += [a for k, v in keys.items() for a in ("--set", f"{k}={v}")]
        args += [a for t in teachers for a in ("--teacher", str(work / t / "model"))]
        log(f"start {name}")
        procs[name] = storygpt(*args, stdout=open(work / f"{name}.out", "w"), stderr=subprocess.STDOUT)
    results = {}
    for name, proc in procs.items():
        rc = proc.wait()
        summary = work / name / "summary.json"
        if rc == 0 and summary.is_file():
            results[name] = json.loads(summary.read_text())
            log(f"done {name}: val {results[name]['best_val_bpb']:.4f} bits/byte, {results[name]['tokens']:,} tokens")
        else:
            tail = (work / f"{name}.out").read_text().strip().splitlines()[-3:]
            results[name] = {"error": f"exit {rc}: " + " | ".join(tail)}
            log(f"FAILED {name}: {results[name]['error']}")
    return results


def score(model_dir: Path, heldout: Path, device: str) -> dict:
    """Held-out bits/byte and the suite's likelihood tests (cloze, grammar, continuation), seed 0."""
    from storygpt.eval import evaluate
    from storygpt.eval.suite import cloze, continuation, grammar, load_cloze, read_stories
    from storygpt.generate import load

    out = {"heldout_bpb": evaluate(model_dir, text=[str(heldout)], device=device, dtype="fp32")["bits_per_byte"]}
    model = load(str(model_dir), device=device, dtype="fp32")
    out["cloze"] = cloze(model, load_cloze())["accuracy"]
    out["grammar"] = grammar(model, 100, 0)["accuracy"]
    out["continuation"] = continuation(model, read_stories([str(heldout)], "heldout"), 0.4, 0)["accuracy"]
    return out


def pack_weights(model_dir: Path, out: Path, prefix: str, config_file: bool = True) -> list[str]:
    """The model's weights in bf16, split by tensor into files of at most PART_BYTES, plus (config_file) its
    config as PREFIX.config.json."""
    import torch
    from safetensors.torch import load_file, save_file

    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    parts, part, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * 2
        if part and size + nbytes > PART_BYTES:
            parts.append(part)
            part, size = {}, 0
        part[key], size = state[key], size + nbytes
    parts.append(part)
    names = []
    for i, p in enumerate(parts):
        save_file(p, str(out / f"{prefix}.{i}.safetensors"))
        names.append(f"{prefix}.{i}.safetensors")
    if not config_file:
        return names
    (out / f"{prefix}.config.json").write_text((model_dir / "config.json").read_text())
    return names + [f"{prefix}.config.json"]


def plot(runs: dict, work: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in runs:
        records = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines() if line]
        evals = [r for r in records if "val_bpb" in r]
        if evals:
            line, = ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], label=name)
            ema = [r for r in evals if "ema_val_bpb" in r]
            ax.plot([r["tokens"] / 1e6 for r in ema], [r["ema_val_bpb"] for r in ema], ls=":", color=line.get_color())
    ax.set(xlabel="tokens seen (M)", ylabel="val bits/byte (dotted: EMA)", title="gpu_default_model.sh")
    ax.set_ylim(top=1.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, for seconds (CI)")
    p.add_argument("--inputs", default=os.environ.get("STORYGPT_GPU_DATA", str(ROOT / "gpu_data")))
    p.add_argument("--work", default=None, help="run folders (default: OUT_work beside OUT, kept out of OUT)")
    p.add_argument("--ablations", action="store_true", help="only the fixed-step ablations (ABLATIONS), no model packed")
    args = p.parse_args()
    out, inputs = Path(args.out), Path(args.inputs)
    work = Path(args.work) if args.work else out.resolve().parent / f"{out.name}_work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    heldout = inputs / "heldout.txt"
    if not heldout.is_file():
        raise SystemExit(f"gpu_default_model: {heldout} is missing")
    t0 = time.time()
    import torch

    device = "cpu" if args.smoke else "cuda"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    if not args.smoke and gpu == "none":
        raise SystemExit("gpu_default_model: no CUDA GPU here (use --smoke to try the steps on a CPU)")
    log(f"GPU: {gpu}; torch {torch.__version__}")
    data = prepare(inputs, work)
    results = {"gpu": gpu, "torch": torch.__version__, "smoke": args.smoke, "phases": [], "runs": {}}
    for phase in [ABLATIONS] if args.ablations else PHASES:
        results["phases"].append({k: v for k, v in phase.items() if k != "runs"} | {"runs": list(phase["runs"])})
        results["runs"] |= run_phase(phase, data, work, args.smoke)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"training done after {time.time() - t0:.0f} s; scoring")
    for name, summary in results["runs"].items():
        if "error" in summary:
            continue
        if "model_flops_per_s" in summary and not args.smoke:
            summary["mfu"] = round(summary["model_flops_per_s"] / H200_PEAK_BF16, 4)
        summary |= score(work / name / "model", heldout, device)
        log(f"{name}: held-out {summary['heldout_bpb']:.4f} bits/byte, cloze {summary['cloze']:.3f}, "
            f"grammar {summary['grammar']:.3f}, continuation {summary['continuation']:.3f}")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    # the student to ship is chosen on the run's own val split, never on heldout.txt
    students = {n: s for n, s in results["runs"].items() if "error" not in s and not n.startswith("teacher")}
    if students and args.ablations:
        results["best"] = min(students, key=lambda n: students[n]["best_val_bpb"])
        plot(results["runs"], work, out / "curves.png")
    elif students:
        ranked = sorted(students, key=lambda n: students[n]["best_val_bpb"])
        results["best"], results["files"], results["configs"] = ranked[0], [], {}
        for prefix, name in zip(("best", "second"), ranked):
            results["files"] += pack_weights(work / name / "model", out, prefix, config_file=False)
            results["configs"][prefix] = {"run": name} | json.loads((work / name / "model" / "config.json").read_text())
        plot(results["runs"], work, out / "curves.png")
    with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
        for name in results["runs"]:
            for f in ("config.json", "log.jsonl", "summary.json", "loss.png"):
                if (work / name / f).is_file():
                    tar.add(work / name / f, arcname=f"{name}/{f}")
            tar.add(work / f"{name}.out", arcname=f"{name}/stdout.txt")
    results["wall_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"all done in {results['wall_s']} s: {out}")
    failed = [n for n, s in results["runs"].items() if "error" in s]
    if failed or "best" not in results:
        raise SystemExit(f"gpu_default_model: failed runs: {', '.join(failed) or 'no student'}")


if __name__ == "__main__":
    main()
