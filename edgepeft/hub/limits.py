"""What the hub does not take on trust from a device: sample claims, value sizes, byte-level identity,
and the one invariant behind every publish (a device's own reader accepts the version).

Sample weights are capped here and nowhere else; the ΔW math in ``aggregate`` and ``delta.merge`` only
sees the capped weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from typing import Mapping

import numpy as np

from edgepeft.delta.format import Delta, DeltaMeta, delta_from_bytes, meta_to_strings
from edgepeft.delta.transport import is_packed, quantize, unpack
from edgepeft.errors import DeltaError, HubError
from edgepeft.manifest import Manifest

MAX_SAMPLES_CLAIM = 10**9  # an upload claiming more training samples is refused: no device has seen that many
DEFAULT_MAX_SAMPLES = 10_000  # one delta weighs at most this much unless the admin sets max_samples
MEDIAN_MULTIPLE = 1  # ... and at most the median claim of its round: a device that lies about its samples weighs no
#                     more than a typical one (at 4x, one liar among 5 moved the fleet 4 points: test_fleet_robust.py)
MAX_ABS_VALUE = 1e4  # a delta value beyond this is refused at upload (LoRA and bias deltas are O(1)):
#                      the merge then stays finite in float32, so what is published stays readable
MAX_PUBLISHED_SAMPLES = 10**15  # a published version's samples stay far inside what the delta reader accepts


def sample_weights(claims: list[int], max_samples: int | None, devices: list[str] | None = None) -> list[float]:
    """Aggregation weights from the deltas' self-reported sample counts, capped so no claim outweighs the fleet.

    Default cap: ``MEDIAN_MULTIPLE`` times the round's median claim, and never above ``DEFAULT_MAX_SAMPLES``;
    an admin's ``max_samples`` replaces it (the override for fleets whose devices really differ that much).
    The cap holds per delta and, given ``devices`` (the uploader of each claim), per device and round: a device
    that sends many deltas into one version shares one cap among them (scaled down in proportion).
    """
    if max_samples is None:
        cap = min(DEFAULT_MAX_SAMPLES, math.ceil(MEDIAN_MULTIPLE * statistics.median(claims))) if claims else 0
    else:
        cap = max_samples
    out = [max(0, min(int(c), cap, MAX_SAMPLES_CLAIM)) for c in claims]
    if devices is None:
        return out
    totals: dict[str, int] = {}
    for w, d in zip(out, devices):
        totals[d] = totals.get(d, 0) + w
    return [w if totals[d] <= cap else w * cap / totals[d] for w, d in zip(out, devices)]


STALENESS_POWER = 0.5  # FedBuff's polynomial rule: a delta s versions behind weighs 1 / (1 + s) ** 0.5 of a fresh one


def staleness_factor(staleness: int) -> float:
    """How much a delta counts when ``staleness`` versions were published after the one it trained from (0: fresh)."""
    if staleness < 0:
        raise HubError(f"staleness {staleness} < 0: a delta cannot be trained from a version not yet published")
    return 1.0 / (1.0 + staleness) ** STALENESS_POWER


def largest_value(delta: Delta) -> float:
    """max |x| over every tensor of ``delta`` (0 for an empty delta)."""
    return max((float(np.abs(t).max(initial=0.0)) for t in delta.tensors.values()), default=0.0)


def content_id(delta: Delta, device: str, codes: dict[str, np.ndarray] | None = None) -> str:
    """What makes two uploads the same delta: uploader, every meta field and each tensor's int8 transport form.

    Raw and packed bytes of one delta get the same id (packing stores exactly these int8 values, and
    re-quantizing unpacked values gives them back), so a delta sent raw and then packed is stored once.
    Row scales are left out: they may differ in the last float32 bit between the two forms. ``codes``: the int8
    values of a packed upload as it stored them (the same values; quantizing again would only repeat the work).
    """
    shapes = {name: t.shape for name, t in delta.tensors.items()}
    if codes is not None:
        return codes_content_id(delta.meta, shapes, codes, device)
    # quantized one tensor at a time, as hashed: a raw upload's codes are never all held at once
    return codes_content_id(delta.meta, shapes, _Quantized(delta), device)


class _Quantized:
    """``codes[name]``: the int8 transport values of one tensor of ``delta``, made when asked."""

    def __init__(self, delta: Delta) -> None:
        self.delta = delta

    def __getitem__(self, name: str) -> np.ndarray:
        return quantize(self.delta.tensors[name])[1]


def codes_content_id(meta: DeltaMeta, shapes: dict[str, tuple[int, ...]], codes: Mapping[str, np.ndarray] | _Quantized,
                     device: str) -> str:
    """:func:`content_id` from the meta, shapes and int8 codes alone (a packed upload checked without unpacking)."""
    h = hashlib.sha256(json.dumps({"device": device, "meta": meta_to_strings(meta)}, sort_keys=True).encode())
    for name in sorted(shapes):
        h.update(f"\0{name}\0{list(shapes[name])}\0".encode())
        h.update(np.ascontiguousarray(codes[name]))  # hashed in place (the buffer protocol), not copied
    return h.hexdigest()


def readable(data: bytes, manifest: Manifest, what: str) -> None:
    """The invariant behind every publish: a device's own reader (the checks it trains from) accepts ``data``."""
    try:
        if is_packed(data):
            unpack(data, what, manifest=manifest, for_training=True)
        else:
            delta_from_bytes(data, what, manifest, for_training=True)
    except DeltaError as e:
        raise HubError(f"refusing to publish {what}: the device reader would refuse it ({e})") from None
