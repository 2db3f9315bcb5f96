"""A tokenizer's chat template as plain strings the device can concatenate (no Jinja on the device).

The template is rendered on the workstation with marker contents, and the text around the markers
becomes, per role, a prefix and a suffix, plus how a conversation starts with and without a system
message (SmolLM2 adds a default system prompt) and the generation prompt. The pieces are checked by
re-rendering conversations with them; a template they cannot reproduce is not shipped (chat data is
then refused on the device with a message saying so).
"""

from __future__ import annotations

from typing import Any

MARK = "\u2063{}\u2063"  # invisible separators: no template rewrites them
FORMAT = 1


def _render(tokenizer, messages: list[dict[str, str]], generation: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _split(text: str, marks: list[str]) -> list[str] | None:
    """The text between the marks, in order (len(marks) + 1 pieces), or None when a mark is missing."""
    pieces = []
    for m in marks:
        head, sep, text = text.partition(m)
        if not sep:
            return None
        pieces.append(head)
    return pieces + [text]


def render_pieces(pieces: dict[str, Any], messages: list[dict[str, str]], generation: bool = False) -> str:
    """A conversation rendered with the derived pieces (the device does the same in runtime/chat_data.py)."""
    out = []
    if messages and messages[0]["role"] == "system":
        out += [pieces["start_with_system"], messages[0]["content"], pieces["roles"]["system"][1]]
        messages = messages[1:]
    else:
        out.append(pieces["start_without_system"])
    for m in messages:
        pre, post = pieces["roles"][m["role"]]
        out += [pre, m["content"], post]
    if generation:
        out.append(pieces["generation_prompt"])
    return "".join(out)


def derive_pieces(tokenizer) -> dict[str, Any] | None:
    """Prefix/suffix per role and the conversation start of ``tokenizer``'s chat template; None if it has none or they
    cannot reproduce it."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    s, u, a, u2, a2 = (MARK.format(i) for i in range(5))
    conv = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a},
            {"role": "user", "content": u2}, {"role": "assistant", "content": a2}]
    try:
        seg = _split(_render(tokenizer, conv), [s, u, a, u2, a2])
        with_gen = _split(_render(tokenizer, conv[:2], True), [s, u])
        without_gen = _split(_render(tokenizer, conv[:2]), [s, u])
        no_system = _split(_render(tokenizer, conv[1:3]), [u, a])
    except Exception:  # a template that raises on these conversations is one the device cannot mirror
        return None
    if not (seg and with_gen and without_gen and no_system):
        return None
    suffix_user, suffix_asst = without_gen[2], seg[5]
    if not (seg[3].startswith(suffix_asst) and seg[2].startswith(suffix_user) and with_gen[2].startswith(suffix_user)):
        return None
    prefix_user = seg[3][len(suffix_asst):]
    if not (seg[1].endswith(prefix_user) and no_system[0].endswith(prefix_user)):
        return None
    pieces = {
        "format": FORMAT,
        "start_with_system": seg[0],
        "start_without_system": no_system[0][: len(no_system[0]) - len(prefix_user)],
        "roles": {"system": ["", seg[1][: len(seg[1]) - len(prefix_user)]], "user": [prefix_user, suffix_user],
                  "assistant": [seg[2][len(suffix_user):], suffix_asst]},
        "generation_prompt": with_gen[2][len(suffix_user):],
    }
    checks = [conv, conv[1:], conv[1:2] + conv[2:3] + conv[3:4]]
    if any(render_pieces(pieces, c) != _render(tokenizer, c) for c in checks):
        return None
    if render_pieces(pieces, conv[1:2], True) != _render(tokenizer, conv[1:2], True):
        return None
    return pieces
