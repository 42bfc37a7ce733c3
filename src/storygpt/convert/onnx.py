"""Export to ONNX, for onnxruntime (Python, or onnxruntime-web's wasm build in a web page), and a small runner.

    storygpt export --model M --out DIR --format onnx [--dtype fp32|int8]

DIR gets `model.onnx` (one graph for prefill and decoding, weights inside), the tokenizer (`tokenizer.model`,
`tokenizer.json`) and `onnx.json` (what a runner needs: layers, kv heads, head dim, context, start/end ids,
the graph's input and output names). The graph (onnx_graph.py) takes `input_ids` [batch, seq] and a cache of
`past_key_values.{i}.key/value` [batch, kv_heads, past, head_dim] (past may be 0) and returns `logits`
[batch, seq, vocab] and `present.{i}.key/value` with the new positions appended.

int8: onnxruntime's dynamic quantization of the fp32 graph: every weight matrix (the embedding too, which is
gathered and multiplied by) in int8, activations quantized per call (DynamicQuantizeLinear + MatMulInteger,
kernels of onnxruntime's CPU provider and of its wasm build).

`OnnxStory(DIR)`: `step(ids, past)` and `greedy(prompt, n)`, storygpt's greedy decoding on onnxruntime.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from storygpt.errors import StoryGPTError
from storygpt.files import atomic_dir, atomic_write
from storygpt.model.load import DEFAULT_MODEL, INSTRUCT_MODEL, load_model, shipped_or, trained_context
from storygpt.model.transformer import Transformer
from storygpt.text.instruct import is_instruct
from storygpt.text.tokenizer import Tokenizer

from .onnx_graph import OPSET, export_graph, input_names, output_names

ONNX_FILE, META = "model.onnx", "onnx.json"
ONNX_DTYPES = ("fp32", "int8")
FORMAT, VERSION = "storygpt-onnx", 1


def export_onnx(model, out: str | os.PathLike, dtype: str = "fp32", source: str | None = None) -> Path:
    """Write `model` to the folder `out` as ONNX (`model.onnx`, the tokenizer, `onnx.json`); returns `out`.

    model: a model, run or adapter directory, "default"/"instruct"/None (the shipped models), or an already
    loaded (net, tokenizer, info) (then `source` names it in onnx.json). dtype: fp32 or int8. `out` is replaced
    whole (built beside it, then moved in): it may be missing, empty, or an earlier ONNX export."""
    if dtype not in ONNX_DTYPES:
        raise StoryGPTError(f"onnx dtype must be fp32 or int8, got {dtype!r}")
    out = Path(out)
    path = None if isinstance(model, tuple) else Path(shipped_or(model))
    _check_out(path, out)
    net, tokenizer, info = model if path is None else load_model(path)
    if not isinstance(net, Transformer) or getattr(net, "quantized", None):
        raise StoryGPTError("only fp32/fp16/bf16 storygpt models export to ONNX (load it without int8)")
    if source is None:
        source = _source_name(model, path)
    if any(p.dtype != torch.float32 for p in net.parameters()) or net.training:
        net = copy.deepcopy(net).float().eval()  # the caller's model stays as it is
    with atomic_dir(out) as work:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(work, 0o777 & ~umask)  # a normal folder's permissions (mkdtemp makes 0700), e.g. for a web server
        fp32 = work / ONNX_FILE
        export_graph(net, fp32)
        _verify(net, fp32)
        if dtype == "int8":
            quantize_int8(fp32, work / "model.int8.onnx")
            os.replace(work / "model.int8.onnx", fp32)
        tokenizer.save(work)
        meta = onnx_meta(net, tokenizer, info, dtype, (work / ONNX_FILE).stat().st_size, source)
        atomic_write(work / META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def onnx_meta(net: Transformer, tokenizer: Tokenizer, info: dict, dtype: str, size: int, source: str) -> dict:
    c = net.cfg
    meta = {"format": FORMAT, "version": VERSION, "arch": c.arch, "vocab_size": c.vocab_size,
            "n_layers": c.n_layers, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "context": trained_context(c, info), "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "dtype": dtype, "opset": OPSET, "inputs": input_names(c.n_layers), "outputs": output_names(c.n_layers),
            "instruct": is_instruct(info), "params": net.num_params(), "bytes": size, "source": source}
    if info.get("evals"):
        meta["evals"] = info["evals"]
    return meta


def _source_name(model, path: Path | None) -> str:
    if path is None:
        return "(in memory)"
    for name, shipped in (("default", DEFAULT_MODEL), ("instruct", INSTRUCT_MODEL)):
        if path.resolve() == shipped.resolve():
            return name
    return str(model)


def _check_out(source: Path | None, out: Path) -> None:
    """`out` is replaced whole: refuse where that would delete the model, or a folder this export did not make."""
    dst = out.resolve()
    if source is not None and (source.resolve() == dst or dst in source.resolve().parents):
        raise StoryGPTError(f"--out {out} would replace the model {source}")
    if dst.exists() and not (dst.is_dir() and (not any(dst.iterdir()) or is_onnx_export(dst))):
        raise StoryGPTError(f"--out {out} exists and is not an ONNX export; not replacing it")


def is_onnx_export(path: str | os.PathLike) -> bool:
    try:
        return json.loads((Path(path) / META).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _quiet():
    """No onnxruntime/quantization warnings or prints on the user's terminal."""
    noise = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 of every weight matrix: MatMul weights (per output column) and the embedding's Gather."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise StoryGPTError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0]})") from None


def _verify(net: Transformer, path: Path, atol: float = 1e-3) -> None:
    """The exported graph computes the model's logits: a prefill from an empty cache, then one decoded token."""
    c = net.cfg
    session = _session(path, threads=1)
    n = min(4, c.max_seq_len - 1)
    if n < 1:
        return
    ids = torch.arange(n)[None] % c.vocab_size
    with torch.no_grad():
        want = net(torch.cat([ids, ids[:, :1]], 1), targets=torch.zeros(1, ids.size(1) + 1, dtype=torch.long))[0]
    past = empty_past(c.n_layers, c.kv_heads, c.head_dim)
    got, present = _run(session, ids.numpy(), past)
    last, _ = _run(session, ids[:, :1].numpy(), present)
    err = max(float(np.abs(got - want[:, :-1].numpy()).max()), float(np.abs(last - want[:, -1:].numpy()).max()))
    if not err <= atol:
        raise StoryGPTError(f"the ONNX graph's logits differ from the model's by {err:.2g}; not exporting it")


def empty_past(n_layers: int, kv_heads: int, head_dim: int, batch: int = 1) -> list[np.ndarray]:
    """The cache of a first call: [batch, kv_heads, 0, head_dim] keys and values per layer."""
    return [np.zeros((batch, kv_heads, 0, head_dim), np.float32) for _ in range(2 * n_layers)]


def _run(session, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    names = [i.name for i in session.get_inputs()]
    feed = {"input_ids": np.asarray(ids, dtype=np.int64), **dict(zip(names[1:], past))}
    logits, *present = session.run(None, feed)
    return logits, present


class OnnxStory:
    """An ONNX export (`export_onnx`'s folder) on onnxruntime's CPU provider: `step` and greedy decoding."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not is_onnx_export(path) or not (path / ONNX_FILE).is_file():
            raise StoryGPTError(f"{path}: not an ONNX export (no {META} or {ONNX_FILE})")
        self.path, self.meta = path, json.loads((path / META).read_text())
        self.tokenizer = Tokenizer.load(path)
        self.session = _session(path / ONNX_FILE, threads)
        self.context = self.meta["context"]

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        m = self.meta
        return empty_past(m["n_layers"], m["kv_heads"], m["head_dim"], batch)

    def step(self, ids, past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """(logits [batch, seq, vocab], the cache with `ids` appended) for `ids` [batch, seq] after `past`
        (a list [key 0, value 0, key 1, ...]; None: an empty cache)."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            ids = ids[None]
        if past is None:
            past = self.empty_past(ids.shape[0])
        if past[0].shape[2] + ids.shape[1] > self.context:
            raise StoryGPTError(f"{past[0].shape[2] + ids.shape[1]} tokens do not fit the context ({self.context})")
        return _run(self.session, ids, past)

    def greedy(self, prompt: str = "", max_new_tokens: int = 256) -> list[int]:
        """The new tokens of storygpt's greedy story (temperature 0): [bos] + the prompt, then the most likely
        token until the end-of-story token (included) or max_new_tokens. Stops when the context is full (no
        sliding window: storygpt slides there, so compare within the context)."""
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        logits, past = self.step([ids])
        new: list[int] = []
        while len(new) < max_new_tokens:
            nxt = int(np.argmax(logits[0, -1]))
            new.append(nxt)
            if nxt == self.tokenizer.eos_id or len(ids) + len(new) >= self.context:
                break
            logits, past = self.step([[nxt]], past)
        return new

    def story(self, prompt: str = "", max_new_tokens: int = 256) -> str:
        """The prompt and its greedy continuation, as `storygpt generate --temperature 0` prints it."""
        ids = [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)
        base = self.tokenizer.decode(ids)
        return prompt + self.tokenizer.decode(ids + self.greedy(prompt, max_new_tokens))[len(base):]


def cross_entropy(runner: OnnxStory, ids: list[int]) -> float:
    """Mean cross-entropy (nats/token) of `ids` (starting with the start token) under the ONNX model."""
    logits = runner.step([ids])[0][0, :-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())

