"""Message and result signatures: the round trip, and every reason a message is refused."""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu.utils import json as kombu_json
from nacl.signing import SigningKey

from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected, RefusedError, ResultSignatureError, UsageError
from xnai_tasks.security import message_signature
from xnai_tasks.security.key_admin import authorize, init_keys, revoke, rotate
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring, load_signer
from xnai_tasks.security.message_signature import COVERED_HEADERS, nonce_ttl_s, sign_message, verify_message
from xnai_tasks.security.refusal import REASONS, Reason
from xnai_tasks.security.result_signature import sign_result, verify_result
from xnai_tasks.security.signature import MAX_SKEW_S, SIG_HEADER

T0 = 1_700_000_000.0
MAX_AGE = 3600.0
TASK_ID = "6f0e4b2a-8d7e-4c1a-9a43-2b8d1f0e9c11"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    init_keys(tmp_path, now=T0 - 1000)
    return tmp_path


@pytest.fixture
def ring(home: Path) -> Keyring:
    return Keyring.load(home)


@pytest.fixture
def copilot(home: Path) -> Signer:
    return load_signer(home, "copilot")


def _headers(task: str = "cline.generate", **extra: Any) -> dict[str, Any]:
    """Protocol-2 headers as Celery builds them for a task."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": TASK_ID,
        "shadow": None,
        "eta": None,
        "expires": "2023-11-14T23:13:20+00:00",
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": TASK_ID,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{'prompt': 'hello'}",
        "origin": "gen1@host",
        "ignore_result": False,
    }
    headers.update(extra)
    return headers


BODY: Any = ((), {"prompt": "hello", "max_tokens": 64}, {"callbacks": None, "errbacks": None, "chain": None})


def _signed(
    signer: Signer,
    task: str = "cline.generate",
    queue: str = "cline",
    body: Any = BODY,
    now: float = T0,
) -> dict[str, Any]:
    """Given: a message as the producer hook leaves it, signature header included."""
    headers = _headers(task)
    headers[SIG_HEADER] = sign_message(signer, headers=headers, body=body, queue=queue, now=now)
    return headers


def _verify(
    ring: Keyring,
    headers: Any,
    body: Any = BODY,
    queue: Any = "cline",
    role: str = "cline",
    now: float = T0 + 1,
) -> message_signature.Verified:
    return verify_message(ring, headers=headers, body=body, queue=queue, now=now, max_age_s=MAX_AGE, role=role)


def _reason(ring: Keyring, headers: Any, **kwargs: Any) -> str:
    with pytest.raises(MessageRejected) as err:
        _verify(ring, headers, **kwargs)
    return err.value.reason


# ---- the round trip ----


def test_round_trip(ring: Keyring, copilot: Signer) -> None:
    # Given a message signed by copilot for cline
    headers = _signed(copilot)
    sig = headers[SIG_HEADER]
    assert set(sig) == {"v", "agent", "kid", "ts", "nonce", "queue", "sig"}
    # When cline's worker verifies it
    verified = _verify(ring, headers)
    # Then it learns who sent which task, and the nonce for the replay check
    assert verified.agent == "copilot" and verified.kid == copilot.kid
    assert (verified.task, verified.task_id, verified.role, verified.queue) == (
        "cline.generate",
        TASK_ID,
        "cline",
        "cline",
    )
    assert verified.ts == T0 and verified.nonce == sig["nonce"] and verified.key_status == "active"


def test_round_trip_through_kombu_json(ring: Keyring, copilot: Signer) -> None:
    # Given a body with tuples, non-string keys and the types kombu tags (datetime, UUID, Decimal, bytes)
    body = (
        (1, 2.5, "x"),
        {
            "when": dt.datetime(2024, 1, 2, 3, 4, 5, 6789, tzinfo=dt.UTC),
            "day": dt.date(2024, 1, 2),
            "at": dt.time(3, 4, 5),
            "id": uuid.UUID(TASK_ID),
            "price": decimal.Decimal("1.10"),
            "blob": b"\x00\xffraw",
            "text": b"plain",
            "scores": {1: "a", 10: "b", 9: "c"},
            "unicode": "d\u00e9j\u00e0 \ud83d",
        },
        {"callbacks": None},
    )
    headers = _signed(copilot, body=body)
    # When the message travels as kombu JSON (as on the Redis transport) and is decoded
    wire = kombu_json.loads(kombu_json.dumps({"headers": headers, "body": body}))
    assert wire["body"][1]["when"] == body[1]["when"]  # kombu revives the types
    # Then the decoded message verifies, and so does the original in-process one
    assert _verify(ring, wire["headers"], body=wire["body"]).task_id == TASK_ID
    assert _verify(ring, headers, body=body).task_id == TASK_ID
    # And so does a plain-JSON round trip of a plain body
    plain = json.loads(json.dumps({"headers": _signed(copilot), "body": BODY}))
    assert _verify(ring, plain["headers"], body=plain["body"]).agent == "copilot"


def test_uncovered_headers_may_change(ring: Keyring, copilot: Signer) -> None:
    # Given a signed message that kombu marks as redelivered and whose display headers change
    headers = _signed(copilot)
    headers["redelivered"] = True
    headers["argsrepr"] = "(...)"
    del headers["lang"]
    # Then it still verifies
    assert _verify(ring, headers).task == "cline.generate"


def test_each_signature_has_a_fresh_nonce(copilot: Signer) -> None:
    nonces = {_signed(copilot)[SIG_HEADER]["nonce"] for _ in range(50)}
    assert len(nonces) == 50 and all(len(n) == 32 for n in nonces)
    assert c.nonce_key("grok", "ab" * 16) == "xnai:nonce:grok:" + "ab" * 16
    assert nonce_ttl_s(MAX_AGE) >= MAX_AGE + MAX_SKEW_S


def test_sign_refuses_unsignable_messages(copilot: Signer) -> None:
    # Given arguments that are not JSON, or headers without a task name
    # Then signing fails with a usage error, not with an unverifiable message
    with pytest.raises(UsageError, match="not JSON"):
        sign_message(copilot, headers=_headers(), body=((), {"s": {1, 2}}, {}), queue="cline")
    with pytest.raises(UsageError, match="not JSON"):
        sign_message(copilot, headers=_headers(), body=((float("nan"),), {}, {}), queue="cline")
    with pytest.raises(UsageError, match="task"):
        sign_message(copilot, headers={"id": TASK_ID}, body=BODY, queue="cline")
    with pytest.raises(UsageError, match="queue"):
        sign_message(copilot, headers=_headers(), body=BODY, queue="")
    with pytest.raises(UsageError, match="not JSON"):
        sign_message(copilot, headers=_headers(retries=float("nan")), body=BODY, queue="cline")
    with pytest.raises(UsageError, match="strings"):
        sign_result(copilot, task_id=None, status="SUCCESS", result=1)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="not JSON"):
        sign_result(copilot, task_id=TASK_ID, status="SUCCESS", result={1, 2})


# ---- every rejection reason ----


def test_reason_codes_are_a_fixed_set() -> None:
    assert set(REASONS) == {
        "unsigned",
        "malformed",
        "unknown_key",
        "revoked_key",
        "bad_signature",
        "not_authorized",
        "wrong_queue",
        "expired",
        "future",
        "replay",
        "deadline",
    }


def test_rejection_is_one_refused_line(ring: Keyring) -> None:
    # Given an unsigned message
    with pytest.raises(MessageRejected) as err:
        _verify(ring, _headers())
    # Then the error is a refusal (exit code 3) in one line with its reason
    assert isinstance(err.value, RefusedError) and err.value.exit_code == 3
    assert str(err.value) == "refused (unsigned): no xnai_sig header"
    assert err.value.reason == "unsigned" and type(err.value.reason) is str


def test_unsigned(ring: Keyring) -> None:
    # Given messages with no signature header, or a null one
    assert _reason(ring, _headers()) == Reason.UNSIGNED
    assert _reason(ring, _headers(**{SIG_HEADER: None})) == Reason.UNSIGNED


def _corrupt(sig: dict[str, Any], field: str, value: Any) -> dict[str, Any]:
    out = dict(sig)
    if value is _DELETE:
        del out[field]
    else:
        out[field] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", 2),
        ("v", "1"),
        ("v", True),
        ("v", _DELETE),
        ("agent", None),
        ("agent", "Copilot\n"),
        ("kid", "XYZ"),
        ("kid", 7),
        ("ts", "now"),
        ("ts", float("inf")),
        ("ts", float("nan")),
        ("ts", 10**400),
        ("ts", True),
        ("nonce", "short"),
        ("nonce", None),
        ("queue", ""),
        ("queue", ["cline"]),
        ("sig", "not base64!" * 8),
        ("sig", "AAAA"),
        ("sig", b"x" * 64),
        ("sig", "=" * 88),
        ("sig", _DELETE),
    ],
)
def test_malformed_signature_fields(ring: Keyring, copilot: Signer, field: str, value: Any) -> None:
    # Given a signed message whose signature header has one bad field
    headers = _signed(copilot)
    headers[SIG_HEADER] = _corrupt(headers[SIG_HEADER], field, value)
    # Then it is malformed
    assert _reason(ring, headers) == Reason.MALFORMED


@pytest.mark.parametrize(
    "mangle",
    [
        lambda h: "not a dict",
        lambda h: None,
        lambda h: [h],
        lambda h: {**h, SIG_HEADER: "a string"},
        lambda h: {**h, SIG_HEADER: [1, 2]},
        lambda h: {**h, "task": None},
        lambda h: {**h, "task": 42},
        lambda h: {**h, "task": "x" * 10_000},
        lambda h: {**h, "id": ""},
        lambda h: {**h, "eta": ["2024-01-01"]},
        lambda h: {**h, "retries": {"n": 1}},
        lambda h: {k: v for k, v in h.items() if k != "task"},
    ],
)
def test_malformed_messages(ring: Keyring, copilot: Signer, mangle: Any) -> None:
    # Given a signed message whose headers are mangled Then it is malformed
    assert _reason(ring, mangle(_signed(copilot))) == Reason.MALFORMED


@pytest.mark.parametrize("body", [{1, 2}, ((float("nan"),), {}, {}), ((10**5000,), {}, {}), object()])
def test_body_that_is_not_json_is_malformed(ring: Keyring, copilot: Signer, body: Any) -> None:
    assert _reason(ring, _signed(copilot), body=body) == Reason.MALFORMED


def test_unknown_key(ring: Keyring, copilot: Signer, tmp_path: Path) -> None:
    # Given a message naming a key id not in the keyring
    headers = _signed(copilot)
    headers[SIG_HEADER]["kid"] = "0123456789abcdef"
    assert _reason(ring, headers) == Reason.UNKNOWN_KEY
    # And a message signed with a key of another installation's keyring
    other_home = tmp_path / "other"
    init_keys(other_home)
    assert _reason(ring, _signed(load_signer(other_home, "copilot"))) == Reason.UNKNOWN_KEY


def test_revoked_key(home: Path, ring: Keyring, copilot: Signer) -> None:
    # Given a message signed before copilot's key was revoked
    headers = _signed(copilot)
    revoke(home, copilot.kid)
    ring.refresh()
    # Then it is refused as signed by a revoked key
    assert _reason(ring, headers) == Reason.REVOKED_KEY


def test_rotation_grace(home: Path, ring: Keyring, copilot: Signer) -> None:
    # Given copilot's key rotated at T0 with one hour of grace, and messages signed by the old and new keys
    rotate(home, "copilot", grace_s=3600, now=T0)
    ring.refresh()
    new = load_signer(home, "copilot", now=T0)
    assert new.kid != copilot.kid
    old_msg = _signed(copilot, now=T0 + 100)
    new_msg = _signed(new, now=T0 + 100)
    # Then within the grace both verify, the old one marked as in grace
    assert _verify(ring, old_msg, now=T0 + 101).key_status == "grace"
    assert _verify(ring, new_msg, now=T0 + 101).key_status == "active"
    # And after the grace the old key is refused, the new one still verifies
    late_old = _signed(copilot, now=T0 + 3700)
    assert _reason(ring, late_old, now=T0 + 3701) == Reason.REVOKED_KEY
    assert _verify(ring, _signed(new, now=T0 + 3700), now=T0 + 3701).agent == "copilot"


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update(sig=s["sig"][:10] + ("A" if s["sig"][10] != "A" else "B") + s["sig"][11:]),
        lambda s: s.update(ts=s["ts"] + 1),
        lambda s: s.update(nonce="0" * 32),
    ],
)
def test_bad_signature_when_signature_fields_change(ring: Keyring, copilot: Signer, edit: Any) -> None:
    # Given a signed message whose signature, timestamp or nonce is edited
    headers = _signed(copilot)
    edit(headers[SIG_HEADER])
    # Then the signature no longer matches
    assert _reason(ring, headers) == Reason.BAD_SIGNATURE


def test_bad_signature_when_the_body_changes(ring: Keyring, copilot: Signer) -> None:
    # Given a signed message whose kwargs are edited in transit
    headers = _signed(copilot)
    body = copy.deepcopy(BODY)
    body[1]["prompt"] = "rm -rf /"
    # Then the signature no longer matches
    assert _reason(ring, headers, body=body) == Reason.BAD_SIGNATURE
    # And a callback smuggled into the embed part is caught too
    assert _reason(ring, headers, body=((), BODY[1], {"callbacks": [{"task": "grok.x"}]})) == Reason.BAD_SIGNATURE


def test_claimed_agent_must_own_the_key(ring: Keyring, home: Path) -> None:
    # Given cline signing, but claiming to be copilot in the signature header
    cline = load_signer(home, "cline")
    forged = Signer(agent="copilot", kid=cline.kid, signing_key=cline.signing_key)
    headers = _signed(forged)
    # Then the claim does not match the key's owner
    assert _reason(ring, headers) == Reason.BAD_SIGNATURE


def test_forged_signature_with_a_known_key_id(ring: Keyring, copilot: Signer) -> None:
    # Given an attacker's own key presenting copilot's key id
    attacker = Signer(agent="copilot", kid=copilot.kid, signing_key=SigningKey.generate())
    # Then the signature does not verify
    assert _reason(ring, _signed(attacker)) == Reason.BAD_SIGNATURE


def test_not_authorized(home: Path, ring: Keyring) -> None:
    # Given cline, allowed only cline.*, sending a grok task to grok
    cline = load_signer(home, "cline")
    headers = _signed(cline, task="grok.synthesize", queue="grok")
    # Then grok refuses it
    assert _reason(ring, headers, queue="grok", role="grok") == Reason.NOT_AUTHORIZED
    # And its own role's tasks (retries, subtasks) are fine
    assert _verify(ring, _signed(cline)).agent == "cline"
    # When cline is authorized for grok.synthesize Then it passes, and grok.analyze still does not
    authorize(home, "cline", ["grok.synthesize"])
    ring.refresh()
    assert _verify(ring, headers, queue="grok", role="grok").task == "grok.synthesize"
    other = _signed(cline, task="grok.analyze", queue="grok")
    assert _reason(ring, other, queue="grok", role="grok") == Reason.NOT_AUTHORIZED


def test_task_renamed(ring: Keyring, copilot: Signer) -> None:
    # Given a signed cline.generate renamed to another cline task, or to a grok task moved to grok
    renamed = _signed(copilot)
    renamed["task"] = "cline.validate"
    rerouted = _signed(copilot)
    rerouted["task"] = "grok.synthesize"
    # Then both fail
    assert _reason(ring, renamed) == Reason.BAD_SIGNATURE
    assert _reason(ring, rerouted, queue="grok", role="grok") in (Reason.BAD_SIGNATURE, Reason.WRONG_QUEUE)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("id", "00000000-0000-0000-0000-000000000000"),
        ("eta", "2030-01-01T00:00:00+00:00"),
        ("expires", None),
        ("retries", 1),
        ("parent_id", TASK_ID),
        ("root_id", "another-root"),
        ("group", "g-1"),
    ],
)
def test_covered_header_changed(ring: Keyring, copilot: Signer, name: str, value: Any) -> None:
    # Given a signed message with one covered header swapped (the id, the eta, the retry count...)
    assert name in COVERED_HEADERS
    headers = _signed(copilot)
    assert headers.get(name) != value
    headers[name] = value
    # Then the signature no longer matches
    assert _reason(ring, headers) == Reason.BAD_SIGNATURE


def test_moved_to_another_queue(ring: Keyring, copilot: Signer) -> None:
    # Given a message signed for the cline queue, pushed onto grok's queue
    headers = _signed(copilot)
    # Then grok's worker refuses it as delivered on the wrong queue
    assert _reason(ring, headers, queue="grok", role="grok") == Reason.WRONG_QUEUE
    # And editing the signed queue to match breaks the signature
    headers[SIG_HEADER]["queue"] = "grok"
    assert _reason(ring, headers, queue="grok", role="grok") == Reason.BAD_SIGNATURE


def test_task_prefix_must_match_the_role(ring: Keyring, copilot: Signer) -> None:
    # Given a grok task, correctly signed, but addressed to the cline queue
    headers = _signed(copilot, task="grok.synthesize", queue="cline")
    # Then cline refuses it: the task does not belong on its queue
    assert _reason(ring, headers) == Reason.WRONG_QUEUE
    # And a worker consuming a queue that is not its role's refuses too
    assert _reason(ring, _signed(copilot, queue="other"), queue="other") == Reason.WRONG_QUEUE
    # And a task with no role prefix is refused
    assert _reason(ring, _signed(copilot, task="generate")) == Reason.WRONG_QUEUE


def test_expired(ring: Keyring, copilot: Signer) -> None:
    # Given a message signed at T0
    headers = _signed(copilot)
    # Then it is accepted up to max age, and refused after
    assert _verify(ring, headers, now=T0 + MAX_AGE).ts == T0
    assert _reason(ring, headers, now=T0 + MAX_AGE + 1) == Reason.EXPIRED


def test_future(ring: Keyring, copilot: Signer) -> None:
    # Given a message stamped in the future by a skewed clock
    headers = _signed(copilot, now=T0 + MAX_SKEW_S + 1)
    # Then it is refused; a smaller skew is tolerated
    assert _reason(ring, headers, now=T0) == Reason.FUTURE
    assert _verify(ring, _signed(copilot, now=T0 + MAX_SKEW_S - 1), now=T0).agent == "copilot"


def test_verify_only_raises_message_rejected_on_odd_inputs(ring: Keyring, copilot: Signer) -> None:
    # Given inputs of the wrong types everywhere
    headers = _signed(copilot)
    odd: list[dict[str, Any]] = [
        {"headers": headers, "queue": None},
        {"headers": headers, "queue": b"cline"},
        {"headers": {SIG_HEADER: {"v": 1}, "task": "cline.x", "id": "1"}},
        {"headers": {("tuple",): 1}},
        {"headers": headers, "body": [[]] * 3},
        {"headers": headers, "body": _deep(5000)},
    ]
    # Then each is refused with a MessageRejected, never another exception
    for case in odd:
        with pytest.raises(MessageRejected) as err:
            _verify(ring, **case)
        assert not err.value.detail.startswith("unexpected")


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


# ---- results ----


def test_result_round_trip(home: Path, ring: Keyring) -> None:
    # Given cline signing the result of its task
    cline = load_signer(home, "cline")
    result = {"code": "def f():\n    return 1\n", "valid": True, "tokens": (1, 2)}
    sig = sign_result(cline, task_id=TASK_ID, status="SUCCESS", result=result)
    # When the client reads it back through JSON
    stored = json.loads(json.dumps({"result": result, "sig": sig}))
    # Then it verifies, also when the client insists on cline as the signer
    verify_result(ring, task_id=TASK_ID, status="SUCCESS", result=stored["result"], signature=stored["sig"])
    verify_result(ring, task_id=TASK_ID, status="SUCCESS", result=result, signature=sig, agent="cline")


def test_result_tampered_forged_or_missing(home: Path, ring: Keyring, copilot: Signer) -> None:
    # Given a signed result
    cline = load_signer(home, "cline")
    result = {"answer": 42}
    sig = sign_result(cline, task_id=TASK_ID, status="SUCCESS", result=result)

    def check(**changes: Any) -> str:
        args: dict[str, Any] = {"task_id": TASK_ID, "status": "SUCCESS", "result": result, "signature": sig}
        args.update(changes)
        with pytest.raises(ResultSignatureError) as err:
            verify_result(ring, **args)
        assert err.value.exit_code == 3 and "\n" not in str(err.value)
        return str(err.value)

    # Then a tampered result, status or task id fails
    assert "does not match" in check(result={"answer": 43})
    assert "does not match" in check(status="FAILURE")
    assert "does not match" in check(task_id="another-task")
    # And a forged signature (attacker key under cline's id), a missing or garbage one fail
    attacker = Signer(agent="cline", kid=cline.kid, signing_key=SigningKey.generate())
    assert "does not match" in check(signature=sign_result(attacker, task_id=TASK_ID, status="SUCCESS", result=result))
    assert "not signed" in check(signature=None)
    for garbage in (
        "x",
        1,
        [],
        {"v": 1},
        {**sig, "sig": "!!"},
        {**sig, "kid": "0" * 16},
        {**sig, "ts": None},
    ):
        check(signature=garbage)
    # And a result signed by someone other than the expected agent fails
    assert "expected grok" in check(agent="grok")
    # And a result signed by a revoked key fails
    revoke(home, cline.kid)
    ring.refresh()
    assert "revoked" in check()
    # And a non-JSON result or non-string ids never raise anything else
    check(result={1, 2})
    check(task_id=None)
    check(status=7)


def test_result_signature_is_not_a_message_signature(ring: Keyring, copilot: Signer) -> None:
    # Given a result signature presented as a message signature (same key, same fields)
    headers = _headers()
    rsig = sign_result(copilot, task_id=TASK_ID, status="SUCCESS", result=BODY)
    headers[SIG_HEADER] = {**rsig, "nonce": "0" * 32, "queue": "cline"}
    # Then it does not verify: the two are signed in separate domains
    assert _reason(ring, headers) == Reason.BAD_SIGNATURE


def test_only_the_canonical_base64_spelling_is_accepted(ring: Keyring, copilot: Signer) -> None:
    # Given a valid signature re-spelled with different unused trailing bits (same decoded bytes)
    headers = _signed(copilot)
    sig = headers[SIG_HEADER]["sig"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(sig[-3])
    headers[SIG_HEADER]["sig"] = sig[:-3] + alphabet[last ^ 1] + sig[-2:]
    # Then it is refused as malformed
    assert _reason(ring, headers) == Reason.MALFORMED
