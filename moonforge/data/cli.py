"""``moonforge data pretrain`` and ``moonforge data sft``: build training data files."""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="build pretraining and SFT data files (Megatron .bin/.idx)")
    dsub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    pre = dsub.add_parser("pretrain", help="JSONL/JSON text records -> PREFIX_<key>_document.{bin,idx}",
                          description="Tokenize text records into Megatron indexed datasets, the files Megatron-LM's "
                                      "tools/preprocess_data.py writes.")
    pre.add_argument("--input", nargs="+", required=True, help="JSONL or JSON-array files; globs allowed")
    pre.add_argument("--tokenizer", required=True, help="tokenizer directory (tiktoken.model or tokenizer.json)")
    pre.add_argument("--output-prefix", required=True, help="writes PREFIX_<key>_document.bin/.idx per key")
    pre.add_argument("--json-keys", nargs="+", default=["text"], help="record keys to tokenize (default: text)")
    pre.add_argument("--append-eod", action="store_true",
                     help="append the tokenizer's end-of-document token ([EOS] for Moonlight) to each document")
    pre.add_argument("--special-tokens", choices=["parse", "text"], default="parse",
                     help="special-token text such as <|im_end|> inside documents: 'parse' as the special token "
                          "(Moonlight's tokenizer and Pai do; default) or 'text' to encode it as plain text")
    _common(pre)
    pre.set_defaults(func=run_pretrain)

    sft = dsub.add_parser("sft", help="alpaca/messages/ShareGPT records -> SFT idxmap (tokens + loss masks)",
                          description="Render SFT records with the tokenizer's chat template and write tokens and "
                                      "loss masks (assistant content only) as Megatron indexed datasets.")
    sft.add_argument("--input", nargs="+", required=True, help="JSON-array or JSONL files; globs allowed")
    sft.add_argument("--tokenizer", required=True, help="tokenizer directory with a chat template")
    sft.add_argument("--seq-len", type=int, required=True, help="tokens per training row")
    sft.add_argument("--output-prefix", required=True, help="writes PREFIX_text_document.* (see docs/data.md)")
    sft.add_argument("--packing", action="store_true",
                     help="pack consecutive samples into one row while they fit; samples stay separate documents")
    sft.add_argument("--format", dest="fmt", choices=["auto", "alpaca", "messages", "sharegpt"], default="auto",
                     help="record format (default: detected per record)")
    sft.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                     help="samples longer than --seq-len: truncate (default) or drop; both are counted")
    _common(sft)
    sft.set_defaults(func=run_sft)


def _common(parser: argparse.ArgumentParser) -> None:
    from moonforge.data.records import DEFAULT_MAX_LINE_BYTES

    parser.add_argument("--workers", type=int, default=1,
                        help="tokenizer processes (0: tokenize in this process); default 1")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip unusable records, count them by reason and report them (default: stop at the "
                             "first with file:line and the reason)")
    parser.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                        help=f"longest accepted JSONL line (default {DEFAULT_MAX_LINE_BYTES})")
    parser.add_argument("--summary-json", default=None, help="also write the run's summary to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_pretrain(args: argparse.Namespace) -> int:
    from moonforge.data.preprocess import preprocess_pretrain

    return _run(args, lambda: preprocess_pretrain(
        args.input, args.tokenizer, args.output_prefix, json_keys=args.json_keys, append_eod=args.append_eod,
        workers=args.workers, skip_bad_lines=args.skip_bad_lines, parse_special_tokens=args.special_tokens == "parse",
        max_line_bytes=args.max_line_bytes, progress=not args.no_progress))


def run_sft(args: argparse.Namespace) -> int:
    from moonforge.data.sft import build_sft_idxmap

    return _run(args, lambda: build_sft_idxmap(
        args.input, args.tokenizer, args.output_prefix, args.seq_len, packing=args.packing, fmt=args.fmt,
        overlong=args.overlong, workers=args.workers, skip_bad_lines=args.skip_bad_lines,
        max_line_bytes=args.max_line_bytes, progress=not args.no_progress))


def _run(args: argparse.Namespace, build) -> int:
    from moonforge.data.pool import terminate_as_exit
    from moonforge.data.records import DataError
    from moonforge.tokenizer import TokenizerError
    from moonforge.utils import atomic_write_text

    # megatron-core announces its training features on import; they are noise for data commands.
    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    try:
        with terminate_as_exit():
            summary = build()
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary.log()
    if args.summary_json:
        atomic_write_text(args.summary_json, json.dumps(summary.as_dict(), indent=2, ensure_ascii=False) + "\n")
    return 0
