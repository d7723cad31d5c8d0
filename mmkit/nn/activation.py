"""GELU (tanh approximation) for CPU half precision, ~2x faster than aten's (why: tanh is slow).

aten's CPU `gelu(approximate="tanh")` evaluates tanh per element (measured 7.6 ms forward for
a 2720 x 1536 bf16 tensor, vs 1.5 ms for SiLU). The same function is
    0.5 x (1 + tanh(z)) = x * sigmoid(2 z),   z = sqrt(2/pi) (x + 0.044715 x^3),
and sigmoid is a fast vectorised exp. Computed in fp32 on row chunks that stay in cache, one
rounding to the output dtype: the same bf16 result as aten (max |diff| one bf16 ulp), and
fp32 inputs are equal to aten's tanh form within 1e-6 (tested). Backward is aten's
gelu_backward (fast already), from the saved input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_C1 = 2.0 * math.sqrt(2.0 / math.pi)  # 2 * sqrt(2/pi)
_C2 = _C1 * 0.044715
_CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32 per temporary: stays in L2


def _rows(x: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMS // max(1, x.shape[-1]))


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # x (N, D) contiguous
        out = torch.empty_like(x)
        step = _rows(x)
        for s in range(0, x.shape[0], step):
            xf = x[s:s + step].float()
            u = xf * xf
            u.mul_(_C2).add_(_C1).mul_(xf)  # 2 z
            torch.sigmoid(u, out=u)
            out[s:s + step] = u.mul_(xf)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors  # aten's backward kernel is already fast (no tanh-bound loop)
        return torch.ops.aten.gelu_backward(grad.contiguous().view_as(x), x, approximate="tanh")


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """F.gelu(x, approximate="tanh"); the chunked sigmoid form on CPU half precision."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16) or x.dim() < 1:
        return F.gelu(x, approximate="tanh")
    shape = x.shape
    return _GeluTanh.apply(x.contiguous().view(-1, shape[-1])).view(shape)
