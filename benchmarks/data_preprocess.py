"""Pretraining preprocessing throughput: `moonforge data pretrain` against Megatron-LM's preprocess_data.py loop.

The reference ("megatron_reference") is Megatron-LM tools/preprocess_data.py's processing loop reproduced
faithfully: ``multiprocessing.Pool(workers).imap(encode, json_lines, 32)``, each worker ``json.loads`` + tokenize
+ EOD, the main process ``IndexedDatasetBuilder.add_document`` per document. Both use the same tokenizer (a
Moonlight-format BPE trained on the corpus unless --tokenizer is given) and must write identical bytes.
Runs alternate between the two implementations; the median wall time of each (pool start-up and finalize
included, Python imports excluded) is recorded.

    python benchmarks/data_preprocess.py                      # writes benchmarks/results/data_preprocess.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = [ROOT.parent / "shared" / "data" / "pretrain" / "clue_small_zh.jsonl",
                  ROOT.parent / "shared" / "data" / "pretrain" / "c4_demo_en.jsonl"]


class _ReferenceEncoder:
    """Megatron-LM's Encoder (tools/preprocess_data.py) for whole documents, with our tokenizer."""

    def __init__(self, tokenizer_dir: str, key: str):
        self.tokenizer_dir, self.key = tokenizer_dir, key

    def initializer(self):
        from moonforge.tokenizer import load_tokenizer

        _ReferenceEncoder.tokenizer = load_tokenizer(self.tokenizer_dir)

    def encode(self, json_line):
        data = json.loads(json_line)
        ids = _ReferenceEncoder.tokenizer.encode(data[self.key])
        lens = [len(ids)] if ids else []
        if ids:
            ids.append(_ReferenceEncoder.tokenizer.eod_id)
            lens[-1] += 1
        return {self.key: ids}, {self.key: lens}, len(json_line)


def megatron_reference(input_path: str, tokenizer_dir: str, output_prefix: str, workers: int, key: str = "text"):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from moonforge.tokenizer import load_tokenizer

    encoder = _ReferenceEncoder(tokenizer_dir, key)
    tokenizer = load_tokenizer(tokenizer_dir)
    with open(input_path, encoding="utf-8") as fin, multiprocessing.Pool(workers, initializer=encoder.initializer) \
            as pool:
        encoded = pool.imap(encoder.encode, fin, 32)
        builder = IndexedDatasetBuilder(f"{output_prefix}_{key}_document.bin",
                                        dtype=DType.optimal_dtype(tokenizer.n_vocab))
        documents = tokens = 0
        for doc, lens, _ in encoded:
            builder.add_document(doc[key], lens[key])
            documents += 1
            tokens += len(doc[key])
        builder.finalize(f"{output_prefix}_{key}_document.idx")
    return documents, tokens


def moonforge_run(input_path: str, tokenizer_dir: str, output_prefix: str, workers: int):
    from moonforge.data.preprocess import preprocess_pretrain

    summary = preprocess_pretrain([input_path], tokenizer_dir, output_prefix, append_eod=True, workers=workers,
                                  progress=False)
    return summary.documents, summary.tokens


def machine(load_at_start: list[float]) -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import megatron.core
    import tiktoken
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "megatron_core": getattr(megatron.core, "__version__", "unknown"), "tiktoken": tiktoken.__version__,
            "load_average_1_5_15min": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]}}


def commit() -> str:
    """MOONFORGE_COMMIT when set (a copied working tree may carry a stale .git), else the checkout's HEAD.
    The one commit lookup of all benchmarks."""
    if os.environ.get("MOONFORGE_COMMIT"):
        return os.environ["MOONFORGE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", default=[str(p) for p in DEFAULT_CORPUS])
    parser.add_argument("--repeat-corpus", type=int, default=5, help="concatenate the corpus this many times")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train a 4096-entry one)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per implementation and worker count")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_preprocess.json"))
    args = parser.parse_args(argv)

    import logging

    from moonforge.tokenizer import load_tokenizer, train_moonlight_tokenizer
    from moonforge.utils import atomic_write_text

    logging.basicConfig(level=logging.WARNING)
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other work on the machine skews the timings
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = args.tokenizer or str(train_moonlight_tokenizer(args.corpus, tmp / "tokenizer", 4096))
        corpus = tmp / "corpus.jsonl"
        with open(corpus, "wb") as out:
            for _ in range(args.repeat_corpus):
                for path in args.corpus:
                    out.write(Path(path).read_bytes())
        size = corpus.stat().st_size
        results = []
        for workers in args.workers:
            times = {"megatron_reference": [], "moonforge": []}
            counts = {}
            for run in range(args.runs):
                for name, fn in (("megatron_reference", megatron_reference), ("moonforge", moonforge_run)):
                    prefix = tmp / f"{name}_{workers}_{run}"
                    start = time.perf_counter()
                    counts[name] = fn(str(corpus), tokenizer_dir, str(prefix), workers)
                    times[name].append(time.perf_counter() - start)
            for suffix in (".bin", ".idx"):
                a = (tmp / f"megatron_reference_{workers}_0_text_document{suffix}").read_bytes()
                b = (tmp / f"moonforge_{workers}_0_text_document{suffix}").read_bytes()
                if a != b:
                    raise SystemExit(f"outputs differ ({suffix}) with {workers} workers")
            for name, ts in times.items():
                seconds = statistics.median(ts)
                documents, tokens = counts[name]
                results.append({"implementation": name, "workers": workers, "seconds_median": round(seconds, 4),
                                "seconds_all": [round(t, 4) for t in ts], "documents_per_s": round(documents / seconds, 1),
                                "mb_per_s": round(size / seconds / 2**20, 3), "tokens_per_s": round(tokens / seconds),
                                "documents": documents, "tokens": tokens})
            ref, ours = results[-2], results[-1]
            print(f"workers={workers}: megatron_reference {ref['mb_per_s']} MB/s, {ref['documents_per_s']} docs/s; "
                  f"moonforge {ours['mb_per_s']} MB/s, {ours['documents_per_s']} docs/s "
                  f"({ours['mb_per_s'] / ref['mb_per_s']:.2f}x)")
        tokenizer = load_tokenizer(tokenizer_dir)
        record = {
            "benchmark": "pretraining preprocessing throughput (JSONL -> Megatron .bin/.idx)",
            "commit": commit(), "machine": machine(load_at_start),
            "config": {"corpus": [Path(p).name for p in args.corpus], "repeat_corpus": args.repeat_corpus,
                       "bytes": size, "tokenizer_vocab": tokenizer.n_vocab, "append_eod": True, "json_key": "text",
                       "runs": args.runs, "outputs_identical": True},
            "results": results,
            "speedup_vs_megatron_reference": {str(w): round(
                next(r for r in results if r["implementation"] == "moonforge" and r["workers"] == w)["mb_per_s"] /
                next(r for r in results if r["implementation"] == "megatron_reference" and r["workers"] == w)["mb_per_s"],
                3) for w in args.workers},
        }
    atomic_write_text(Path(args.out), json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
