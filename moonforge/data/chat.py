"""SFT records (alpaca, messages, ShareGPT) to chat messages, and messages to token ids with a loss mask.

A conversation is rendered with the tokenizer's chat template (Moonlight's:
``<|im_system|>system<|im_middle|>...<|im_end|><|im_user|>user<|im_middle|>...<|im_end|>``
``<|im_assistant|>assistant<|im_middle|>...<|im_end|>``). The loss covers each assistant message's content and
its closing ``<|im_end|>``; system, user and role-header tokens (``<|im_assistant|>assistant<|im_middle|>``) are
context only. Pai-Megatron-Patch puts the assistant header in the loss; we do not.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from moonforge.data.records import BadRecord, DataError, unicode_problem

FORMATS = ("auto", "alpaca", "messages", "sharegpt")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names (LLaMA-Factory, FastChat, Pai) -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "system": "system"}
ALPACA_PROMPT_KEYS = ("instruction", "query")
ALPACA_ANSWER_KEYS = ("output", "response", "content")


class Encoded(NamedTuple):
    tokens: np.ndarray  # int64 [L]
    target: np.ndarray  # bool [L]: True where the token is a loss target


class TemplateError(DataError):
    """The chat template cannot be split into per-message pieces (not prefix-stable)."""


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if any(k in record for k in ALPACA_PROMPT_KEYS):
        return "alpaca"
    return None


def to_messages(record: dict, fmt: str = "auto") -> list[dict] | BadRecord:
    """The record as ``[{"role", "content"}, ...]`` ending with an assistant message, or why it cannot be."""
    kind = detect_format(record) if fmt == "auto" else fmt
    if kind is None:
        keys = ", ".join(sorted(record)[:8]) or "none"
        return _bad(f"not an alpaca (instruction/input/output), messages or ShareGPT (conversations) record "
                    f"(keys: {keys})")
    messages = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt}[kind](record)
    if isinstance(messages, BadRecord):
        return messages
    return _check_conversation(messages, kind)


def _alpaca(record: dict) -> list[dict] | BadRecord:
    prompt_key = next((k for k in ALPACA_PROMPT_KEYS if k in record), None)
    answer_key = next((k for k in ALPACA_ANSWER_KEYS if k in record), None)
    if prompt_key is None or answer_key is None:
        return _bad(f"alpaca record needs one of {'/'.join(ALPACA_PROMPT_KEYS)} and one of "
                    f"{'/'.join(ALPACA_ANSWER_KEYS)}")
    fields = {k: record.get(k, "") for k in (prompt_key, "input", answer_key, "system")}
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            return _bad(f"alpaca key {key!r} must be a string, got {type(value).__name__}")
    prompt = "\n".join(p for p in (fields[prompt_key], fields["input"]) if p)
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    for pair in record.get("history") or []:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            return _bad("alpaca 'history' must be a list of [query, response] string pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[answer_key]}]


def _messages(record: dict) -> list[dict] | BadRecord:
    messages = record["messages"]
    if not isinstance(messages, list):
        return _bad("'messages' must be a list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return _bad(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            return _bad(f"messages[{i}] has role {m['role']!r}; supported roles: {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt(record: dict) -> list[dict] | BadRecord:
    turns = record["conversations"]
    if not isinstance(turns, list):
        return _bad("'conversations' must be a list of {from, value} objects")
    out = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            return _bad(f"conversations[{i}] must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            return _bad(f"conversations[{i}] is from {t['from']!r}; supported: {', '.join(sorted(SHAREGPT_ROLES))}")
        out.append({"role": role, "content": t["value"]})
    return out


def _check_conversation(messages: list[dict], kind: str) -> list[dict] | BadRecord:
    for i, m in enumerate(messages):
        if not isinstance(m["content"], str):
            return _bad(f"{kind} message {i} ({m['role']}) has non-string content ({type(m['content']).__name__})")
        problem = unicode_problem(m["content"])
        if problem:
            return BadRecord("invalid_unicode", f"{kind} message {i} ({m['role']}): {problem}")
        if m["role"] == "system" and i > 0:
            return _bad(f"{kind} message {i} is a system message; only the first message may be one")
    first = next((m["role"] for m in messages if m["role"] != "system"), None)
    if first == "assistant":
        return _bad(f"{kind} conversation starts with an assistant message; it must start with a user message")
    # Trailing user turns (a question left unanswered) carry no loss target: drop them.
    while messages and messages[-1]["role"] != "assistant":
        messages = messages[:-1]
    if not messages:
        return _bad(f"{kind} record has no assistant message to learn from")
    return messages


def _bad(detail: str) -> BadRecord:
    return BadRecord("bad_conversation", detail)


def encode_messages(tokenizer, messages: list[dict], max_tokens: int | None = None) -> Encoded:
    """Token ids of the rendered conversation and the loss targets (assistant content + its end token).

    Each assistant message's share of the rendered text is found by rendering the conversation up to it with
    ``add_generation_prompt`` (where its header ends) and up to and including it (where it ends). Pieces are
    tokenized separately, which equals tokenizing the whole text because every boundary falls next to a
    special token; this is checked. Once more than ``max_tokens`` tokens are rendered, later messages are not
    (the sample will be truncated or dropped anyway), which bounds the cost of very long conversations.
    """
    ids: list[int] = []
    target: list[bool] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = _render(tokenizer, messages[:k], True, done)
        text = _render(tokenizer, messages[:k + 1], False, header)
        for piece, is_target in ((header[len(done):], False), (text[len(header):], True)):
            piece_ids = tokenizer.encode(piece, allowed_special="all")
            ids += piece_ids
            target += [is_target] * len(piece_ids)
        done = text
        if max_tokens is not None and len(ids) > max_tokens:
            break
    if ids != tokenizer.encode(done, allowed_special="all"):
        raise TemplateError("tokenizing the chat template's pieces separately differs from tokenizing the whole "
                            "conversation; this template puts text (not a special token) at a message boundary")
    return Encoded(np.array(ids, dtype=np.int64), np.array(target, dtype=bool))


def _render(tokenizer, messages: list[dict], generation_prompt: bool, prefix: str) -> str:
    text = tokenizer.render_chat(messages, add_generation_prompt=generation_prompt)
    if not text.startswith(prefix):
        raise TemplateError("the chat template is not prefix-stable: rendering one more message changes the text "
                            "before it, so per-message loss masks cannot be derived")
    return text
