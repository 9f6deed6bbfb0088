"""Model configuration: read from a Hugging Face ``config.json`` (DeepSeek-V2/V3 family) or from a preset.

The field names are the Hugging Face ones, so a user who knows Moonlight's ``config.json`` knows this class.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")


class ConfigError(ValueError):
    """A model or training configuration is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V3-style model (MLA attention, fine-grained MoE with shared experts)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 163840
    hidden_size: int = 2048
    intermediate_size: int = 11264
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int | None = 64
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.446
    norm_topk_prob: bool = True
    rope_theta: float = 50000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    attention_bias: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    pad_token_id: int | None = None
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    num_nextn_predict_layers: int = 0
    # Keys of the source config.json that this class does not model; written back unchanged on export.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ derived quantities
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_a_layernorm_eps(self) -> float:
        # The reference implementation builds kv_a_layernorm (and q_a_layernorm) with the RMSNorm default.
        return 1e-6

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace and (
            layer_idx % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def softmax_scale(self) -> float:
        """Attention softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale = scale * m * m
        return scale

    # ------------------------------------------------------------------ parameter and FLOP counts
    def _attention_params(self) -> int:
        h, nh = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = h * nh * self.qk_head_dim
        else:
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * self.qk_head_dim
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
        o = nh * self.v_head_dim * h
        bias = (self.q_lora_rank or 0) + self.kv_lora_rank + self.qk_rope_head_dim + h if self.attention_bias else 0
        return q + kv + o + bias

    def _mlp_params(self, inter: int) -> int:
        return 3 * self.hidden_size * inter

    def param_counts(self) -> dict[str, int]:
        """Exact parameter counts: total, embedding, lm_head, and activated non-embedding per token."""
        h = self.hidden_size
        embed = self.vocab_size * h
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total_layers = active_layers = 0
        for i in range(self.num_hidden_layers):
            common = self._attention_params() + 2 * h  # attention + two norms
            if self.is_moe_layer(i):
                expert = self._mlp_params(self.moe_intermediate_size)
                shared = self._mlp_params(self.moe_intermediate_size * (self.n_shared_experts or 0))
                router = self.n_routed_experts * h
                total_layers += common + router + shared + self.n_routed_experts * expert
                active_layers += common + router + shared + self.num_experts_per_tok * expert
            else:
                dense = self._mlp_params(self.intermediate_size)
                total_layers += common + dense
                active_layers += common + dense
        final_norm = h
        return {
            "total": embed + lm_head + total_layers + final_norm,
            "embedding": embed,
            "lm_head": lm_head,
            "non_embedding": total_layers + final_norm,
            "active_non_embedding": active_layers + final_norm,
        }

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the formula every throughput number uses.

        6 x (activated non-embedding parameters + lm_head parameters)
        + 3 x layers x heads x seq_len x (qk_head_dim + v_head_dim)   (causal attention)
        """
        counts = self.param_counts()
        lm_head = counts["lm_head"] or counts["embedding"]
        dense = 6 * (counts["active_non_embedding"] + lm_head)
        attn = 3 * self.num_hidden_layers * self.num_attention_heads * seq_len * (self.qk_head_dim + self.v_head_dim)
        return float(dense + attn)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config") -> "ModelConfig":
        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{source}: field '{key}' {msg}")

        if self.model_type not in SUPPORTED_MODEL_TYPES:
            fail("model_type", f"is {self.model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                fail(key, f"must be a positive integer, got {value!r}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", f"must be null or a positive integer, got {self.q_lora_rank!r}")
        if self.hidden_act != "silu":
            fail("hidden_act", f"is {self.hidden_act!r}; only 'silu' (SwiGLU) is supported")
        if self.num_key_value_heads != self.num_attention_heads:
            fail("num_key_value_heads", f"is {self.num_key_value_heads} but MLA needs it equal to num_attention_heads "
                 f"({self.num_attention_heads})")
        if self.n_routed_experts:
            if self.scoring_func not in SCORING_FUNCS:
                fail("scoring_func", f"is {self.scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")
            if self.topk_method not in TOPK_METHODS:
                fail("topk_method", f"is {self.topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
            if not self.moe_intermediate_size or self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", f"must be a positive integer, got {self.moe_intermediate_size!r}")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                fail("num_experts_per_tok", f"is {self.num_experts_per_tok}; must be in 1..n_routed_experts "
                     f"({self.n_routed_experts})")
            if self.n_group < 1 or self.n_routed_experts % self.n_group:
                fail("n_group", f"is {self.n_group}; n_routed_experts ({self.n_routed_experts}) must divide into it")
            if not 1 <= self.topk_group <= self.n_group:
                fail("topk_group", f"is {self.topk_group}; must be in 1..n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if self.num_experts_per_tok > self.topk_group * per_group:
                fail("num_experts_per_tok", f"is {self.num_experts_per_tok} but only topk_group x experts per group = "
                     f"{self.topk_group * per_group} experts are eligible")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                fail("n_group", "noaux_tc scores groups by their top-2 experts, so each group needs at least 2")
            if self.moe_layer_freq < 1:
                fail("moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
            if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
                fail("first_k_dense_replace", f"is {self.first_k_dense_replace}; must be in 0..num_hidden_layers "
                     f"({self.num_hidden_layers})")
        if self.rope_scaling:
            if self.rope_type not in ("yarn", "default"):
                fail("rope_scaling", f"type {self.rope_type!r} is not supported; use 'yarn' or none")
            if self.rope_type == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        fail("rope_scaling", f"of type yarn needs '{key}'")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < self.vocab_size + 2:
                fail(key, f"is {value}, outside the vocabulary (vocab_size {self.vocab_size})")
        return self

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        if "model_type" not in data:
            raise ConfigError(f"{source}: field 'model_type' is missing; expected one of {SUPPORTED_MODEL_TYPES}")
        if data["model_type"] not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"{source}: field 'model_type' is {data['model_type']!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            else:
                extra[key] = value
        # transformers 5 writes rope settings as rope_parameters = {rope_theta, rope_type, ...}.
        rope_params = extra.pop("rope_parameters", None)
        if rope_params:
            kwargs.setdefault("rope_theta", rope_params.get("rope_theta", cls.rope_theta))
            rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
            if rope_type != "default" and not kwargs.get("rope_scaling"):
                kwargs["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if kwargs.get("rope_scaling"):
            scaling = dict(kwargs["rope_scaling"])
            if "type" in scaling and "rope_type" not in scaling:
                scaling["rope_type"] = scaling.pop("type")
            kwargs["rope_scaling"] = scaling
        if data["model_type"] == "deepseek_v2":
            # DeepSeek-V2 configs predate noaux_tc and sigmoid scoring; fill their defaults.
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
        for key in ("n_group", "topk_group"):
            if kwargs.get(key) is None:
                kwargs[key] = 1
        extra = {k: v for k, v in extra.items() if k not in _DROPPED_HF_KEYS}
        return cls(**kwargs, extra=extra).validate(source)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: not found; a model directory needs a Hugging Face config.json")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_hf_dict(data, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' native DeepseekV3/V2 classes load (no remote code)."""
        arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        out: dict[str, Any] = {"architectures": [arch]}
        out.update({k: v for k, v in self.extra.items() if k not in ("architectures", "auto_map")})
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out.setdefault("torch_dtype", "bfloat16")
        return dict(sorted(out.items()))

    def save(self, path: str | Path) -> None:
        from moonforge.utils import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_hf_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes).validate()


# Keys transformers derives or that belong to remote code; they are not carried into exports.
_DROPPED_HF_KEYS = {"auto_map", "transformers_version", "_name_or_path", "dtype", "head_dim", "qk_head_dim",
                    "rope_interleave", "num_local_experts", "use_cache", "pretraining_tp", "ep_size",
                    "attention_dropout", "output_router_logits"}


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _moonlight_16b_a3b() -> ModelConfig:
    return ModelConfig()


def _tiny() -> ModelConfig:
    # Same structure as Moonlight (no q-LoRA, sigmoid noaux_tc router, one dense layer, shared experts),
    # small enough for CPU tests and the demo.
    return ModelConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=192,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        bos_token_id=3840,
        eos_token_id=3842,
    )


PRESETS = {"moonlight-16b-a3b": _moonlight_16b_a3b, "tiny": _tiny}


def preset(name: str) -> ModelConfig:
    """A named architecture: ``moonlight-16b-a3b`` (the real config) or ``tiny`` (CPU tests and demo)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]().validate(f"preset {name}")
