"""The ``edgepeft`` command: one click group whose commands load lazily.

The workstation side (torch) is imported only by ``export``, so every other command works on a
device install. Domain errors (``EdgePeftError``) become one line and exit status 1.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from edgepeft import __version__
from edgepeft.errors import EdgePeftError

# command name -> (module, attribute, one-line help). Help is here so `edgepeft --help` imports nothing.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "export": ("edgepeft.commands.export", "export_cmd", "Export a Hugging Face model to a bundle (workstation)."),
    "info": ("edgepeft.commands.info", "info_cmd", "Show what a bundle holds: base, slots, sizes."),
    "infer": ("edgepeft.commands.infer", "infer_cmd", "Run the bundle on text, with or without a delta."),
    "chat": ("edgepeft.commands.chat", "chat_cmd", "Chat with a causal-LM bundle (+ delta), replies streamed."),
    "train": ("edgepeft.commands.train", "train_cmd", "Train a delta on local data (device side, no torch)."),
    "eval": ("edgepeft.commands.train", "eval_cmd", "Evaluate a bundle (+ delta) on a data file."),
    "delta": ("edgepeft.commands.delta", "delta_group", "Inspect, pack, merge and convert delta files."),
    "hub": ("edgepeft.commands.hub", "hub_group", "Run the hub that stores and aggregates fleet deltas."),
    "push": ("edgepeft.commands.sync", "push_cmd", "Upload a delta to the hub."),
    "pull": ("edgepeft.commands.sync", "pull_cmd", "Download an adapter version from the hub."),
    "agent": ("edgepeft.commands.sync", "agent_group", "Run the device sync agent."),
    "demo": ("edgepeft.commands.demo", "demo_cmd", "Run the whole loop on a real model and real data."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module only when that command runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        mod, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(mod), attr)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "fastapi", "uvicorn", "psycopg"):
                raise click.ClickException(
                    f"`edgepeft {name}` needs {e.name}, which this install lacks; "
                    f"install it with: pip install \"edgepeft[{'hub' if name == 'hub' else 'export'}]\""
                ) from None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgepeft")
def cli() -> None:
    """Parameter-efficient fine-tuning at the edge.

    \b
    On the workstation:  edgepeft export MODEL_DIR -o BUNDLE
    On the device:       edgepeft train BUNDLE --data mine.jsonl -o mine.delta
                         edgepeft infer BUNDLE --delta mine.delta "some text"
    Across the fleet:    edgepeft hub serve --store DIR ; edgepeft push / pull
    """


def main(argv: list[str] | None = None) -> None:
    """Console entry point: domain errors become one line on stderr and exit status 1."""
    try:
        cli.main(args=argv, prog_name="edgepeft", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgePeftError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
