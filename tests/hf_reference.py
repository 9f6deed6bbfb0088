"""Tiny random Hugging Face reference models (transformers' own classes and save_pretrained) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_COMMON = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_shared_experts=2, first_k_dense_replace=1, max_position_embeddings=512,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)

REFERENCE_CONFIGS = {
    # Moonlight: no q-LoRA, sigmoid + noaux_tc, one group, normalised top-k, scaling 2.446.
    "moonlight": dict(model_type="deepseek_v3", q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
                      scoring_func="sigmoid", topk_method="noaux_tc", rope_theta=50000.0),
    # DeepSeek-V3: q-LoRA, grouped routing (4 groups, 2 kept).
    "deepseek_v3": dict(model_type="deepseek_v3", q_lora_rank=24, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                        scoring_func="sigmoid", topk_method="noaux_tc", rope_theta=10000.0),
    # DeepSeek-V2-Lite: softmax + greedy, YaRN.
    "deepseek_v2_lite": dict(model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
                             n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                             scoring_func="softmax", topk_method="greedy", rope_theta=10000.0,
                             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                           "mscale_all_dim": 0.707}),
}


def make_hf_model(kind: str, out_dir: Path, seed: int = 0, dtype=torch.float32):
    """Build a random transformers model of the given kind, save it with save_pretrained, return it."""
    import transformers

    spec = dict(TINY_COMMON, **REFERENCE_CONFIGS[kind])
    model_type = spec.pop("model_type")
    if model_type == "deepseek_v3":
        cfg = transformers.DeepseekV3Config(**spec)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg = transformers.DeepseekV2Config(**spec)
        cls = transformers.DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)  # non-trivial norm weights
    model.save_pretrained(out_dir)
    return model
