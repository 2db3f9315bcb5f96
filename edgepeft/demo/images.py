"""``edgepeft demo --task images``: EfficientNet-Lite0 (ImageNet) adapted on the devices to Fashion-MNIST.

Each device's new images arrive as PNG files and an ``image,label`` .csv (what a camera device would keep, and
what ``edgepeft train --data`` reads; Pillow decodes them, the ``vision`` extra); the held-out images are
Fashion-MNIST's test split, read from its IDX file.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from edgepeft import atomic
from edgepeft.demo.assets import FASHION_LABELS, efficientnet_lite0_weights, fashion_mnist
from edgepeft.demo.task import DemoTask, Say
from edgepeft.errors import DataError

SIZE = 64  # input side: Fashion-MNIST's 28x28 resized up (what two cores afford; the model takes any size)
TOP_BLOCKS = 4  # slots in the top 4 of 16 blocks and after them
RANK = 8


class ImageTask(DemoTask):
    name, bundle_name, unit = "images", "effnet-lite0-int8.bundle", "images"
    base_stage = "base (ImageNet features, fresh head)"
    defaults = {"per_device": 400, "eval_rows": 500, "epochs": 2,
                "train": {"batch_size": 32, "lr": 3e-3, "weight_decay": 0.0}}

    def __init__(self) -> None:
        self.held = None
        self._train: tuple[np.ndarray, np.ndarray] | None = None

    def export(self, out: Path, say: Say) -> None:
        from edgepeft.exporters.vision_specs import export_vision  # workstation side, only when the bundle is missing

        say(f"== workstation: export EfficientNet-Lite0 (ImageNet; int8, {SIZE}x{SIZE} input, LoRA r={RANK} on the 1x1 "
            f"convolutions of the top {TOP_BLOCKS} blocks + a fresh 10-class head)")
        export_vision("efficientnet-lite0", efficientnet_lite0_weights(), out, labels=list(FASHION_LABELS), size=SIZE,
                      method="lora+head", method_config={"lora.rank": RANK}, top_layers=TOP_BLOCKS, quantize="int8",
                      progress=lambda m: say("   " + m))

    def held_out(self, bundle, rows: int, work: Path) -> str:
        from edgepeft.runtime.image_data import load_image_dataset

        test = load_image_dataset(fashion_mnist("t10k"), bundle.manifest)
        self.held = test.subset(np.sort(np.random.default_rng(1).choice(len(test), rows, replace=False)))
        return f"{rows} held-out Fashion-MNIST test images, 10 classes"

    def accuracy(self, predictor, deltas: Sequence = ()) -> float:
        from edgepeft.runtime.evaluate import evaluate

        return evaluate(predictor, self.held, deltas, batch_size=64)["accuracy"]

    def write_shard(self, data_dir: Path, round_: int, device: int, devices: int, n: int) -> Path:
        images, labels = self._train_images()
        shard = round_ * devices + device
        order = np.random.default_rng(0).permutation(len(labels))[shard * n:(shard + 1) * n]
        folder = data_dir / f"round{round_ + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        rows = ["image,label"]
        for k, i in enumerate(order):
            name = f"{k:05d}.png"
            (folder / name).write_bytes(png(images[i]))  # plain writes: the .csv, written last and atomically, commits them
            rows.append(f"{folder.name}/{name},{FASHION_LABELS[labels[i]]}")
        out = data_dir / f"{folder.name}.csv"
        atomic.write_text(out, "\n".join(rows) + "\n")
        return out

    def _train_images(self) -> tuple[np.ndarray, np.ndarray]:
        if self._train is None:
            from edgepeft.runtime.images import read_idx

            path = fashion_mnist("train")
            self._train = read_idx(path), read_idx(path.with_name(path.name.replace("-images-idx3", "-labels-idx1")))
        return self._train


def png(image: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, C) image as PNG bytes (Pillow, the ``vision`` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError('writing the demo\'s images needs Pillow: pip install "edgepeft[vision]"') from None
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()
