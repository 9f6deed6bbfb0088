"""Train-time datasets against megatron-core's own GPT datasets, and the resumable data-parallel loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moonforge.data.records import DataError
from tests.conftest import shared_data

SEQ = 64


@pytest.fixture(scope="module")
def corpora(tokenizer_dir, tmp_path_factory):
    """The shared English and Chinese corpora as Megatron datasets (with EOD), and an SFT idxmap."""
    from moonforge.data.preprocess import preprocess_pretrain
    from moonforge.data.sft import build_sft_idxmap

    out = tmp_path_factory.mktemp("corpora")
    for name in ("c4_demo_en", "clue_small_zh"):
        preprocess_pretrain([str(shared_data("pretrain", f"{name}.jsonl"))], tokenizer_dir, out / name,
                            append_eod=True, workers=0, progress=False)
    records = json.loads(shared_data("sft", "alpaca_en_demo.json").read_text(encoding="utf-8"))[:50]
    (out / "sft.json").write_text(json.dumps(records), encoding="utf-8")
    build_sft_idxmap([str(out / "sft.json")], tokenizer_dir, out / "sft", 256, packing=True, workers=0,
                     progress=False)
    return {"en": str(out / "c4_demo_en_text_document"), "zh": str(out / "clue_small_zh_text_document"),
            "sft": str(out / "sft_text_document"), "dir": out}


class _Tok:
    """A Megatron-style tokenizer for the reference datasets."""

    def __init__(self, tokenizer):
        self.vocab_size, self.eod = tokenizer.n_vocab, tokenizer.eod_id
        self.unique_identifiers = {"reference": True}


def megatron_reference(blend, tokenizer, split, sizes, cache, **flags):
    """megatron-core's GPT datasets built the way Megatron-LM's pretrain_gpt.py builds them (all splits)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    config = GPTDatasetConfig(random_seed=1234, sequence_length=SEQ, blend=blend, split=split, path_to_cache=str(cache),
                              tokenizer=_Tok(tokenizer), reset_position_ids=flags.get("reset", False),
                              reset_attention_mask=flags.get("reset", False), eod_mask_loss=False,
                              create_attention_mask=flags.get("reset", False))
    from moonforge.data.pretrain import _single_process_rank

    with _single_process_rank():
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def test_helpers_are_compiled():
    from moonforge.data.pretrain import check_helpers

    check_helpers()


@pytest.mark.parametrize("split, index", [("train", 0), ("valid", 1)])
def test_pretrain_samples_are_megatrons(split, index, corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    ours = build_dataset("pretrain", [corpora["zh"]], tokenizer=tokenizer, seq_len=SEQ, split=split,
                         split_spec="95,5,0", cache_dir=str(tmp_path / "c1"))
    ref = megatron_reference(([corpora["zh"]], None), tokenizer, "95,5,0", [None, None, None], tmp_path / "c2")[index]
    assert len(ours) == len(ref) > 10
    for i in range(len(ours)):
        item, expected = ours[i], ref[i]
        np.testing.assert_array_equal(item["input_ids"], expected["tokens"].numpy())
        np.testing.assert_array_equal(item["labels"], expected["labels"].numpy())
    assert (item["input_ids"][1:] == item["labels"][:-1]).all()  # seq_len + 1 token windows
    assert list((tmp_path / "c1").glob("*GPTDataset-*-shuffle_index.npy"))  # indices cached


def test_weighted_blend_is_megatrons(corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    n = 300
    ours = build_dataset("pretrain", [(0.3, corpora["en"]), (0.7, corpora["zh"])], tokenizer=tokenizer, seq_len=SEQ,
                         split="train", split_spec="98,2,0", num_samples=n, cache_dir=str(tmp_path / "c1"))
    ref = megatron_reference(([corpora["en"], corpora["zh"]], [0.3, 0.7]), tokenizer, "98,2,0", [n, 10, 0],
                             tmp_path / "c2")[0]
    assert len(ours) == len(ref) == n
    for i in range(n):
        np.testing.assert_array_equal(ours[i]["input_ids"], ref[i]["tokens"].numpy())
    from_en = sum(int(ref[i]["dataset_id"]) == 0 for i in range(n))
    assert abs(from_en / n - 0.3) < 0.02
    flat = build_dataset("pretrain", ["30", corpora["en"], "70", corpora["zh"]], tokenizer=tokenizer, seq_len=SEQ,
                         split="train", split_spec="98,2,0", num_samples=n, cache_dir=str(tmp_path / "c1"))
    np.testing.assert_array_equal(flat[7]["input_ids"], ours[7]["input_ids"])


def test_document_mask_matches_megatron_reset_flags(corpora, tokenizer, tmp_path):
    """document_ids give the model exactly Megatron's --reset-position-ids and --reset-attention-mask."""
    from moonforge.data.loader import build_dataset
    from moonforge.model import AttentionMask, positions_from_documents

    ours = build_dataset("pretrain", [corpora["en"]], tokenizer=tokenizer, seq_len=SEQ, split="train",
                         split_spec="100,0,0", cache_dir=str(tmp_path / "c1"), document_mask=True)
    ref = megatron_reference(([corpora["en"]], None), tokenizer, "100,0,0", [None, None, None], tmp_path / "c2",
                             reset=True)[0]
    multi = 0
    for i in range(0, min(len(ours), 600), 4):
        docs = torch.from_numpy(ours[i]["document_ids"])[None]
        expected = ref[i]
        assert torch.equal(positions_from_documents(docs)[0], expected["position_ids"])
        allowed = AttentionMask(document_ids=docs).dense(SEQ, SEQ, torch.device("cpu"))[0, 0]
        assert torch.equal(allowed, ~expected["attention_mask"][0])
        multi += int(docs.max()) > 0
    assert multi > 5  # many samples span a document boundary


def test_padding_is_its_own_document():
    from moonforge.data.pretrain import eod_document_ids

    eod = 9
    tokens = np.array([1, 2, eod, 3, eod, 4, 0, 0])
    target = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)  # labels 5.. are Megatron's padding
    assert eod_document_ids(tokens, target, eod).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]


def test_splits_are_disjoint_contiguous_document_ranges(corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    parts = [build_dataset("pretrain", [corpora["zh"]], tokenizer=tokenizer, seq_len=SEQ, split=s,
                           split_spec="80,10,10", cache_dir=str(tmp_path)).dataset.indices for s in
             ("train", "valid", "test")]
    assert np.array_equal(np.concatenate(parts), np.arange(1500))
    assert [len(p) for p in parts] == [1200, 150, 150]


class _Indexed:
    """A dataset whose sample i is [i, ...]: the loader's arithmetic made visible."""

    fingerprint = "indexed"

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return {"input_ids": np.full(3, i), "labels": np.full(3, i)}


def test_rank_r_gets_the_documented_global_samples():
    from moonforge.data.loader import DataLoader

    mbs, dp, micro_batches = 2, 3, 4
    gbs = mbs * dp * micro_batches
    loaders = [DataLoader(_Indexed(), micro_batch_size=mbs, dp_rank=r, dp_size=dp) for r in range(dp)]
    for t in range(3):
        for m in range(micro_batches):
            for r, loader in enumerate(loaders):
                got = loader.next_batch().input_ids[:, 0].tolist()
                assert got == [t * gbs + m * mbs * dp + r * mbs + j for j in range(mbs)]


def _global_batches(dataset, dp, mbs, steps, micro_batches, state=None):
    """Per step, the concatenation of every rank's micro-batches (input_ids, labels, document_ids)."""
    from moonforge.data.loader import DataLoader

    loaders = [DataLoader(dataset, micro_batch_size=mbs, dp_rank=r, dp_size=dp) for r in range(dp)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(json.loads(json.dumps(state)))
    out = []
    for _ in range(steps):
        parts = [[loader.next_batch() for loader in loaders] for _ in range(micro_batches)]
        batches = [b for per_rank in parts for b in per_rank]
        out.append(tuple(torch.cat([getattr(b, k) for b in batches]) for k in ("input_ids", "labels", "document_ids")
                         if getattr(batches[0], k) is not None))
    return out, loaders[0].state_dict()


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("kind", ["sft", "pretrain"])
def test_resume_mid_epoch_sees_the_same_batches(kind, dp, corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    gbs, mbs = 8, 2
    path = corpora["sft"] if kind == "sft" else corpora["en"]
    seq = 256 if kind == "sft" else SEQ

    def dataset():
        return build_dataset(kind, [path], tokenizer=tokenizer, seq_len=seq, split="train", split_spec="100,0,0",
                             seed=11, num_samples=gbs * 12, cache_dir=str(tmp_path), document_mask=True)

    micro = gbs // (mbs * dp)
    straight, _ = _global_batches(dataset(), dp, mbs, 12, micro)
    first, state = _global_batches(dataset(), dp, mbs, 5, micro)
    assert state["consumed_samples"] == 5 * gbs
    if kind == "sft":
        rows = dataset().rows_per_epoch
        assert state["epoch"] == 5 * gbs // rows and 0 < state["index_in_epoch"] < rows  # mid-epoch
        assert 12 * gbs > rows  # the run crosses into a reshuffled epoch
    resumed, _ = _global_batches(dataset(), dp, mbs, 7, micro, state)
    # Resuming with the other data-parallel size gives the same global batches too.
    other_dp = 3 - dp
    resumed_other, _ = _global_batches(dataset(), other_dp, mbs, 7, gbs // (mbs * other_dp), state)
    for got in (first + resumed, first + resumed_other):
        assert len(got) == len(straight)
        for a, b in zip(got, straight):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_loader_errors(corpora, tokenizer, tmp_path):
    from moonforge.data.loader import DataLoader, build_dataset

    ds = build_dataset("sft", [corpora["sft"]], tokenizer=tokenizer, seq_len=256, split="train", num_samples=4)
    loader = DataLoader(ds, micro_batch_size=2, dp_rank=0, dp_size=2)
    loader.next_batch()
    with pytest.raises(DataError, match="larger num_samples"):
        loader.next_batch()
    other = build_dataset("sft", [corpora["sft"]], tokenizer=tokenizer, seq_len=256, split="train", num_samples=4,
                          seed=5)
    with pytest.raises(DataError, match="saved for another dataset"):
        DataLoader(other, micro_batch_size=2, dp_rank=0, dp_size=2).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("kind, path, kw, message", [
    ("pretrain", "missing", {}, "no indexed dataset here"),
    ("pretrain", "sft", {}, "this is an SFT idxmap"),
    ("sft", "en", {}, "not a moonforge SFT idxmap"),
    ("sft", "sft", {"seq_len": 128}, "built for seq_len 256"),
    ("pretrain", "en", {"split": "valid", "split_spec": "100,0,0"}, "split 'valid' is empty"),
    ("pretrain", "en", {"split_spec": "a,b"}, "bad split spec"),
    ("pretrain", "weighted", {}, "needs num_samples"),
    ("sft", "weighted", {}, "weighted blends are for kind 'pretrain'"),
    ("nope", "en", {}, "unknown dataset kind"),
])
def test_dataset_errors(kind, path, kw, message, corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    paths = {"missing": [str(tmp_path / "x")], "weighted": [(1.0, corpora["en"]), (1.0, corpora["zh"])]}.get(
        path, [corpora.get(path, "")])
    args = dict(tokenizer=tokenizer, seq_len=256 if kind == "sft" else SEQ, split="train", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=message):
        build_dataset(kind, paths, **(args | kw))


def test_prefix_hint_for_output_prefix(corpora, tokenizer):
    from moonforge.data.loader import build_dataset

    with pytest.raises(DataError, match="did you mean .*c4_demo_en_text_document"):
        build_dataset("pretrain", [str(corpora["dir"] / "c4_demo_en")], tokenizer=tokenizer, seq_len=SEQ,
                      split="train")


def _rank_main(rank, world, init_file, prefix, tokenizer_dir, cache, out):
    import torch.distributed as dist

    from moonforge.data.loader import DataLoader, build_dataset
    from moonforge.tokenizer import load_tokenizer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
        ds = build_dataset("pretrain", [prefix], tokenizer=tokenizer, seq_len=SEQ, split="train",
                           split_spec="100,0,0", seed=3, num_samples=64, cache_dir=cache, document_mask=True)
        loader = DataLoader(ds, micro_batch_size=2, dp_rank=rank, dp_size=world)
        batches = [loader.next_batch().input_ids for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = DataLoader(ds, micro_batch_size=2, dp_rank=rank, dp_size=world)
        resumed.load_state_dict(state)
        batches += [resumed.next_batch().input_ids for _ in range(3)]
        torch.save(torch.stack(batches), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes over gloo
def test_two_process_ranks_build_and_resume(corpora, tokenizer, tokenizer_dir, tmp_path):
    """Under torch.distributed (megatron-core builds its indices on rank 0 first), two ranks with a save and
    restore in the middle read exactly the global sample order of one process."""
    import multiprocessing

    from moonforge.data.loader import DataLoader, build_dataset

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, tmp_path / "init", corpora["en"], str(tokenizer_dir),
                                                  str(tmp_path / "cache"), tmp_path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    single = build_dataset("pretrain", [corpora["en"]], tokenizer=tokenizer, seq_len=SEQ, split="train",
                           split_spec="100,0,0", seed=3, num_samples=64, cache_dir=str(tmp_path / "cache1"))
    expected = DataLoader(single, micro_batch_size=4, dp_rank=0, dp_size=1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for step in range(6):
        assert torch.equal(torch.cat([ranks[0][step], ranks[1][step]]), expected.next_batch().input_ids)


def test_unwritable_cache_is_reported(corpora, tokenizer, tmp_path):
    from moonforge.data.loader import build_dataset

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DataError, match="cannot write the sample-index cache"):
        build_dataset("pretrain", [corpora["en"]], tokenizer=tokenizer, seq_len=SEQ, split="train",
                      cache_dir=str(blocker / "cache"))
