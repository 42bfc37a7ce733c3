"""Choosing where to run and in which precision.

bf16 is only a win where the hardware does bf16 math natively: NVIDIA GPUs from Ampere on, and
CPUs with AVX512-BF16 or AMX. Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates it, 25x slower than
fp32 in our measurements, so "auto" picks fp32 there.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import shutil
import sys

import torch

from storygpt.errors import StoryGPTError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise StoryGPTError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StoryGPTError("device cuda requested but no CUDA GPU is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise StoryGPTError("device mps requested but MPS is not available")
    return dev


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
        if flags:
            return " avx512_bf16" in flags or " amx_bf16" in flags
    except OSError:
        pass
    try:  # other platforms: ask oneDNN (it reports native support, e.g. Apple silicon says no)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def supports_dtype(device: torch.device, dtype: str) -> bool:
    if dtype == "fp32":
        return True
    if device.type == "cuda":
        return dtype == "fp16" or torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    return dtype == "bf16" and cpu_has_native_bf16()


def pick_dtype(device: torch.device, dtype: str = "auto") -> str:
    """The autocast compute dtype name: bf16 where native, else fp32 ("auto"); validates explicit choices."""
    if dtype == "auto":
        return "bf16" if device.type != "mps" and supports_dtype(device, "bf16") else "fp32"
    if dtype not in DTYPES:
        raise StoryGPTError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    if dtype == "fp16" and device.type == "cpu":
        raise StoryGPTError("fp16 autocast is not supported on CPU; use bf16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def maybe_compile(fn, device: torch.device, **options):
    """torch.compile(fn, **options), or fn itself where the compiler's toolchain is missing (on CPU,
    inductor needs a C++ compiler), with a warning."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        print("storygpt: warning: torch.compile needs a C++ compiler on CPU and none was found; running eagerly",
              file=sys.stderr)
        return fn
    return torch.compile(fn, **options)


def release_cpu_threads() -> bool:
    """Hand back the calling thread's idle OpenMP worker threads (`omp_pause_resource_all`, OpenMP 5), where
    torch's OpenMP runtime has it; True if it did. Call it on a thread that has run torch's CPU kernels (loading a
    model) before another thread does the work (a decoding thread).

    Why: torch's CPU kernels run on an OpenMP team per calling thread. GNU OpenMP counts the workers of every
    team, and when they outnumber the cores it lets an idle worker spin only ~100 times before it sleeps, so
    every kernel of the busy thread waits for its worker to wake. A server that loads its models on the main
    thread and decodes on another decoded a third slower on 2 cores until the main thread's team was released."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all  # the process's symbols (Windows has no such handle)
    except (AttributeError, OSError, TypeError):
        return False
    pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
    return pause(1) == 0  # omp_pause_soft: the threads end; the next parallel region starts a new team


def machine_description() -> str:
    """e.g. 'AMD EPYC, 2 threads, avx512_bf16': for benchmark reports."""
    name = ""
    try:
        with open("/proc/cpuinfo") as fh:
            name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    name = name or platform.processor() or platform.machine()
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name}, {torch.get_num_threads()} threads, {bf16}, torch {torch.__version__}"
