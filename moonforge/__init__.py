"""moonforge: continued pre-training, fine-tuning, conversion and evaluation of Moonlight-16B-A3B and other
DeepSeek-V3-architecture models on PyTorch."""

from moonforge.config import ModelConfig, preset
from moonforge.loading import load_model, load_tokenizer
from moonforge.model import Transformer, build_model

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "build_model", "load_model", "load_tokenizer", "preset"]
