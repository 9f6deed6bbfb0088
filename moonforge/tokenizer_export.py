"""A Hugging Face fast tokenizer (``tokenizer.json``) equivalent to Moonlight's tiktoken tokenizer.

transformers cannot load Moonlight's ``tiktoken.model`` without its remote Python code. This module turns the
tiktoken ranks into a byte-level BPE for the ``tokenizers`` library: the same vocabulary and ids, merges derived
from the ranks, Moonlight's split pattern as the pre-tokenizer, and the same special tokens. With
``tokenizer_class: PreTrainedTokenizerFast`` in ``tokenizer_config.json``, ``AutoTokenizer.from_pretrained``
loads an exported directory with no remote code, and encodes text to the ids moonforge's
``TiktokenTokenizer`` gives.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from moonforge.tokenizer import MOONLIGHT_PAT_STR, TiktokenTokenizer, TokenizerError, _bytes_to_unicode
from moonforge.utils import atomic_write_text

logger = logging.getLogger(__name__)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that rebuilds every multi-byte token, ordered by the rank of the merged token.

    tiktoken merges, at each step, the adjacent pair whose concatenation has the lowest rank. Replaying that
    on a token's own bytes, allowing only tokens ranked below it, ends in exactly two parts: the last merge
    that produced the token.
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_rank = None, rank
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((rank, parts[0], parts[1]))
        else:
            logger.warning("token of rank %d cannot be built by merges of lower-ranked tokens; it is kept in the "
                           "vocabulary and matched only as a whole piece", rank)
    return [(a, b) for _, a, b in sorted(merges)]


def build_hf_tokenizer(tok: TiktokenTokenizer):
    """A ``tokenizers.Tokenizer`` with the ids, pieces and special tokens of ``tok``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    ranks = tok.encoding._mergeable_ranks
    byte_char = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    # ignore_merges: a piece that is itself a token maps to it directly, as tiktoken does.
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(MOONLIGHT_PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    if [i for _, i in specials] != list(range(len(ranks), len(ranks) + len(specials))):
        raise TokenizerError(f"{tok.path}: special token ids must follow the BPE ranks without gaps")
    hf.add_special_tokens([AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False,
                                      single_word=False) for content, _ in specials])
    for content, token_id in specials:
        if hf.token_to_id(content) != token_id:
            raise TokenizerError(f"{tok.path}: special token {content!r} got id {hf.token_to_id(content)}, "
                                 f"expected {token_id}")
    return hf


def export_hf_tokenizer(directory: str | Path) -> Path:
    """Write ``tokenizer.json`` next to ``tiktoken.model`` and point ``tokenizer_config.json`` at it.

    ``tiktoken.model`` stays, so moonforge keeps reading the directory as before; the special tokens, their
    ids and the chat template are unchanged; ``auto_map`` (remote code) is dropped.
    """
    directory = Path(directory)
    tok = TiktokenTokenizer(directory)
    hf = build_hf_tokenizer(tok)
    atomic_write_text(directory / "tokenizer.json", hf.to_str(pretty=False))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    config.pop("auto_map", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["added_tokens_decoder"] = {
        str(i): {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
        for content, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    for key, token_id in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id),
                          ("unk_token", tok.unk_id)):
        if token_id is not None:
            config[key] = tok.id_to_special(token_id)
    config.setdefault("clean_up_tokenization_spaces", False)
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    logger.info("wrote %s (%d BPE tokens, %d special tokens)", directory / "tokenizer.json", tok.n_bpe,
                len(tok.special_tokens))
    return directory / "tokenizer.json"
