"""``edgepeft hub ...``: serve the hub, and admin commands that talk to a running hub over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path

import click

from edgepeft import atomic
from edgepeft.commands import hub_access
from edgepeft.hub import REQUEST_THREADS

ADMIN_OPTION, ADMIN_ENV = "--admin-token-file", "EDGEPEFT_ADMIN_TOKEN_FILE"
admin_options = hub_access.token_options(ADMIN_OPTION, ADMIN_ENV, "File holding the admin token (or env EDGEPEFT_ADMIN_TOKEN_FILE).")


def _admin_client(hub: str, token_file: str | None):
    return hub_access.client(hub, token_file, ADMIN_OPTION, ADMIN_ENV, retries=2)


@click.group("hub", context_settings={"help_option_names": ["-h", "--help"]})
def hub_group() -> None:
    """Run the hub that stores and aggregates fleet deltas, and administer it."""


@hub_group.command("serve")
@click.option("--store", "store_uri", required=True, help="Store: a directory, sqlite:///DIR, or postgresql://USER@HOST/DB.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; keep loopback and put a TLS proxy in front.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False),
              help="File with the admin token; default DIR/admin.token for a directory store (created if missing).")
@click.option("--max-upload-bytes", default=16 * 2**20, show_default=True, type=click.IntRange(1), help="Largest delta upload (413 above).")
@click.option("--policy-interval", default=30.0, show_default=True, type=click.FloatRange(0), help="Seconds between time-policy checks (0: off).")
@click.option("--public-status", is_flag=True, help="Serve the status page at / without the admin token.")
@click.option("--threads", default=REQUEST_THREADS, show_default=True, type=click.IntRange(1, 256),
              help="Threads for the handlers' blocking work (store, validation). More contend for the GIL: 2 ran 64 "
                   "concurrent uploads 1.7x as fast as anyio's default 40.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Hub processes on this port and store (uvicorn workers); one process is one core. Claims, revokes "
                   "and retries stay exact across them (see edgepeft/hub/workers.py).")
@click.option("--merge-threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="Threads an aggregation multiplies deltas on (0: every core). While it runs it competes with "
                   "serving uploads for those cores; 1 leaves the others to serving.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]), help="uvicorn log level.")
def serve_cmd(store_uri: str, host: str, port: int, admin_token_file: str | None, max_upload_bytes: int,
              policy_interval: float, public_status: bool, threads: int, workers: int, merge_threads: int,
              log_level: str) -> None:
    """Serve the hub HTTP API (OpenAPI at /docs) over STORE."""
    import uvicorn

    from edgepeft.hub.app import create_app
    from edgepeft.hub.logs import hub_log_config
    from edgepeft.hub.backends import open_store

    from edgepeft.hub import aggregate

    aggregate.MERGE_THREADS = merge_threads or None
    token = _admin_token(store_uri, admin_token_file)
    store = open_store(store_uri)  # also where a bad store is told in one line, and its schema made once
    if workers > 1:
        store.close()
        _serve_workers(store_uri, _token_file(store_uri, admin_token_file), workers, host, port, log_level,
                       max_upload_bytes=max_upload_bytes, policy_interval_s=policy_interval, request_threads=threads,
                       status_public=public_status, merge_threads=merge_threads)
        return
    app = create_app(store, admin_token=token, max_upload_bytes=max_upload_bytes, policy_interval_s=policy_interval,
                     request_threads=threads,
                     status_public=public_status)
    click.echo(f"edgepeft hub on http://{host}:{port} (store {store_uri.split('@')[-1]})", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=hub_log_config(log_level), timeout_graceful_shutdown=5)
    finally:
        store.close()


def _serve_workers(store_uri: str, token_file: str, workers: int, host: str, port: int, log_level: str,
                   **app_options) -> None:
    """``workers`` uvicorn worker processes, each building its app with hub/workers.py's factory."""
    import uvicorn

    from edgepeft.hub.logs import hub_log_config
    from edgepeft.hub.workers import ENV, WorkerOptions

    os.environ[ENV] = WorkerOptions(store_uri, str(Path(token_file).resolve()), **app_options).to_env()
    click.echo(f"edgepeft hub on http://{host}:{port}, {workers} workers (store {store_uri.split('@')[-1]})", err=True)
    uvicorn.run("edgepeft.hub.workers:app_from_env", factory=True, workers=workers, host=host, port=port,
                log_level=log_level, log_config=hub_log_config(log_level), timeout_graceful_shutdown=5)


def _token_file(store_uri: str, token_file: str | None) -> str:
    """The admin token's file: ``token_file``, else admin.token in a directory store."""
    if token_file is not None:
        return token_file
    return str(Path(store_uri[len("sqlite://"):] if store_uri.startswith("sqlite://") else store_uri) / "admin.token")


def _admin_token(store_uri: str, token_file: str | None) -> str:
    if token_file is None:
        if "://" in store_uri and not store_uri.startswith("sqlite://"):
            raise click.BadParameter("a database store needs --admin-token-file", param_hint="--admin-token-file")
        token_file = _token_file(store_uri, None)
        Path(token_file).parent.mkdir(parents=True, exist_ok=True)
        if not Path(token_file).exists():
            with contextlib.suppress(FileExistsError):  # another hub process wrote it first: both read that one
                atomic.write_text(token_file, secrets.token_urlsafe(32) + "\n", private=True, exclusive=True)
                click.echo(f"admin token written to {token_file}", err=True)
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise click.BadParameter(f"{token_file}: no such file", param_hint="--admin-token-file") from None
    if len(token) < 16:
        raise click.BadParameter(f"{token_file}: the admin token must be at least 16 characters", param_hint="--admin-token-file")
    return token


@hub_group.group("bundle")
def bundle_group() -> None:
    """Bundles on the hub."""


@bundle_group.command("add")
@click.argument("bundle_dir", type=click.Path(file_okay=False, exists=True))
@admin_options
def bundle_add_cmd(bundle_dir: str, hub: str, admin_token_file: str | None) -> None:
    """Register BUNDLE_DIR (uploaded as a tar); prints its fingerprint."""
    from edgepeft.hub.local import bundle_tar

    with _admin_client(hub, admin_token_file) as c:
        r = c.request("POST", "/api/v1/bundles", content=bundle_tar(Path(bundle_dir))).json()
    click.echo(r["fingerprint"])


@hub_group.group("fleet")
def fleet_group() -> None:
    """Fleets on the hub."""


def _int_list(text: str, option: str) -> list[int]:
    """Comma-separated integers of an option."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated integers, e.g. 4,8,16", param_hint=option) from None


@fleet_group.command("create")
@click.argument("name")
@click.option("--bundle", "fingerprint", required=True, help="Fingerprint of a registered bundle.")
@click.option("--aggregate-every", default=0, type=click.IntRange(0), help="Aggregate when this many deltas are pending (0: off).")
@click.option("--aggregate-minutes", default=0.0, type=click.FloatRange(0), help="Aggregate when the oldest pending delta is this old (0: off).")
@click.option("--staleness", default=2, show_default=True, type=click.IntRange(0), help="Versions a delta's parent may lag behind.")
@click.option("--clip-norm", type=click.FloatRange(0, min_open=True), help="Default: clip each device's update to this norm.")
@click.option("--trim", type=click.FloatRange(0, 0.5, max_open=True), help="Default: coordinate-wise trimmed mean fraction (else 0.2).")
@click.option("--buckets", type=click.IntRange(1), help="Default: a round of more deltas than this takes the trimmed mean over "
                                                        "this many bucket means (else 32).")
@click.option("--max-samples", type=click.IntRange(1, 10**9), help="Default cap on one delta's weight (else the median claim of its version, at most 10000).")
@click.option("--ranks", default="", help="LoRA ranks devices may train at, comma-separated, each at most the bundle's "
                                          "(e.g. 4,8,16 on a rank-16 bundle; default: the bundle's rank only).")
@click.option("--server-lr", type=click.FloatRange(0, 10, min_open=True),
              help="Server step: each version moves this fraction of the way from its parent to the devices' mean (else 1).")
@click.option("--server-momentum", type=click.FloatRange(0, 1, max_open=True),
              help="Server momentum (FedAvgM): plus this times what the parent version moved (else 0; 0.9 is usual).")
@admin_options
def fleet_create_cmd(name: str, fingerprint: str, aggregate_every: int, aggregate_minutes: float, staleness: int,
                     clip_norm: float | None, trim: float | None, buckets: int | None, max_samples: int | None, ranks: str,
                     server_lr: float | None, server_momentum: float | None, hub: str, admin_token_file: str | None) -> None:
    """Create fleet NAME training a registered bundle."""
    robust = {k: v for k, v in {"clip_norm": clip_norm, "trim": trim, "buckets": buckets, "max_samples": max_samples,
                                "server_lr": server_lr, "server_momentum": server_momentum}.items() if v is not None}
    body = {"name": name, "bundle": fingerprint, "aggregate_every": aggregate_every,
            "aggregate_minutes": aggregate_minutes, "staleness": staleness, "robust": robust,
            "ranks": _int_list(ranks, "--ranks")}
    with _admin_client(hub, admin_token_file) as c:
        c.request("POST", "/api/v1/fleets", json=body)
    click.echo(f"fleet {name} created")


@hub_group.group("device")
def device_group() -> None:
    """Devices on the hub."""


@device_group.command("add")
@click.argument("fleet")
@click.argument("device")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the token to this file (mode 600) instead of stdout.")
@admin_options
def device_add_cmd(fleet: str, device: str, output: str | None, hub: str, admin_token_file: str | None) -> None:
    """Add DEVICE to FLEET and print its token (shown once; the hub keeps only a hash)."""
    with _admin_client(hub, admin_token_file) as c:
        token = c.request("POST", f"/api/v1/fleets/{fleet}/devices", json={"device": device}).json()["token"]
    _give_token(device, token, output)


def _give_token(device: str, token: str, output: str | None) -> None:
    """Print a new device token, or write it to ``output`` with mode 600."""
    if output:
        atomic.write_text(output, token + "\n", private=True)
        click.echo(f"token of {device} written to {output}")
    else:
        click.echo(token)


@device_group.command("rotate")
@click.argument("fleet")
@click.argument("device")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the new token to this file (mode 600) instead of stdout.")
@admin_options
def device_rotate_cmd(fleet: str, device: str, output: str | None, hub: str, admin_token_file: str | None) -> None:
    """Give DEVICE a new token (shown once); its old token is refused from the next request on."""
    with _admin_client(hub, admin_token_file) as c:
        token = c.request("POST", f"/api/v1/fleets/{fleet}/devices/{device}/token").json()["token"]
    _give_token(device, token, output)


@device_group.command("revoke")
@click.argument("fleet")
@click.argument("device")
@admin_options
def device_revoke_cmd(fleet: str, device: str, hub: str, admin_token_file: str | None) -> None:
    """Revoke DEVICE's token: every request with it gets 401 from now on (`rotate` issues a new one)."""
    with _admin_client(hub, admin_token_file) as c:
        c.request("DELETE", f"/api/v1/fleets/{fleet}/devices/{device}/token")
    click.echo(f"token of {device} revoked")


@hub_group.command("aggregate")
@click.argument("fleet")
@click.option("--adapter", default="default", show_default=True, help="Adapter to aggregate.")
@click.option("--clip-norm", type=click.FloatRange(0, min_open=True), help="Clip each device's update (ΔW space) to this norm.")
@click.option("--trim", type=click.FloatRange(0, 0.5, max_open=True), help="Coordinate-wise trimmed mean: fraction cut at each end.")
@click.option("--buckets", type=click.IntRange(1), help="The trimmed mean of more deltas than this is over this many bucket means (else 32).")
@click.option("--max-samples", type=click.IntRange(1, 10**9), help="Cap on one delta's weight (default: the median claim, at most 10000).")
@admin_options
def aggregate_cmd(fleet: str, adapter: str, clip_norm: float | None, trim: float | None, buckets: int | None,
                  max_samples: int | None, hub: str, admin_token_file: str | None) -> None:
    """Aggregate FLEET's pending deltas into a new adapter version."""
    body = {k: v for k, v in {"clip_norm": clip_norm, "trim": trim, "buckets": buckets, "max_samples": max_samples}.items()
            if v is not None}
    with _admin_client(hub, admin_token_file) as c:
        v = c.request("POST", f"/api/v1/fleets/{fleet}/adapters/{adapter}/aggregate", json=body or None).json()
    trimmed = v["report"].get("trimmed")  # what the trimmed mean was taken over: the deltas, or bucket means of a large round
    how = f", trimmed mean over {trimmed['buckets']} {trimmed['over']}" if trimmed else ""
    click.echo(f"{fleet}/{adapter} v{v['version']}: {v['report'].get('count')} deltas, {v['report'].get('samples')} samples{how}")


@hub_group.command("publish")
@click.argument("fleet")
@click.argument("delta", type=click.Path(dir_okay=False, exists=True))
@click.option("--adapter", default="default", show_default=True, help="Adapter the delta becomes the next version of.")
@admin_options
def publish_cmd(fleet: str, delta: str, adapter: str, hub: str, admin_token_file: str | None) -> None:
    """Publish DELTA as the next version of FLEET's adapter (no aggregation)."""
    with _admin_client(hub, admin_token_file) as c:
        v = c.request("POST", f"/api/v1/fleets/{fleet}/adapters/{adapter}/versions", content=Path(delta).read_bytes()).json()
    click.echo(f"{fleet}/{adapter} v{v['version']} published")


@hub_group.command("status")
@click.argument("fleet", required=False)
@admin_options
def status_cmd(fleet: str | None, hub: str, admin_token_file: str | None) -> None:
    """Print fleets (or one fleet's devices and versions) as JSON."""
    with _admin_client(hub, admin_token_file) as c:
        if fleet is None:
            out = c.request("GET", "/api/v1/fleets").json()
        else:
            out = {"devices": c.request("GET", f"/api/v1/fleets/{fleet}/devices").json(),
                   "versions": c.request("GET", f"/api/v1/fleets/{fleet}/versions").json()}
    click.echo(json.dumps(out, indent=1, sort_keys=True))


