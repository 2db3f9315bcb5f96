"""``edgepeft delta ...``: inspect, compare, pack, merge and convert delta files (device-safe: no torch)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from edgepeft import atomic
from edgepeft.delta import format as fmt
from edgepeft.delta import transport
from edgepeft.delta.merge import diff, merge  # the package re-exports merge(), shadowing the module
from edgepeft.errors import DeltaError
from edgepeft.manifest import Manifest, read_manifest

MAX_PACKED_READ = 1024 * 1024 * 1024  # a packed file bigger than this is not a delta

BUNDLE_HELP = "Bundle directory whose manifest.json the delta must fit."


def _manifest(bundle: str | None) -> Manifest | None:
    return None if bundle is None else read_manifest(bundle)


def read_any(path: str | os.PathLike, manifest: Manifest | None = None) -> fmt.Delta:
    """Load a delta file or a packed delta (told apart by the first bytes), fully checked."""
    p = Path(os.fspath(path))
    if not p.is_file():
        raise DeltaError(f"{p}: no such delta file")
    with open(p, "rb") as f:
        head = f.read(8)
    if transport.is_packed(head):
        if p.stat().st_size > MAX_PACKED_READ:
            raise DeltaError(f"{p.name}: {p.stat().st_size} bytes is too large for a packed delta")
        return transport.unpack(p.read_bytes(), p.name, manifest=manifest)
    return fmt.load_delta(p, manifest)


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in s) or "scalar"


@click.group("delta", context_settings={"help_option_names": ["-h", "--help"]})
def delta_group() -> None:
    """Inspect, compare, pack, merge and convert delta files."""


@delta_group.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--bundle", type=click.Path(file_okay=False), default=None, help=BUNDLE_HELP)
def inspect_cmd(file: str, bundle: str | None) -> None:
    """Show a delta's meta, slots, raw and packed sizes, and the packing error. FILE: delta or packed delta."""
    d = read_any(file, _manifest(bundle))
    m = d.meta
    raw = len(fmt.delta_bytes(d))
    packed = transport.pack(d)
    back = transport.unpack(packed, "packed form")
    err = max((float(np.abs(back.tensors[n] - d.tensors[n]).max(initial=0.0)) for n in d.tensors), default=0.0)
    numbers = sum(t.size for t in d.tensors.values())
    click.echo(f"file        {file} ({Path(file).stat().st_size} bytes on disk)")
    click.echo(f"base        {m.base_fingerprint}")
    click.echo(f"adapter     {m.adapter} v{m.version} (parent {'-' if m.parent is None else m.parent})")
    click.echo(f"method      {m.method}  rank {m.rank}  alpha {m.alpha:g}  scale {d.scale:g}")
    click.echo(f"samples     {m.samples}  creator {m.creator or '-'}  created {m.created or '-'}")
    for k, v in sorted(m.extra.items()):
        click.echo(f"extra       {k} = {v}")
    click.echo(f"slots       {len(d.tensors)} ({numbers} numbers)")
    for n in sorted(d.tensors):
        click.echo(f"  {n:<60} {_shape(d.tensors[n].shape)}")
    click.echo(f"raw         {raw} bytes")
    click.echo(f"packed      {len(packed)} bytes ({raw / max(len(packed), 1):.2f}x smaller)")
    click.echo(f"pack error  max |x - x'| = {err:.3g} (bound {transport.error_bound(d):.3g}: max|row| / 254 per row)")


@delta_group.command("diff")
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
def diff_cmd(a: str, b: str) -> None:
    """Compare delta A with delta B per slot and per LoRA update (dW = s*B@A): max |A-B| and ||A-B|| / ||B||."""
    rows = diff(read_any(a), read_any(b))
    width = max((len(k) for k in rows), default=4)
    click.echo(f"{'slot':<{width}}  {'max_abs':>10}  {'rel_fro':>10}")
    for k, (mx, rel) in rows.items():
        click.echo(f"{k:<{width}}  {mx:>10.3g}  {rel:>10.3g}")


@delta_group.command("pack")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Packed file to write.")
def pack_cmd(src: str, out: str) -> None:
    """Pack a delta file for transport (int8 per row + zstd)."""
    d = read_any(src)
    data = transport.pack(d)
    atomic.write_bytes(out, data)
    raw = len(fmt.delta_bytes(d))
    click.echo(f"wrote {out} ({len(data)} bytes, {raw / max(len(data), 1):.2f}x smaller than {raw})")


@delta_group.command("unpack")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Delta file to write.")
@click.option("--bundle", type=click.Path(file_okay=False), default=None, help=BUNDLE_HELP)
def unpack_cmd(src: str, out: str, bundle: str | None) -> None:
    """Unpack a packed delta into a delta file."""
    d = read_any(src, _manifest(bundle))
    fmt.save_delta(out, d)
    click.echo(f"wrote {out}")


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        ws = [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None
    if len(ws) != n:
        raise click.BadParameter(f"{len(ws)} weights for {n} deltas", param_hint="--weights")
    return ws


@delta_group.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Merged delta file to write.")
@click.option("--weights", default=None, help="Comma-separated weights, one per file (default: each delta's sample count).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="LoRA rank of the result (default: the largest input rank).")
@click.option("--scale", type=float, default=None, help="LoRA scale alpha/rank of the result (default: the first delta's).")
@click.option("--bundle", type=click.Path(file_okay=False), default=None,
              help="Bundle directory; needed for methods that aggregate against the base weights (DoRA).")
def merge_cmd(files: tuple[str, ...], out: str, weights: str | None, rank: int | None, scale: float | None,
              bundle: str | None) -> None:
    """Merge deltas FILES in the space of the full update (weighted mean of s*B@A, re-factored by SVD)."""
    ws = _weights(weights, len(files))
    base = None
    if bundle is not None:
        from edgepeft.runtime.bundle import open_bundle
        from edgepeft.runtime.weights import bundle_base_weights

        base = bundle_base_weights(open_bundle(bundle))

    def stream() -> Iterator[fmt.Delta]:  # one delta in memory at a time
        for f in files:
            yield read_any(f)

    merged, report = merge(stream(), ws, rank=rank, scale=scale, base=base)
    fmt.save_delta(out, merged)
    click.echo(f"merged {report.count} deltas (total weight {report.total_weight:g}) -> rank {report.rank}, scale {report.scale:g}")
    for m, e in report.errors.items():
        click.echo(f"  {m:<60} rel. error {e:.3g}")
    click.echo(f"wrote {out}")


def _base_weights(bundle: str, manifest: Manifest) -> dict[str, np.ndarray] | None:
    """The bundle's frozen weights by parameter path (PEFT stores heads and bias='all' biases whole), or None
    when the bundle directory holds only its manifest."""
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.weights import read_frozen

    if not (Path(bundle) / manifest.weights).is_file():
        return None
    return read_frozen(open_bundle(bundle))


@delta_group.command("to-peft")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help=BUNDLE_HELP)
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="PEFT adapter directory to write.")
def to_peft_cmd(file: str, bundle: str, out: str) -> None:
    """Convert a delta to a Hugging Face PEFT LoRA adapter directory."""
    from edgepeft.delta.peft_format import to_peft

    manifest = read_manifest(bundle)
    d = read_any(file, manifest)
    to_peft(d, manifest, out, base_weights=_base_weights(bundle, manifest))
    click.echo(f"wrote {out}")


@delta_group.command("from-peft")
@click.argument("adapter_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--bundle", required=True, type=click.Path(file_okay=False), help=BUNDLE_HELP)
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="Delta file to write.")
@click.option("--fill-missing", is_flag=True, help="Treat bundle slots the adapter lacks as zero instead of refusing.")
@click.option("--adapter", default="default", show_default=True, help="Adapter name to record in the delta.")
def from_peft_cmd(adapter_dir: str, bundle: str, out: str, fill_missing: bool, adapter: str) -> None:
    """Convert a Hugging Face PEFT LoRA adapter directory DIR to a delta that fits the bundle."""
    from edgepeft.delta.peft_format import from_peft

    manifest = read_manifest(bundle)
    d = from_peft(adapter_dir, manifest, base_weights=_base_weights(bundle, manifest), fill_missing=fill_missing, adapter=adapter)
    fmt.save_delta(out, d)
    click.echo(f"wrote {out} (rank {d.meta.rank}, alpha {d.meta.alpha:g})")


@delta_group.command("to-ort-adapter")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False), help="ONNX Runtime .onnx_adapter file to write.")
@click.option("--bundle", type=click.Path(file_okay=False), default=None, help=BUNDLE_HELP)
def to_ort_adapter_cmd(file: str, out: str, bundle: str | None) -> None:
    """Export a delta as an ONNX Runtime adapter file (LoRA B pre-multiplied by the scale).

    Apply it to the bundle's model.onnx with onnxruntime.LoraAdapter + RunOptions.add_active_adapter:
    every delta slot of model.onnx has a neutral default, so the adapter fills the slots it names.
    """
    from edgepeft.delta.ort_adapter import to_ort_adapter

    to_ort_adapter(read_any(file, _manifest(bundle)), out)
    click.echo(f"wrote {out}")
