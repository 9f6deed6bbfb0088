"""``moonforge demo``: the seed's whole Moonlight workflow on a tiny model, on the CPU, in a few minutes."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run the whole workflow on a tiny model (CPU, a few minutes)")
    parser.add_argument("--workdir", default="demo-work", help="where every file of the demo goes")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moonforge.config import preset
    from moonforge.model import build_model, cross_entropy_sum
    from moonforge.tokenizer import load_tokenizer, train_moonlight_tokenizer

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    corpus = work / "corpus.txt"
    corpus.write_text(_demo_text(), encoding="utf-8")
    tok_dir = train_moonlight_tokenizer([corpus], work / "tokenizer", vocab_size=preset("tiny").vocab_size)
    tokenizer = load_tokenizer(tok_dir)
    logger.info("step 1: tokenizer in Moonlight's format at %s (%d BPE tokens)", tok_dir, tokenizer.n_bpe)
    model = build_model(preset("tiny"), seed=0)
    ids = torch.tensor([tokenizer.encode(corpus.read_text(encoding="utf-8"))[:257]])
    with torch.no_grad():
        loss = cross_entropy_sum(model(ids[:, :-1]), ids[:, 1:]) / (ids.shape[1] - 1)
    logger.info("step 2: tiny Moonlight-architecture model, initial loss %.3f", loss.item())
    logger.info("demo finished in %.1f s; files in %s", time.time() - start, work)
    return 0


def _demo_text() -> str:
    colors = ["red", "green", "blue", "yellow", "black", "white"]
    things = ["apple", "leaf", "sky", "sun", "night", "snow"]
    return "\n".join(f"The {t} is {c}." for c, t in zip(colors, things)) * 50
