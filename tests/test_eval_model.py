"""moonforge's lm-eval model class against independent references.

- Acceptance: on the real CMMLU and C-Eval files, ``MoonforgeLM`` on a moonforge checkpoint and lm-eval's own
  ``hf`` backend (transformers) on its Hugging Face export give identical per-subject accuracies and per-request
  loglikelihoods within 1e-4, 0-shot and 5-shot.
- Loglikelihoods against a hand computation (including left truncation and empty contexts), rolling
  loglikelihoods and greedy generation against the ``hf`` backend, batching and layer placement invariance.
- The seed's evaluation step end to end (convert to HF, ``moonforge eval`` on cmmlu,ceval-valid), and a
  two-process torchrun run (marked slow) against a single-process one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from moonforge.cli import main as moonforge_main
from moonforge.config import preset
from moonforge.eval.lm import MoonforgeLM
from moonforge.eval.placement import split_layers, to_device
from moonforge.eval.run import evaluate, format_table
from moonforge.model import AttentionMask, build_model
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
LL_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory):
    """(moonforge checkpoint, its Hugging Face export) of a tiny random model.

    The initialisation scale is raised so that answer choices differ clearly in likelihood: accuracies then
    compare real decisions rather than near-ties.
    """
    from moonforge.checkpoint.native import CheckpointManager, write_checkpoint_skeleton

    root = tmp_path_factory.mktemp("eval_model")
    model = build_model(preset("tiny").replace(initializer_range=0.1), seed=0)
    ckpt, hf_dir = root / "ckpt", root / "hf"
    write_checkpoint_skeleton(ckpt, model.config, tokenizer_dir)
    CheckpointManager(ckpt).save(0, {"model": model}, meta={})
    assert moonforge_main(["convert", "native-to-hf", "--ckpt", str(ckpt), "--out", str(hf_dir)]) == 0
    return ckpt, hf_dir


@pytest.fixture(scope="module")
def ours(exported):
    return MoonforgeLM(exported[0], batch_size=8)


@pytest.fixture(scope="module")
def reference(exported):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(exported[1]), dtype=torch.float32, device="cpu", batch_size=8)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


# ---------------------------------------------------------------------------------------------------- acceptance
@pytest.mark.parametrize("num_fewshot, limit", [(0, 3), (5, 2)])
def test_same_accuracies_and_loglikelihoods_as_hf_backend(ours, reference, num_fewshot, limit):
    data = shared_data()
    kwargs = dict(num_fewshot=num_fewshot, limit=limit, log_samples=True)
    got = evaluate(ours, ["cmmlu", "ceval-valid"], data, **kwargs)
    want = evaluate(reference, ["cmmlu", "ceval-valid"], data, **kwargs)

    subjects = got["group_subtasks"]["cmmlu"] + got["group_subtasks"]["ceval-valid"]
    assert len(subjects) == 24
    worst, compared = 0.0, 0
    for task in subjects:
        for metric in ("acc,none", "acc_norm,none"):
            assert got["results"][task][metric] == want["results"][task][metric], (task, metric)
        reference_samples = {s["doc_id"]: s for s in want["samples"][task]}
        assert len(got["samples"][task]) == limit
        for sample in got["samples"][task]:
            other = reference_samples[sample["doc_id"]]
            assert sample["arguments"] == other["arguments"]
            for (ll, greedy), (ll_ref, greedy_ref) in zip((r[0] for r in sample["resps"]),
                                                           (r[0] for r in other["resps"])):
                worst = max(worst, abs(ll - ll_ref))
                assert greedy == greedy_ref
                compared += 1
    assert compared == 24 * limit * 4
    print(f"{num_fewshot}-shot: {compared} requests, max |loglikelihood difference| {worst:.2e}")
    assert worst < LL_TOLERANCE
    for group in ("cmmlu", "ceval-valid"):
        assert got["results"][group]["acc,none"] == pytest.approx(want["results"][group]["acc,none"])
    # The decisions are not all alike, so equal accuracies are informative.
    assert len({got["results"][t]["acc,none"] for t in subjects}) > 1


# ---------------------------------------------------------------------------------------------------- units
def _hand_loglikelihood(model, tokens: list[int], n_cont: int, max_length: int) -> tuple[float, bool]:
    tokens = tokens[-(max_length + 1):]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0].double()
    logprobs = F.log_softmax(logits[-n_cont:], dim=-1)
    target = torch.tensor(tokens[-n_cont:])
    return float(logprobs[torch.arange(n_cont), target].sum()), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_matches_hand_computation(exported, tokenizer):
    model = MoonforgeLM(exported[0], batch_size=3, max_length=40)
    long_context = "以下是关于逻辑学的单项选择题。" * 8
    cases = [("论证的三重功能不包括\n答案：", " B"), ("The sky is", " blue today"), ("", "答案"),
             (long_context, " C"), ("trailing space ", "moved")]
    results = model.loglikelihood(_requests("loglikelihood", cases), disable_tqdm=True)
    bos = tokenizer.bos_id
    for (context, continuation), (ll, greedy) in zip(cases, results):
        if context:
            stripped = context.rstrip()
            continuation = context[len(stripped):] + continuation
            whole = tokenizer.encode(stripped + continuation)
            n_cont = len(whole) - len(tokenizer.encode(stripped))
        else:
            whole = [bos] + tokenizer.encode(continuation)
            n_cont = len(whole) - 1
        want = _hand_loglikelihood(model.model, whole, n_cont, max_length=40)
        assert ll == pytest.approx(want[0], abs=1e-4)
        assert greedy == want[1]
    assert len(tokenizer.encode(long_context)) > 40  # the truncation case is exercised


def test_batching_does_not_change_results(exported):
    cases = [("问题" * n, c) for n in range(1, 7) for c in (" A", " B", " 选项C")]
    one = MoonforgeLM(exported[0], batch_size=1).loglikelihood(_requests("loglikelihood", cases), True)
    many = MoonforgeLM(exported[0], batch_size=5).loglikelihood(_requests("loglikelihood", cases), True)
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-5) and ga == gb


def test_rolling_loglikelihood_matches_hf_backend(exported):
    from lm_eval.models.huggingface import HFLM

    rows = [json.loads(line)["text"] for line in
            shared_data("pretrain", "clue_small_zh.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    texts = [rows[0][:300], rows[1][:20], "A short English line."]
    ours = MoonforgeLM(exported[0], batch_size=4, max_length=32)
    ref = HFLM(pretrained=str(exported[1]), dtype=torch.float32, device="cpu", batch_size=4, max_length=32)
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True)
    want = ref.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), True)
    assert got == pytest.approx(want, abs=LL_TOLERANCE)
    assert len(ours.tok_encode(texts[0])) > 3 * 32  # several windows


def test_greedy_generation_matches_hf_backend(ours, reference):
    stop = {"until": ["。", "\n\n"], "max_gen_toks": 12, "do_sample": False}
    free = {"until": [], "max_gen_toks": 7, "do_sample": False}
    cases = [("以下是关于商业伦理的单项选择题", stop), ("世界市场最终完备是在", stop),
             ("The answer is", free), ("答案：", free)]
    got = ours.generate_until(_requests("generate_until", cases), True)
    want = reference.generate_until(_requests("generate_until", cases), True)
    assert got == want
    assert any(g for g in got)


def test_generation_with_a_kv_cache_matches_recomputation(exported):
    """The cached decoder against recomputing every sequence per token: prompts of many lengths in one batch
    (left padding), rows stopping at different steps, an empty context; on one device and spread over two."""
    texts = [rows["text"][:n] for rows, n in zip(
        (json.loads(line) for line in shared_data("pretrain", "clue_small_zh.jsonl").read_text(
            encoding="utf-8").splitlines()[:6]), (200, 5, 60, 1, 120, 33))] + ["", "The answer is"]
    settings = [{"until": ["。", "\n\n"], "max_gen_toks": 24, "do_sample": False},
                {"until": [], "max_gen_toks": 9, "do_sample": False}]
    requests = [(t, g) for g in settings for t in texts]
    recomputed = MoonforgeLM(exported[0], batch_size=5, kv_cache="false")
    want = recomputed.generate_until(_requests("generate_until", requests), True)
    assert sum(len(w) for w in want) > 100 and len({len(w) for w in want}) > 3  # real, varied continuations
    for model in (MoonforgeLM(exported[0], batch_size=5), MoonforgeLM(exported[0], batch_size=5, device_map="cpu,cpu")):
        assert model.generate_until(_requests("generate_until", requests), True) == want


def test_layer_placement_keeps_results(exported):
    cases = [("论证评价的基本标准不包括", " A"), ("法庭悖论", " D")]
    plain = MoonforgeLM(exported[0], batch_size=2).loglikelihood(_requests("loglikelihood", cases), True)
    placed = MoonforgeLM(exported[0], batch_size=2, device_map="cpu,cpu")
    hooks = sum(len(m._forward_pre_hooks) for m in placed.model.modules())
    assert hooks == 4 + preset("tiny").num_hidden_layers  # embedding, rotary, each layer, norm, lm_head
    assert placed.loglikelihood(_requests("loglikelihood", cases), True) == plain


def _best_max_load(sizes, n):
    """Brute force: the smallest possible largest share over all ways to cut ``sizes`` into at most n runs."""
    from itertools import combinations

    best = sum(sizes)
    for k in range(1, n):
        for cuts in combinations(range(1, len(sizes)), k):
            bounds = (0, *cuts, len(sizes))
            best = min(best, max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


def test_split_layers_minimises_the_largest_share():
    # Moonlight-like proportions: embedding, a dense first layer, MoE layers, norm + lm_head.
    sizes = [3, 1] + [6] * 12 + [3]
    for n in (1, 2, 3, 4, 5, 8):
        devices = split_layers(sizes, n)
        assert devices == sorted(devices) and devices[0] == 0 and devices[-1] < n
        loads = [sum(s for s, d in zip(sizes, devices) if d == i) for i in range(devices[-1] + 1)]
        assert max(loads) == _best_max_load(sizes, n), (n, loads)
    assert split_layers([5, 5], 4) == [0, 1]


def test_to_device_moves_nested_tensors():
    mask = AttentionMask(document_ids=torch.zeros(1, 4, dtype=torch.long))
    moved = to_device(((torch.ones(2), torch.ones(3)), mask, {"x": torch.ones(1)}, 7), torch.device("meta"))
    assert moved[0][0].is_meta and moved[0][1].is_meta and moved[2]["x"].is_meta and moved[3] == 7
    assert moved[1].document_ids.is_meta and moved[1].backend == mask.backend


# ---------------------------------------------------------------------------------------------------- end to end
def test_seed_evaluation_step(exported, tmp_path, capsys):
    """The seed converts the trained checkpoint to HF, then evaluates cmmlu and ceval-valid on it."""
    ckpt, _ = exported
    hf_dir, out = tmp_path / "hf", tmp_path / "results" / "eval.json"
    assert moonforge_main(["convert", "native-to-hf", "--ckpt", str(ckpt), "--out", str(hf_dir)]) == 0
    code = moonforge_main(["eval", "--model", str(hf_dir), "--tasks", "cmmlu,ceval-valid", "--data-dir",
                           str(shared_data()), "--limit", "2", "--batch-size", "4", "--output", str(out),
                           "--log-samples"])
    assert code == 0
    results = json.loads(out.read_text())
    table = out.with_suffix(".md").read_text()
    assert results["data_coverage"]["cmmlu"]["total"] == 67 and len(results["data_coverage"]["cmmlu"]["present"]) == 12
    assert results["n-samples"]["cmmlu_logical"]["effective"] == 2
    for group in ("cmmlu", "ceval-valid"):
        assert 0.0 <= results["results"][group]["acc,none"] <= 1.0
    assert "| cmmlu (12 of 67 subjects) |" in table and "| ceval-valid (12 of 52 subjects) |" in table
    assert "ceval-valid_physician" in table and "acc_norm" in table.splitlines()[0]
    assert table in capsys.readouterr().out
    samples = out.with_suffix(".samples.jsonl").read_text().splitlines()
    assert len(samples) == 24 * 2
    assert format_table(results) == table


def test_cli_reports_bad_data_before_loading(tmp_path, capsys):
    bad = tmp_path / "data" / "cmmlu" / "test"
    bad.mkdir(parents=True)
    (bad / "logical.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n", encoding="utf-8")
    code = moonforge_main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "cmmlu",
                           "--data-dir", str(tmp_path / "data")])
    assert code == 2
    assert "cmmlu subject 'logical'" in capsys.readouterr().err
    code = moonforge_main(["eval", "--model", str(tmp_path / "no-model"), "--tasks", "cmmlu_logical",
                           "--data-dir", str(shared_data())])
    assert code == 2
    assert f"moonforge eval: {tmp_path / 'no-model'}" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(exported, tmp_path):
    """torchrun with two CPU processes (gloo): each rank scores half the questions; lm-eval gathers them."""
    ckpt, _ = exported
    args = ["eval", "--model", str(ckpt), "--tasks", "cmmlu_logical,ceval-valid_physician", "--data-dir",
            str(shared_data()), "--limit", "5", "--num-fewshot", "1", "--log-samples"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "moonforge.cli", *args, "--output", str(tmp_path / "two.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert moonforge_main(args + ["--output", str(tmp_path / "one.json")]) == 0
    two = json.loads((tmp_path / "two.json").read_text())
    one = json.loads((tmp_path / "one.json").read_text())
    for task in ("cmmlu_logical", "ceval-valid_physician"):
        assert two["results"][task]["acc,none"] == one["results"][task]["acc,none"]
        assert two["n-samples"][task]["effective"] == 5
    samples = {}
    for name in ("one", "two"):
        for line in (tmp_path / f"{name}.samples.jsonl").read_text().splitlines():
            s = json.loads(line)
            samples.setdefault((s["task"], s["doc_id"]), {})[name] = [r[0][0] for r in s["resps"]]
    assert len(samples) == 10
    for key, pair in samples.items():
        assert pair["two"] == pytest.approx(pair["one"], abs=1e-5), key
