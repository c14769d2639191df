"""The fused kernels' arithmetic and autograd functions: rotary embeddings and SwiGLU.

On CUDA, kernels compiled at first use through NVRTC, which builds for the GPU at hand (a T4
included; no Triton); on the CPU the same arithmetic as PyTorch ops, which the tests hold to
the models' own code. service.fast.rotary and service.fast.swiglu install them.
"""

from __future__ import annotations

from typing import Any

from service.fast.nvrtc import compiled

# Llama-style RoPE rotates each head's two halves: out1 = x1*c1 - x2*s1, out2 = x2*c2 + x1*s2,
# and its gradient is the transpose: dx1 = g1*c1 + g2*s2, dx2 = g2*c2 - g1*s1. One thread per
# pair (x1, x2), so each element is read once: an elementwise (jiterator) kernel reaches the
# partner half only through extra broadcast operands, and ran at a quarter of this speed. One
# block per token, its threads over the token's (head, pair)s: a flat index split by 64-bit
# divisions in every thread took 0.32 ms on the queries (32 x 512 x 4096, fp16), where
# reading and writing them once at an H200's memory rate takes ~0.07 ms. The
# storage type comes in as T, with load/store to and from float, so no CUDA header is needed.
ROPE_SOURCE = """
extern "C" __global__ void spotlora_rope(
    const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
    T* __restrict__ out, int batch, int heads, int length, int half,
    int xb, int xh, int xl, int ob, int oh, int ol, int cb, int cl, int backward) {
  int b = blockIdx.x / length, l = blockIdx.x - b * length;
  long long xt = (long long)b * xb + (long long)l * xl;
  long long ot = (long long)b * ob + (long long)l * ol;
  long long ct = (long long)b * cb + (long long)l * cl;
  for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
    int h = j / half, d = j - h * half;
    long long xi = xt + (long long)h * xh + d, oi = ot + (long long)h * oh + d;
    float x1 = load(x[xi]), x2 = load(x[xi + half]);
    float c1 = load(cos[ct + d]), c2 = load(cos[ct + d + half]);
    float s1 = load(sin[ct + d]), s2 = load(sin[ct + d + half]);
    float sa = backward ? -s2 : s1, sb = backward ? -s1 : s2;
    out[oi] = store(x1 * c1 - x2 * sa);
    out[oi + half] = store(x2 * c2 + x1 * sb);
  }
}
"""
ROPE_BLOCK = 256
# silu(gate) * up and its gradient: plain elementwise, so jiterator's vectorized kernels.
SWIGLU_CODE = """
template <typename T> T spotlora_swiglu(T gate, T up) {
  float g = static_cast<float>(gate);
  return static_cast<T>(g / (1.0f + expf(-g)) * static_cast<float>(up));
}
"""
SWIGLU_GRAD_CODE = """
template <typename T> void spotlora_swiglu_grad(T grad, T gate, T up, T& dgate, T& dup) {
  float g = static_cast<float>(gate);
  float d = static_cast<float>(grad);
  float sig = 1.0f / (1.0f + expf(-g));
  dup = static_cast<T>(d * g * sig);
  dgate = static_cast<T>(d * static_cast<float>(up) * sig * (1.0f + g * (1.0f - sig)));
}
"""


class Elementwise:
    """The kernels, compiled at first use through NVRTC (which builds for the GPU at hand, a
    T4 included) on CUDA; on the CPU the same arithmetic as PyTorch ops, which the tests hold
    to the models' own code."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if cuda:
            from torch.cuda import jiterator

            self.swiglu = jiterator._create_jit_fn(SWIGLU_CODE)
            self.swiglu_grad = jiterator._create_multi_output_jit_fn(SWIGLU_GRAD_CODE, 2)
        else:
            self.swiglu, self.swiglu_grad = _swiglu_ops, _swiglu_grad_ops

    def rope(self, x: Any, cos: Any, sin: Any, out: Any, backward: bool) -> Any:
        """x (batch, heads, length, dim) rotated by cos and sin (batch, length, dim), into
        `out` (x's shape, any strides); backward: by the transpose."""
        if not self.cuda:
            return out.copy_(_rope_ops(x, cos, sin, backward))

        batch, heads, length, dim = x.shape
        compiled(ROPE_SOURCE, "spotlora_rope", x.dtype)(
            grid=(batch * length, 1, 1),
            block=(min(ROPE_BLOCK, -(-heads * dim // 64) * 32), 1, 1),
            args=[
                *(x, cos, sin, out, batch, heads, length, dim // 2),
                *x.stride()[:3],
                *out.stride()[:3],
                *(cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), int(backward)),
            ],
        )
        return out


def _rope_ops(x: Any, cos: Any, sin: Any, backward: bool) -> Any:
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()
    c1, c2, s1, s2 = c[..., :half], c[..., half:], s[..., :half], s[..., half:]
    sa, sb = (-s2, -s1) if backward else (s1, s2)
    return torch.cat((x1 * c1 - x2 * sa, x2 * c2 + x1 * sb), dim=-1).to(x.dtype)


def _swiglu_ops(gate: Any, up: Any) -> Any:
    import torch

    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def _swiglu_grad_ops(grad: Any, gate: Any, up: Any) -> tuple[Any, Any]:
    import torch

    g, d = gate.float(), grad.float()
    sig = torch.sigmoid(g)
    dgate = d * up.float() * sig * (1 + g * (1 - sig))
    return dgate.to(gate.dtype), (d * g * sig).to(up.dtype)


_KERNELS: dict[bool, Elementwise] = {}


def elementwise(cuda: bool) -> Elementwise:
    if cuda not in _KERNELS:
        _KERNELS[cuda] = Elementwise(cuda)
    return _KERNELS[cuda]


def rotary_function() -> Any:
    import torch

    class Rotary(torch.autograd.Function):
        """cos and sin (batch, length, dim), shared by the heads."""

        @staticmethod
        def forward(ctx: Any, x: Any, cos: Any, sin: Any) -> Any:
            ctx.save_for_backward(cos, sin)
            ctx.layout = x.stride()
            # Contiguous (batch, heads, length, dim), whatever x's layout: what SDPA reads.
            out = x.new_empty(x.shape)
            return elementwise(x.is_cuda).rope(x, cos, sin, out, backward=False)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            cos, sin = ctx.saved_tensors
            grad = grad if grad.stride(-1) == 1 else grad.contiguous()
            # In the input's layout, so that the head split before it needs no copy.
            out = grad.new_empty_strided(grad.shape, ctx.layout)
            return elementwise(grad.is_cuda).rope(grad, cos, sin, out, backward=True), None, None

    return Rotary


def swiglu_function() -> Any:
    import torch

    class SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            ctx.save_for_backward(gate, up)
            return elementwise(gate.is_cuda).swiglu(gate, up)

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            gate, up = ctx.saved_tensors
            return tuple(elementwise(grad.is_cuda).swiglu_grad(grad, gate, up))

    return SwiGLU


_FUNCTIONS: dict[str, Any] = {}


def function(name: str) -> Any:
    """The autograd function 'rotary' (x, cos, sin) or 'swiglu' (gate, up), made once."""
    if name not in _FUNCTIONS:
        _FUNCTIONS[name] = {"rotary": rotary_function, "swiglu": swiglu_function}[name]()
    return _FUNCTIONS[name]
