"""Logit parity with transformers on the GPU, in fp32 and bf16, for the three reference tiny configurations.

    python benchmarks/gpu_parity.py --out parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moonforge  # noqa: E402
from tests.hf_reference import REFERENCE_CONFIGS, make_hf_model  # noqa: E402


def compare(kind: str, dtype: torch.dtype, device: str) -> dict:
    tmp = Path(tempfile.mkdtemp())
    make_hf_model(kind, tmp)
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    ours = moonforge.load_model(tmp, dtype=dtype, device=device)
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (4, 128), device=device)
    with torch.no_grad():
        want = ref(ids).logits.float()
        got = ours(ids).float()
    diff = (got - want).abs()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    return {"kind": kind, "dtype": str(dtype), "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "logit_scale": want.abs().mean().item(), "cosine": cos,
            "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = "cuda"
    results = [compare(kind, dtype, device) for kind in REFERENCE_CONFIGS
               for dtype in (torch.float32, torch.bfloat16)]
    record = {"benchmark": "gpu_parity", "date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(),
              "torch_version": torch.__version__, "results": results,
              "tolerance": {"float32": "max abs < 1e-4 (TF32 off)", "bfloat16": "cosine > 0.999, top-1 > 0.95"}}
    Path(args.out).write_text(json.dumps(record, indent=2))
    for r in results:
        print(f"{r['kind']:18} {r['dtype']:15} max {r['max_abs_diff']:.2e} mean {r['mean_abs_diff']:.2e} "
              f"cos {r['cosine']:.6f} top1 {r['top1_agreement']:.3f}")


if __name__ == "__main__":
    main()
