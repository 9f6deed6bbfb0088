"""GPU attention kernels for packed documents: flash varlen (``attention_backend: varlen``) and FlexAttention
(``flex``). The plain causal case uses SDPA (cuDNN first on Hopper: qk 192 / v 128)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def cu_seqlens(document_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative sequence starts of every document of every row, flattened (int32), ending with B*S."""
    bsz, seq = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    idx = torch.nonzero(starts.flatten(), as_tuple=True)[0]
    return torch.cat([idx, idx.new_tensor([bsz * seq])]).to(torch.int32)


def varlen_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    """q, k, v: [B, H, S, D]; causal within documents. Flash needs v's dim equal to qk's: v is zero-padded."""
    from torch.nn.attention.varlen import varlen_attn

    bsz, heads, seq, dq = q.shape
    dv = v.shape[-1]
    flat = lambda t: t.transpose(1, 2).reshape(bsz * seq, heads, t.shape[-1])  # noqa: E731
    v = F.pad(v, (0, dq - dv)) if dv < dq else v
    cu = mask.cu_seqlens()
    out = varlen_attn(flat(q), flat(k), flat(v), cu, cu, seq, seq, scale=scale, window_size=(-1, 0))
    return out[..., :dv].reshape(bsz, seq, heads, dv).transpose(1, 2)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    return _compiled_flex()(q, k, v, block_mask=mask.block_mask(q.shape[2], k.shape[2], q.device), scale=scale)


def build_block_mask(mask, q_len: int, k_len: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    qi = mask.query_index if mask.query_index is not None else torch.arange(q_len, device=device)
    ki = mask.key_index if mask.key_index is not None else torch.arange(k_len, device=device)
    qd = mask.document_ids
    kd = mask.key_document_ids if mask.key_document_ids is not None else qd

    def mask_mod(b, h, q, kv):
        allowed = ki[kv] <= qi[q]
        if qd is not None:
            allowed = allowed & (qd[b, q] == kd[b, kv])
        return allowed

    bsz = qd.shape[0] if qd is not None else 1
    return create_block_mask(mask_mod, bsz, None, q_len, k_len, device=device)
