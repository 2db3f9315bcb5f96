"""Tokens: never in a URL or a log line; the status page signs in by form and cookie; a device token
is revoked or rotated through the API and the CLI and refused from the next request on."""

from __future__ import annotations

import logging
import time

import httpx
import pytest
import uvicorn
from cli_helpers import run_cli
from edgepeft.hub.local import free_port
from test_hub_api import ADMIN, H, hub  # noqa: F401  (the hub fixture)

from edgepeft.hub.app import create_app
from edgepeft.hub.auth import SESSION_COOKIE
from edgepeft.hub.logs import RedactSecrets, hub_log_config, redact


def test_the_status_page_without_credentials_is_a_login_form_that_posts_the_token(hub):
    client, *_ = hub
    r = client.get("/")
    assert r.status_code == 401
    assert '<form method="post" action="/login">' in r.text and 'name="token"' in r.text and 'type="password"' in r.text


def test_a_token_in_the_url_opens_nothing(hub):
    client, *_ = hub
    assert client.get(f"/?token={ADMIN}").status_code == 401
    assert client.get(f"/api/v1/fleets?token={ADMIN}").status_code == 401


def test_the_login_form_sets_an_httponly_strict_cookie_that_opens_only_the_status_page(hub):
    client, *_ = hub
    assert client.post("/login", data={"token": "wrong-token-0123456789"}, follow_redirects=False).status_code == 401
    r = client.post("/login", data={"token": ADMIN}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert ADMIN not in cookie
    page = client.get("/")
    assert page.status_code == 200 and "f1" in page.text
    client.cookies.clear()
    value = cookie.split(";")[0].split("=", 1)[1]
    assert client.get("/api/v1/fleets", cookies={SESSION_COOKIE: value}).status_code == 401  # not an API credential
    assert client.get("/api/v1/fleets", headers=H(value)).status_code == 401


def test_the_status_page_takes_the_admin_bearer_but_not_a_device_token(hub):
    client, manifest, tokens, store = hub
    assert client.get("/", headers=H(ADMIN)).status_code == 200
    assert client.get("/", headers=H(tokens["a"])).status_code == 401


def test_a_revoked_token_gets_401_from_the_next_request_on(hub):
    client, manifest, tokens, store = hub
    assert client.get("/api/v1/device", headers=H(tokens["a"])).status_code == 200
    r = client.delete("/api/v1/fleets/f1/devices/a/token", headers=H(ADMIN))
    assert r.status_code == 200 and r.json()["revoked"] is True
    assert client.get("/api/v1/device", headers=H(tokens["a"])).status_code == 401
    assert client.get("/api/v1/device", headers=H(tokens["b"])).status_code == 200  # the others are untouched
    listed = {d["device"]: d["revoked"] for d in client.get("/api/v1/fleets/f1/devices", headers=H(ADMIN)).json()}
    assert listed == {"a": True, "b": False}


def test_rotation_refuses_the_old_token_and_accepts_the_new(hub):
    client, manifest, tokens, store = hub
    new = client.post("/api/v1/fleets/f1/devices/a/token", headers=H(ADMIN)).json()["token"]
    assert client.get("/api/v1/device", headers=H(tokens["a"])).status_code == 401
    assert client.get("/api/v1/device", headers=H(new)).json()["device"] == "a"
    own = client.post("/api/v1/device/token", headers=H(new)).json()["token"]  # a device rotates its own
    assert client.get("/api/v1/device", headers=H(new)).status_code == 401
    assert client.get("/api/v1/device", headers=H(own)).status_code == 200


def test_rotating_or_revoking_a_device_of_another_fleet_is_404(hub):
    client, *_ = hub
    assert client.delete("/api/v1/fleets/f2/devices/a/token", headers=H(ADMIN)).status_code == 404
    assert client.post("/api/v1/fleets/f1/devices/nobody/token", headers=H(ADMIN)).status_code == 404
    assert client.post("/api/v1/fleets/f1/devices/a/token", headers=H("a.x")).status_code == 401


def test_redaction_of_secret_query_values():
    assert redact("/?token=abc&x=1") == "/?token=[redacted]&x=1"
    assert redact("/a?x=1&access_token=s3cr3t#f") == "/a?x=1&access_token=[redacted]#f"
    rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                            ("1.2.3.4:5", "GET", "/?token=abc", "1.1", 401), None)
    RedactSecrets().filter(rec)
    assert "abc" not in rec.getMessage()


@pytest.fixture
def served(tmp_path, hub_bundle):
    """A hub under real uvicorn with the hub's log config (what `edgepeft hub serve` runs), logging to files."""
    from edgepeft.hub.backends import open_store

    store = open_store(str(tmp_path / "store"))
    port = free_port()
    cfg = hub_log_config("info")
    for name, handler in cfg["handlers"].items():  # the same formatters and filters, written to a file
        handler.pop("stream", None)
        handler.update({"class": "logging.FileHandler", "filename": str(tmp_path / f"{name}.log")})
    server = uvicorn.Server(uvicorn.Config(create_app(store, admin_token=ADMIN, policy_interval_s=0), host="127.0.0.1",
                                           port=port, log_config=cfg))
    import threading

    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", store, tmp_path
    server.should_exit = True
    t.join(10)
    store.close()


def test_the_access_log_never_holds_a_token(served):
    url, store, tmp = served
    with httpx.Client(base_url=url) as c:
        c.get(f"/?token={ADMIN}")
        c.post("/login", data={"token": ADMIN})
        c.get("/api/v1/fleets", headers=H(ADMIN))
        c.get("/api/v1/fleets?admin_token=" + ADMIN)
    time.sleep(0.2)
    log = "".join(p.read_text() for p in tmp.glob("*.log"))
    assert "GET /?token=[redacted]" in log and "POST /login" in log  # the access log is on
    assert ADMIN not in log


def test_cli_rotates_and_revokes_a_device_token(served, capsys, hub_bundle):
    url, store, tmp = served
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint)
    old = store.add_device("f", "d1")
    admin_file = tmp / "admin.token"
    admin_file.write_text(ADMIN)
    common = ["--hub", url, "--admin-token-file", str(admin_file)]
    r = run_cli(capsys, "hub", "device", "rotate", "f", "d1", "-o", str(tmp / "d1.token"), *common)
    assert r.code == 0, r.err
    new = (tmp / "d1.token").read_text().strip()
    assert store.authenticate(old) is None and store.authenticate(new).id == "d1"
    r = run_cli(capsys, "hub", "device", "revoke", "f", "d1", *common)
    assert r.code == 0 and "revoked" in r.out
    with httpx.Client(base_url=url) as c:
        assert c.get("/api/v1/device", headers=H(new)).status_code == 401
    r = run_cli(capsys, "hub", "device", "revoke", "f", "ghost", *common)
    assert r.code != 0 and len([line for line in r.err.splitlines() if line.strip()]) == 1
