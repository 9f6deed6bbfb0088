"""Public loading API: ``load_model`` and ``load_tokenizer`` from a Hugging Face or moonforge directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moonforge.checkpoint.hf import HFCheckpoint, expected_native_shapes
from moonforge.config import ModelConfig
from moonforge.model import Transformer
from moonforge.utils import parse_dtype

logger = logging.getLogger(__name__)


def is_hf_directory(path: Path) -> bool:
    path = Path(path)
    return (path / "config.json").exists() and (
        (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors")))


def load_model(path: str | Path, dtype: str | torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a model for inference from a Hugging Face directory or a moonforge checkpoint.

    Calling the result on ``input_ids`` [B, S] returns logits [B, S, V]. Missing, unexpected or mis-shaped tensors
    raise ``CheckpointError`` listing them; nothing is ever left randomly initialised.
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    if is_hf_directory(path):
        model = _load_hf(path, dtype, torch.device(device))
    else:
        from moonforge.checkpoint.native import is_native_checkpoint, load_native_model

        if not is_native_checkpoint(path):
            raise FileNotFoundError(
                f"{path}: neither a Hugging Face model directory (config.json + *.safetensors) nor a moonforge "
                "checkpoint (moonforge.json + config.json + iter_* directories)")
        model = load_native_model(path, dtype=dtype, device=torch.device(device))
    model.eval()
    return model


def _load_hf(path: Path, dtype: torch.dtype, device: torch.device) -> Transformer:
    config = ModelConfig.from_json(path)
    with torch.device("meta"):
        model = Transformer(config)
    ckpt = HFCheckpoint(path)
    ckpt.check_against(expected_native_shapes(model), ignore_layers_from=config.num_hidden_layers)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            target_dtype = torch.float32 if name.endswith("e_score_correction_bias") else dtype
            tensor.data = ckpt.read(name).to(device=device, dtype=target_dtype)
    ckpt.close()
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    return model


def load_tokenizer(path: str | Path):
    """Moonlight's tiktoken tokenizer (tiktoken.model + tokenizer_config.json) or a tokenizer.json one."""
    from moonforge.tokenizer import load_tokenizer as _load

    return _load(path)
