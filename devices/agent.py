"""The device sync agent: pull the latest adapter, train on new local data, push the delta.

``edgepeft agent run --config device.toml``. Everything it must not lose lives on disk under
``state_dir``: the outbox (deltas not yet accepted), the adapter it trains from, and which data files
are done (by sha256). A data file is marked done only after its delta is in the outbox, and a delta
leaves the outbox only when the hub accepted it, so a crash at any point neither loses nor doubles a
round; offline, the agent keeps training from the adapter it has and pushes when the hub is back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepeft import atomic, schema
from edgepeft.delta.format import Delta, delta_bytes, delta_from_bytes, load_delta, replace_meta
from edgepeft.delta.transport import is_packed, pack, unpack
from edgepeft.devices.client import HubClient, HubRefused
from edgepeft.devices.outbox import Outbox
from edgepeft.errors import EdgePeftError, HubError
from edgepeft.manifest import Manifest, read_manifest

MAX_CONFIG_BYTES = 1 << 20


def _checked(raw: dict[str, Any]) -> dict[str, Any]:
    """The keys of ``device.toml`` that are present, each checked for type and range (SchemaError otherwise)."""
    f = schema.Fields(raw)
    out: dict[str, Any] = {}
    for key in ("hub", "token", "token_file", "bundle", "data_dir", "state_dir", "adapter"):
        if key in raw:
            out[key] = f.text(key, 4096)
    for key, hi in (("interval_s", 1e7), ("backoff_s", 3600.0), ("backoff_cap_s", 86400.0)):
        if key in raw:
            out[key] = f.number(key, 0.0, hi)
    if "raw" in raw:
        out["raw"] = f.typed("raw", bool)
    if "retries" in raw:
        out["retries"] = f.integer("retries", 0, 100)
    if "train" in raw:
        out["train"] = f.typed("train", dict)
        schema.depth(out["train"], 4)
    return out


def wire_delta(data: bytes, where: str, manifest: Manifest) -> Delta:
    """A delta from what travels (packed transport form, or safetensors), checked against the bundle."""
    if is_packed(data):
        return unpack(data, where, manifest=manifest)
    return delta_from_bytes(data, where, manifest)


TrainFn = Callable[[Path, Path, "Path | None", Path], int]  # (bundle, data, start delta or None, out) -> samples
DATA_SUFFIXES = (".jsonl", ".csv", ".txt")


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class AgentConfig:
    """What ``device.toml`` holds; relative paths are relative to the file's folder."""

    hub: str = _help("http://127.0.0.1:8000", "Hub URL (https:// through a TLS proxy in production).")
    token: str = _help("", "Device token (prefer token_file).")
    token_file: str = _help("", "File holding the device token.")
    bundle: str = _help("bundle", "Bundle directory; downloaded from the hub when missing.")
    data_dir: str = _help("data", "Folder where new local data files (*.jsonl, *.csv, *.txt; for an image or audio bundle an image,label or audio,label .csv) appear.")
    state_dir: str = _help("state", "Outbox, current adapter and progress.")
    adapter: str = _help("default", "Adapter name to pull and train.")
    interval_s: float = _help(300.0, "Seconds between rounds in `agent run`.")
    retries: int = _help(6, "Retries per request (exponential backoff with jitter).")
    backoff_s: float = _help(0.5, "First backoff delay; doubles per retry up to backoff_cap_s.")
    backoff_cap_s: float = _help(60.0, "Longest backoff delay.")
    raw: bool = _help(False, "Push the float32 safetensors delta instead of the packed (int8 + zstd) transport form.")
    train: dict[str, Any] = _help(None, "Options of the device trainer (runtime.trainer.TrainConfig fields).")

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = {}
        if self.interval_s < 0 or self.retries < 0:
            raise HubError("interval_s and retries must be >= 0")

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "AgentConfig":
        """Read ``device.toml``; unknown keys are refused by name."""
        p = Path(os.fspath(path))
        try:
            if p.stat().st_size > MAX_CONFIG_BYTES:
                raise HubError(f"{p}: {p.stat().st_size} bytes; a device config is at most {MAX_CONFIG_BYTES}")
            raw = tomllib.loads(p.read_bytes().decode("utf-8"))
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(raw) - known)
            if unknown:
                raise HubError(f"{p}: unknown key(s) {', '.join(u[:64] for u in unknown)}; known: {', '.join(sorted(known))}")
            cfg = cls(**_checked(raw))
        except FileNotFoundError:
            raise HubError(f"{p}: no such config file") from None
        except UnicodeDecodeError as e:
            raise HubError(f"{p}: not UTF-8 (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise HubError(f"{p}: not valid TOML ({e})") from None
        except schema.SchemaError as e:
            raise HubError(f"{p}: {e}") from None
        for name in ("token_file", "bundle", "data_dir", "state_dir"):
            v = getattr(cfg, name)
            if v and not os.path.isabs(v):
                setattr(cfg, name, str(p.parent / v))
        return cfg

    def read_token(self) -> str:
        if self.token:
            return self.token.strip()
        if not self.token_file:
            raise HubError("device config needs token or token_file")
        try:
            return Path(self.token_file).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise HubError(f"{self.token_file}: token file not found") from None


def runtime_train_fn(options: dict[str, Any] | None = None) -> TrainFn:
    """A train_fn on the device trainer (``edgepeft.runtime.trainer``) with these TrainConfig options."""

    def train(bundle_dir: Path, data_path: Path, start: Path | None, out: Path) -> int:
        from edgepeft.delta.format import save_delta
        from edgepeft.runtime.bundle import open_bundle
        from edgepeft.runtime.datasets import load_for_bundle
        from edgepeft.runtime.trainer import TrainConfig, Trainer

        bundle = open_bundle(bundle_dir)
        data = load_for_bundle(data_path, bundle)  # text, images or audio, as `edgepeft train` reads them
        start_delta = load_delta(start, bundle.manifest, for_training=True) if start else None
        result = Trainer(bundle, data, TrainConfig(**(options or {})), start=start_delta).fit()
        save_delta(out, result.delta)
        return int(result.delta.meta.samples)

    return train


@dataclass
class RoundReport:
    """What one round did."""

    version: int | None = None  # adapter version trained from
    pulled: bool = False
    trained: int = 0
    sent: int = 0
    rejected: int = 0
    pending: int = 0
    bytes_up: int = 0  # delta bytes the hub accepted this round
    bytes_down: int = 0  # version bytes pulled this round
    unimproved: int = 0  # data files whose training did not beat the starting delta (nothing pushed)
    loss: float | None = None  # training loss of the last delta trained, when the trainer reports it
    offline: str | None = None  # the last connection problem, if any


class Agent:
    """One device's loop over pull, train, push."""

    def __init__(self, config: AgentConfig, *, train_fn: TrainFn | None = None, client: HubClient | None = None) -> None:
        self.config = config
        self.client = client or HubClient(config.hub, config.read_token(), retries=config.retries,
                                          backoff=config.backoff_s, backoff_cap=config.backoff_cap_s)
        self.train_fn = train_fn or runtime_train_fn(config.train)
        self.state_dir = Path(config.state_dir)
        self.outbox = Outbox(self.state_dir / "outbox")
        self.state_file = self.state_dir / "state.json"
        self.state = self._load_state()

    # ---- state -----------------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        return {"version": None, "fleet": None, "done": {}}

    def _save_state(self) -> None:
        atomic.write_text(self.state_file, json.dumps(self.state, indent=1, sort_keys=True))

    @property
    def adapter_path(self) -> Path:
        return self.state_dir / "adapter.delta"

    @property
    def version(self) -> int | None:
        return self.state.get("version")

    # ---- steps -----------------------------------------------------------------------------------

    def flush(self, report: RoundReport) -> None:
        res = self.outbox.flush(self.client.push)
        report.sent += res.sent
        report.rejected += res.rejected
        if res.error:
            report.offline = res.error
        for key in res.stale:  # trained from a version the fleet no longer takes: train that data again
            self.state["done"].pop(key, None)
        if res.stale:
            self._save_state()

    def pull(self, report: RoundReport) -> None:
        """Fetch the bundle if missing and the latest adapter version if newer than ours."""
        me = self.client.me()
        self.state["fleet"] = me["fleet"]
        bundle = Path(self.config.bundle)
        if not (bundle / "manifest.json").is_file():
            self.client.download_bundle(me["bundle"], bundle)
        latest = me.get("latest", {}).get(self.config.adapter)
        if latest and latest != self.version:
            rank = (self.config.train or {}).get("rank") or None  # a device of a lower rank pulls the version refitted to it
            version, data = self.client.download_version(me["fleet"], self.config.adapter, latest, rank=rank)  # sha256 checked
            d = wire_delta(data, f"{self.config.adapter} v{version}", read_manifest(bundle))  # check before use
            atomic.write_bytes(self.adapter_path, delta_bytes(d))  # kept decoded: what the trainer starts from
            self.state["version"] = version
            report.pulled = True
        self._save_state()

    def new_data(self) -> list[tuple[Path, str]]:
        """(file, sha256) of data files not yet trained on, oldest first."""
        folder = Path(self.config.data_dir)
        if not folder.is_dir():
            return []
        files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES), key=lambda p: (p.stat().st_mtime, p.name))
        out = []
        for p in files:
            key = hashlib.sha256(p.read_bytes()).hexdigest()
            if key not in self.state["done"]:
                out.append((p, key))
        return out

    def train(self, report: RoundReport) -> None:
        """Train one delta per new data file into the outbox."""
        bundle = Path(self.config.bundle)
        for path, key in self.new_data():
            if not self.outbox.has(key):
                out = self.state_dir / "training.delta"
                start = self.adapter_path if self.version and self.adapter_path.is_file() else None
                samples = self.train_fn(bundle, path, start, out)
                d = load_delta(out)
                if not samples:  # nothing beat the starting point: pushing it would only add noise to the fleet
                    out.unlink(missing_ok=True)
                    report.unimproved += 1
                    self.state["done"][key] = path.name
                    self._save_state()
                    continue
                d = replace_meta(d, creator=self.client.device_id, parent=self.version, adapter=self.config.adapter,
                                 samples=int(d.meta.samples or samples), version=0)
                self.outbox.put(delta_bytes(d) if self.config.raw else pack(d), key)
                try:
                    report.loss = float(d.meta.extra["train_loss"])
                except (KeyError, ValueError):
                    pass
                out.unlink(missing_ok=True)
                report.trained += 1
            self.state["done"][key] = path.name
            self._save_state()

    def run_once(self) -> RoundReport:
        """One round: push what waits, pull, train on new data, push."""
        report = RoundReport()
        up, down = self.client.bytes_up, self.client.bytes_down
        try:
            self._round(report)
        finally:
            report.bytes_up, report.bytes_down = self.client.bytes_up - up, self.client.bytes_down - down
        return report

    def _round(self, report: RoundReport) -> None:
        self.flush(report)
        try:
            self.pull(report)
        except HubRefused:
            raise
        except HubError as e:
            report.offline = str(e)  # offline: train from what we have
        if (Path(self.config.bundle) / "manifest.json").is_file():
            self.train(report)
        if report.trained or self.outbox.pending():
            self.flush(report)
        report.version = self.version
        report.pending = len(self.outbox.pending())
        if report.trained and not report.offline:
            try:
                values = {"trained": float(report.trained), "pending": float(report.pending)}
                if report.loss is not None and report.loss == report.loss:
                    values["train_loss"] = report.loss
                self.client.report(values, self.version)
            except HubError:
                pass  # metrics are best effort

    def run(self, rounds: int | None = None, on_round: Callable[[RoundReport], None] | None = None) -> None:
        """Rounds every ``interval_s`` seconds, forever or ``rounds`` times."""
        n = 0
        while rounds is None or n < rounds:
            try:
                report = self.run_once()
            except EdgePeftError as e:
                report = RoundReport(offline=str(e))
            if on_round:
                on_round(report)
            n += 1
            if rounds is None or n < rounds:
                time.sleep(self.config.interval_s)
