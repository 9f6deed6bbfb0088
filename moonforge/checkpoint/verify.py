"""``moonforge verify``: transformers' model and moonforge's on the same tokens, compared logit by logit.

    moonforge verify --hf Moonlight-16B-A3B-Instruct --ckpt ckpt/moonlight [--dtype fp32] [--tokens 128]

Prints the max and mean absolute logit difference, the cosine similarity and the top-1 agreement, and exits 1
when any is beyond tolerance (defaults depend on the dtype; each can be overridden).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moonforge.checkpoint.cli import user_errors

logger = logging.getLogger(__name__)

# (max |diff|, min cosine, min top-1 agreement) per compute dtype. Half-precision runs of two implementations
# differ by rounding in every layer, so only agreement-type checks make sense there.
DEFAULT_TOLERANCES = {
    torch.float32: (1e-4, 0.99999, 0.99),
    torch.bfloat16: (None, 0.99, 0.90),
    torch.float16: (None, 0.995, 0.90),
}


@dataclass
class Comparison:
    max_abs_diff: float
    mean_abs_diff: float
    cosine: float
    min_token_cosine: float
    top1_agreement: float
    tokens: int

    def failures(self, max_abs: float | None, min_cosine: float, min_top1: float) -> list[str]:
        out = []
        if max_abs is not None and self.max_abs_diff > max_abs:
            out.append(f"max |diff| {self.max_abs_diff:.3e} > {max_abs:.1e}")
        if self.cosine < min_cosine:
            out.append(f"cosine {self.cosine:.6f} < {min_cosine}")
        if self.top1_agreement < min_top1:
            out.append(f"top-1 agreement {self.top1_agreement:.4f} < {min_top1}")
        return out


def compare_logits(reference: torch.Tensor, ours: torch.Tensor) -> Comparison:
    """Statistics of two logit tensors [B, S, V] (computed in fp64)."""
    a, b = reference.double().flatten(0, -2), ours.double().flatten(0, -2)
    diff = (a - b).abs()
    per_token = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    overall = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    return Comparison(max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(), cosine=overall.item(),
                      min_token_cosine=per_token.min().item(),
                      top1_agreement=(a.argmax(-1) == b.argmax(-1)).float().mean().item(), tokens=a.shape[0])


def run_models(hf_dir: Path, ckpt: Path, dtype: torch.dtype, tokens: int, batch: int, seed: int) -> Comparison:
    import transformers

    import moonforge
    from moonforge.loading import is_hf_directory

    if not is_hf_directory(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: not a Hugging Face model directory (config.json + *.safetensors)")
    ours = moonforge.load_model(ckpt, dtype=dtype)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    vocab = min(ours.config.vocab_size, reference.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids)
    return compare_logits(want, got)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("verify", help="compare moonforge's logits with transformers' on the same tokens")
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (the reference, run by transformers)")
    parser.add_argument("--ckpt", required=True, help="moonforge checkpoint or HF directory (run by moonforge)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="compute dtype of both models (default fp32)")
    parser.add_argument("--tokens", type=int, default=64, help="sequence length of the random input (default 64)")
    parser.add_argument("--batch", type=int, default=2, help="sequences (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--max-abs", type=float, default=None, help="largest allowed |logit difference|")
    parser.add_argument("--min-cosine", type=float, default=None, help="smallest allowed cosine similarity")
    parser.add_argument("--min-top1", type=float, default=None, help="smallest allowed top-1 agreement")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    parser.set_defaults(func=run)


@user_errors
def run(args: argparse.Namespace) -> int:
    from moonforge.utils import parse_dtype

    dtype = parse_dtype(args.dtype)
    max_abs, min_cosine, min_top1 = DEFAULT_TOLERANCES[dtype]
    max_abs = args.max_abs if args.max_abs is not None else max_abs
    min_cosine = args.min_cosine if args.min_cosine is not None else min_cosine
    min_top1 = args.min_top1 if args.min_top1 is not None else min_top1
    result = run_models(Path(args.hf), Path(args.ckpt), dtype, args.tokens, args.batch, args.seed)
    failures = result.failures(max_abs, min_cosine, min_top1)
    print(f"tokens {result.tokens}  dtype {args.dtype}\n"
          f"max |diff|   {result.max_abs_diff:.3e}\n"
          f"mean |diff|  {result.mean_abs_diff:.3e}\n"
          f"cosine       {result.cosine:.7f} (lowest per token {result.min_token_cosine:.7f})\n"
          f"top-1 agree  {result.top1_agreement:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(result), "dtype": args.dtype, "failures": failures},
                                              indent=2) + "\n")
    if failures:
        print("FAIL: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("OK: within tolerance")
    return 0
