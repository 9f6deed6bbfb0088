"""FP8 matrix products for training (precision ``fp8``, the seed's PR=fp8): rowwise-scaled e4m3.

The recipe is "rowwise with the weight gradient in high precision": the forward product and the input-gradient
product run in FP8 with one scale per row of each operand along the contracted dimension, and the weight
gradient stays a bf16 product. Two of every three GEMM FLOPs thereby use Hopper's FP8 tensor cores, while the
accumulated weight update never sees FP8 rounding, and no activation needs quantising along the token axis
(which would take a transposed copy). Activations are kept in bf16 for the backward, as without FP8.

Scales are computed from each row's absolute maximum (current scaling, no amax history), so a product never
overflows. Activations and output gradients are quantised at every use. A weight ``[out, in]`` is quantised along
``in`` for the forward and along ``out`` for the input gradient, at every use too, or, with
``enable_fp8(model, cache_weights=True)``, once while it is unchanged (``cached``): weights change only at the
optimizer step, so every micro-batch of a step, forward and backward, reuses the copies. They cost one byte per
parameter each and are dropped before the optimizer step (``release_cached``).

``torch._scaled_mm`` and ``torch._scaled_grouped_mm`` (CUTLASS on sm89+/sm90) do the products on GPUs. Elsewhere
the same products are formed from the dequantised operands in fp32 (their definition; torch's CPU kernel takes
only one scale per tensor), so the recipe's numerics can be tested anywhere, slowly.
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448
ALIGNMENT = 16  # both matrix dimensions of an FP8 product must be multiples of this


def supported_shape(*dims: int) -> bool:
    """Whether a product over these matrix dimensions can run in FP8 (else it stays bf16)."""
    return all(d % ALIGNMENT == 0 for d in dims)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q [..., K] e4m3, contiguous; scale [..., 1] fp32) with x ~= q * scale per row.

    The scale maps each row's absolute maximum onto e4m3's largest value; all-zero rows get a tiny scale and
    quantise to zeros.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.contiguous(), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def scaled_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
              fast_accum: bool = False) -> torch.Tensor:
    """(a * sa) @ (b * sb).T for a [M, K], b [N, K] (both e4m3, row-major), sa [M, 1], sb [N, 1]: [M, N]."""
    if not a.is_cuda:
        return (dequantize_rows(a, sa) @ dequantize_rows(b, sb).t()).to(out_dtype)
    return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def scaled_grouped_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor,
                      out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """Rows of a [T, K] grouped by ``offs`` (int32 cumulative ends, one per group) times each group's
    b[g] [N, K] transposed: [T, N]. sa [T, 1], sb [G, N, 1]. Rows past offs[-1] are left zero (off the GPU)."""
    return _scaled_grouped_mm(a, sa, b, sb, offs, out_dtype, fast_accum)


# An opaque operator to torch.compile: the CUTLASS kernel needs a row-major and b column-major, and a compiled
# graph may otherwise hand it an operand in whatever layout the compiler chose for that buffer.
@torch.library.custom_op("moonforge::scaled_grouped_mm", mutates_args=())
def _scaled_grouped_mm(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor, offs: torch.Tensor,
                       out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    if a.is_cuda:
        return torch._scaled_grouped_mm(a.contiguous(), b.contiguous().transpose(1, 2), sa.reshape(-1).contiguous(),
                                        sb.reshape(b.shape[0], -1).contiguous(), offs=offs, out_dtype=out_dtype,
                                        use_fast_accum=fast_accum)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = scaled_mm(a[start:end], sa[start:end], b[g], sb[g], out_dtype)
        start = end
    return out


@_scaled_grouped_mm.register_fake
def _(a, sa, b, sb, offs, out_dtype, fast_accum):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The bf16 weight gradient of a grouped product: per group g, grad[rows of g].T @ x[rows of g]: [G, N, K]."""
    return _grouped_weight_grad(grad, x, offs)


# Opaque to torch.compile for the same reason: the kernel checks 16-byte alignment of every group along the
# token dimension unless the first operand is column-major and the second row-major, which a compiled graph's
# choice of layouts does not guarantee.
@torch.library.custom_op("moonforge::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(grad.contiguous().t(), x.contiguous(), offs=offs)


@_grouped_weight_grad.register_fake
def _(grad, x, offs):
    return grad.new_empty(offs.shape[0], grad.shape[1], x.shape[1])


class QuantizedWeight(NamedTuple):
    """A weight ``[..., out, in]`` in e4m3 both ways: ``q`` with a scale per row along ``in`` (the forward
    product contracts it), ``q_t`` = the transpose ``[..., in, out]`` with a scale per row along ``out`` (the
    input-gradient product contracts that)."""

    q: torch.Tensor
    scale: torch.Tensor
    q_t: torch.Tensor
    scale_t: torch.Tensor


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    return QuantizedWeight(*quantize_rows(weight), *quantize_rows(weight.transpose(-2, -1)))


_compiled_quantize_weight = None


def quantize_weight_fast(weight: torch.Tensor) -> QuantizedWeight:
    """``quantize_weight`` as fused kernels on a GPU (one reduction and one write per orientation; eager takes
    about eight passes over fp32 temporaries). A test compares the two on a GPU."""
    global _compiled_quantize_weight
    if not weight.is_cuda:
        return quantize_weight(weight)
    if _compiled_quantize_weight is None:
        _compiled_quantize_weight = torch.compile(quantize_weight)  # a second shape makes the sizes symbolic
    return _compiled_quantize_weight(weight)


def cached(owner: nn.Module, sources: tuple[torch.Tensor, ...],
           build: Callable[[], tuple[QuantizedWeight, ...]]) -> tuple[QuantizedWeight, ...] | None:
    """``owner``'s quantised weights from ``build()``, made again only when a tensor of ``sources`` has changed
    (another tensor, or its version counter moved: an in-place update); None when not training (inference
    quantises per use, the forward orientation only) or when ``owner.fp8_cache_weights`` is off.

    Inside a compiled graph the copies are only read: ``prepare`` makes them, eagerly, before the graph runs
    (data pointers and version counters cannot be traced)."""
    if not torch.is_grad_enabled() or not getattr(owner, "fp8_cache_weights", False):
        return None
    if torch.compiler.is_compiling():
        return owner.__dict__.get("_fp8_weights")
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in sources)
    if owner.__dict__.get("_fp8_key") != key:
        owner.__dict__.pop("_fp8_weights", None)  # free the stale copies before making new ones
        with torch.no_grad():
            owner._fp8_weights = build()
        owner._fp8_key = key
    return owner._fp8_weights


def prepare(modules: list[nn.Module]) -> None:
    """Make (or keep) the cached copies of these modules' weights, eagerly, before a compiled graph reads them.
    A module takes part through its ``quantized_weights()``, which calls ``cached``."""
    for module in modules:
        if module.fp8:
            module.quantized_weights()


def release_cached(modules: Iterable[nn.Module]) -> None:
    """Drop the cached quantised weights of ``modules`` (e.g. ``model.modules()``): before the optimizer step
    changes the weights, and to free their memory (the version check alone could miss a weight rewritten into
    the same storage by a copy that does not count as an in-place update, such as FSDP's next all-gather)."""
    for module in modules:
        module.__dict__.pop("_fp8_weights", None)
        module.__dict__.pop("_fp8_key", None)


def linear(x: torch.Tensor, weight: torch.Tensor, quantized: QuantizedWeight | None = None) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias) with the forward and input-gradient products in FP8; ``quantized``:
    ``weight`` already quantised both ways (else it is quantised here, per use)."""
    return _Fp8Linear.apply(x, weight, *(quantized or (None,) * 4))


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, qw, sw, qwt, swt):
        x2 = x.reshape(-1, x.shape[-1])
        qx, sx = quantize_rows(x2)
        if qw is None:
            qw, sw = quantize_rows(weight)
        out = scaled_mm(qx, sx, qw, sw, x.dtype, fast_accum=True)
        ctx.save_for_backward(x2, weight, qwt, swt)
        ctx.in_shape = x.shape
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, qwt, swt = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        qg, sg = quantize_rows(g2)
        if qwt is None:
            qwt, swt = quantize_rows(weight.t())  # [in, out]: scales along the contracted ``out``
        d_x = scaled_mm(qg, sg, qwt, swt, grad.dtype)
        d_w = g2.t().to(x2.dtype) @ x2
        return d_x.view(ctx.in_shape), d_w.to(weight.dtype), None, None, None, None
