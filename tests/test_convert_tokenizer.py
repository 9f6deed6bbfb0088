"""The exported HF tokenizer.json against moonforge's tiktoken tokenizer, on real Chinese and English text."""

from __future__ import annotations

import json
import shutil

import pytest

from moonforge.tokenizer import load_tokenizer
from moonforge.tokenizer_export import bpe_merges, export_hf_tokenizer
from tests.conftest import shared_data


def _texts() -> list[str]:
    texts = []
    for name in ("clue_small_zh.jsonl", "c4_demo_en.jsonl"):
        with open(shared_data("pretrain", name), encoding="utf-8") as f:
            texts += [json.loads(line)["text"] for _, line in zip(range(150), f)]
    for name in ("alpaca_zh_demo.json", "alpaca_en_demo.json"):
        records = json.loads(shared_data("sft", name).read_text(encoding="utf-8"))[:100]
        texts += ["\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k)) for r in records]
    texts += ["<|im_user|>user<|im_middle|>Hello  world!\n\n\t 你好 HTTPServer don't 12345<|im_end|>[EOS]",
              "   leading spaces, trailing   \n", "emoji 🙂 and symbols ∑∫ — “quotes”", ""]
    return texts


@pytest.fixture(scope="module")
def exported(tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    export_hf_tokenizer(out)
    return out


def test_transformers_autotokenizer_encodes_like_tiktoken(exported, tokenizer):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(exported))
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in config
    texts = _texts()
    mismatches = [t[:60] for t in texts if hf.encode(t, add_special_tokens=False) != tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} texts encode differently: {mismatches[:3]}"
    for text in texts[:50]:
        assert hf.decode(tokenizer.encode(text)) == text
    assert hf.convert_tokens_to_ids("<|im_end|>") == tokenizer.special_tokens["<|im_end|>"]
    assert hf.eos_token == "[EOS]" and hf.eos_token_id == tokenizer.eos_id
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi!"}]
    assert hf.apply_chat_template(messages, tokenize=False) == tokenizer.render_chat(messages)
    assert len(hf) == tokenizer.n_vocab


def test_moonforge_still_reads_the_export_as_tiktoken(exported, tokenizer):
    again = load_tokenizer(exported)
    assert type(again).__name__ == "TiktokenTokenizer"
    assert again.encode("混合 text 123") == tokenizer.encode("混合 text 123")


def test_bpe_merges_rebuild_tokens():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"cd", b"abcd"):
        ranks[token] = len(ranks)
    # abcd: tiktoken merges a+b (rank 256), then ab+c (257, lower than cd's 258), then abc+d.
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"c", b"d"), (b"abc", b"d")]
