"""KWS CNN bundles with seeded random weights, for A/B timing of the exporter (bench_cnn_session.py, bench_cnn_profile.py).

The train step's work does not depend on the weights, so an exporter change can be timed on bundles exported before
and after it (run this at each commit) without the speech bench's data and base training: the KWS CNN at its bench
size (10 words, 40 mels x 98 frames), BatchNorm statistics and affine seeded away from the identity, int8 weights, the
speech bench's two methods (BN + head, LoRA r=8 + head).

    python benchmarks/kws_random_bundles.py OUT_DIR TAG   # writes OUT_DIR/kws-random-{bn_head,lora_head}-TAG
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_cnn import randomize_batchnorm  # noqa: E402

from edgepeft.exporters.audio_specs import export_audio, save_audio_weights  # noqa: E402
from edgepeft.exporters.kws_cnn import KwsCnn  # noqa: E402
from edgepeft.runtime.audio import AudioSpec  # noqa: E402

METHODS = {"bn_head": ("bn+head", {}), "lora_head": ("lora+head", {"lora.rank": 8})}  # as bench_speech.py exports them


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="Directory for the bundles.")
    ap.add_argument("tag", help="Suffix of the bundles' names (before, after, a commit).")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = randomize_batchnorm(KwsCnn(10, 40), 1, affine=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "kws.safetensors"
        save_audio_weights(model, weights, labels=[f"w{i}" for i in range(10)], features=AudioSpec(mean=-6.0, std=4.0).to_dict())
        for name, (method, config) in METHODS.items():
            out = a.out / f"kws-random-{name}-{a.tag}"
            export_audio("kws-cnn", weights, out, method=method, method_config=config, quantize="int8")
            print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
