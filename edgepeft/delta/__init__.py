"""Delta files: what a device learns, checked on every load, packed for transport, merged on the hub.

numpy + safetensors + zstd (stdlib or backports.zstd) only: this package runs on devices, so it never imports torch.
"""

from edgepeft.delta.format import Delta, DeltaMeta, delta_from_init, load_delta, map_delta, save_delta
from edgepeft.delta.merge import MergeReport, diff, merge
from edgepeft.delta.transport import pack, unpack

__all__ = ["Delta", "DeltaMeta", "MergeReport", "delta_from_init", "diff", "load_delta", "map_delta", "merge", "pack", "save_delta", "unpack"]
