"""SFT data: formats, chat-template token ids and loss masks derived by hand, the SFT idxmap, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moonforge.data.chat import encode_messages, to_messages
from moonforge.model import IGNORE_INDEX
from tests.conftest import shared_data


def test_multi_turn_with_system_token_ids_and_mask_by_hand(tokenizer):
    """Moonlight's template written out by hand: <|im_system|>system<|im_middle|>S<|im_end|>, then per turn
    <|im_user|>user<|im_middle|>Q<|im_end|> and <|im_assistant|>assistant<|im_middle|>A<|im_end|>. Loss only on
    each A and its <|im_end|>."""
    sp = tokenizer.special_tokens
    enc = tokenizer.encode
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "It is 4."}]
    ids, mask = [], []

    def add(piece_ids, target=False):
        ids.extend(piece_ids)
        mask.extend([int(target)] * len(piece_ids))

    add([sp["<|im_system|>"]] + enc("system") + [sp["<|im_middle|>"]] + enc("You are terse.") + [sp["<|im_end|>"]])
    add([sp["<|im_user|>"]] + enc("user") + [sp["<|im_middle|>"]] + enc("Hi there") + [sp["<|im_end|>"]])
    add([sp["<|im_assistant|>"]] + enc("assistant") + [sp["<|im_middle|>"]])
    add(enc("Hello!") + [sp["<|im_end|>"]], target=True)
    add([sp["<|im_user|>"]] + enc("user") + [sp["<|im_middle|>"]] + enc("2+2?") + [sp["<|im_end|>"]])
    add([sp["<|im_assistant|>"]] + enc("assistant") + [sp["<|im_middle|>"]])
    add(enc("It is 4.") + [sp["<|im_end|>"]], target=True)

    encoded = encode_messages(tokenizer, messages)
    assert encoded.tokens.tolist() == ids
    assert encoded.target.astype(int).tolist() == mask
    assert tokenizer.decode(ids) == tokenizer.render_chat(messages)

    from moonforge.data.sft import build_row

    row = build_row([encoded], len(ids) + 3, pad_id=tokenizer.pad_id, with_document_ids=True)
    expected = [ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX] * 4
    assert row["labels"].tolist() == expected
    assert row["input_ids"].tolist() == ids + [tokenizer.pad_id] * 3
    assert row["document_ids"].tolist() == [0] * len(ids) + [1] * 3


def test_default_system_prompt_when_none(tokenizer):
    sp = tokenizer.special_tokens
    encoded = encode_messages(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    head = [sp["<|im_system|>"]] + tokenizer.encode("system") + [sp["<|im_middle|>"]] + \
        tokenizer.encode("You are a helpful assistant") + [sp["<|im_end|>"]]
    assert encoded.tokens[:len(head)].tolist() == head
    assert not encoded.target[:len(head)].any()


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "Translate", "input": "你好", "output": "Hello"},
     [("user", "Translate\n你好"), ("assistant", "Hello")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, [("user", "Say hi"), ("assistant", "hi")]),
    ({"query": "q", "response": "r"}, [("user", "q"), ("assistant", "r")]),
    ({"instruction": "q", "content": "c", "system": "be brief"},
     [("system", "be brief"), ("user", "q"), ("assistant", "c")]),
    ({"instruction": "q2", "output": "a2", "history": [["q1", "a1"]]},
     [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                   {"role": "assistant", "content": "a"}]}, [("system", "s"), ("user", "u"), ("assistant", "a")]),
    ({"conversations": [{"from": "human", "value": "u1"}, {"from": "gpt", "value": "a1"},
                        {"from": "human", "value": "unanswered"}], "system": "s"},
     [("system", "s"), ("user", "u1"), ("assistant", "a1")]),
])
def test_formats_to_messages(record, expected):
    assert [(m["role"], m["content"]) for m in to_messages(record)] == expected


@pytest.mark.parametrize("parts", [("sft", "alpaca_zh_demo.json"), ("sft", "alpaca_en_demo.json"),
                                   ("sft", "sharegpt_zh_1K.jsonl"),
                                   ("sft", "messages_minicpm", "AdvertiseGenChatML", "train.json")])
def test_real_data_targets_are_exactly_the_assistant_replies(parts, tokenizer):
    from moonforge.data.records import iter_payloads, parse_payload

    path = shared_data(*parts)
    checked = 0
    for _, payload, _ in iter_payloads(path):
        messages = to_messages(parse_payload(payload))
        if not isinstance(messages, list):
            continue
        encoded = encode_messages(tokenizer, messages)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], encoded.target.astype(int), [0]])))
        runs = [tokenizer.decode(encoded.tokens[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
        assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        checked += 1
        if checked == 40:
            break
    assert checked >= 3


def test_overlong_truncate_or_drop(tokenizer, tokenizer_dir, tmp_path):
    from moonforge.data.sft import build_sft_idxmap

    long_answer = " ".join(f"word{i}" for i in range(200))
    records = [{"instruction": "short", "output": "ok"}, {"instruction": "long", "output": long_answer},
               {"instruction": "x " * 300, "output": "prompt alone is too long"}]
    src = tmp_path / "s.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    t = build_sft_idxmap([str(src)], tokenizer_dir, tmp_path / "t", 64, workers=0, progress=False)
    assert (t.samples, t.truncated, t.dropped_no_target, t.dropped_overlong) == (2, 1, 1, 0)
    d = build_sft_idxmap([str(src)], tokenizer_dir, tmp_path / "d", 64, overlong="drop", workers=0, progress=False)
    assert (d.samples, d.truncated, d.dropped_no_target, d.dropped_overlong) == (1, 0, 0, 2)
    meta = json.loads((tmp_path / "t_text_document.sft.json").read_text())
    assert meta["truncated"] == 1 and meta["dropped_no_target"] == 1 and meta["samples"] == 2


def _first_records(path, n):
    return json.loads(path.read_text(encoding="utf-8"))[:n]


@pytest.mark.parametrize("packing", [False, True])
def test_idxmap_layout_read_back_with_megatron(packing, tokenizer, tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moonforge.data.sft import build_sft_idxmap, encode_record

    records = _first_records(shared_data("sft", "alpaca_en_demo.json"), 60)
    src = tmp_path / "a.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    seq_len = 256
    summary = build_sft_idxmap([str(src)], tokenizer_dir, tmp_path / "s", seq_len, packing=packing, workers=2,
                               progress=False)
    expected = [encode_record(tokenizer, r, "auto", seq_len, "truncate")[0] for r in records]
    tokens = IndexedDataset(str(tmp_path / "s_text_document"))
    masks = IndexedDataset(str(tmp_path / "s_text_document_loss_mask"))
    assert masks.index.dtype == np.uint8 and tokens.index.dtype == np.uint16
    assert len(tokens) == len(masks) == len(expected) == summary.samples
    for i, sample in enumerate(expected):
        assert tokens[i].tolist() == sample.tokens.tolist()
        assert masks[i].astype(bool).tolist() == sample.target.tolist()
    docs = tokens.document_indices
    lengths = tokens.sequence_lengths
    rows = [lengths[a:b] for a, b in zip(docs[:-1], docs[1:])]
    assert len(rows) == summary.rows
    assert all(len(r) == 1 for r in rows) if not packing else all(r.sum() <= seq_len for r in rows)
    if packing:  # next-fit: a row is closed only when the next sample does not fit
        assert all(a.sum() + b[0] > seq_len for a, b in zip(rows[:-1], rows[1:]))
        assert summary.rows < summary.samples


def test_raw_rows_equal_unpacked_idxmap_rows(tokenizer, tokenizer_dir, tmp_path):
    from moonforge.data.loader import build_dataset
    from moonforge.data.sft import build_sft_idxmap

    src = tmp_path / "a.json"
    src.write_text(json.dumps(_first_records(shared_data("sft", "alpaca_zh_demo.json"), 40)), encoding="utf-8")
    build_sft_idxmap([str(src)], tokenizer_dir, tmp_path / "s", 128, workers=0, progress=False)
    idx = build_dataset("sft", [str(tmp_path / "s_text_document")], tokenizer=tokenizer, seq_len=128,
                        split="train", split_spec="100,0,0", seed=7, num_samples=100)
    raw = build_dataset("raw", [str(src)], tokenizer=tokenizer, seq_len=128, split="train", seed=7, num_samples=100,
                        progress=False)
    assert len(idx) == len(raw) == 100
    for i in range(100):
        a, b = idx[i], raw[i]
        assert a.keys() == b.keys() == {"input_ids", "labels"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    epoch0 = [tuple(idx[i]["input_ids"]) for i in range(40)]
    epoch1 = [tuple(idx[i]["input_ids"]) for i in range(40, 80)]
    assert len(set(epoch0)) == 40 and set(epoch0) == set(epoch1)  # each epoch visits every row once
    assert epoch0 != epoch1  # in a fresh order


def test_packed_loss_equals_samples_one_by_one(tokenizer, tokenizer_dir, tmp_path):
    """Tiny model, fp32: the loss of packed rows equals the token-weighted loss of the same samples run alone,
    so nothing leaks between packed samples through attention or positions."""
    from moonforge.config import preset
    from moonforge.data.loader import DataLoader, build_dataset
    from moonforge.data.sft import build_sft_idxmap, encode_record
    from moonforge.model import build_model, cross_entropy_sum

    records = [r for r in _first_records(shared_data("sft", "alpaca_zh_demo.json"), 40)
               if len(r["instruction"] + r["input"] + r["output"]) < 60][:8]
    src = tmp_path / "a.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    seq_len = 192
    summary = build_sft_idxmap([str(src)], tokenizer_dir, tmp_path / "p", seq_len, packing=True, workers=0,
                               progress=False)
    assert summary.rows < summary.samples == len(records) and summary.truncated == 0
    ds = build_dataset("sft", [str(tmp_path / "p_text_document")], tokenizer=tokenizer, seq_len=seq_len,
                       split="train", split_spec="100,0,0")
    batch = DataLoader(ds, micro_batch_size=summary.rows, dp_rank=0, dp_size=1).next_batch()
    assert batch.document_ids is not None

    torch.manual_seed(0)
    model = build_model(preset("tiny"), dtype=torch.float32, seed=0).eval()
    with torch.no_grad():
        packed = cross_entropy_sum(model(batch.input_ids, document_ids=batch.document_ids), batch.labels)
        leaky = cross_entropy_sum(model(batch.input_ids), batch.labels)
        alone, n_tokens = torch.zeros((), dtype=torch.float64), 0
        for record in records:
            sample, _ = encode_record(tokenizer, record, "auto", seq_len, "truncate")
            tokens = torch.from_numpy(sample.tokens)[None]
            labels = torch.where(torch.from_numpy(sample.target[1:]), tokens[0, 1:], IGNORE_INDEX)
            alone += cross_entropy_sum(model(tokens[:, :-1]), labels[None]).double()
            n_tokens += int((labels != IGNORE_INDEX).sum())
    assert n_tokens == batch.num_loss_tokens() == summary.target_tokens
    packed_mean, alone_mean = packed.item() / n_tokens, alone.item() / n_tokens
    assert abs(packed_mean - alone_mean) < 1e-6, (packed_mean, alone_mean)
    assert abs(leaky.item() / n_tokens - alone_mean) > 1e-3  # without document ids, samples would see each other


def test_template_that_rewrites_earlier_text_is_refused(tokenizer_dir):
    from moonforge.data.chat import TemplateError
    from moonforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-stable"):
        encode_messages(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
