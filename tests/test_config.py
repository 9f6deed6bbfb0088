import json

import pytest
import torch

from moonforge.config import ConfigError, ModelConfig, preset
from moonforge.model import Transformer


def test_moonlight_preset_counts_and_flops():
    config = preset("moonlight-16b-a3b")
    with torch.device("meta"):
        model = Transformer(config)
    assert sum(p.numel() for p in model.parameters()) == 15_960_108_544
    counts = config.param_counts()
    assert counts["total"] == 15_960_108_544
    assert counts["active_non_embedding"] == 2_243_685_888
    assert round(config.flops_per_token(4096) / 1e9, 2) == 17.17


def test_tiny_preset_has_moonlight_structure():
    tiny, real = preset("tiny"), preset("moonlight-16b-a3b")
    for key in ("q_lora_rank", "scoring_func", "topk_method", "first_k_dense_replace", "n_shared_experts",
                "norm_topk_prob", "routed_scaling_factor"):
        assert getattr(tiny, key) == getattr(real, key)


def test_unknown_model_type_names_the_field(tmp_path):
    data = preset("tiny").to_hf_dict()
    data["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_json(tmp_path)


@pytest.mark.parametrize("key,value,field", [
    ("n_group", 3, "n_group"),              # 8 experts do not split into 3 groups
    ("topk_group", 4, "topk_group"),        # more groups kept than exist
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("num_key_value_heads", 2, "num_key_value_heads"),
    ("scoring_func", "relu", "scoring_func"),
])
def test_inconsistent_dimensions_name_the_field(tmp_path, key, value, field):
    data = preset("tiny").to_hf_dict()
    data[key] = value
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_json(tmp_path)


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n "model_type": "deepseek_v3",\n oops\n}')
    with pytest.raises(ConfigError, match=r"config.json:3"):
        ModelConfig.from_json(tmp_path)


def test_hf_round_trip_of_config():
    config = preset("moonlight-16b-a3b")
    again = ModelConfig.from_hf_dict(json.loads(json.dumps(config.to_hf_dict())))
    assert again == config


def test_yarn_softmax_scale_uses_mscale_all_dim():
    config = preset("tiny").replace(rope_scaling={"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                                  "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096})
    import math
    m = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert config.softmax_scale() == pytest.approx(config.qk_head_dim ** -0.5 * m * m)
