"""Tokenizers: Moonlight's tiktoken format read directly (no remote code), ``tokenizer.json`` through the
``tokenizers`` library, Moonlight's chat template, and a small BPE trainer that writes Moonlight's file format.

Moonlight's directory holds ``tiktoken.model`` (one ``base64(token) rank`` line per BPE token) and
``tokenizer_config.json`` (``added_tokens_decoder``, special tokens, ``chat_template``). Special tokens occupy
ids n_bpe .. n_bpe+257: Moonlight's wrapper registers 256 reserved ids plus 2 (the embedding has n_bpe + 256
rows; the last two ids are never produced).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

import jinja2
import regex
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moonforge.utils import atomic_write_text

logger = logging.getLogger(__name__)

MOONLIGHT_PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
NUM_RESERVED_SPECIAL_TOKENS = 256
# Moonlight's wrapper registers two more special ids than it reserves rows for.
MOONLIGHT_EXTRA_SPECIAL_IDS = 2

# Offsets from n_bpe of the named special tokens (Moonlight and the Kimi family).
MOONLIGHT_SPECIAL_TOKENS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
    6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 17: "<|im_middle|>",
    254: "[UNK]", 255: "[PAD]",
}

MOONLIGHT_CHAT_TEMPLATE = """{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>{%- endif -%}
  {%- if message['role']=='system' -%}<|im_system|>{%- endif -%}
  {%- if message['role']=='user' -%}<|im_user|>{%- endif -%}
  {%- if message['role']=='assistant' -%}<|im_assistant|>{%- endif -%}
  {{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"""

# Moonlight's wrapper splits inputs this way before encoding (tiktoken is slow on huge runs).
_MAX_ENCODE_CHARS = 400_000
_MAX_NO_WHITESPACE_CHARS = 25_000
_LONG_RUN = re.compile(r"\s{%d,}|\S{%d,}" % (_MAX_NO_WHITESPACE_CHARS + 1, _MAX_NO_WHITESPACE_CHARS + 1))


class TokenizerError(ValueError):
    """A tokenizer directory is missing files or has malformed ones."""


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class BaseTokenizer:
    """What the rest of moonforge needs from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    special_tokens: dict[str, int]

    def encode(self, text: str, allowed_special="all") -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    @property
    def eod_id(self) -> int:
        """End-of-document token appended by pretraining preprocessing (Megatron's ``eod``)."""
        if self.eos_id is None:
            raise TokenizerError("the tokenizer defines no eos_token, so documents cannot be terminated")
        return self.eos_id

    def token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        ids = self.encode(token)
        if len(ids) != 1:
            raise KeyError(f"{token!r} is not a single token")
        return ids[0]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json)")
        return self._template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=self.id_to_special(self.bos_id),
                                       eos_token=self.id_to_special(self.eos_id), **kwargs)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs):
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, allowed_special="all") if tokenize else text

    def id_to_special(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        for token, i in self.special_tokens.items():
            if i == token_id:
                return token
        return self.decode([token_id])

    def _template(self):
        if getattr(self, "_compiled_template", None) is None:
            self._compiled_template = _compile_template(self.chat_template)
        return self._compiled_template


class TiktokenTokenizer(BaseTokenizer):
    """Moonlight's tokenizer, built from ``tiktoken.model`` and ``tokenizer_config.json`` without remote code."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        ranks = read_tiktoken_model(path / "tiktoken.model")
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        self.n_bpe = len(ranks)
        try:
            added = {int(k): _token_content(v) for k, v in config.get("added_tokens_decoder", {}).items()}
        except ValueError as e:
            raise TokenizerError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder keys must be ids ({e})")
        n_special = NUM_RESERVED_SPECIAL_TOKENS + MOONLIGHT_EXTRA_SPECIAL_IDS
        self.special_tokens = {added.get(i, f"<|reserved_token_{i}|>"): i
                               for i in range(self.n_bpe, self.n_bpe + n_special)}
        self.encoding = tiktoken.Encoding(name=path.name or "moonlight", pat_str=MOONLIGHT_PAT_STR,
                                          mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.bos_id = self._special_id(config, "bos_token")
        self.eos_id = self._special_id(config, "eos_token")
        self.pad_id = self._special_id(config, "pad_token")
        self.unk_id = self._special_id(config, "unk_token")
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # a list of named templates; take the default one
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"),
                                      self.chat_template[0]["template"])

    def _special_id(self, config: dict, key: str) -> int | None:
        token = _token_content(config.get(key))
        if token is None:
            return None
        if token not in self.special_tokens:
            raise TokenizerError(f"{self.path / 'tokenizer_config.json'}: {key} {token!r} is not a special token "
                                 "in added_tokens_decoder")
        return self.special_tokens[token]

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Token ids; special-token text is parsed as specials unless ``allowed_special`` excludes it.

        ``allowed_special="all"`` is Moonlight's behaviour; pass ``set()`` to encode such text as plain bytes.
        """
        ids: list[int] = []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            chunk = text[start:start + _MAX_ENCODE_CHARS]
            pieces = _split_long_runs(chunk) if _LONG_RUN.search(chunk) else (chunk,)
            for piece in pieces:
                ids.extend(self.encoding.encode(piece, allowed_special=allowed_special, disallowed_special=()))
        return ids

    def encode_batch(self, texts: list[str], allowed_special="all") -> list[list[int]]:
        return [self.encode(t, allowed_special) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")


def _split_long_runs(text: str) -> Iterable[str]:
    """Split so that no run of whitespace or non-whitespace exceeds the limit (as Moonlight's wrapper does)."""
    current_len, current_space, start = 0, text[0].isspace() if text else False, 0
    for i, ch in enumerate(text):
        space = ch.isspace()
        if current_space ^ space:
            current_len, current_space = 1, space
        else:
            current_len += 1
            if current_len > _MAX_NO_WHITESPACE_CHARS:
                yield text[start:i]
                start, current_len = i, 1
    yield text[start:]


class HFJsonTokenizer(BaseTokenizer):
    """A ``tokenizer.json`` tokenizer through the ``tokenizers`` library (other DeepSeek-family models)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        path = Path(path)
        self.path = path
        try:
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the library raises plain Exceptions for malformed files
            raise TokenizerError(f"{path / 'tokenizer.json'}: cannot be loaded ({e})") from None
        config = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        self.special_tokens = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items()
                               if t.special}
        ids = {key: _token_content(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
        self.bos_id, self.eos_id, self.pad_id = (self.tokenizer.token_to_id(ids[k]) if ids[k] else None
                                                 for k in ("bos_token", "eos_token", "pad_token"))
        self.chat_template = config.get("chat_template")

    @property
    def n_vocab(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> BaseTokenizer:
    """Moonlight's ``tiktoken.model`` format, else ``tokenizer.json``."""
    path = Path(path)
    if (path / "tiktoken.model").exists():
        return TiktokenTokenizer(path)
    if (path / "tokenizer.json").exists():
        return HFJsonTokenizer(path)
    raise TokenizerError(f"{path}: no tokenizer found (expected tiktoken.model + tokenizer_config.json, or "
                         "tokenizer.json); `moonforge tokenizer train` makes a Moonlight-format one")


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """Parse a ``tiktoken.model`` file; errors name the line."""
    if not path.exists():
        raise TokenizerError(f"{path}: not found")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, base64.binascii.Error) as e:
                raise TokenizerError(f"{path}:{lineno}: {e}") from None
            ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks must be the distinct integers 0..{len(ranks) - 1}")
    return ranks


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# ---------------------------------------------------------------------------------------------------- training
def pretokenize(text: str) -> list[str]:
    """Split text into the pieces BPE may merge within, with Moonlight's pattern (Python's ``regex`` V1)."""
    return _PRETOKENIZE.findall(text)


_PRETOKENIZE = regex.compile("(?V1)" + MOONLIGHT_PAT_STR)


def train_bpe(texts: Iterable[str], n_bpe: int) -> dict[bytes, int]:
    """Byte-level BPE with ``n_bpe`` ranks: the 256 single bytes, then merged tokens in the order they were learnt.

    Pieces come from Moonlight's pattern; the merge statistics are counted by the ``tokenizers`` library's
    trainer (Rust, deterministic), and its vocabulary order becomes the tiktoken ranks.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if n_bpe < 256:
        raise ValueError(f"n_bpe must be at least 256 (all single bytes), got {n_bpe}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(MOONLIGHT_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    bpe.train_from_iterator(texts, trainer)
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for token, token_id in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        raw = bytes(to_byte[ch] for ch in token)
        ranks.setdefault(raw, len(ranks))
    if len(ranks) < n_bpe:
        logger.warning("the training text supports only %d BPE tokens (asked for %d)", len(ranks), n_bpe)
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def write_moonlight_tokenizer(ranks: dict[bytes, int], out_dir: str | Path) -> Path:
    """Write ``tiktoken.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in Moonlight's format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_text(out / "tiktoken.model", "\n".join(lines) + "\n")
    n_bpe = len(ranks)
    added = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        content = MOONLIGHT_SPECIAL_TOKENS.get(offset, f"<|reserved_token_{n_bpe + offset}|>")
        added[str(n_bpe + offset)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
    named = [MOONLIGHT_SPECIAL_TOKENS[o] for o in sorted(MOONLIGHT_SPECIAL_TOKENS) if o not in (0, 1, 254, 255)]
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": named,
        "bos_token": "[BOS]",
        "chat_template": MOONLIGHT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "[EOS]",
        "extra_special_tokens": {},
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "[PAD]",
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": "[UNK]",
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                   "additional_special_tokens": named}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")
    return out


def train_moonlight_tokenizer(files: Sequence[str | Path], out_dir: str | Path, vocab_size: int,
                              json_key: str = "text", max_chars: int | None = None) -> Path:
    """Train a BPE so that BPE ranks + 256 special ids = ``vocab_size`` (the model's embedding rows)."""
    n_bpe = vocab_size - NUM_RESERVED_SPECIAL_TOKENS
    return write_moonlight_tokenizer(train_bpe(_iter_texts(files, json_key, max_chars), n_bpe), out_dir)


def _iter_texts(files: Sequence[str | Path], json_key: str, max_chars: int | None) -> Iterable[str]:
    total = 0
    for file in files:
        file = Path(file)
        if file.suffix in (".jsonl", ".json"):
            with open(file, encoding="utf-8") as f:
                if file.suffix == ".json":
                    records = json.load(f)
                else:
                    records = (json.loads(line) for line in f if line.strip())
                for rec in records:
                    text = _record_text(rec, json_key)
                    if text:
                        total += len(text)
                        yield text
                    if max_chars and total >= max_chars:
                        return
        else:
            text = file.read_text(encoding="utf-8")
            yield text[:max_chars] if max_chars else text
            total += len(text)
        if max_chars and total >= max_chars:
            return


def _record_text(rec, json_key: str) -> str:
    """Text of a pretraining record, or of an instruction/chat record (all its strings)."""
    if isinstance(rec, dict) and isinstance(rec.get(json_key), str):
        return rec[json_key]
    parts: list[str] = []

    def walk(x):
        if isinstance(x, str):
            parts.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(rec)
    return "\n".join(parts)
