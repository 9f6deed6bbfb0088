"""HF -> moonforge -> HF conversion against transformers' own checkpoints, and the seed's converter script."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moonforge
from moonforge.checkpoint.convert import Layout, hf_to_native, native_to_hf, parse_size
from moonforge.checkpoint.dcp import read_metadata
from moonforge.checkpoint.hf import CheckpointError
from moonforge.config import ConfigError, preset
from tests.hf_reference import make_hf_model

REPO = Path(__file__).resolve().parents[1]
SEED_SCRIPT = REPO / "examples" / "moonlight" / "hf2mcore_moonlight_convertor.sh"


def hf_tensors(directory: Path) -> dict[str, tuple[torch.dtype, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a directory's safetensors files."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def make_moonlight_like(out: Path, tokenizer_dir: Path | None = None, max_shard_size: str | None = None):
    """transformers' tiny Moonlight in bf16, stored like Moonlight's release: router bias fp32, several shards."""
    model = make_hf_model("moonlight", out, dtype=torch.bfloat16)
    if max_shard_size:
        model.save_pretrained(out, max_shard_size=max_shard_size)
        (out / "model.safetensors").unlink(missing_ok=True)
    for file in out.glob("*.safetensors"):
        tensors = load_file(file)
        tensors = {k: v.float() if k.endswith("e_score_correction_bias") else v for k, v in tensors.items()}
        save_file(tensors, file, metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return model


def make_tiny_preset(out: Path):
    """transformers' DeepseekV3 built from moonforge's `tiny` preset (Moonlight's structure, 4096 vocabulary)."""
    import transformers

    cfg = {k: v for k, v in preset("tiny").to_hf_dict().items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(3)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**cfg)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    model.save_pretrained(out)
    return model


def assert_roundtrip(src: Path, exported: Path) -> None:
    want, got = hf_tensors(src), hf_tensors(exported)
    assert sorted(got) == sorted(want)
    for name, (dtype, shape, raw) in want.items():
        assert got[name][0] == dtype and got[name][1] == shape, name
        assert got[name][2] == raw, f"{name}: bytes differ"
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(want)
    assert index["metadata"]["total_size"] == sum(len(raw) for _, _, raw in want.values())
    if (src / "model.safetensors.index.json").exists():
        src_index = json.loads((src / "model.safetensors.index.json").read_text())
        assert sorted(src_index["weight_map"]) == sorted(index["weight_map"])
    for file in set(index["weight_map"].values()):
        assert (exported / file).is_file()


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["moonlight", "tiny", "deepseek_v3", "deepseek_v2_lite"])
def test_hf_native_hf_roundtrip_is_bitwise(kind, tmp_path, tokenizer_dir):
    import transformers

    src = tmp_path / "src"
    if kind == "moonlight":
        make_moonlight_like(src, tokenizer_dir, max_shard_size="200KB")
    elif kind == "tiny":
        make_tiny_preset(src)
    else:
        make_hf_model(kind, src)
    hf_to_native(src, tmp_path / "native")
    native_to_hf(tmp_path / "native", tmp_path / "export", max_shard_bytes=300_000)
    assert_roundtrip(src, tmp_path / "export")

    load = transformers.AutoModelForCausalLM.from_pretrained
    reference = load(src, dtype=torch.float32).eval()
    exported = load(tmp_path / "export", dtype=torch.float32).eval()
    ours = moonforge.load_model(tmp_path / "native", dtype=torch.float32)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    want = logits(reference, ids)
    assert torch.equal(logits(exported, ids), want)
    diff = (logits(ours, ids) - want).abs().max().item()
    assert diff < 1e-5, diff


def test_native_layout_and_stock_dcp_load(tmp_path, tokenizer_dir):
    """The converted directory has the agreed layout and loads with torch's own DCP reader."""
    import torch.distributed.checkpoint as dcp

    make_moonlight_like(tmp_path / "hf", tokenizer_dir)
    hf_to_native(tmp_path / "hf", tmp_path / "native", dtype=torch.bfloat16, layout=Layout(ep=8))
    root = tmp_path / "native"
    assert json.loads((root / "moonforge.json").read_text()) == {"format": "moonforge", "version": 1}
    assert (root / "latest").read_text().strip() == "iter_0000000"
    for name in ("config.json", "tiktoken.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (root / name).is_file(), name
    meta = json.loads((root / "iter_0000000" / "meta.json").read_text())
    assert meta["iteration"] == 0 and meta["consumed_tokens"] == 0
    assert meta["layout"] == {"tp": 1, "pp": 1, "ep": 8, "etp": 1, "pp0_layers": None}
    assert set(meta["files"]) == {p.name for p in (root / "iter_0000000").iterdir()} - {"meta.json"}

    metadata = read_metadata(root / "iter_0000000")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert metadata.state_dict_metadata[bias].properties.dtype == torch.float32
    assert metadata.state_dict_metadata["model.layers.1.mlp.experts.gate_up_proj"].size == torch.Size([8, 2, 32, 64])

    ckpt = moonforge.checkpoint.hf.HFCheckpoint(tmp_path / "hf")
    state = {name: torch.empty(md.size, dtype=md.properties.dtype)
             for name, md in metadata.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=root / "iter_0000000", no_dist=True)
    for name, tensor in state.items():
        assert torch.equal(tensor, ckpt.read(name)), name


def test_dtype_conversion_keeps_router_bias_fp32(tmp_path):
    make_hf_model("moonlight", tmp_path / "hf")  # fp32 source, bias fp32
    hf_to_native(tmp_path / "hf", tmp_path / "native", dtype=torch.bfloat16)
    stored = read_metadata(tmp_path / "native" / "iter_0000000").state_dict_metadata
    for name, md in stored.items():
        expect = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        assert md.properties.dtype == expect, name
    native_to_hf(tmp_path / "native", tmp_path / "fp16", dtype=torch.float16)
    for name, (dtype, _, _) in hf_tensors(tmp_path / "fp16").items():
        assert dtype == (torch.float32 if name.endswith("e_score_correction_bias") else torch.float16), name
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["torch_dtype"] == "float16"


def test_shards_respect_max_size(tmp_path):
    make_hf_model("moonlight", tmp_path / "hf")
    hf_to_native(tmp_path / "hf", tmp_path / "native")
    native_to_hf(tmp_path / "native", tmp_path / "out", max_shard_bytes=parse_size("150KB"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    largest = max(d[2].__len__() for d in hf_tensors(tmp_path / "hf").values())
    for file in files:
        assert (tmp_path / "out" / file).stat().st_size <= max(150_000, largest) + 20_000
    assert parse_size("5GB") == 5_000_000_000 and parse_size("1GiB") == 2**30 and parse_size(1234) == 1234


def test_layout_validation(tmp_path):
    make_tiny_preset(tmp_path / "hf")  # 4 layers, 4 heads, 8 experts
    for layout, message in ((Layout(tp=3), "TP=3 must divide num_attention_heads=4"),
                            (Layout(ep=3), "EP=3 must divide n_routed_experts=8"),
                            (Layout(pp=3), "do not split evenly over PP=3"),
                            (Layout(pp0_layers=2), "needs PP > 1")):
        with pytest.raises(ConfigError, match=message):
            hf_to_native(tmp_path / "hf", tmp_path / "bad", layout=layout)
        assert not (tmp_path / "bad").exists()
    hf_to_native(tmp_path / "hf", tmp_path / "ok", layout=Layout(tp=2, pp=3, ep=4, pp0_layers=2))
    meta = json.loads((tmp_path / "ok" / "iter_0000000" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "pp": 3, "ep": 4, "etp": 1, "pp0_layers": 2}


def test_bad_inputs_name_the_problem(tmp_path):
    make_hf_model("moonlight", tmp_path / "hf")
    with pytest.raises(CheckpointError, match="not a moonforge checkpoint"):
        native_to_hf(tmp_path / "hf", tmp_path / "out")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj"):
        hf_to_native(tmp_path / "hf", tmp_path / "native")
    assert not (tmp_path / "native").exists() and not (tmp_path / "native.partial").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    make_hf_model("moonlight", tmp_path / "hf2")
    with pytest.raises(FileExistsError, match="--force"):
        hf_to_native(tmp_path / "hf2", tmp_path / "taken")


def test_export_of_a_training_checkpoint(tmp_path):
    """A trainer's checkpoint (fp32 weights plus optimizer state) exports to bf16 HF that transformers loads."""
    import transformers

    from moonforge.checkpoint.native import CheckpointManager, OptimizerState, write_checkpoint_skeleton
    from moonforge.model import build_model

    config = preset("tiny")
    model = build_model(config, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    write_checkpoint_skeleton(tmp_path / "run", config, None)
    CheckpointManager(tmp_path / "run").save(
        5, {"model": model, "optimizer": OptimizerState(model, optimizer)}, {"consumed_tokens": 10})
    native_to_hf(tmp_path / "run", tmp_path / "hf", dtype=torch.bfloat16)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    bf16_model = moonforge.load_model(tmp_path / "hf", dtype=torch.float32)
    assert (logits(exported, ids) - logits(bf16_model, ids)).abs().max().item() < 1e-5
    # bf16 rounding of the weights only: the logits stay aligned with the fp32 training weights' logits.
    cosine = torch.nn.functional.cosine_similarity(logits(bf16_model, ids).flatten(), logits(model, ids).flatten(), dim=0)
    assert cosine > 0.999


# ---------------------------------------------------------------------------------------------------- the seed's script
def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", str(SEED_SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_seed_converter_command_lines(tmp_path, tokenizer_dir):
    """The seed's two converter calls (hf2mcore, then mg2hf) on the tiny preset, and rejected layouts."""
    src = tmp_path / "Moonlight-16B-A3B-Instruct"
    make_tiny_preset(src)
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (src / name).write_bytes((tokenizer_dir / name).read_bytes())
    mcore = tmp_path / "Moonlight-16B-A3B-Instruct-to-mcore-tp1-pp1-etp1-ep8"
    done = run_script("A3B", str(src), str(mcore), "1", "1", "1", "8", "bf16", "false")
    assert done.returncode == 0, done.stderr
    assert json.loads((mcore / "iter_0000000" / "meta.json").read_text())["layout"]["ep"] == 8

    hf = tmp_path / "Moonlight-16B-A3B-Instruct-mcore-to-hf"
    done = run_script("A3B", str(mcore), str(hf), "1", "1", "1", "8", "bf16", "true", str(src))
    assert done.returncode == 0, done.stderr
    assert sorted(hf_tensors(hf)) == sorted(hf_tensors(src))
    assert (hf / "tokenizer.json").is_file()

    bad = tmp_path / "bad"
    for args, env, reason in (
            (("A3B", str(src), str(bad), "3", "1", "1", "8", "bf16", "false"), None, "TP=3 must divide"),
            (("A3B", str(src), str(bad), "1", "1", "1", "8", "bf16", "false"), {"MP_PP0_LAYERS": "2"}, "PP > 1"),
            (("A37B", str(src), str(bad), "1", "1", "1", "8", "bf16", "false"), None, "only A3B"),
            (("A3B", str(src), str(bad), "1", "1", "1", "8", "int8", "false"), None, "PR is 'int8'"),
            (("A3B", str(src), str(bad), "1", "1", "1", "8"), None, "expected 9 or 10 arguments")):
        done = run_script(*args, env=env)
        assert done.returncode != 0 and reason in done.stderr, (args, done.stderr)
        assert not bad.exists()
