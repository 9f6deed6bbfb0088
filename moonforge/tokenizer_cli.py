"""``moonforge tokenizer train``: a small BPE with Moonlight's pattern, written in Moonlight's file format."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("tokenizer", help="train a Moonlight-format tokenizer")
    tsub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = tsub.add_parser("train", help="train a byte-level BPE with Moonlight's pre-tokenizer pattern")
    train.add_argument("--input", nargs="+", required=True, help="text files, or JSON/JSONL records")
    train.add_argument("--out", required=True, help="output directory (tiktoken.model, tokenizer_config.json)")
    train.add_argument("--vocab-size", type=int, default=4096,
                       help="model vocabulary: BPE ranks + 256 special ids (default 4096, the tiny preset's)")
    train.add_argument("--json-key", default="text")
    train.add_argument("--max-chars", type=int, default=None, help="stop reading after this many characters")
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from moonforge.tokenizer import load_tokenizer, train_moonlight_tokenizer

    out = train_moonlight_tokenizer(args.input, args.out, args.vocab_size, args.json_key, args.max_chars)
    tok = load_tokenizer(out)
    logger.info("wrote %s: %d BPE tokens + %d special ids (model vocab_size %d)", out, tok.n_bpe,
                tok.n_vocab - tok.n_bpe, args.vocab_size)
    return 0
