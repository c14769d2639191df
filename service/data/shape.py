"""Rows in trl's native shapes (prompt/completion, conversational prompt/completion, or
text), cut to what data.max_length can use before trl tokenizes them."""

from __future__ import annotations

import re
from typing import Any

from service.data.read import BadRow
from service.manifest.spec import DataSpec

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_ROLES = {"system", "user", "assistant", "tool"}

# Characters of text per token that no tokenizer averages on real text: SmolLM2's (49K
# vocabulary) averages 3.0 to 3.7 on this repository's Python, YAML, Terraform, JSON and
# README, larger vocabularies a little more, and 16 is over four times that; only
# padding-like text goes past it (lines of 64 spaces: 22). trl keeps a row's first
# max_length tokens but tokenizes all of it first, at a cost in memory that grows with
# the row (one 20 MB row took 4.5 GB), so text past max_length x this is cut before
# tokenizing. A row that beat the bound would lose text trl would have kept, and its cut
# end would fit in max_length, followed by the EOS token trl appends.
CHARS_PER_TOKEN_BOUND = 16
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # escapes JSON allows that are no character


def alpaca_prompt(row: dict[str, Any]) -> str:
    if row.get("input"):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def row_chars_budget(max_length: int) -> int:
    """The characters of text a row keeps: more could not fit in max_length tokens."""
    return max_length * CHARS_PER_TOKEN_BOUND


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing or empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return _unicode(value, repr(key))


def _unicode(value: str, what: str) -> str:
    """Refuse text no tokenizer or Arrow column takes: a JSON line may escape half of a
    surrogate pair (\\udc80), which decodes to no character and cannot be encoded."""
    if not value.isascii() and (bad := _SURROGATE.search(value)):
        detail = f"{what} holds \\u{ord(bad.group()):04x} at character {bad.start() + 1}"
        raise BadRow("not valid Unicode: an unpaired surrogate", detail)
    return value


def shape_row(raw: Any, spec: DataSpec) -> dict[str, Any]:
    """Turn one raw row into trl's form for this format, or raise ValueError(reason)."""
    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    fmt = spec.format
    if fmt == "alpaca":
        instruction = _text(raw, "instruction")
        row = {"instruction": instruction, "input": _text(raw, "input", required=False)}
        return {"prompt": alpaca_prompt(row), "completion": _text(raw, "output")}
    if fmt == "prompt_completion":
        return {"prompt": _text(raw, "prompt"), "completion": _text(raw, "completion")}
    if fmt == "text":
        return {"text": _text(raw, "text")}
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("missing or empty 'messages' list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] needs a role in {sorted(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": _unicode(m["content"], f"messages[{i}]")})
    if clean[-1]["role"] != "assistant" or len(clean) < 2:
        raise ValueError("a chat row must end with an assistant message after a prompt")
    if spec.loss_on_completion_only:
        return {"prompt": clean[:-1], "completion": clean[-1:]}
    return {"messages": clean}


def fit_row(
    row: dict[str, Any], max_chars: int, *, completion_only: bool
) -> tuple[dict[str, Any], bool]:
    """Cut a shaped row's text to max_chars characters, keeping its start as trl's
    truncation would; says whether it cut. A prompt that alone fills the budget leaves no
    response token to train on (trl would drop the row), so such a row is skipped."""
    if "text" in row:
        text = row["text"]
        return ({"text": text[:max_chars]}, True) if len(text) > max_chars else (row, False)
    if "messages" in row:
        if _chars(row["messages"]) <= max_chars:
            return row, False
        return {"messages": _cut_messages(row["messages"], max_chars)}, True
    prompt, completion = row["prompt"], row["completion"]
    prompt_chars = _chars(prompt)
    if prompt_chars + _chars(completion) <= max_chars:
        return row, False
    if completion_only and prompt_chars >= max_chars:
        raise BadRow("prompt longer than data.max_length tokens could hold")
    if isinstance(prompt, str):
        prompt = prompt[:max_chars]
        completion = completion[: max_chars - len(prompt)]
    else:
        prompt = _cut_messages(prompt, max_chars)
        completion = _cut_messages(completion, max_chars - _chars(prompt))
    return {"prompt": prompt, "completion": completion}, True


def _chars(part: str | list[dict[str, str]]) -> int:
    return len(part) if isinstance(part, str) else sum(len(m["content"]) for m in part)


def _cut_messages(messages: list[dict[str, str]], max_chars: int) -> list[dict[str, str]]:
    """The conversation's first max_chars characters of content: the message that
    crosses the budget is cut, those after it dropped."""
    kept: list[dict[str, str]] = []
    left = max_chars
    for m in messages:
        if len(m["content"]) >= left:
            if left:
                kept.append({**m, "content": m["content"][:left]})
            return kept
        kept.append(m)
        left -= len(m["content"])
    return kept
