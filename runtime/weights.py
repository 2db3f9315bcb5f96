"""Read a bundle's frozen weights with numpy alone (memory-mapped), dequantized on request.

Used where the base weights themselves are needed outside onnxruntime: a PEFT adapter's
``modules_to_save`` (full head weights), and references built on exactly the bundle's weights.
"""

from __future__ import annotations

import json

import numpy as np

from edgepeft.errors import BundleError
from edgepeft.frozen import BaseWeights, base_weights, frozen_arrays
from edgepeft.names import WEIGHTS_INDEX_FILE
from edgepeft.runtime.bundle import Bundle


def read_frozen(bundle: Bundle) -> dict[str, np.ndarray]:
    """Every frozen base weight by torch parameter path, float weights dequantized to float32."""
    path = bundle.path / WEIGHTS_INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: cannot be read ({e})") from None
    return frozen_arrays(index, np.memmap(bundle.path / bundle.manifest.weights, dtype=np.uint8, mode="r"))


def bundle_base_weights(bundle: Bundle) -> BaseWeights:
    """module -> frozen weight (out, in), float64, for methods that aggregate against the base (DoRA)."""
    return base_weights(read_frozen(bundle), bundle.manifest)
