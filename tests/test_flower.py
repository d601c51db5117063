"""Flower runs beside the stack on 127.0.0.1 with generated basic-auth credentials."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from xnai_tasks.errors import SettingsError
from xnai_tasks.ops.flower import ensure_credentials
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import wait_flower_success


def _get(url: str, auth: str | None) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, None


def test_flower_api_lists_role_workers_only_with_credentials(stack: Stack, stack_settings: Settings) -> None:
    # Given the credentials generated under XNAI_HOME (mode 0600)
    creds, new = ensure_credentials(stack_settings)
    assert not new
    assert (stack_settings.home / "flower.json").stat().st_mode & 0o777 == 0o600
    url = f"http://127.0.0.1:{stack_settings.flower_port}/api/workers?refresh=1"
    # When /api/workers is asked with them, Then it lists every role's worker
    deadline = time.monotonic() + 60
    workers: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status, workers = _get(url, creds.basic_auth)
        except OSError:
            status = 0  # Flower not listening yet
        if status == 200 and all(
            any(n.startswith(f"{r}@") for n in workers) for r in ("copilot", "cline", "grok", "curation")
        ):
            break
        time.sleep(1)
    assert status == 200, status
    assert {node.split("@")[0] for node in workers} >= {"copilot", "cline", "grok", "curation"}
    # And without credentials, or with wrong ones, it answers 401
    assert _get(url, None)[0] == 401
    assert _get(url, f"{creds.user}:wrong")[0] == 401


def test_flower_sees_signed_tasks_and_their_results(stack: Stack, stack_settings: Settings) -> None:
    # Given a signed task run through the stack (Celery's own `auth` serializer breaks Flower; ours must not)
    from xnai_tasks.client.sync import Client

    client = Client(stack_settings)
    handle = client.submit("grok", "echo", value="seen by flower")
    assert handle.get(timeout=30) == "seen by flower"
    client.close()
    creds, _ = ensure_credentials(stack_settings)
    # Then Flower's task API shows it with its state, and its dashboard page renders
    base = f"http://127.0.0.1:{stack_settings.flower_port}"
    info = wait_flower_success(stack_settings, handle.id)
    assert info and info["state"] == "SUCCESS" and info["name"] == "grok.echo"
    request = urllib.request.Request(f"{base}/workers")
    request.add_header("Authorization", "Basic " + base64.b64encode(creds.basic_auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and b"grok@" in response.read()


def test_credentials_readable_by_others_are_refused(tmp_path: Path) -> None:
    # Given Flower's credentials file made readable by others
    settings = Settings(home=tmp_path)
    ensure_credentials(settings)
    (tmp_path / "flower.json").chmod(0o644)
    # When Flower's credentials are loaded, Then they are refused in one line that says how to fix it
    with pytest.raises(SettingsError, match="mode 0644, readable by others: run chmod 600") as err:
        ensure_credentials(settings)
    assert "\n" not in str(err.value)
