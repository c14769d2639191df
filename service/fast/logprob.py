"""trl's chunked LM-head loss on a GPU without Triton (a T4, or any GPU without a C compiler
for Triton's launchers): each logits tile folded by one compiled kernel each way instead of
trl's PyTorch tile functions, set in trl's module for the run and put back by uninstall.

trl projects 4,096 tokens at a time through the LM head and folds each logits tile into
per-token running statistics (online log-sum-exp, the target's logit, the entropy's and
the top-1 metric's sums); its backward recomputes the tile and turns it into the logits'
gradient in place. Without Triton each fold is some twenty PyTorch passes over fp32 copies
of the tile (tokens x 32,768 vocabulary entries, 512 MiB each); these kernels read the tile
once (forward) or once and write it once (backward). Same arithmetic, in fp32.
"""

from __future__ import annotations

import inspect
import struct
from typing import Any

from service.fast import probe as checks
from service.fast.nvrtc import compiled
from service.fast.policy import Policy

NAME = "lm_head_loss"
_TILE_FUNCTIONS = ("_forward_tile", "_backward_tile")
_SAVED: dict[str, Any] = {}  # trl's own values while the run's are set

# One block per token: each thread folds a strided share of the tile's columns into its own
# running statistics, the block merges them, and one thread merges the block's into the
# token's running ones. The thread that meets the target column writes its logit.
FORWARD_SOURCE = """
#define NEG_INF __int_as_float((int)0xff800000u)

struct Stats { float m, se, xe, sq, zs, mb; };

__device__ __forceinline__ float transform(float y, float scale, float softcap, float inv_t,
                                           int has_softcap) {
  y *= scale;
  if (has_softcap) y = softcap * tanhf(y / softcap);
  return y * inv_t;
}

__device__ __forceinline__ Stats merge(Stats a, Stats b) {
  Stats r;
  r.m = fmaxf(a.m, b.m);
  float fa = a.m == NEG_INF ? 0.0f : expf(a.m - r.m);
  float fb = b.m == NEG_INF ? 0.0f : expf(b.m - r.m);
  r.se = a.se * fa + b.se * fb;
  r.xe = a.xe * fa + b.xe * fb;
  r.sq = a.sq * fa * fa + b.sq * fb * fb;
  r.zs = a.zs + b.zs;
  r.mb = fmaxf(a.mb, b.mb);
  return r;
}

extern "C" __global__ void spotlora_logprob_forward(
    const T* __restrict__ tile, int stride, const long long* __restrict__ targets,
    float* running_max, float* sum_exp, float* x_sum_exp, float* sq_sum_exp, float* z_sum,
    float* max_before_target, float* target_logit, int vocab_start, int n_cols,
    int scale_bits, int softcap_bits, int inv_t_bits, int has_softcap) {
  float scale = __int_as_float(scale_bits), softcap = __int_as_float(softcap_bits);
  float inv_t = __int_as_float(inv_t_bits);
  __shared__ Stats shared[32];
  int row = blockIdx.x;
  const T* x = tile + (long long)row * stride;
  long long local = targets[row] - vocab_start;
  Stats s = {NEG_INF, 0.0f, 0.0f, 0.0f, 0.0f, NEG_INF};
  for (int j = threadIdx.x; j < n_cols; j += blockDim.x) {
    float z = transform(load(x[j]), scale, softcap, inv_t, has_softcap);
    s.zs += z;
    if (j < local) s.mb = fmaxf(s.mb, z);
    if (j == local) target_logit[row] = z;
    if (z > s.m) {
      float f = s.m == NEG_INF ? 0.0f : expf(s.m - z);
      s.se = s.se * f + 1.0f;
      s.xe = s.xe * f + z;
      s.sq = s.sq * f * f + 1.0f;
      s.m = z;
    } else if (z != NEG_INF) {  // a NaN goes here and stays a NaN
      float e = expf(z - s.m);
      s.se += e;
      s.xe += e * z;
      s.sq += e * e;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    Stats o;
    o.m = __shfl_down_sync(0xffffffffu, s.m, offset);
    o.se = __shfl_down_sync(0xffffffffu, s.se, offset);
    o.xe = __shfl_down_sync(0xffffffffu, s.xe, offset);
    o.sq = __shfl_down_sync(0xffffffffu, s.sq, offset);
    o.zs = __shfl_down_sync(0xffffffffu, s.zs, offset);
    o.mb = __shfl_down_sync(0xffffffffu, s.mb, offset);
    s = merge(s, o);
  }
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < blockDim.x / 32; ++w) s = merge(s, shared[w]);
  Stats run = {running_max[row], sum_exp[row], x_sum_exp[row], sq_sum_exp[row], z_sum[row],
               max_before_target[row]};
  run = merge(run, s);
  running_max[row] = run.m;
  sum_exp[row] = run.se;
  x_sum_exp[row] = run.xe;
  sq_sum_exp[row] = run.sq;
  z_sum[row] = run.zs;
  max_before_target[row] = run.mb;
}
"""
BACKWARD_SOURCE = """
extern "C" __global__ void spotlora_logprob_backward(
    T* tile, int stride, const long long* __restrict__ targets,
    const float* __restrict__ log_z, const float* __restrict__ entropy,
    const float* __restrict__ grad_logprobs, const float* __restrict__ grad_entropy,
    int vocab_start, int n_cols, int scale_bits, int softcap_bits, int inv_t_bits,
    int has_softcap, int has_logprob_grad, int has_entropy_grad) {
  float scale = __int_as_float(scale_bits), softcap = __int_as_float(softcap_bits);
  float inv_t = __int_as_float(inv_t_bits);
  int row = blockIdx.y;
  int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col < n_cols) {
    T* at = tile + (long long)row * stride + col;
    float y = load(*at) * scale, t = 0.0f, z;
    if (has_softcap) {
      t = tanhf(y / softcap);
      z = softcap * t * inv_t;
    } else {
      z = y * inv_t;
    }
    float log_p = z - log_z[row];
    float p = expf(log_p);
    float grad = 0.0f;
    if (has_logprob_grad)
      grad += grad_logprobs[row] * ((col + vocab_start == targets[row] ? 1.0f : 0.0f) - p);
    if (has_entropy_grad) grad -= grad_entropy[row] * p * (log_p + entropy[row]);
    grad *= inv_t;
    if (has_softcap) grad *= 1.0f - t * t;
    *at = store(grad * scale);
  }
}
"""
FORWARD_THREADS = 256
BACKWARD_THREADS = 256

# The parameters of trl's tile functions (trl 1.16) that these replace: another trl keeps
# its own.
_TILE = ["tile", "tile_stride", "targets"]
_SCALARS = ["vocab_start", "n_cols", "logit_scale", "softcap", "inv_t", "HAS_SOFTCAP"]
_STATS = ["running_max", "sum_exp", "x_sum_exp", "sq_sum_exp", "z_sum", "max_before_target"]
_OUTPUTS = ["HAS_ENTROPY", "HAS_LOG_SUM_SQ_PROBS", "HAS_MEAN_LOGITS", "HAS_IS_TOP1"]
FORWARD_PARAMETERS = [*_TILE, *_STATS, "target_logit", *_SCALARS, *_OUTPUTS, "BLOCK_SIZE"]
_GRADS = ["grad_logprobs", "grad_entropy"]
_GRAD_FLAGS = ["HAS_LOGPROB_GRAD", "HAS_ENTROPY_GRAD"]
BACKWARD_PARAMETERS = [*_TILE, "log_z", "entropy", *_GRADS, *_SCALARS, *_GRAD_FLAGS, "BLOCK_SIZE"]


def fold_forward(original: Any) -> Any:
    """trl's _forward_tile through the kernel on CUDA, `original` elsewhere. Each running
    statistic is kept whether trl asked for it or not (it reads only those it asked for)."""

    def fold(tile: Any, tile_stride: int, targets: Any, *rest: Any) -> None:
        if not _plain(tile, targets, *rest[:7]):
            return original(tile, tile_stride, targets, *rest)
        (running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum, max_before_target, target_logit,
         vocab_start, n_cols, logit_scale, softcap, inv_t, has_softcap) = rest[:13]  # fmt: skip
        compiled(FORWARD_SOURCE, "spotlora_logprob_forward", tile.dtype)(
            grid=(tile.shape[0], 1, 1),
            block=(FORWARD_THREADS, 1, 1),
            args=[
                *(tile, tile.stride(0), targets, running_max, sum_exp, x_sum_exp, sq_sum_exp),
                *(z_sum, max_before_target, target_logit, int(vocab_start), int(n_cols)),
                *_bits(logit_scale, softcap, inv_t),
                int(bool(has_softcap)),
            ],
        )
        return None

    return _by_name(fold, original, FORWARD_PARAMETERS)


def fold_backward(original: Any) -> Any:
    """trl's _backward_tile through the kernel on CUDA, `original` elsewhere."""

    def fold(tile: Any, tile_stride: int, targets: Any, *rest: Any) -> None:
        (log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols, logit_scale, softcap,
         inv_t, has_softcap, has_logprob_grad, has_entropy_grad) = rest[:12]  # fmt: skip
        # An absent gradient comes as a placeholder (trl passes the whole log_z), not read.
        grads = [
            g
            for g, used in ((grad_logprobs, has_logprob_grad), (grad_entropy, has_entropy_grad))
            if used
        ]
        if not _plain(tile, targets, log_z, entropy, *grads):
            return original(tile, tile_stride, targets, *rest)
        compiled(BACKWARD_SOURCE, "spotlora_logprob_backward", tile.dtype)(
            grid=((int(n_cols) + BACKWARD_THREADS - 1) // BACKWARD_THREADS, tile.shape[0], 1),
            block=(BACKWARD_THREADS, 1, 1),
            args=[
                *(tile, tile.stride(0), targets, log_z, entropy, grad_logprobs, grad_entropy),
                *(int(vocab_start), int(n_cols), *_bits(logit_scale, softcap, inv_t)),
                *(int(bool(has_softcap)), int(bool(has_logprob_grad))),
                int(bool(has_entropy_grad)),
            ],
        )
        return None

    return _by_name(fold, original, BACKWARD_PARAMETERS)


def _bits(*values: float) -> list[int]:
    """Each float as the int32 of its fp32 bits: kernel arguments go by 32-bit int (a Python
    float's C type differs between torch releases)."""
    return [struct.unpack("<i", struct.pack("<f", float(v)))[0] for v in values]


def _plain(tile: Any, targets: Any, *per_token: Any) -> bool:
    """A CUDA tile with contiguous rows, int64 targets and contiguous fp32 per-token arrays,
    one entry per row, as trl 1.16 passes them."""
    import torch

    rows = tile.shape[0]
    return (
        tile.is_cuda
        and tile.dim() == 2
        and tile.stride(-1) == 1
        and tile.shape[0] < 65536  # one grid row per token
        and tile.numel() < 2**31
        and targets.dtype == torch.int64
        and targets.is_contiguous()
        and targets.shape == (rows,)
        and all(
            t.dtype == torch.float32 and t.is_contiguous() and t.shape == (rows,) for t in per_token
        )
    )


def _by_name(fold: Any, original: Any, names: list[str]) -> Any:
    """`fold`, called as `original` is (trl passes the flags by name), with the arguments in
    the order of `names`."""
    signature = inspect.signature(original)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return fold(*(bound.arguments[name] for name in names))

    call.spotlora_original = original  # type: ignore[attr-defined]
    return call


def matches_trl(original: Any, names: list[str]) -> bool:
    """Whether trl's tile function takes the parameters these kernels were written for."""
    return list(inspect.signature(original).parameters) == names


def probe(folds: list[tuple[str, Any, Any]], dtype: Any, scale: float, softcap: Any) -> Any:
    """trl's folds and these on two random tiles of one row block in the run's tile dtype,
    logit scale and soft-capping, called as trl calls them: the running statistics after
    both, then the gradient tile; trl's results first."""
    import torch

    (_, forward, fused_forward), (_, backward, fused_backward) = folds
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows, cols = 5, 300
    tiles = [(torch.randn(rows, cols, generator=gen) * 4).cuda().to(dtype) for _ in range(2)]
    targets = torch.tensor([3, 299, 300, 450, 599]).cuda()
    flags = dict(
        HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=True, HAS_LOG_SUM_SQ_PROBS=True,
        HAS_MEAN_LOGITS=True, HAS_IS_TOP1=True, BLOCK_SIZE=1024,
    )  # fmt: skip
    scalars = dict(logit_scale=scale, softcap=softcap or 1.0, inv_t=1.0)
    results = []
    for fold, fold_back in ((forward, backward), (fused_forward, fused_backward)):
        stats = [torch.full((rows,), -torch.inf, device="cuda")]
        stats += [torch.zeros(rows, device="cuda") for _ in range(4)]
        stats += [torch.full((rows,), -torch.inf, device="cuda"), torch.zeros(rows, device="cuda")]
        for start, tile in zip((0, cols), tiles, strict=True):
            fold(tile, tile.stride(0), targets, *stats, start, cols, **scalars, **flags)
        log_z = stats[0] + stats[1].log()
        entropy = log_z - stats[2] / stats[1]
        grad = torch.linspace(-1, 1, rows, device="cuda")
        tile = tiles[1].clone()
        fold_back(
            tile, tile.stride(0), targets, log_z, entropy, grad, grad * 0.5, cols, cols,
            **scalars, HAS_SOFTCAP=flags["HAS_SOFTCAP"], HAS_LOGPROB_GRAD=True,
            HAS_ENTROPY_GRAD=True, BLOCK_SIZE=1024,
        )  # fmt: skip
        results.append([*stats, tile.float()])
    return results


def _trl() -> Any:
    try:
        from trl.kernels import chunked_logprob
    except ImportError:  # a trl without the chunked loss has nothing to replace or switch
        return None
    return chunked_logprob


def use_triton(policy: Policy) -> bool:
    """trl reads _TRITON_AVAILABLE at each call to choose its Triton kernel or its PyTorch
    path: off for the run where Triton cannot run here (below compute capability 8.0, or no
    C compiler for its launchers, which would fail the first step). Whether it runs."""
    trl = _trl()
    if trl is None or policy.device != "cuda":
        return False
    if policy.triton(trl._TRITON_AVAILABLE):
        return True
    if trl._TRITON_AVAILABLE:
        _SAVED.setdefault("_TRITON_AVAILABLE", trl._TRITON_AVAILABLE)
        trl._TRITON_AVAILABLE = False
    return False


def applies(model: Any, policy: Policy) -> str | None:
    if reason := policy.cuda_kernels():
        return reason
    trl = _trl()
    if trl is None:
        return "this trl has no chunked LM-head loss"
    if trl._TRITON_AVAILABLE:
        return "trl's Triton kernel computes it here"
    return None


def install(model: Any, policy: Policy) -> int:
    """Both of trl's PyTorch tile folds through the kernels, after a probe in the run's tile
    dtype (the compute dtype) with the model's logit scale and soft-capping. 1 if done."""
    trl = _trl()
    folds = []
    for name, names, make in (
        ("_forward_tile", FORWARD_PARAMETERS, fold_forward),
        ("_backward_tile", BACKWARD_PARAMETERS, fold_backward),
    ):
        current = getattr(trl, name, None)
        original = getattr(current, "spotlora_original", current)
        if original is None or not matches_trl(original, names):
            raise checks.Fallback(f"trl's {name} is not the one these kernels were written for")
        folds.append((name, original, make(original)))
    config = model.config.get_text_config() if hasattr(model, "config") else None
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    softcap = getattr(config, "final_logit_softcapping", None)
    checks.check(probe, folds, checks.dtype(policy.compute_dtype), scale, softcap)
    for name, original, fold in folds:
        _SAVED.setdefault(name, original)
        setattr(trl, name, fold)
    return 1


def uninstall(model: Any) -> None:
    """trl's tile functions and its Triton flag as they were."""
    trl = _trl()
    while trl is not None and _SAVED:
        name, value = _SAVED.popitem()
        setattr(trl, name, value)
