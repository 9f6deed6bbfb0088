"""Context parallelism: each CP rank holds two chunks of every sequence (chunk r and chunk 2*CP-1-r, which
balances causal attention work) and attends to the whole sequence by all-gathering MLA's compressed KV latent
(kv_lora_rank + rope dims per token: ~9x smaller than the per-head keys and values).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moonforge.model import AttentionMask, Transformer
from moonforge.parallel.comm import all_gather


def chunk_indices(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global token indices held by CP rank ``rank``: chunks ``rank`` and ``2*cp-1-rank`` of 2*cp."""
    size = seq_len // (2 * cp)
    idx = torch.arange(seq_len, device=device).view(2 * cp, size)
    return torch.cat([idx[rank], idx[2 * cp - 1 - rank]])


def shard_sequence(t: torch.Tensor | None, cp: int, rank: int) -> torch.Tensor | None:
    """This rank's tokens of [B, S] (or [B, S, ...]) tensors."""
    if t is None or cp == 1:
        return t
    return t.index_select(1, chunk_indices(t.shape[1], cp, rank, t.device))


class ContextParallel:
    """Installed on the model and its MLA layers by ``apply_context_parallel``."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def attention_mask(self, document_ids: torch.Tensor | None, backend: str) -> AttentionMask:
        local = document_ids
        if local is None:
            raise ValueError("context parallelism needs document ids (the trainer always passes them)")
        seq = local.shape[1] * self.cp
        device = local.device
        query_index = chunk_indices(seq, self.cp, self.rank, device)
        key_index = torch.cat([chunk_indices(seq, self.cp, r, device) for r in range(self.cp)])
        gathered = [torch.empty_like(local) for _ in range(self.cp)]
        dist.all_gather(gathered, local.contiguous(), group=self.group)
        return AttentionMask(document_ids=local, key_document_ids=torch.cat(gathered, dim=1),
                             query_index=query_index, key_index=key_index, backend=backend)

    def gather_latent(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latent = torch.cat([c_kv, k_pe], dim=-1)
        full = all_gather(latent, self.group, dim=1)
        return full.split([c_kv.shape[-1], k_pe.shape[-1]], dim=-1)


def apply_context_parallel(part: Transformer, group: dist.ProcessGroup) -> None:
    cp = ContextParallel(group)
    part.context_parallel = cp
    for block in part.model.layers.values():
        block.self_attn.latent_hooks.insert(0, cp.gather_latent)
