"""``edgepeft info``: what a bundle holds."""

from __future__ import annotations

from pathlib import Path

import click

from edgepeft.manifest import read_manifest
from edgepeft.methods import owner


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


@click.command("info")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--slots/--no-slots", default=True, show_default=True, help="List every delta slot.")
def info_cmd(bundle: Path, slots: bool) -> None:
    """Show a bundle's base model, fingerprint, size, quantization and delta slots."""
    m = read_manifest(bundle)
    disk = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
    base = int(m.extra.get("base_parameters", 0))
    trainable = m.trainable_numbers
    share = f" ({100 * trainable / base:.2f} % of {base:,} base parameters)" if base else ""
    rows = [
        ("source", m.source), ("architecture", f"{m.architecture} ({m.model_type})"), ("task", m.task),
        ("fingerprint", m.fingerprint), ("size on disk", _size(disk)), ("quantization", m.quantization),
        ("method", m.method), ("max length", str(m.max_length)),
        ("trainable", f"{trainable:,} numbers = {_size(4 * trainable)}{share}"),
    ]
    if m.labels:
        rows.insert(3, ("labels", ", ".join(m.labels)))
    if m.train_layers is not None:
        rows.append(("train layers", ", ".join(map(str, m.train_layers))))
    for name, cfg in sorted(m.method_config.items()):  # bundles exported before the registry have none
        if cfg:
            rows.append((f"{name} options", ", ".join(f"{k}={v}" for k, v in sorted(cfg.items()))))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if slots:
        click.echo(f"slots ({len(m.slots)}):")
        for s in m.slots:
            extra = f"  r={s.rank} alpha={s.alpha:g}" if s.rank else ""
            click.echo(f"  {s.name}  {s.kind} ({owner(s.kind).name})  {tuple(s.shape)}{extra}")
