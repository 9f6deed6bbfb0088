"""``moonforge convert``: Hugging Face <-> moonforge checkpoints.

    moonforge convert hf-to-native --hf Moonlight-16B-A3B-Instruct --out ckpt/moonlight [--dtype bf16]
                                   [--tp 1 --pp 1 --etp 1 --ep 8 --pp0-layers N]
    moonforge convert native-to-hf --ckpt ckpt/moonlight --out Moonlight-hf [--dtype bf16] [--iteration N]
                                   [--max-shard-size 5GB]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert between Hugging Face and moonforge checkpoints")
    csub = parser.add_subparsers(dest="convert_command", metavar="ACTION", required=True)

    h2n = csub.add_parser("hf-to-native", help="HF safetensors directory -> moonforge (DCP) checkpoint")
    h2n.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + *.safetensors)")
    h2n.add_argument("--out", required=True, help="checkpoint directory to create")
    h2n.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="weight dtype (default: as stored); the router bias is always fp32")
    add_layout_arguments(h2n, "checked against the model and recorded in meta.json")
    h2n.add_argument("--force", action="store_true", help="replace --out if it exists")
    h2n.set_defaults(func=run_hf_to_native)

    n2h = csub.add_parser("native-to-hf", help="moonforge checkpoint -> HF safetensors directory")
    n2h.add_argument("--ckpt", required=True, help="moonforge checkpoint (root or an iter_* directory)")
    n2h.add_argument("--out", required=True, help="Hugging Face directory to create")
    n2h.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="weight dtype (default: as stored); e_score_correction_bias stays fp32")
    n2h.add_argument("--iteration", type=int, default=None, help="iteration to export (default: latest)")
    n2h.add_argument("--max-shard-size", default="5GB", type=_size,
                     help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    n2h.add_argument("--tokenizer", default=None,
                     help="take tokenizer files from this directory instead of the checkpoint's")
    n2h.add_argument("--no-verify", action="store_true", help="skip the CRC-32 check of the checkpoint files")
    n2h.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_layout_arguments(n2h, "checked against the model (the seed's converter takes them in both directions)")
    n2h.set_defaults(func=run_native_to_hf)


def add_layout_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    group = parser.add_argument_group(
        "parallel layout", f"the seed's layout arguments: {what}; the files do not depend on them (any layout "
        "loads any checkpoint)")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--etp", type=int, default=1, help="expert tensor parallel size")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size")
    group.add_argument("--pp0-layers", type=int, default=None,
                       help="layers of the first pipeline stage (the seed's MP_PP0_LAYERS; needs PP > 1)")


def _size(text: str) -> int:
    from moonforge.checkpoint.convert import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _layout(args: argparse.Namespace):
    from moonforge.checkpoint.convert import Layout

    return Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, pp0_layers=args.pp0_layers)


def user_errors(func):
    """Report bad input (a wrong path, layout or checkpoint) as one clear line and exit status 1."""
    def wrapper(args: argparse.Namespace) -> int:
        from moonforge.checkpoint.hf import CheckpointError
        from moonforge.config import ConfigError
        from moonforge.tokenizer import TokenizerError

        try:
            return func(args)
        except (CheckpointError, ConfigError, TokenizerError, FileExistsError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapper


@user_errors
def run_hf_to_native(args: argparse.Namespace) -> int:
    from moonforge.checkpoint.convert import hf_to_native
    from moonforge.utils import parse_dtype

    dtype = parse_dtype(args.dtype) if args.dtype else None
    hf_to_native(Path(args.hf), Path(args.out), dtype=dtype, layout=_layout(args), force=args.force)
    return 0


@user_errors
def run_native_to_hf(args: argparse.Namespace) -> int:
    from moonforge.checkpoint.convert import native_to_hf
    from moonforge.utils import parse_dtype

    dtype = parse_dtype(args.dtype) if args.dtype else None
    native_to_hf(Path(args.ckpt), Path(args.out), dtype=dtype, iteration=args.iteration,
                 max_shard_bytes=args.max_shard_size, tokenizer_src=args.tokenizer, force=args.force,
                 verify=not args.no_verify, layout=_layout(args))
    return 0
