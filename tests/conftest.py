"""Shared fixtures: a Moonlight-format tokenizer trained once per session on the shared real text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MOONFORGE_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
DATA = SHARED / "data"


def shared_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not found: {path}")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A 4096-entry Moonlight-format tokenizer (3840 BPE ranks + 256 specials), as the tiny preset expects."""
    from moonforge.tokenizer import train_moonlight_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    files = [shared_data("pretrain", "clue_small_zh.jsonl"), shared_data("pretrain", "c4_demo_en.jsonl")]
    return train_moonlight_tokenizer(files, out, vocab_size=4096)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from moonforge.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(params=[False, True], ids=["eager", "compiled"])
def kernels(request):
    """moonforge's element-wise kernels as written, then compiled (``compile_kernels``); reset afterwards."""
    from moonforge.model import KERNELS, compile_kernels

    if request.param:
        compile_kernels()
    yield
    KERNELS.reset()
