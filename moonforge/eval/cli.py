"""``moonforge eval``: lm-evaluation-harness tasks on a Hugging Face directory or a moonforge checkpoint.

    moonforge eval --model CKPT --tasks cmmlu,ceval-valid --data-dir DATA [--num-fewshot 5] [--output out.json]

Several GPUs: ``torchrun --nproc-per-node N -m moonforge.cli eval ...`` splits the requests across ranks;
``--device-map auto`` instead spreads one model over all visible GPUs of one process.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate with lm-evaluation-harness (CMMLU, C-Eval, any lm-eval task)")
    parser.add_argument("--model", required=True,
                        help="Hugging Face model directory or moonforge checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--tasks", default="cmmlu,ceval-valid",
                        help="comma-separated lm-eval tasks or groups (default: cmmlu,ceval-valid)")
    parser.add_argument("--data-dir", default=None,
                        help="local task data: DIR/cmmlu/{dev,test}/<subject>.csv and "
                             "DIR/ceval/{dev,val}/<subject>_{dev,val}.csv")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="few-shot examples per question (default: the task's, 0 for cmmlu and ceval-valid)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    parser.add_argument("--limit", type=_limit, default=None,
                        help="questions per task (an integer), or a fraction of each task below 1; for quick checks")
    parser.add_argument("--output", default=None,
                        help="results JSON file (lm-eval's format); the table is written next to it as .md")
    parser.add_argument("--log-samples", action="store_true",
                        help="also write every request and response next to --output (.samples.jsonl)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32")
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else cpu")
    parser.add_argument("--device-map", default=None,
                        help="'auto': spread the layers of one model over all visible GPUs (a model too big for "
                             "one GPU); or a comma-separated device list")
    parser.add_argument("--max-length", type=int, default=None,
                        help="longest input in tokens (default: the config's max_position_embeddings)")
    parser.add_argument("--max-gen-toks", type=int, default=256, help="generation limit when a task sets none")
    parser.add_argument("--no-kv-cache", action="store_true",
                        help="generate by recomputing every sequence for each new token (slow; the reference the "
                             "KV cache is checked against)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="wrap prompts in the tokenizer's chat template (for chat-tuned models)")
    parser.set_defaults(func=run)


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--limit must be positive, got {text}")
    return value if value < 1 else int(value)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("moonforge eval needs lm-evaluation-harness: pip install 'moonforge[eval]'", file=sys.stderr)
        return 2
    from moonforge.checkpoint.hf import CheckpointError
    from moonforge.config import ConfigError
    from moonforge.eval.run import format_table, prepared_tasks, run_tasks, write_results, write_samples
    from moonforge.eval.tasks import EvalDataError
    from moonforge.tokenizer import TokenizerError

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        print("moonforge eval: --tasks is empty", file=sys.stderr)
        return 2
    if args.log_samples and not args.output:
        print("moonforge eval: --log-samples needs --output (the samples go next to it)", file=sys.stderr)
        return 2
    if not getattr(args, "verbose", False):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its per-task INFO lines drown the progress bar
    start = time.time()
    try:
        with prepared_tasks(tasks, args.data_dir) as plan:  # data errors surface before the model loads
            from moonforge.eval.lm import MoonforgeLM

            lm = MoonforgeLM(pretrained=args.model, tokenizer=args.tokenizer, batch_size=args.batch_size,
                             max_length=args.max_length, max_gen_toks=args.max_gen_toks, dtype=args.dtype,
                             device=args.device, device_map=args.device_map, kv_cache=not args.no_kv_cache)
            results = run_tasks(lm, plan, num_fewshot=args.num_fewshot, limit=args.limit,
                                log_samples=args.log_samples, apply_chat_template=args.apply_chat_template)
    except (EvalDataError, CheckpointError, ConfigError, TokenizerError, FileNotFoundError) as e:
        print(f"moonforge eval: {e}", file=sys.stderr)
        return 2
    finally:
        _leave_process_group()
    if results is None:  # not rank 0
        return 0
    table = format_table(results)
    print(table)
    if args.output:
        json_path, table_path = write_results(results, args.output)
        logger.info("wrote %s and %s", json_path, table_path)
        if args.log_samples:
            samples = write_samples(results, json_path.with_suffix(".samples.jsonl"))
            logger.info("wrote %s", samples)
    logger.info("evaluation finished in %.1f s", time.time() - start)
    return 0


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
