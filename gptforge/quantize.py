"""8-bit decoding on a CPU: every Linear layer's weight in int8, one scale per output channel, the rest as it is.

`to_int8(model)` swaps each `nn.Linear` of a loaded model (eval mode, on the CPU) for an `Int8Linear`: the weight
stored once as int8 per output channel (symmetric, scale = max |w| / 127); each call quantizes its input on the
fly with one scale for the whole call (the rows of a batch share it), multiplies in int8 with int32 sums and
returns float32 with the bias added. Decoding one token reads every weight once, so on a CPU its speed is the
speed of reading the weights, and int8 reads a quarter of fp32's bytes. Norms, attention, embeddings and the KV
cache stay float32; a tied embedding table keeps its float32 copy for the lookup, and the output layer gets its
own int8 copy. `gptforge.modelio.load.load(..., dtype="int8")` is the one place verbs convert a model.

Two kernels, both PyTorch's own (`benchmarks/int8_decode.py --kernels`; 2-core AMD EPYC, AVX2, one thread,
twelve distinct 768x3072 one-row products: fp32 8.7 ms):
- fbgemm (qnnpack on ARM), `torch.ops.quantized.linear_dynamic`, the kernels of PyTorch's dynamic
  quantization: 1.3 ms. Activations in 7 bits (`reduce_range`), as PyTorch does on x86: AVX2's 8-bit
  multiply-add sums pairs into 16 bits with saturation, which full 8-bit ranges on both sides can overflow.
- onednn, `torch.ops.onednn.qlinear_pointwise` (what PyTorch's x86 inductor quantization lowers to; plain
  int8 tensors, 8-bit activations): 2.7 ms. Used when fbgemm's are missing (`best_kernel`).
torchao 0.18's Int8WeightOnlyConfig and Int8DynamicActivationInt8WeightConfig reach neither on x86 (5.1 and
27.8 ms eagerly, about 1.3x fp32 compiled), nor does `torch._weight_int8pack_mm` (23 ms).

The packed weights live in the kernel's own object, not in parameters: a converted model is for inference
only (no training, no state_dict, no moving to another device).
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from gptforge.errors import UserError

DTYPES = ("auto", "int8")
KERNELS = ("fbgemm", "onednn")


def _fbgemm_pack(w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]):
    """The weight packed for `torch.ops.quantized.linear_dynamic` (fbgemm on x86, qnnpack on ARM). Packing goes
    through a qint8 tensor, whose creation PyTorch has deprecated (pytorch/pytorch#184982) with nothing a user can
    do about it: the warning is kept from them, and `to_int8` falls back to onednn once these ops are gone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        q = torch.quantize_per_channel(w, scale.double(), torch.zeros(w.size(0), dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, bias)


class Int8Linear(nn.Module):
    """A Linear layer's weight as int8 per output channel, multiplied by the CPU's int8 kernels: `kernel` fbgemm
    (PyTorch's dynamic quantization: 7-bit activations) or onednn (what PyTorch's x86 inductor quantization lowers
    to: 8-bit activations, plain int8 tensors)."""

    def __init__(self, linear: nn.Linear, kernel: str = "fbgemm"):
        super().__init__()
        self.in_features, self.out_features, self.kernel = linear.in_features, linear.out_features, kernel
        w = linear.weight.detach().float().contiguous()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,): a row of zeros keeps a scale above 0
        bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.has_bias = bias is not None
        if kernel == "fbgemm":
            self._packed = _fbgemm_pack(w, scale, bias)
        else:
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._packed = torch.ops.onednn.qlinear_prepack(q, None)
            self._scale, self._zero, self._bias = scale, torch.zeros(w.size(0), dtype=torch.int32), bias
        self.int8_params = w.numel() + (0 if bias is None else bias.numel())  # what num_params counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float().contiguous()
        if self.kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x, self._packed, True)
        else:
            lo, hi = x.aminmax()
            scale = ((hi.clamp(min=0) - lo.clamp(max=0)) / 255).clamp(min=1e-12)  # asymmetric uint8, 0 exact
            zero = torch.round(-lo.clamp(max=0) / scale).to(torch.int32)
            qx = (torch.round(x / scale) + zero).clamp(0, 255).to(torch.uint8)
            y = torch.ops.onednn.qlinear_pointwise.tensor(qx, scale, zero, self._packed, self._scale, self._zero,
                                                          self._bias, 1.0, 0, torch.float32, "none", [], "")
        return y.view(*shape[:-1], self.out_features)

    @property
    def weight_bytes(self) -> int:
        """Bytes one call reads of its weights: the int8 matrix, and a float32 scale and bias per output."""
        return (self.in_features + 4 + 4 * self.has_bias) * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel, {self.kernel}"


@lru_cache(maxsize=1)
def best_kernel() -> Optional[str]:
    """The fastest int8 kernel this PyTorch build has (fbgemm, else onednn), or None."""
    probe = nn.Linear(8, 8)
    for kernel in KERNELS:
        try:
            Int8Linear(probe, kernel)(torch.zeros(1, 8))
            return kernel
        except (RuntimeError, AttributeError, NotImplementedError):
            continue
    return None


def check_dtype(dtype: str, device: torch.device) -> None:
    """Refuse, in one line, a decode dtype this device cannot run."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; use auto (the model's own) or int8 (CPU, 8-bit weights)")
    if dtype == "int8" and device.type != "cpu":
        raise UserError(f"--dtype int8 is for CPUs (their int8 kernels); on {device.type} leave it out: the model "
                        "already decodes in bf16 there, which reads half of fp32's bytes")
    if dtype == "int8" and best_kernel() is None:
        raise UserError(f"--dtype int8 needs PyTorch's CPU int8 kernels, which this build lacks (quantized engine "
                        f"{torch.backends.quantized.engine!r})")


def is_int8(model: nn.Module) -> bool:
    """Whether `model`'s Linear layers were converted by `to_int8`."""
    return getattr(model, "int8", False)


def to_int8(model: nn.Module, kernel: Optional[str] = None) -> nn.Module:
    """`model` (on the CPU, eval mode) with every nn.Linear replaced by an `Int8Linear` using `kernel` (default
    `best_kernel()`); returns the model. A weight tied to another parameter (GPT-2's output layer and token table)
    keeps that parameter, and its int8 copy is not counted twice by num_params."""
    kernel = kernel or best_kernel()
    if kernel is None:
        raise UserError("this PyTorch build has no CPU int8 kernels (fbgemm or onednn)")
    linears = {id(m) for m in model.modules() if isinstance(m, nn.Linear)}
    kept = {id(p) for m in model.modules() if id(m) not in linears for p in m.parameters(recurse=False)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                layer = Int8Linear(child, kernel)
                if id(child.weight) in kept:
                    layer.int8_params -= child.weight.numel()
                setattr(parent, name, layer)
    model.int8 = True  # what the engine's thread choice reads (gptforge.infer.engine.decode_threads)
    return model
