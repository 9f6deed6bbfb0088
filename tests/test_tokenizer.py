import json

import pytest

from moonforge.tokenizer import (MOONLIGHT_SPECIAL_TOKENS, TokenizerError, load_tokenizer, pretokenize,
                                 read_tiktoken_model)
from tests.conftest import shared_data


def test_pretokenize_matches_moonlight_reference_split():
    text = "Hello world, 12345 don't 你好世界\n\n  x HTTPServer"
    assert pretokenize(text) == ['Hello', ' world', ',', ' ', '123', '45', " don't", ' ', '你好世界', '\n\n', ' ',
                                 ' x', ' HTTPServer']


def test_special_token_ids_follow_moonlight_layout(tokenizer):
    n_bpe = tokenizer.n_bpe
    assert n_bpe == 3840
    for offset, token in MOONLIGHT_SPECIAL_TOKENS.items():
        assert tokenizer.special_tokens[token] == n_bpe + offset
    assert tokenizer.special_tokens[f"<|reserved_token_{n_bpe + 5}|>"] == n_bpe + 5
    # Moonlight's wrapper registers 258 special ids: two more than the embedding rows.
    assert tokenizer.n_vocab == n_bpe + 258
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (n_bpe, n_bpe + 1, n_bpe + 255)


@pytest.mark.parametrize("name", ["clue_small_zh.jsonl", "c4_demo_en.jsonl"])
def test_round_trip_on_real_text(tokenizer, name):
    lines = shared_data("pretrain", name).read_text(encoding="utf-8").splitlines()
    for line in lines[:300]:
        text = json.loads(line)["text"]
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.n_bpe for i in ids)
        assert tokenizer.decode(ids) == text


def test_round_trip_chat_data(tokenizer):
    for record in json.loads(shared_data("sft", "alpaca_zh_demo.json").read_text(encoding="utf-8"))[:100]:
        for text in record.values():
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_renders_the_reference_example_token_for_token(tokenizer):
    messages = [{"role": "system", "content": "You are a helpful assistant provided by Moonshot-AI."},
                {"role": "user", "content": "Is 123 a prime?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_system|>system<|im_middle|>You are a helpful assistant provided by Moonshot-AI.<|im_end|>"
                    "<|im_user|>user<|im_middle|>Is 123 a prime?<|im_end|><|im_assistant|>assistant<|im_middle|>")
    s = tokenizer.special_tokens
    enc = lambda t: tokenizer.encode(t, allowed_special=set())  # noqa: E731
    want = ([s["<|im_system|>"]] + enc("system") + [s["<|im_middle|>"]]
            + enc("You are a helpful assistant provided by Moonshot-AI.") + [s["<|im_end|>"], s["<|im_user|>"]]
            + enc("user") + [s["<|im_middle|>"]] + enc("Is 123 a prime?") + [s["<|im_end|>"], s["<|im_assistant|>"]]
            + enc("assistant") + [s["<|im_middle|>"]])
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == want


def test_default_system_prompt_is_inserted(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == ("<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
                    "<|im_user|>user<|im_middle|>hi<|im_end|>")


def test_special_text_can_be_encoded_as_plain_text(tokenizer):
    assert tokenizer.encode("<|im_end|>") == [tokenizer.special_tokens["<|im_end|>"]]
    plain = tokenizer.encode("<|im_end|>", allowed_special=set())
    assert len(plain) > 1 and tokenizer.decode(plain) == "<|im_end|>"


def test_very_long_runs_are_encoded(tokenizer):
    text = "a" * 60_000 + " " * 30_000 + "b"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_malformed_tiktoken_model_names_the_line(tmp_path):
    (tmp_path / "tiktoken.model").write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(TokenizerError, match=r"tiktoken.model:2"):
        read_tiktoken_model(tmp_path / "tiktoken.model")


def test_missing_tokenizer_is_reported(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


def test_tokenizer_json_is_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_id == tok.token_to_id("<eos>")
    assert loaded.encode("hello world")
