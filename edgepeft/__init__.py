"""edgepeft: export a base model once, train small deltas on the device, sync only deltas.

Layers (data flows one way):
  edgepeft.exporters  workstation: torch -> bundle (model.onnx, train.onnx, manifest.json)
  edgepeft.runtime    device: numpy + onnxruntime, reads bundles, trains deltas
  edgepeft.devices    device fleet: push / pull deltas to a hub
  edgepeft            shared core: manifest, delta format, errors, CLI, hub
"""

__version__ = "0.1.0"
