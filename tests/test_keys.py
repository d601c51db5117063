"""The keyring on disk: creation, modes, rotation, revocation, permissions."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from xnai_tasks.core import constants as c
from xnai_tasks.errors import KeyringError, UsageError
from xnai_tasks.security.key_admin import authorize, init_keys, list_keys, revoke, rotate
from xnai_tasks.security.key_pair import KeyStatus, key_id
from xnai_tasks.security.key_store import keyring_path, keys_dir, private_key_path
from xnai_tasks.security.keyring import Keyring, SignerSource, load_signer

T0 = 1_700_000_000.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _active_kid(home: Path, agent: str) -> str:
    entry = Keyring.load(home).active_entry(agent)
    assert entry is not None
    return entry.kid


def test_init_creates_one_key_per_role_with_safe_modes(tmp_path: Path) -> None:
    # Given an empty home
    # When the keys are initialized
    ring = init_keys(tmp_path)
    # Then every role, and Flower (read-only control commands), has one active key, whose private file
    # is 0600, in a 0700 directory; Flower may dispatch no task
    assert set(ring.agents()) == set(c.AGENTS) == {*c.ROLES, "flower"}
    assert ring.permissions("flower") == ()
    assert _mode(keys_dir(tmp_path)) == 0o700
    for agent in c.AGENTS:
        entry = ring.active_entry(agent)
        assert entry is not None
        assert entry.kid == key_id(entry.public_key) == hashlib.sha256(entry.public_key).hexdigest()[:16]
        assert _mode(private_key_path(tmp_path, agent, entry.kid)) == 0o600
    # And the keyring is plain JSON with public keys only
    doc = json.loads(keyring_path(tmp_path).read_text())
    assert doc["version"] == 1 and len(doc["keys"]) == len(c.AGENTS)
    text = keyring_path(tmp_path).read_text()
    for agent in c.AGENTS:
        seed = private_key_path(tmp_path, agent, _active_kid(tmp_path, agent)).read_text().strip()
        assert seed not in text


def test_default_permissions(tmp_path: Path) -> None:
    # Given a fresh keyring
    ring = init_keys(tmp_path)
    # Then copilot may dispatch anything and each role agent only its own role's tasks
    assert ring.permissions("copilot") == ("*.*",)
    assert ring.is_authorized("copilot", "grok.synthesize", "grok")
    assert ring.is_authorized("copilot", "copilot.health", "copilot")
    for role in c.WORKER_ROLES:
        assert ring.permissions(role) == (f"{role}.*",)
        assert ring.is_authorized(role, f"{role}.anything", role)
        others = [r for r in c.ROLES if r != role]
        assert not any(ring.is_authorized(role, f"{other}.anything", other) for other in others)


def test_is_authorized_requires_the_role_prefix(tmp_path: Path) -> None:
    # Given copilot, allowed everything
    ring = init_keys(tmp_path)
    # Then a task whose prefix is not the target role, or with no prefix, is still refused
    assert not ring.is_authorized("copilot", "cline.generate", "grok")
    assert not ring.is_authorized("copilot", "generate", "cline")
    assert not ring.is_authorized("copilot", "cline.", "cline")
    assert not ring.is_authorized("nobody", "cline.generate", "cline")


def test_init_is_idempotent_and_never_overwrites(tmp_path: Path) -> None:
    # Given initialized keys
    init_keys(tmp_path)
    before = {p.name: p.read_bytes() for p in keys_dir(tmp_path).glob("*.key")}
    ring_before = keyring_path(tmp_path).read_bytes()
    # When init runs again
    init_keys(tmp_path)
    # Then no key file and not the keyring changed
    after = {p.name: p.read_bytes() for p in keys_dir(tmp_path).glob("*.key")}
    assert after == before
    assert keyring_path(tmp_path).read_bytes() == ring_before


def test_signer_repr_hides_the_private_key(tmp_path: Path) -> None:
    # Given a signer
    init_keys(tmp_path)
    signer = load_signer(tmp_path, "cline")
    seed = private_key_path(tmp_path, "cline", signer.kid).read_text().strip()
    # Then neither repr nor str shows the key
    assert seed not in repr(signer) and seed not in str(signer)
    assert signer.agent == "cline" and len(signer.sign(b"x")) == 64


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_loose_private_key_mode_is_refused(tmp_path: Path, mode: int) -> None:
    # Given a private key readable by group or others
    init_keys(tmp_path)
    path = private_key_path(tmp_path, "grok", _active_kid(tmp_path, "grok"))
    os.chmod(path, mode)
    # When it is loaded
    with pytest.raises(KeyringError) as err:
        load_signer(tmp_path, "grok")
    # Then the refusal is one line naming the file and the fix
    message = str(err.value)
    assert str(path) in message and "chmod 600" in message and "\n" not in message
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_missing_private_key_is_refused(tmp_path: Path) -> None:
    # Given a keyring whose private key file was deleted
    init_keys(tmp_path)
    path = private_key_path(tmp_path, "curation", _active_kid(tmp_path, "curation"))
    path.unlink()
    # When loading it Then a KeyringError names the file
    with pytest.raises(KeyringError, match="missing") as err:
        load_signer(tmp_path, "curation")
    assert str(path) in str(err.value)


def test_symlinked_private_key_is_refused(tmp_path: Path) -> None:
    # Given a private key replaced by a symlink to a 0600 copy
    init_keys(tmp_path)
    path = private_key_path(tmp_path, "cline", _active_kid(tmp_path, "cline"))
    copy = tmp_path / "elsewhere.key"
    copy.write_bytes(path.read_bytes())
    os.chmod(copy, 0o600)
    path.unlink()
    path.symlink_to(copy)
    # When loading it Then it is refused
    with pytest.raises(KeyringError, match="cannot be opened"):
        load_signer(tmp_path, "cline")


def test_mismatched_or_malformed_private_key_is_refused(tmp_path: Path) -> None:
    # Given cline's key file holding grok's seed
    init_keys(tmp_path)
    cline = private_key_path(tmp_path, "cline", _active_kid(tmp_path, "cline"))
    grok = private_key_path(tmp_path, "grok", _active_kid(tmp_path, "grok"))
    cline.write_bytes(grok.read_bytes())
    # Then loading cline's signer fails: the key does not match the keyring
    with pytest.raises(KeyringError, match="does not match"):
        load_signer(tmp_path, "cline")
    # And garbage in the file is malformed
    cline.write_text("not hex\n")
    with pytest.raises(KeyringError, match="malformed"):
        load_signer(tmp_path, "cline")


def test_unknown_agent_has_no_signer(tmp_path: Path) -> None:
    init_keys(tmp_path)
    with pytest.raises(KeyringError, match="no active key"):
        load_signer(tmp_path, "mallory")


def test_missing_or_broken_keyring(tmp_path: Path) -> None:
    # Given no keyring: loading says how to create one
    with pytest.raises(KeyringError, match="xnai keys init"):
        Keyring.load(tmp_path)
    # Given a keyring that is not JSON, or has a public key not matching its id
    init_keys(tmp_path)
    path = keyring_path(tmp_path)
    doc = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(KeyringError, match="malformed") as err:
        Keyring.load(tmp_path)
    assert str(path) in str(err.value)
    doc["keys"][0]["public_key"] = "00" * 32
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyringError, match="does not match its id"):
        Keyring.load(tmp_path)


def test_world_writable_keyring_is_refused(tmp_path: Path) -> None:
    # Given a keyring anyone can rewrite
    init_keys(tmp_path)
    os.chmod(keyring_path(tmp_path), 0o666)
    # Then loading it is refused
    with pytest.raises(KeyringError, match="too open"):
        Keyring.load(tmp_path)


def test_rotation_grace_then_expiry(tmp_path: Path) -> None:
    # Given grok's key
    init_keys(tmp_path, now=T0)
    old = _active_kid(tmp_path, "grok")
    # When it is rotated with one hour of grace
    new = rotate(tmp_path, "grok", grace_s=3600, now=T0 + 10)
    ring = Keyring.load(tmp_path)
    # Then the new key is active and signs; the old verifies until the grace ends, then expires
    assert new.kid != old
    assert ring.status(new.kid, T0 + 10) is KeyStatus.ACTIVE
    assert ring.status(old, T0 + 10) is KeyStatus.GRACE
    assert ring.status(old, T0 + 10 + 3599) is KeyStatus.GRACE
    assert ring.status(old, T0 + 10 + 3600) is KeyStatus.EXPIRED
    assert load_signer(tmp_path, "grok", now=T0 + 20).kid == new.kid
    # And the old private key file is gone, the new one is 0600
    assert not private_key_path(tmp_path, "grok", old).exists()
    assert _mode(private_key_path(tmp_path, "grok", new.kid)) == 0o600
    rows = {r["kid"]: r for r in list_keys(tmp_path, now=T0 + 20)}
    assert rows[old]["status"] == "grace" and rows[new.kid]["status"] == "active"


def test_rotation_with_zero_grace_expires_at_once(tmp_path: Path) -> None:
    init_keys(tmp_path, now=T0)
    old = _active_kid(tmp_path, "cline")
    rotate(tmp_path, "cline", grace_s=0, now=T0)
    assert Keyring.load(tmp_path).status(old, T0) is KeyStatus.EXPIRED
    with pytest.raises(KeyringError, match="grace"):
        rotate(tmp_path, "cline", grace_s=-1)
    with pytest.raises(KeyringError, match="no keys"):
        rotate(tmp_path, "mallory")


def test_revoke(tmp_path: Path) -> None:
    # Given cline's key
    init_keys(tmp_path)
    kid = _active_kid(tmp_path, "cline")
    # When it is revoked
    revoke(tmp_path, kid)
    # Then it is revoked, its private file is gone, and cline cannot sign until a new key exists
    assert Keyring.load(tmp_path).status(kid) is KeyStatus.REVOKED
    assert not private_key_path(tmp_path, "cline", kid).exists()
    with pytest.raises(KeyringError, match="no active key"):
        load_signer(tmp_path, "cline")
    # And init gives cline a new key without touching the others
    others = {a: _active_kid(tmp_path, a) for a in c.ROLES if a != "cline"}
    init_keys(tmp_path)
    assert load_signer(tmp_path, "cline").kid != kid
    assert {a: _active_kid(tmp_path, a) for a in others} == others
    with pytest.raises(KeyringError, match="no key"):
        revoke(tmp_path, "0123456789abcdef")


def test_authorize_adds_dedupes_and_replaces(tmp_path: Path) -> None:
    # Given cline's default permissions
    init_keys(tmp_path)
    # When grok.synthesize is added twice
    assert authorize(tmp_path, "cline", ["grok.synthesize"]) == ("cline.*", "grok.synthesize")
    assert authorize(tmp_path, "cline", ["grok.synthesize"]) == ("cline.*", "grok.synthesize")
    ring = Keyring.load(tmp_path)
    # Then cline may dispatch exactly that grok task
    assert ring.is_authorized("cline", "grok.synthesize", "grok")
    assert not ring.is_authorized("cline", "grok.analyze", "grok")
    # When the permissions are replaced
    assert authorize(tmp_path, "cline", ["*.index"], replace=True) == ("*.index",)
    ring = Keyring.load(tmp_path)
    # Then the old ones are gone and the wildcard role applies
    assert not ring.is_authorized("cline", "cline.generate", "cline")
    assert ring.is_authorized("cline", "curation.index", "curation")
    # And an empty replacement denies everything
    assert authorize(tmp_path, "cline", [], replace=True) == ()
    assert not Keyring.load(tmp_path).is_authorized("cline", "cline.generate", "cline")


@pytest.mark.parametrize("pattern", ["cline", "nosuchrole.*", "cline.gen-erate", "*", ".x", "cline.*.x", ""])
def test_authorize_rejects_bad_patterns(tmp_path: Path, pattern: str) -> None:
    init_keys(tmp_path)
    with pytest.raises(KeyringError, match="bad permission pattern"):
        authorize(tmp_path, "cline", [pattern])


def test_authorize_rejects_unknown_agents_and_bare_strings(tmp_path: Path) -> None:
    init_keys(tmp_path)
    with pytest.raises(KeyringError, match="no keys"):
        authorize(tmp_path, "mallory", ["cline.*"])
    with pytest.raises(KeyringError, match="bad agent name"):
        authorize(tmp_path, "Bad Name", ["cline.*"])
    with pytest.raises(KeyringError, match="list"):
        authorize(tmp_path, "cline", "cline.*")


def test_list_keys_rows(tmp_path: Path) -> None:
    # Given keys made at T0
    init_keys(tmp_path, now=T0)
    # When listed 100 s later
    rows = list_keys(tmp_path, now=T0 + 100)
    # Then one row per agent with age, status and permissions
    assert [r["agent"] for r in rows] == sorted(c.AGENTS)
    for row in rows:
        assert set(row) == {"agent", "kid", "age_s", "status", "expires_at", "permissions"}
        assert row["age_s"] == 100 and row["status"] == "active"
    assert next(r for r in rows if r["agent"] == "copilot")["permissions"] == ["*.*"]


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    init_keys(tmp_path)
    rotate(tmp_path, "grok")
    authorize(tmp_path, "grok", ["curation.search"])
    names = sorted(p.name for p in keys_dir(tmp_path).iterdir())
    assert not [n for n in names if n.endswith(".tmp")]
    assert _mode(keyring_path(tmp_path)) & 0o022 == 0


def test_loaded_keyring_sees_later_changes(tmp_path: Path) -> None:
    # Given a keyring loaded by a worker
    ring = init_keys(tmp_path)
    kid = _active_kid(tmp_path, "grok")
    assert ring.status(kid) is KeyStatus.ACTIVE
    # When another process revokes a key and rotates another
    revoke(tmp_path, kid)
    new = rotate(tmp_path, "cline")
    # Then a refresh sees both, and a second refresh has nothing new
    assert ring.refresh() is True
    assert ring.status(kid) is KeyStatus.REVOKED
    assert ring.entry(new.kid) is not None
    assert ring.refresh() is False


def test_signer_source_follows_rotation(tmp_path: Path) -> None:
    # Given a long-running producer's signer source that checks on every call
    init_keys(tmp_path)
    source = SignerSource(tmp_path, "copilot", refresh_s=0)
    first = source.get()
    assert source.get() is first
    # When copilot's key is rotated Then the next signer is the new key
    new = rotate(tmp_path, "copilot")
    assert source.get().kid == new.kid


def test_writable_key_directory_is_refused(tmp_path: Path) -> None:
    # Given a key directory other users may write to (they could swap the keyring or a key)
    init_keys(tmp_path)
    os.chmod(keys_dir(tmp_path), 0o777)
    # Then loading and changing keys are refused, naming the directory
    for action in (lambda: Keyring.load(tmp_path), lambda: load_signer(tmp_path, "cline"), lambda: init_keys(tmp_path)):
        with pytest.raises(KeyringError, match="chmod 700") as err:
            action()
        assert str(keys_dir(tmp_path)) in str(err.value)
