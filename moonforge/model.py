"""The DeepSeek-V3 / Moonlight architecture in plain PyTorch.

Read top to bottom: RMSNorm, rotary embedding, attention kernels, Multi-head Latent Attention (MLA), the router,
the routed experts (one grouped GEMM for all experts), the MoE layer with shared experts, the decoder block and
the causal LM. Nothing here knows about parallelism: ``moonforge.parallel`` applies FSDP, TP, EP, PP and CP from
outside. Parameter names follow Hugging Face's, so checkpoints map one to one, except that routed experts are
stored stacked as ``experts.gate_up_proj`` [E, 2, I, H] and ``experts.down_proj`` [E, H, I].
"""

from __future__ import annotations

import functools
import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from moonforge import fp8
from moonforge.config import ModelConfig, yarn_mscale

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return KERNELS.rms_norm(x, self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------------- rotary
def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rotary part and the cos/sin scale (YaRN's attention factor, else 1)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    s = config.rope_scaling
    factor = s["factor"]
    original = s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if s.get("attention_factor") is not None:
        attention_factor = s["attention_factor"]
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_parameters(self) -> None:
        self.inv_freq.copy_(rope_inv_freq(self.config)[0].to(self.inv_freq.device))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [B, S, rope_dim / 2], fp32."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek's interleaved RoPE: pairs (x0, x1), (x2, x3), ... rotate together.

    The result is laid out [rotated evens | rotated odds]; queries and keys get the same layout, so their dot
    products equal those of the interleaved form (this is how transformers computes it too).
    """
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- attention
class _MaskCache:
    """The derived masks of one micro-batch (cu_seqlens, dense or block masks), keyed by kind."""

    def __init__(self):
        self.items: dict = {}

    def get(self, key: str, build):
        if key not in self.items:
            self.items[key] = build()
        return self.items[key]


@dataclass
class AttentionMask:
    """Which keys each query may see. Shared by all layers of one micro-batch.

    ``document_ids`` [B, S] keeps packed documents apart; ``None`` means one document per row. Under context
    parallelism the keys are a gathered, longer sequence: ``key_document_ids`` and the global token indices
    ``query_index`` / ``key_index`` describe them. Causality is always ``key_index <= query_index``.
    """

    document_ids: torch.Tensor | None = None
    key_document_ids: torch.Tensor | None = None
    query_index: torch.Tensor | None = None
    key_index: torch.Tensor | None = None
    backend: str = "sdpa"
    # Derived masks, built on first use. A holder object, not a dict: FSDP re-creates this dataclass for every
    # block (``dataclasses.replace``) and copies dicts, so only a shared holder lets all blocks see one build.
    cache: _MaskCache = field(default_factory=_MaskCache, repr=False, compare=False)

    @property
    def is_plain_causal(self) -> bool:
        return self.document_ids is None and self.query_index is None

    def dense(self, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
        """Boolean mask [B or 1, 1, q_len, k_len], True where attention is allowed."""
        def build():
            qi = self.query_index if self.query_index is not None else torch.arange(q_len, device=device)
            ki = self.key_index if self.key_index is not None else torch.arange(k_len, device=device)
            allowed = (ki[None, :] <= qi[:, None])[None]
            if self.document_ids is not None:
                kd = self.key_document_ids if self.key_document_ids is not None else self.document_ids
                allowed = allowed & (self.document_ids[:, :, None] == kd[:, None, :])
            return allowed[:, None]
        return self.cache.get(("dense", device), build)  # layers spread over devices each get their own

    def cu_seqlens(self) -> torch.Tensor:
        from moonforge.attention import cu_seqlens

        return self.cache.get("cu", lambda: cu_seqlens(self.document_ids))

    def block_mask(self, q_len: int, k_len: int, device: torch.device):
        from moonforge.attention import build_block_mask

        return self.cache.get("block", lambda: build_block_mask(self, q_len, k_len, device))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float) -> torch.Tensor:
    """Causal attention over [B, S, H, D] tensors; returns [B, S, H, Dv]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    on_gpu = q.is_cuda
    if mask.is_plain_causal:
        if on_gpu:
            with sdpa_kernel(_GPU_SDPA_ORDER, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif on_gpu and mask.backend == "varlen" and mask.query_index is None:
        from moonforge.attention import varlen_causal

        out = varlen_causal(q, k, v, mask, scale)
    elif on_gpu and mask.backend == "flex":
        from moonforge.attention import flex_causal

        out = flex_causal(q, k, v, mask, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.shape[2], k.shape[2], q.device),
                                             scale=scale)
    return out.transpose(1, 2)


# cuDNN first: on Hopper it is the fastest SDPA kernel for MLA's qk 192 / v 128 (flash needs equal dims).
_GPU_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]


class Linear(nn.Linear):
    """``nn.Linear`` whose products can run in FP8 (``enable_fp8``); its state is nn.Linear's."""

    fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return F.linear(x, self.weight, self.bias)
        quantized = self.quantized_weights()
        out = fp8.linear(x, self.weight, quantized[0] if quantized else None)
        return out if self.bias is None else out + self.bias

    def quantized_weights(self) -> tuple[fp8.QuantizedWeight] | None:
        return fp8.cached(self, (self.weight,), lambda: (fp8.quantize_weight_fast(self.weight),))


class MLA(nn.Module):
    """Multi-head Latent Attention: keys and values are rebuilt from a 512-dim latent plus a shared RoPE key."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.qk_dim = c.qk_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.q_lora_rank = c.q_lora_rank
        n_heads = c.num_attention_heads
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.kv_a_layernorm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.kv_a_layernorm_eps)
        self.kv_b_proj = Linear(c.kv_lora_rank, n_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = Linear(n_heads * c.v_head_dim, c.hidden_size, bias=c.attention_bias)
        self.softmax_scale = c.softmax_scale()
        # Parallelisms that act on the compressed KV add functions (c_kv, k_pe) -> (c_kv, k_pe) here: context
        # parallelism gathers the whole sequence, tensor parallelism sums the shared RoPE key's gradient over heads.
        self.latent_hooks: list = []

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: LayerCache | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        cos, sin = rope
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(bsz, seq, -1, self.qk_dim)  # -1: the heads held here (all, or a tensor-parallel share)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q = torch.cat([q_nope, KERNELS.apply_rope(q_pe, cos[:, :, None], sin[:, :, None])], dim=-1)

        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = KERNELS.apply_rope(k_pe, cos, sin)
        for hook in self.latent_hooks:
            c_kv, k_pe = hook(c_kv, k_pe)
        kv = self.kv_b_proj(c_kv).view(bsz, c_kv.shape[1], -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, k_nope.shape[2], -1)], dim=-1)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = attention(q, k, v, mask, self.softmax_scale)
        return self.o_proj(out.reshape(bsz, seq, -1))


# ---------------------------------------------------------------------------------------------------- MLPs
class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the (fused) shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(KERNELS.swiglu(self.gate_proj(x), self.up_proj(x)))


_COUNT_ROUTING = [True]


@contextmanager
def routing_counts_paused():
    """Forward passes that are not training (a pipeline stage inferring its shapes, recomputation inside the
    backward) leave no counts. A compiled block reads the flag as a guard: it gets one graph for each state."""
    previous = _COUNT_ROUTING[0]
    _COUNT_ROUTING[0] = False
    try:
        yield
    finally:
        _COUNT_ROUTING[0] = previous


class Router(nn.Module):
    """Top-k routing, computed in fp32.

    ``e_score_correction_bias`` (aux-loss-free balancing) changes which experts are selected, never the weights:
    weights come from the unbiased scores, renormalised when ``norm_topk_prob``, times ``routed_scaling_factor``.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group, c.topk_group
        self.scoring_func, self.topk_method = c.scoring_func, c.topk_method
        self.norm_topk_prob, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size))
        if c.topk_method == "noaux_tc":  # DeepSeek-V2's routers have no correction bias
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Routed slots per expert since the last balancing update (not saved: a step's counts are consumed by it).
        self.register_buffer("tokens_per_expert", torch.zeros(c.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, k] fp32, expert ids [T, k], scores [T, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "noaux_tc":
            choice = self._limit_groups(scores + self.e_score_correction_bias, fill=float("-inf"))
            indices = choice.topk(self.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, indices)
        elif self.topk_method == "group_limited_greedy":
            weights, indices = self._limit_groups(scores, fill=0.0).topk(self.top_k, dim=-1, sorted=False)
        else:
            weights, indices = scores.topk(self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        if _COUNT_ROUTING[0]:  # paused while recomputation re-runs this forward: the first pass counted
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(indices, self.n_experts).float()
        return weights, indices, scores

    def _limit_groups(self, scores: torch.Tensor, fill: float) -> torch.Tensor:
        """Keep the experts of the best ``topk_group`` groups: DeepSeek-V3 ranks groups by the sum of their
        top-2 scores, DeepSeek-V2 by their maximum."""
        if self.n_group <= 1:
            return scores
        grouped = scores.view(-1, self.n_group, self.n_experts // self.n_group)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1)
        else:
            group_scores = grouped.max(dim=-1).values
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return grouped.masked_fill(~group_mask[..., None], fill).view(-1, self.n_experts)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.e_score_correction_bias is not None:
            nn.init.zeros_(self.e_score_correction_bias)
        self.tokens_per_expert.zero_()


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights, computed with one grouped GEMM per projection.

    ``gate_up_proj`` is [E, 2, I, H] (gate then up) so that slicing I keeps each gate row with its up row;
    ``down_proj`` is [E, H, I].
    """

    fp8 = False  # products in FP8 (``enable_fp8``)

    def __init__(self, n_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [T, H], weights/indices [T, k] -> sum over the k chosen experts of weight * expert(x): [T, H]."""
        n_tokens, top_k = indices.shape
        order, counts = sort_by_expert(indices, self.gate_up_proj.shape[0])
        h = expert_ffn(expert_rows(x, order, top_k), self.gate_up_proj, self.down_proj, counts, fp8=self.fp8,
                       quantized=self.quantized_weights() if self.fp8 else None)
        return KERNELS.combine(h, order, weights)

    def quantized_weights(self, gate_up: torch.Tensor | None = None, down: torch.Tensor | None = None,
                          sources: tuple[torch.Tensor, ...] | None = None):
        """The cached FP8 copies of (gate_up as [E, 2I, H], down), see ``fp8.cached``. Expert parallelism passes
        its local compute-dtype copies and, as ``sources``, the masters they come from; the module's own weights
        are DTensors there and have no local copies to quantise."""
        if gate_up is None:
            if isinstance(self.gate_up_proj, DTensor):
                return None
            gate_up, down = self.gate_up_proj, self.down_proj
        return fp8.cached(self, sources or (gate_up, down), lambda: quantize_expert_weights(gate_up, down))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        nn.init.normal_(self.down_proj, std=std)


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routed slots per expert (int64, static shape, no host synchronisation)."""
    flat = indices.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_by_expert(indices: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the flattened (token, slot) pairs by expert id, and the count per expert."""
    return indices.flatten().argsort(stable=True), expert_counts(indices, n_experts)


def quantize_expert_weights(gate_up: torch.Tensor, down: torch.Tensor) -> tuple[fp8.QuantizedWeight, ...]:
    """Both expert weights in e4m3 both ways, gate_up [E, 2, I, H] viewed as the product's [E, 2I, H]."""
    n_experts, _, inter, hidden = gate_up.shape
    return (fp8.quantize_weight_fast(gate_up.reshape(n_experts, 2 * inter, hidden)),
            fp8.quantize_weight_fast(down))


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor,
               weights_again=None, fp8: bool = False, quantized=None, rows_again=None) -> torch.Tensor:
    """SwiGLU of rows grouped by expert: x [N, H] sorted by expert, counts [E] rows per expert.

    The backward rebuilds the SwiGLU output from the saved gate/up projections instead of keeping it (an [N, I]
    activation per MoE layer less). ``weights_again``, when given, is called in the backward to rebuild the
    compute-dtype (gate_up, down) instead of keeping the forward's copies alive until then. ``fp8``: the
    forward and input-gradient products in rowwise-scaled FP8 (see ``moonforge.fp8``), with ``quantized``, when
    given, the weights' FP8 copies (``quantize_expert_weights``) instead of quantising them here. ``rows_again``,
    when given, is called in the backward to rebuild ``x`` (gathering it again from the tokens) instead of
    keeping it.

    Rows after the last expert's (``counts`` summing to less than N) are not computed: the output's rows there
    are left as the grouped GEMM leaves them (unwritten), and so are the input gradient's.
    """
    flat = (None,) * 8 if quantized is None else (*quantized[0], *quantized[1])
    return _ExpertFFN.apply(x, gate_up, down, counts, weights_again, rows_again, fp8, *flat)


class _ExpertFFN(torch.autograd.Function):
    """Grouped GEMM -> SwiGLU -> grouped GEMM; the gradients are the products autograd forms for
    ``torch._grouped_mm``."""

    @staticmethod
    def forward(ctx, x, gate_up, down, counts, weights_again, rows_again, use_fp8, q13, s13, q13_t, s13_t, qd, sd,
                qd_t, sd_t):
        n_experts, _, inter, hidden = gate_up.shape
        offs = counts.cumsum(0).to(torch.int32)
        w13 = gate_up.to(x.dtype).reshape(n_experts, 2 * inter, hidden)
        if use_fp8:
            w13_q = (q13, s13) if q13 is not None else fp8.quantize_rows(w13)
            h = fp8.scaled_grouped_mm(*fp8.quantize_rows(x), *w13_q, offs, x.dtype, fast_accum=True)
        else:
            h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
        gate, up = h.split(inter, dim=-1)
        act = KERNELS.swiglu(gate, up)
        if use_fp8:
            down_q = (qd, sd) if qd is not None else fp8.quantize_rows(down.to(x.dtype))
            out = fp8.scaled_grouped_mm(*fp8.quantize_rows(act), *down_q, offs, x.dtype, fast_accum=True)
        else:
            out = torch._grouped_mm(act, down.to(x.dtype).transpose(1, 2), offs=offs)
        ctx.weights_again, ctx.rows_again = weights_again, rows_again
        ctx.use_fp8 = use_fp8
        ctx.quantized_t = q13_t is not None
        ctx.weight_meta = (gate_up.shape, gate_up.dtype, down.dtype)
        transposed = (q13_t, s13_t, qd_t, sd_t) if q13_t is not None else ()
        kept_x = (x,) if rows_again is None else ()
        if weights_again is None:
            ctx.save_for_backward(*kept_x, h, offs, gate_up, down, *transposed)
        else:
            ctx.save_for_backward(*kept_x, h, offs, *transposed)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = list(ctx.saved_tensors)
        transposed = [saved.pop() for _ in range(4)][::-1] if ctx.quantized_t else None
        if ctx.rows_again is not None:
            saved.insert(0, ctx.rows_again())
        if ctx.weights_again is None:
            x, h, offs, gate_up, down = saved
        else:  # the products need no weights when their FP8 copies are at hand
            x, h, offs = saved
            gate_up, down = ctx.weights_again() if transposed is None else (None, None)
        gate_up_shape, gate_up_dtype, down_dtype = ctx.weight_meta
        n_experts, _, inter, hidden = gate_up_shape
        w13 = None if transposed else gate_up.to(x.dtype).reshape(n_experts, 2 * inter, hidden)
        gate, up = h.split(inter, dim=-1)
        act = KERNELS.swiglu(gate, up)
        grad = grad.contiguous()
        # FP8: the weights are quantised along their output dimension, the one these input-gradient products
        # contract; the weight gradients stay bf16 products.
        if ctx.use_fp8:
            down_q = transposed[2:] if transposed else fp8.quantize_rows(down.to(x.dtype).transpose(1, 2))
            d_act = fp8.scaled_grouped_mm(*fp8.quantize_rows(grad), *down_q, offs, grad.dtype)
            d_down = fp8.grouped_weight_grad(grad, act, offs)
        else:
            d_act = torch._grouped_mm(grad, down.to(x.dtype), offs=offs)
            d_down = torch._grouped_mm(grad.transpose(0, 1), act, offs=offs)
        del act
        d_h = KERNELS.swiglu_backward(gate, up, d_act)
        del d_act
        if ctx.use_fp8:
            w13_q = transposed[:2] if transposed else fp8.quantize_rows(w13.transpose(1, 2))
            d_x = fp8.scaled_grouped_mm(*fp8.quantize_rows(d_h), *w13_q, offs, grad.dtype)
            d_gate_up = fp8.grouped_weight_grad(d_h, x, offs)
        else:
            d_x = torch._grouped_mm(d_h, w13, offs=offs)
            d_gate_up = torch._grouped_mm(d_h.transpose(0, 1), x, offs=offs)
        return (d_x, d_gate_up.view(gate_up_shape).to(gate_up_dtype), d_down.to(down_dtype), None, None, None, None,
                *(None,) * 8)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of ``silu(gate) * up`` as one [N, 2I] tensor (gate part, then up part), computed in fp32."""
    g, u, d = gate.float(), up.float(), grad.float()
    sig = torch.sigmoid(g)
    silu = g * sig
    d_gate = d * u * sig * (1 + g * (1 - sig))
    return torch.cat([d_gate, d * silu], dim=-1).to(grad.dtype)


def accumulate(total: torch.Tensor, grad: torch.Tensor) -> None:
    """``total += grad`` for an fp32 gradient and a low-precision one (fused: vectorised loads on GPUs)."""
    total.add_(grad)


def assign(total: torch.Tensor, grad: torch.Tensor) -> None:
    """``total[:] = grad`` (the first gradient of a step, upcast when ``total`` is fp32; fused on GPUs)."""
    total.copy_(grad)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 (fused: vectorised loads on GPUs, where aten's mixed-dtype copy is not)."""
    return x.float()


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes ``order``: ``inverse[order[i]] == i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def expert_rows(x: torch.Tensor, order: torch.Tensor, top_k: int, routed: torch.Tensor | None = None) -> torch.Tensor:
    """``x[order // top_k]``: each token's row once per chosen expert, in expert order (``order`` from
    ``sort_by_expert``). Its backward sums each token's k row gradients by gathering them, in fp32: one fused
    pass without atomics, so deterministic.

    ``routed`` (a 0-d tensor, left on the device): only the first ``routed`` rows go through experts; the
    gradients of the rows after them are ignored, whatever they hold (see ``combine``)."""
    return _ExpertRows.apply(x, order, top_k, routed)


class _ExpertRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, top_k, routed):
        ctx.save_for_backward(order, routed)
        ctx.top_k = top_k
        return x[order // top_k]

    @staticmethod
    def backward(ctx, grad):
        order, routed = ctx.saved_tensors
        return KERNELS.sum_token_rows(grad, inverse_order(order), ctx.top_k, routed), None, None, None


def sum_token_rows(rows: torch.Tensor, inverse: torch.Tensor, top_k: int,
                   routed: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's k rows of ``rows`` (in expert order; ``inverse`` from ``inverse_order``) summed in fp32, rows
    from position ``routed`` on counted as zeros."""
    return _token_slots(rows, inverse, (inverse.numel() // top_k, top_k), routed).float().sum(dim=1).to(rows.dtype)


def combine(h: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
            routed: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over each token's k expert outputs; h [T*k, H] in expert order. Deterministic (no atomics).

    The rows are gathered back into token order inside the weighted sum, never written out in that order: with
    torch.compile the forward and each of the two gradients are one fused pass over ``h``.

    ``routed`` (a 0-d tensor, left on the device): only the first ``routed`` rows of ``h`` are expert outputs;
    the slots sorted after them contribute zero, and their weights get zero gradient, whatever those rows hold.
    Static shapes with no host synchronisation: a grouped GEMM whose offsets end at ``routed`` leaves the rows
    after it unwritten."""
    return _Combine.apply(h, order, weights, routed)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, order, weights, routed):
        # The inverse order is computed again in the backward, not saved: compiled, that backward's reduction
        # measured 4.4 ms per step against 7.8 with the saved one (20 layers on an H100).
        ctx.save_for_backward(h, order, weights, routed)
        unsorted = _token_slots(h, inverse_order(order), weights.shape, routed)
        return (unsorted.float() * weights[..., None]).sum(dim=1).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, order, weights, routed = ctx.saved_tensors
        top_k = weights.shape[1]
        grad = grad.float()
        d_h = (grad[order // top_k] * weights.flatten()[order, None]).to(h.dtype)
        unsorted = _token_slots(h, inverse_order(order), weights.shape, routed)
        d_weights = (unsorted.float() * grad[:, None]).sum(dim=-1).to(weights.dtype)
        return d_h, None, d_weights, None


def _token_slots(h: torch.Tensor, inverse: torch.Tensor, shape, routed: torch.Tensor | None) -> torch.Tensor:
    """``h``'s rows in (token, slot) order as [T, k, H] (``shape`` = (T, k)), rows from position ``routed`` on as
    zeros."""
    unsorted = h[inverse].view(*shape, -1)
    if routed is None:
        return unsorted
    return torch.where((inverse < routed).view(*shape, 1), unsorted, 0)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = GroupedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size)
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts)
                               if c.n_shared_experts else None)
        self.top_k = c.num_experts_per_tok
        self.n_experts = c.n_routed_experts
        # Sequence-wise auxiliary balance loss (DeepSeek-V3's seq_aux); 0 disables it.
        self.aux_loss_coeff = 0.0
        # Gradient scale of the auxiliary loss per summed sequence; the trainer sets it to 1 / sequences per step.
        self.aux_loss_scale = 1.0
        # Ranks holding other parts of the same sequences (context/sequence parallelism); None when whole.
        self.seq_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(tokens)
        out = self.experts(tokens, weights, indices)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        out = out.view(shape)
        if self.aux_loss_coeff > 0 and torch.is_grad_enabled():
            aux = seq_aux_loss(scores.view(shape[0], shape[1], -1), indices.view(shape[0], shape[1], -1),
                               self.n_experts, self.top_k, self.seq_group)
            out = AuxLossGradient.apply(out, aux * (self.aux_loss_coeff * self.aux_loss_scale))
        return out


def seq_aux_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int,
                 group=None) -> torch.Tensor:
    """Sum over sequences of DeepSeek-V3's sequence-wise balance loss  sum_i f_i * P_i  (without alpha).

    scores [B, S, E] (sigmoid scores are normalised per token), indices [B, S, k].
    f_i = E / (k S) * #tokens routed to i;  P_i = mean over tokens of the normalised score of i.
    When ``group`` holds the other parts of the same sequences, f uses the whole sequences' counts and each
    rank returns its share of the P sums, so the shares add up to the loss of the whole sequences.
    """
    bsz, seq, _ = scores.shape
    probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.zeros(bsz, n_experts, device=scores.device, dtype=torch.float32)
    counts.scatter_add_(1, indices.reshape(bsz, -1), torch.ones(bsz, seq * top_k, device=scores.device))
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(counts, group=group)
        seq *= dist.get_world_size(group)
    f = counts * (n_experts / (top_k * seq))
    return (f * probs.sum(dim=1) / seq).sum()


class AuxLossGradient(torch.autograd.Function):
    """Identity on the activations that also back-propagates a unit gradient into an auxiliary loss.

    The auxiliary loss thereby joins the objective without being threaded through the model's outputs, which
    keeps pipeline stages and activation checkpointing unaware of it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


# ---------------------------------------------------------------------------------------------------- blocks
class LayerCache:
    """One layer's keys and values, [B, capacity, heads, dim] on the layer's device, of which the first ``length``
    positions are filled. With no capacity given, each extension concatenates (a copy of all of it per step)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append positions [B, S, heads, dim]; returns all the keys and values so far."""
        end = self.length + k.shape[1]
        if self.capacity is None or end > self.capacity:
            if self.k is not None:
                k, v = torch.cat([self.k[:, :self.length], k], 1), torch.cat([self.v[:, :self.length], v], 1)
            self.k, self.v, self.length = k, v, end
            return k, v
        if self.k is None:
            self.k = k.new_empty(k.shape[0], self.capacity, *k.shape[2:])
            self.v = v.new_empty(v.shape[0], self.capacity, *v.shape[2:])
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        self.length = end
        return self.k[:, :end], self.v[:, :end]


class KVCache:
    """Keys and values of the positions already seen, for generating one token at a time (inference only).

    Rows are independent sequences. Their start may be left padding, marked by a document id that differs from
    the sequence's (0 for padding, 1 for tokens, say): attention never crosses document ids, and positions are
    counted within the document, so padding changes no result. ``keep(rows)`` drops finished sequences.
    The keys are cached after RoPE, as [B, T, heads, 192] and values [B, T, heads, 128]: 10 KB per token, layer
    and row at Moonlight's sizes in bf16. ``capacity`` (prompt plus new tokens) allocates each layer's buffers
    once; a sequence that grows past it is copied on every step.
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.layers: dict[str, LayerCache] = {}
        self.document_ids: torch.Tensor | None = None  # [B, T] of the cached positions

    @property
    def length(self) -> int:
        return 0 if self.document_ids is None else self.document_ids.shape[1]

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache(self.capacity)
        return self.layers[name]

    def keep(self, rows: torch.Tensor | list[int]) -> None:
        """Keep only these rows (indices into the current batch), in this order."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        self.document_ids = self.document_ids[rows.to(self.document_ids.device)]
        for cache in self.layers.values():
            index = rows.to(cache.k.device)
            cache.k, cache.v = cache.k[index], cache.v[index]


def left_padded(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths as one batch for a ``KVCache``'s first forward: tokens [B, S] padded on the
    left with ``pad_id``, and document ids that set the padding apart (0 padding, 1 tokens)."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    documents = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        documents[i, width - len(r):] = 1
    return tokens, documents


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask,
                cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None:  # training: tensor parallelism's input layouts (PrepareModuleInput) expect three inputs
            x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        else:
            x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, blocks and final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # A dict keyed by layer index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_hidden_layers)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class Transformer(nn.Module):
    """Causal LM. ``forward(input_ids)`` returns logits [B, S, V].

    Packed sequences: pass ``document_ids`` [B, S]; tokens never attend across documents and positions restart
    at each document (unless ``position_ids`` are given). A pipeline stage holds a subset of ``model.layers``;
    its ``embed_tokens`` or ``norm``/``lm_head`` may be None, and then it takes or returns hidden states.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.attn_backend = "sdpa"
        # Context parallelism sets this to describe the local share of the sequence; None otherwise.
        self.context_parallel = None

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, S, V]; or, given ``labels``, the fp32 sum of token cross-entropies (the logits of the
        163,840-entry vocabulary are then never held whole).

        ``cache`` (inference): the tokens continue the sequences whose keys and values it holds, and theirs are
        added to it (see ``KVCache``)."""
        m = self.model
        h = m.embed_tokens(tokens) if m.embed_tokens is not None else tokens
        if cache is not None:
            return self._forward_cached(h, position_ids, document_ids, labels, cache)
        if position_ids is None:
            position_ids = (positions_from_documents(document_ids) if document_ids is not None
                            else torch.arange(h.shape[1], device=h.device)[None].expand(h.shape[0], -1))
        if self.context_parallel is not None:
            mask = self.context_parallel.attention_mask(document_ids, self.attn_backend)
        else:
            mask = AttentionMask(document_ids=document_ids, backend=self.attn_backend)
        rope = m.rotary_emb(position_ids)
        for layer in m.layers.values():
            h = layer(h, rope, mask)
        return self._head(h, labels)

    def _forward_cached(self, h, position_ids, document_ids, labels, cache: KVCache) -> torch.Tensor:
        m = self.model
        if torch.is_grad_enabled() or self.context_parallel is not None or m.embed_tokens is None:
            raise ValueError("a KV cache is for inference on the whole model: run under torch.no_grad(), without "
                             "context or pipeline parallelism")
        bsz, seq = h.shape[:2]
        if document_ids is None:
            document_ids = torch.ones(bsz, seq, dtype=torch.long, device=h.device)
        if position_ids is None:
            if cache.length:
                raise ValueError("pass position_ids for tokens that continue cached sequences")
            position_ids = positions_from_documents(document_ids)
        past = cache.length
        keys = document_ids if cache.document_ids is None else torch.cat([cache.document_ids, document_ids], 1)
        mask = AttentionMask(document_ids=document_ids, key_document_ids=keys, backend="sdpa",
                             query_index=torch.arange(past, past + seq, device=h.device),
                             key_index=torch.arange(past + seq, device=h.device))
        rope = m.rotary_emb(position_ids)
        for name, layer in m.layers.items():
            h = layer(h, rope, mask, cache.layer(name))
        cache.document_ids = keys
        return self._head(h, labels)

    def _head(self, h: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        m = self.model
        if m.norm is not None:
            h = m.norm(h)
        if self.lm_head is None:
            return h
        if labels is None:
            return self.lm_head(h)
        weight = self.lm_head.weight
        if type(h) is torch.Tensor and type(weight) in (nn.Parameter, torch.Tensor):  # not tensor-parallel
            return linear_cross_entropy_sum(h, weight, labels)
        return cross_entropy_sum(self.lm_head(h), labels)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Hugging Face's initialisation: normal(0, initializer_range) matrices, unit norms, zero biases.

        Each tensor is drawn from its own generator seeded by (seed, name), so a tensor's initial value does not
        depend on which other tensors a model part holds: pipeline stages and sharded layouts start from exactly
        the weights one process would (see ``initial_tensor``).
        """
        for name, tensor in self.state_dict(keep_vars=True).items():
            tensor.data.copy_(initial_tensor(self, name, tensor.shape, tensor.dtype, tensor.device, seed))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after building on the meta device and materialising)."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_parameters()
            elif isinstance(module, Router):
                module.tokens_per_expert.zero_()

    def routers(self) -> dict[int, Router]:
        return {int(i): layer.mlp.gate for i, layer in self.model.layers.items() if isinstance(layer.mlp, MoE)}


@torch.no_grad()
def initial_tensor(model: nn.Module, name: str, shape, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """The initial value of state-dict entry ``name`` (global shape), independent of the model's layout."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(owner, RMSNorm):
        return torch.ones(shape, dtype=dtype, device=device)
    if leaf == "bias" or leaf == "e_score_correction_bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    generator = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, model.config.initializer_range, generator=generator)
    return out.to(dtype)


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its document, for rows of consecutive document ids [B, S]."""
    seq = document_ids.shape[1]
    idx = torch.arange(seq, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 8192) -> torch.Tensor:
    """Sum of token cross-entropies in fp32, ignoring IGNORE_INDEX; the logits are upcast chunk by chunk."""
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], chunk_tokens):
        chunk = logits[start:start + chunk_tokens].float()
        total = total + F.cross_entropy(chunk, labels[start:start + chunk_tokens], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             chunk_tokens: int = 4096) -> torch.Tensor:
    """``cross_entropy_sum(h @ weight.T, labels)`` computed chunk by chunk, with the gradients of each chunk
    formed right away, so neither the logits nor their fp32 softmax are ever stored for the whole batch."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk_tokens)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = None
        chunk_loss = _fused(_ce_chunk, h, dynamic=False)
        starts = range(0, h.shape[0], chunk)
        for start in starts:
            h_c, y = h[start:start + chunk], labels[start:start + chunk]
            loss, g = chunk_loss(h_c @ weight.t(), y, need_grad)
            total += loss
            if need_grad:
                torch.mm(g, weight, out=grad_h[start:start + chunk])
                # One chunk: its product is the gradient, in the weight's dtype. Several: summed in fp32.
                grad_w = g.t() @ h_c if len(starts) == 1 else _add_product_fp32(grad_w, g.t(), h_c)
        if need_grad and grad_w is None:  # no tokens
            grad_w = torch.zeros_like(weight)
        if need_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = _fused(_scale, grad_h)
        return scale(grad_h, grad_out, grad_h.dtype), scale(grad_w, grad_out, ctx.weight_dtype), None, None


def _scale(x: torch.Tensor, factor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x * factor`` in fp32, then ``dtype``: one pass, the factor never rounded to x's low precision."""
    return (x.float() * factor.float()).to(dtype)


def _add_product_fp32(total: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``total + a @ b`` in fp32 (``a @ b`` when ``total`` is None). On a GPU the low-precision product is written
    in fp32 and added in the GEMM's epilogue (in place): no rounded product, upcast copy or separate addition,
    which for the 163,840 x 2048 head are passes over 0.7 to 1.3 GB each."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        if total is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    product = (a @ b).float()
    return product if total is None else total.add_(product)


def _ce_chunk(logits: torch.Tensor, y: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Summed cross-entropy of one chunk and d(loss)/d(logits) = softmax - onehot (zero on ignored tokens)."""
    logits32 = logits.float()
    valid = y != IGNORE_INDEX
    target = y.clamp(min=0)
    lse = torch.logsumexp(logits32, dim=-1)
    loss = ((lse - logits32.gather(1, target[:, None]).squeeze(1)) * valid).sum()
    if not need_grad:
        return loss, None
    onehot = torch.nn.functional.one_hot(target, logits.shape[-1]).to(logits32.dtype)
    grad = (torch.exp(logits32 - lse[:, None]) - onehot) * valid[:, None]
    return loss, grad.to(logits.dtype)


def _fused(fn, t: torch.Tensor, dynamic: bool | None = None):
    """``fn`` compiled (once per function and setting) when ``t`` is on a GPU; as written elsewhere."""
    return _compiled(fn, dynamic) if t.is_cuda else fn


@functools.cache
def _compiled(fn, dynamic: bool | None):
    return torch.compile(fn, dynamic=dynamic, fullgraph=True)


KERNEL_NAMES = ("rms_norm", "swiglu", "apply_rope", "combine", "accumulate", "assign", "upcast", "swiglu_backward",
                "sum_token_rows")


class _Kernels:
    """The element-wise pieces of the model (``KERNEL_NAMES``), in one place so that ``compile_kernels`` can swap
    in compiled (fused) versions on GPUs; matrix products and attention stay library kernels either way."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        for name in KERNEL_NAMES:
            setattr(self, name, globals()[name])


KERNELS = _Kernels()


def compile_kernels() -> None:
    """Fuse the element-wise islands (norms, RoPE, SwiGLU, the weighted expert combine, mixed-precision gradient
    accumulation) with torch.compile."""
    for name in KERNEL_NAMES:
        # Shapes that vary become dynamic; a graph break would split the fusion, so it is an error instead.
        setattr(KERNELS, name, torch.compile(globals()[name], fullgraph=True))


def compile_blocks(model: Transformer, backend: str = "inductor") -> None:
    """torch.compile every decoder block's forward as a whole: one fused graph (a few where it has to break)
    instead of hundreds of separately launched operations per block and direction, which is what keeps the host
    behind the GPU at Moonlight's sizes.

    Blocks of one kind share their compiled graphs (parameters are graph inputs); a block is one graph, except
    around expert-parallel dispatch, which runs eagerly. Recomputation re-runs the same compiled forward (with
    routing counts paused: a second graph). Each block's ``forward`` is replaced in place; parameter names do not
    change. FP8 weight copies are made or checked eagerly before each call (``fp8.prepare``); the graph reads them.
    """
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for block in model.model.layers.values():
        block.forward = _prepare_fp8_then(block, torch.compile(block.forward, backend=backend, dynamic=False))


def _prepare_fp8_then(block: nn.Module, compiled):
    fp8_capable = [m for m in block.modules() if isinstance(m, (Linear, GroupedExperts))]

    @functools.wraps(compiled)
    def forward(*args, **kwargs):
        fp8.prepare(fp8_capable)
        return compiled(*args, **kwargs)
    return forward


def enable_fp8(model: nn.Module, cache_weights: bool = False) -> list[str]:
    """Run the products of the attention and feed-forward projections and of the routed experts in FP8
    (``moonforge.fp8``); returns the names of the modules switched. The LM head, the embedding and the router
    stay in their precision, as do products whose dimensions FP8 cannot take (not multiples of 16). Call before
    tensor parallelism (FP8 products take whole weights). ``cache_weights``: in training, quantise each weight
    once per optimizer step (``fp8.cached``; two bytes per switched parameter until ``fp8.release_cached``),
    not at every use."""
    switched = []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and fp8.supported_shape(*module.weight.shape):
            module.fp8 = True
        elif isinstance(module, GroupedExperts) and fp8.supported_shape(*module.down_proj.shape[1:]):
            module.fp8 = True
        else:
            continue
        module.fp8_cache_weights = cache_weights
        switched.append(name)
    return switched


def build_model(config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                seed: int | None = 0) -> Transformer:
    """A randomly initialised model (HF's initialisation); router bias stays fp32 whatever ``dtype``."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights(seed if seed is not None else 0)
    return cast_model(model, dtype)


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast parameters to ``dtype``, keeping the router's correction bias and counters in fp32."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model
