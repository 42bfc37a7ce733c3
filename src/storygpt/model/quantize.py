"""Weight-only int8 for decoding on CPU: `quantize_int8(model)` (or `storygpt.load(dtype="int8")`).

Every matrix of the model is stored as int8 with one scale per output row (symmetric: the row's largest |w|
maps to 127, the scale rounded up to a bfloat16 number, so that the bf16 kernel below uses it exactly);
activations, norms and the KV cache stay in float (fp32 from `load()`, or the model's dtype). The token
embedding and the output head share one matrix in a tied model, and a head's output rows are the
embedding's token rows, so one int8 table and one scale per token serve both: the lookup scales the rows it
gathers, the head scales its outputs. The weights then take 1/4 of their fp32 bytes (8.7M-parameter default
model: 35.0 MB -> 8.9 MB).

The matmul: on a CPU that computes bf16 natively (AVX512-BF16, AMX), `torch.ops.aten._weight_int8pack_mm`
with the activations rounded to bf16 for the product (fp32 accumulation, bf16 out, then back to the
activations' dtype): it reads the int8 weights directly, 1.7x faster per decoded token's matmuls than
oneDNN's prepacked bf16 ones and 2.7x faster than fp32's on an AMD EPYC Zen 4 (benchmarks/decode_profile.py).
Elsewhere `F.linear(x, w_int8.to(x.dtype)) * scale`, the computation torchao's `Int8WeightOnlyConfig`
runs on CPU (`_weight_int8pack_mm` in fp32 measured 5-25x slower than this on an AVX2 CPU, and 4x slower
than fp32 matmuls on the Zen 4). Training code never sees these modules; evaluation does through
`evaluate(dtype="int8")`, which runs the same kernels. They hold no gradients.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from storygpt.errors import StoryGPTError

from .device import cpu_has_native_bf16


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale per row) with weight ~= int8 * scale[:, None], per row symmetric; each scale is
    a bfloat16 number (the row's largest |w| / 127 rounded up), so |int8| <= 127 and the scale is exact in bf16."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.bfloat16).tiny) / 127.0
    rounded = scale.bfloat16().float()
    up = torch.nextafter(rounded.bfloat16(), torch.tensor(float("inf"), dtype=torch.bfloat16)).float()
    scale = torch.where(rounded >= scale, rounded, up)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # a parameter without gradient (int8 cannot have one): still counted by num_params(); the scales are
    # buffers, so a quantized model counts the parameters its fp32 original had
    return nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """y = x W^T * scale + b with W stored as int8 (out, in) and scale (out,) in the activations' dtype."""

    def __init__(self, weight: nn.Parameter, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.bfloat16(), persistent=False)  # for _weight_int8pack_mm
        self.packed = cpu_has_native_bf16()  # decided once, not in every (traced) forward
        self.bias = None if bias is None else _frozen(bias.detach().to(scale.dtype))
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, dtype: torch.dtype) -> Int8Linear:
        q, s = quantize_rows(linear.weight)
        return cls(_frozen(q), s.to(dtype), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed and x.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).bfloat16(), self.weight,
                                                   self.scale_bf16)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """Rows of an int8 table times their row's scale (in the activations' dtype)."""

    def __init__(self, weight: nn.Parameter, scale: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.register_buffer("scale", scale)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, dtype: torch.dtype) -> Int8Embedding:
        q, s = quantize_rows(emb.weight)
        return cls(_frozen(q), s.to(dtype))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight).to(self.scale.dtype) * self.scale[idx, None]

    def extra_repr(self) -> str:
        return f"{self.weight.size(0)}, {self.weight.size(1)}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every nn.Linear and nn.Embedding of `model` (a storygpt Transformer) by its
    int8 version; a tied output head shares the embedding's int8 table. Returns the model, in eval
    mode, with `model.quantized = "int8"`. CPU only: a model elsewhere is a StoryGPTError."""
    if getattr(model, "quantized", None):
        raise StoryGPTError("this model is already quantized")
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if not floats:
        raise StoryGPTError("nothing to quantize: the model has no floating-point weights")
    device, dtype = floats[0].device, floats[0].dtype
    if device.type != "cpu":
        raise StoryGPTError(f"int8 weights are for decoding on CPU; on {device.type} use --dtype fp16 or bf16")
    if dtype not in (torch.float32, torch.bfloat16):
        raise StoryGPTError(f"int8 weights need fp32 or bf16 activations on CPU, not {str(dtype).removeprefix('torch.')}")
    tok_emb, output = getattr(model, "tok_emb", None), getattr(model, "output", None)
    tied = tok_emb is not None and output is not None and output.weight is tok_emb.weight
    new: dict[int, nn.Module] = {}  # id(old module) -> its int8 replacement
    if tied:
        emb = Int8Embedding.from_embedding(tok_emb, dtype)
        new[id(tok_emb)], new[id(output)] = emb, Int8Linear(emb.weight, emb.scale)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in new:
                if isinstance(child, nn.Linear):
                    new[id(child)] = Int8Linear.from_linear(child, dtype)
                elif isinstance(child, nn.Embedding):
                    new[id(child)] = Int8Embedding.from_embedding(child, dtype)
                else:
                    continue
            setattr(parent, name, new[id(child)])
    model.quantized = "int8"
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and int8 scales (a tied/shared tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *(b for name, b in model.named_buffers() if name.endswith("scale"))]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
