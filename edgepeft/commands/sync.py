"""``edgepeft push / pull / agent``: the device side of fleet sync (httpx only, no server deps)."""

from __future__ import annotations

from pathlib import Path

import click

from edgepeft import atomic
from edgepeft.commands import hub_access

TOKEN_OPTION, TOKEN_ENV = "--token-file", "EDGEPEFT_TOKEN_FILE"
device_options = hub_access.token_options(TOKEN_OPTION, TOKEN_ENV, "File holding this device's token (or env EDGEPEFT_TOKEN_FILE).")


def _client(hub: str, token_file: str | None):
    return hub_access.client(hub, token_file, TOKEN_OPTION, TOKEN_ENV)


@click.command("push")
@click.argument("delta", type=click.Path(dir_okay=False, exists=True))
@click.option("--pack/--no-pack", "packed", default=True, show_default=True, help="Send the packed (int8 + zstd) transport form.")
@device_options
def push_cmd(delta: str, packed: bool, hub: str, token_file: str | None) -> None:
    """Upload DELTA (a delta file or a packed delta) to the hub as this device."""
    from edgepeft.commands.delta import read_any
    from edgepeft.delta.transport import is_packed, pack

    data = Path(delta).read_bytes()
    if packed and not is_packed(data[:8]):
        data = pack(read_any(delta))
    with _client(hub, token_file) as c:
        r = c.push(data)
    click.echo(f"{'already stored' if r.get('duplicate') else 'accepted'}: {r['id'][:16]} ({len(data)} bytes)")


@click.command("pull")
@click.argument("adapter")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the delta file.")
@click.option("--version", default="latest", show_default=True, help="Version number, or latest.")
@click.option("--packed", is_flag=True, help="Write the packed transport form as pulled (default: the decoded delta file).")
@click.option("--rank", type=click.IntRange(1), default=None, help="A lower LoRA rank the fleet takes: the version refitted to it (train with the same --rank).")
@device_options
def pull_cmd(adapter: str, output: str, version: str, packed: bool, rank: int | None, hub: str, token_file: str | None) -> None:
    """Download a version of ADAPTER from this device's fleet (packed on the wire, its sha256 checked)."""
    from edgepeft.delta.format import delta_bytes
    from edgepeft.delta.transport import is_packed, unpack

    with _client(hub, token_file) as c:
        fleet = c.me()["fleet"]
        number, data = c.download_version(fleet, adapter, version, rank=rank)
    pulled = len(data)
    if not packed and is_packed(data):
        data = delta_bytes(unpack(data, f"{fleet}/{adapter} v{number}"))
    atomic.write_bytes(output, data)
    click.echo(f"{fleet}/{adapter} v{number} -> {output} ({pulled} bytes pulled, sha256 checked; {len(data)} written)")


@click.group("agent", context_settings={"help_option_names": ["-h", "--help"]})
def agent_group() -> None:
    """Run the device sync agent."""


@agent_group.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, exists=True), help="device.toml of this device; its [train] table takes `edgepeft train`'s options by field name (rank = 4, logit_adjust = 1.0 for a device whose labels are skewed, prox = 0.01 to keep its update near the version it pulled, ...).")
@click.option("--once", is_flag=True, help="Run one round and exit.")
@click.option("--rounds", type=click.IntRange(1), help="Run this many rounds, then exit (default: forever).")
@click.option("--raw", is_flag=True, help="Push float32 safetensors deltas instead of the packed form (or raw = true in device.toml).")
def agent_run_cmd(config_path: str, once: bool, rounds: int | None, raw: bool) -> None:
    """Pull the latest adapter, train on new local data, push the delta; repeat every interval_s."""
    from edgepeft.devices.agent import Agent, AgentConfig, RoundReport

    config = AgentConfig.from_toml(config_path)
    config.raw = config.raw or raw
    agent = Agent(config)

    def show(r: RoundReport) -> None:
        line = (f"v{r.version or 0}: pulled={'yes' if r.pulled else 'no'} trained={r.trained} sent={r.sent} pending={r.pending} "
                f"up={r.bytes_up} B down={r.bytes_down} B")
        if r.rejected:
            line += f" rejected={r.rejected}"
        if r.offline:
            line += f" offline ({r.offline})"
        click.echo(line)

    agent.run(rounds=1 if once else rounds, on_round=show)
