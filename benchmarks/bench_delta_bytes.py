"""Bytes that travel: a trained delta raw and packed, against its bundle and PEFT's adapter_model.safetensors.

For each bundle (the default export and, when it differs, the all-layers LoRA bundle), a delta is
trained for ``--steps`` steps on Rotten Tomatoes with the device trainer (so its values are real, not
the zero-initialized B of a fresh delta), then measured as: the delta file (safetensors, fp32), its
transport form (``edgepeft.delta.pack``: int8 per row + zstd), the PEFT adapter edgepeft writes for it
(``to_peft``), and the adapter_model.safetensors that ``PeftModel.save_pretrained`` writes for the same
LoRA configuration in torch. The bundle is every file in its directory (sent once per device).

    python benchmarks/bench_delta_bytes.py [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import DEFAULT_BUNDLE, minilm_bundle, run_child, write_result  # noqa: E402

PEFT_CHILD = """
import json, os, sys, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
import transformers
from peft import LoraConfig, get_peft_model
from edgepeft.demo.assets import minilm_dir
transformers.logging.set_verbosity_error()
layers = json.loads(sys.argv[1])
m = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
m = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS", target_modules=["query", "value"],
                                 layers_to_transform=layers))
with tempfile.TemporaryDirectory() as d:
    m.save_pretrained(d)
    print("RESULT", json.dumps({"bytes": os.path.getsize(os.path.join(d, "adapter_model.safetensors"))}))
"""


def measure(spec: dict, steps: int) -> dict:
    from bench_time_to_accuracy import data_files

    from edgepeft.delta import pack
    from edgepeft.delta.format import delta_bytes
    from edgepeft.delta.peft_format import WEIGHTS_FILE, to_peft
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.data import load_dataset
    from edgepeft.runtime.text import load_tokenizer
    from edgepeft.runtime.trainer import TrainConfig, Trainer
    from edgepeft.runtime.weights import read_frozen

    path = minilm_bundle(**spec)
    b = open_bundle(path)
    train = load_dataset(data_files()["train"], b.manifest, load_tokenizer(b))
    delta = Trainer(b, train, TrainConfig(max_steps=steps, batch_size=16)).fit().delta
    with tempfile.TemporaryDirectory() as d:
        to_peft(delta, b.manifest, d, base_weights=read_frozen(b))
        peft_ours = (Path(d) / WEIGHTS_FILE).stat().st_size
    layers = sorted(b.manifest.train_layers) if b.manifest.train_layers else list(range(6))
    peft_torch = run_child(PEFT_CHILD, str(layers))["bytes"]
    bundle = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    raw, packed = len(delta_bytes(delta)), len(pack(delta))
    return {"bundle": path.name, "trainable_numbers": b.manifest.trainable_numbers, "bundle_bytes": bundle,
            "delta_raw_bytes": raw, "delta_packed_bytes": packed, "peft_adapter_bytes_from_edgepeft": peft_ours,
            "peft_adapter_bytes_torch": peft_torch, "packed_share_of_bundle": round(packed / bundle, 5),
            "packed_vs_peft_adapter": round(packed / peft_torch, 3), "raw_vs_peft_adapter": round(raw / peft_torch, 3)}


def main(argv: list[str] | None = None) -> None:
    from bench_time_to_accuracy import IDENTICAL_BUNDLE

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps behind the measured delta")
    ap.add_argument("--quick", action="store_true", help="3 training steps")
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    specs = {"default export": DEFAULT_BUNDLE}
    all_layers = {**IDENTICAL_BUNDLE, "quantize": DEFAULT_BUNDLE["quantize"]}
    if all_layers != DEFAULT_BUNDLE:
        specs["LoRA q,v in every layer"] = all_layers
    rows = [{"config": name, **measure(spec, steps)} for name, spec in specs.items()]
    write_result("delta_bytes", {"benchmark": "bytes that travel: delta vs bundle vs PEFT adapter", "steps": steps, "rows": rows})
    for r in rows:
        print(f"{r['config']}: bundle {r['bundle_bytes'] / 2**20:.1f} MB, delta raw {r['delta_raw_bytes'] / 1024:.1f} KB, "
              f"packed {r['delta_packed_bytes'] / 1024:.1f} KB ({100 * r['packed_share_of_bundle']:.2f} % of the bundle), "
              f"PEFT adapter {r['peft_adapter_bytes_torch'] / 1024:.1f} KB")


if __name__ == "__main__":
    main()
