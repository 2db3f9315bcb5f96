"""Data a person has, for a causal LM: instruction JSONL through the chat template, and text rows.

Row forms (one JSON object per line; a file may mix them):

- ``{"prompt": ..., "completion": ...}``: one exchange; the loss is on the completion only;
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``: a conversation; the
  loss is on every assistant message (its end-of-turn marker included, so the model learns to stop);
- ``{"text": ...}``: plain text; every token after the first is a target.

With a chat template in the bundle (``chat_template.json``, derived at export) prompts and
conversations are rendered exactly as the tokenizer's template renders them; without one, a prompt
and its completion are joined as they are and ``messages`` rows are refused. Every bad row is a
DataError naming the file and line, raised before anything trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest
from edgepeft.runtime.data import jsonl_objects
from edgepeft.runtime.text import untruncated

ROLES = ("system", "user", "assistant")
Segment = tuple[str, bool]  # (text, is a target)


def load_chat_template(bundle_path: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The bundle's chat template pieces, or None for a bundle without one."""
    if not manifest.chat_template:
        return None
    path = bundle_path / manifest.chat_template
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable chat template ({e}); re-copy or re-export the bundle") from None


def segments(pieces: dict[str, Any], messages: list[dict[str, str]], generation: bool = False) -> list[Segment]:
    """A conversation as text pieces in order, each marked whether it is a target (assistant content and end)."""
    out: list[Segment] = []
    if messages and messages[0]["role"] == "system":
        out += [(pieces["start_with_system"], False), (messages[0]["content"], False),
                (pieces["roles"]["system"][1], False)]
        messages = messages[1:]
    else:
        out.append((pieces["start_without_system"], False))
    for m in messages:
        pre, post = pieces["roles"][m["role"]]
        target = m["role"] == "assistant"
        out += [(pre, False), (m["content"], target), (post, target)]
    if generation:
        out.append((pieces["generation_prompt"], False))
    return [s for s in out if s[0]]


def render(pieces: dict[str, Any], messages: list[dict[str, str]], generation: bool = False) -> str:
    """The conversation as the tokenizer's chat template renders it (``generation``: ready for the reply)."""
    return "".join(text for text, _ in segments(pieces, messages, generation))


def _messages(obj: dict, where: str) -> list[dict[str, str]]:
    """The conversation of one row, checked."""
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                raise DataError(f"{where}: message {i} needs a 'role' ({', '.join(ROLES)}) and a string 'content'")
            if m["role"] == "system" and i:
                raise DataError(f"{where}: message {i} is a system message; only the first message may be one")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise DataError(f"{where}: no assistant message with content; there is nothing to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    prompt, completion = obj.get("prompt"), obj.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
    if not completion.strip():
        raise DataError(f"{where}: empty completion; there is nothing to learn from")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def row_segments(obj: object, pieces: dict[str, Any] | None, where: str) -> list[Segment]:
    """One JSONL row of a causal-LM data file as target-marked text pieces."""
    if not isinstance(obj, dict) or not ({"text", "messages"} & obj.keys() or {"prompt", "completion"} <= obj.keys()):
        raise DataError(f"{where}: expected {{\"prompt\": ..., \"completion\": ...}}, {{\"messages\": [...]}} "
                        "or {\"text\": ...}")
    if "text" in obj and not {"messages", "prompt"} & obj.keys():
        text = obj["text"]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return [(text, True)]
    if pieces is None:
        if "messages" in obj:
            raise DataError(f"{where}: this bundle has no chat template (its tokenizer had none at export), so "
                            "'messages' rows cannot be rendered; use {\"prompt\", \"completion\"} or {\"text\"} rows")
        msgs = _messages(obj, where)
        return [(msgs[0]["content"], False), (msgs[1]["content"], True)]
    return segments(pieces, _messages(obj, where))


def encode_segments(tok: Tokenizer, segs: list[Segment], *, plain_text: bool) -> tuple[list[int], list[int]]:
    """Token ids of the joined text and a 0/1 target flag per token (a token is a target if it starts in a target piece).

    Plain text keeps the tokenizer's special tokens (as text rows always have); a rendered chat template
    already holds its own, so it is encoded without them, as ``apply_chat_template`` does.
    """
    text = "".join(s for s, _ in segs)
    spans, pos = [], 0
    for s, target in segs:
        if target:
            spans.append((pos, pos + len(s)))
        pos += len(s)
    enc = tok.encode(text, add_special_tokens=plain_text)
    flags = []
    for (start, end), special in zip(enc.offsets, enc.special_tokens_mask):
        inside = any(a <= start < b for a, b in spans) and end > start
        flags.append(int(inside and not (plain_text and special)))
    return list(enc.ids), flags


def lm_rows(path: Path, lines: Iterator[tuple[int, str]], tokenizer: Tokenizer, pieces: dict[str, Any] | None,
            max_length: int) -> Iterator[tuple[int, list[int], list[int]]]:
    """(line, ids, target flags) of every row of a causal-LM JSONL file, truncated to ``max_length`` tokens."""
    tok = untruncated(tokenizer)  # a too-long prompt must be seen, not cut
    for n, where, obj in jsonl_objects(path, lines):
        segs = row_segments(obj, pieces, where)
        plain = len(segs) == 1 or pieces is None
        ids, flags = encode_segments(tok, segs, plain_text=plain)
        if len(segs) == 1 and segs[0][1]:
            flags = [1] * len(ids)  # a text row: every token, as in .txt files
        first = next((i for i, f in enumerate(flags) if f), len(flags))
        if first >= max_length:
            raise DataError(f"{where}: the prompt is {first} tokens, the bundle's max length is {max_length} "
                            "(export --max-length), so no completion token would be trained on; shorten the prompt "
                            "or export with a larger --max-length")
        ids, flags = ids[:max_length], flags[:max_length]
        if sum(flags[1:]) == 0:
            raise DataError(f"{where}: fewer than 2 tokens; a language model needs at least 2 to learn from")
        yield n, ids, flags
