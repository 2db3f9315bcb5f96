"""How CLI commands reach a hub: the --hub / --*-token-file options and a client built from them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

DEFAULT_HUB = "http://127.0.0.1:8000"
HUB_HELP = "Hub URL (or env EDGEPEFT_HUB)."


def token_options(option: str, envvar: str, help: str) -> Callable:
    """Decorator adding --hub and a token-file option (e.g. --token-file, --admin-token-file)."""

    def deco(f: Callable) -> Callable:
        f = click.option(option, envvar=envvar, type=click.Path(dir_okay=False), help=help)(f)
        return click.option("--hub", envvar="EDGEPEFT_HUB", default=DEFAULT_HUB, show_default=True, help=HUB_HELP)(f)

    return deco


def client(hub: str, token_file: str | None, option: str, envvar: str, *, retries: int | None = None):
    """A HubClient holding the token read from ``token_file``; a missing file is a usage error."""
    from edgepeft.devices.client import HubClient

    if not token_file:
        raise click.BadParameter(f"pass {option} or set {envvar}", param_hint=option)
    try:
        token = Path(token_file).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise click.BadParameter(f"{token_file}: no such file", param_hint=option) from None
    return HubClient(hub, token) if retries is None else HubClient(hub, token, retries=retries)
