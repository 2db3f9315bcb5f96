"""``edgepeft demo --task speech``: a keyword spotter trained on the workstation on a few espeak-ng voices, then
personalized by a fleet of devices whose owners speak with voices it never heard.

Each device's owner has a German voice of espeak-ng (``de`` speaking the English words: an accent the base never
heard), one variant per device; the held-out clips are new clips of all of them, so the fleet adapter is scored
on what every device meets. The workstation synthesizes the base speakers' clips (edgepeft/demo/speech_data.py),
trains the KWS CNN on them in torch (exporters/kws_train.py) and exports it int8 with its trained head; a device's
new clips arrive as 16 kHz WAV files and an ``audio,label`` .csv, as ``edgepeft train --data`` reads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgepeft import atomic
from edgepeft.demo import speech_data as S
from edgepeft.demo.task import DemoTask, Say

BASE_VOICES = tuple(f"{v}+{var}" for v in ("en-us", "en-gb") for var in ("m1", "m3", "f1", "f2"))  # 8 of the bench's 16
DEVICE_VOICES = ("de+f4", "de+m3", "de+f2")  # one owner per device (cycled beyond three)
BASE_PER_WORD = 5  # clips per (base voice, word)
BASE_EPOCHS = 15
RANK = 8


class SpeechTask(DemoTask):
    name, bundle_name, unit = "speech", "kws-int8.bundle", "clips"
    base_stage = f"base (trained on {len(BASE_VOICES)} other voices)"
    defaults = {"per_device": 40, "eval_rows": 300, "epochs": 8,
                "train": {"batch_size": 16, "lr": 5e-3, "weight_decay": 0.0}}

    def __init__(self, words: Sequence[str] = S.WORDS, synth: Callable[[S.Draw], np.ndarray] = S.clip,
                 device_voices: Sequence[str] = DEVICE_VOICES) -> None:
        self.words, self.synth, self.voices = tuple(words), synth, tuple(device_voices)
        self.held = None

    def export(self, out: Path, say: Say) -> None:
        import time

        from edgepeft.exporters.audio_specs import export_audio  # workstation side, only when the bundle is missing
        from edgepeft.exporters.kws_train import accuracy, train_kws

        work = out.parent
        t0 = time.perf_counter()
        plan = S.draws(BASE_VOICES, BASE_PER_WORD, 0, self.words)
        say(f"== workstation: synthesize {len(plan)} clips of {len(BASE_VOICES)} voices (espeak-ng + sox), "
            f"train the keyword spotter on them (torch, {BASE_EPOCHS} epochs)")
        base = S.write_set(work / "speech-base", plan, synth=self.synth)
        weights = work / "kws-base.safetensors"
        model, spec = train_kws(base, self.words, BASE_EPOCHS, weights)
        check = S.write_set(work / "speech-base-check", S.draws(BASE_VOICES, 1, 1, self.words), synth=self.synth)
        say(f"   [{time.perf_counter() - t0:6.1f}s] base voices, new clips: accuracy {100 * accuracy(model, check, self.words, spec):.1f} %")
        say(f"== workstation: export it (int8, LoRA r={RANK} on every convolution + its trained head)")
        export_audio("kws-cnn", weights, out, method="lora+head", method_config={"lora.rank": RANK}, quantize="int8",
                     progress=lambda m: say("   " + m))

    def held_out(self, bundle, rows: int, work: Path) -> str:
        from edgepeft.runtime.audio_data import load_audio_dataset

        per = max(1, rows // (len(self.voices) * len(self.words)))
        folder = S.write_set(work / f"speech-heldout-{per}", self._draws(self.voices, per, 7), synth=self.synth)
        self.held = load_audio_dataset(folder, bundle.manifest)
        return f"{len(self.held)} held-out clips of the devices' voices {', '.join(self.voices)}"

    def accuracy(self, predictor, deltas: Sequence = ()) -> float:
        from edgepeft.runtime.evaluate import evaluate

        return evaluate(predictor, self.held, deltas, batch_size=32)["accuracy"]

    def write_shard(self, data_dir: Path, round_: int, device: int, devices: int, n: int) -> Path:
        voice = self.voices[device % len(self.voices)]
        folder = data_dir / f"round{round_ + 1}"
        plan = self._draws((voice,), max(1, n // len(self.words)), 1000 + round_ * devices + device)
        S.write_set(folder, plan, synth=self.synth)
        rows = ["audio,label", *(f"{folder.name}/{f.parent.name}/{f.name},{f.parent.name}" for f in sorted(folder.glob("*/*.wav")))]
        out = data_dir / f"{folder.name}.csv"
        atomic.write_text(out, "\n".join(rows) + "\n")  # written last: the agent sees the clips only once all are there
        return out

    def devices_note(self, devices: int) -> str:
        return " (owners' voices " + ", ".join(f"device-{i + 1} {self.voices[i % len(self.voices)]}" for i in range(devices)) + ")"

    def _draws(self, voices: Sequence[str], per_word: int, seed: int) -> list[S.Draw]:
        return S.draws(tuple(voices), per_word, seed, self.words)
