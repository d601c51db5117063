"""Fuzzing the verifier: whatever it is given, it raises MessageRejected or accepts a valid message."""

from __future__ import annotations

import base64
import copy
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xnai_tasks.core import constants as c
from xnai_tasks.errors import MessageRejected
from xnai_tasks.security.canonical import canonical_json
from xnai_tasks.security.key_admin import init_keys, rotate
from xnai_tasks.security.key_pair import Signer
from xnai_tasks.security.keyring import Keyring, load_signer
from xnai_tasks.security.message_signature import COVERED_HEADERS, SIG_FIELDS, sign_message, verify_message
from xnai_tasks.security.refusal import REASONS
from xnai_tasks.security.signature import SIG_HEADER

T0 = 1_700_000_000.0
MAX_AGE = 3600.0
TASKS = ("cline.generate", "grok.synthesize", "curation.index", "copilot.health", "nodot", "cline.")
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def keyring_and_signers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keyring, dict[str, Signer]]:
    home = tmp_path_factory.mktemp("fuzzhome")
    init_keys(home, now=T0 - 1000)
    rotate(home, "curation", grace_s=0, now=T0 - 500)  # leaves an expired key id in the keyring
    return Keyring.load(home), {agent: load_signer(home, agent) for agent in c.ROLES}


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
odd_values = st.one_of(
    json_values,
    st.binary(max_size=100),
    st.floats(),  # NaN and infinities
    st.just(10**5000),  # beyond the int-to-str digit limit
    st.integers(min_value=10**300, max_value=10**400),  # beyond float range
    st.text(min_size=1000, max_size=5000),
    st.tuples(json_values, json_values),
    st.sets(st.integers(), max_size=3),
    st.dictionaries(st.integers(), json_values, max_size=3),
    st.dictionaries(st.one_of(st.integers(), st.text(max_size=3)), json_values, max_size=4),
    st.builds(object),
    st.just(float("inf")),
)
b64_like = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", min_size=86, max_size=90
)
hex_like = st.text(alphabet="0123456789abcdefABCDEF", min_size=15, max_size=33)


def _sig_dicts(kids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    plausible = {
        "v": st.one_of(st.just(1), odd_values),
        "agent": st.one_of(st.sampled_from(c.ROLES), odd_values),
        "kid": st.one_of(st.sampled_from(kids), hex_like, odd_values),
        "ts": st.one_of(st.floats(T0 - 10, T0 + 10), odd_values),
        "nonce": st.one_of(hex_like, odd_values),
        "queue": st.one_of(st.sampled_from(c.ROLES), odd_values),
        "sig": st.one_of(b64_like, odd_values),
    }
    return st.fixed_dictionaries({}, optional=plausible)


def _forged_sigs(kids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Well-formed signature dicts (right types and lengths) with random signatures: they pass parsing."""
    return st.fixed_dictionaries(
        {
            "v": st.just(1),
            "agent": st.sampled_from(c.ROLES),
            "kid": st.one_of(st.sampled_from(kids), st.text(alphabet="0123456789abcdef", min_size=16, max_size=16)),
            "ts": st.one_of(st.floats(T0 - 2 * MAX_AGE, T0 + 120), st.integers(int(T0) - 10, int(T0) + 10)),
            "nonce": st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
            "queue": st.sampled_from(c.ROLES),
            "sig": st.binary(min_size=64, max_size=64).map(lambda b: base64.b64encode(b).decode()),
        }
    )


def _assert_only_rejections(keyring: Keyring, **kwargs: Any) -> None:
    try:
        verify_message(keyring, now=T0, max_age_s=MAX_AGE, **kwargs)
    except MessageRejected as exc:
        assert exc.reason in REASONS
        assert not exc.detail.startswith("unexpected"), exc.detail  # the safety net must not be needed
        assert "\n" not in str(exc)
    else:
        raise AssertionError("a random envelope was accepted")


@FUZZ
@given(data=st.data())
def test_random_envelopes_are_only_ever_rejected(
    keyring_and_signers: tuple[Keyring, dict[str, Signer]], data: st.DataObject
) -> None:
    # Given a random envelope: random headers (often with plausible signature dicts), body, queue and role
    keyring, _ = keyring_and_signers
    kids = [e.kid for e in keyring.entries()]
    header_keys = st.one_of(st.sampled_from([*COVERED_HEADERS, SIG_HEADER, "lang", "shadow"]), st.text(max_size=6))
    header_values = st.one_of(odd_values, _sig_dicts(kids), _forged_sigs(kids))
    headers = data.draw(
        st.one_of(
            st.dictionaries(header_keys, header_values, max_size=10),
            st.fixed_dictionaries(
                {
                    SIG_HEADER: st.one_of(_sig_dicts(kids), _forged_sigs(kids)),
                    "task": st.sampled_from(TASKS),
                    "id": st.text(min_size=1, max_size=40),
                },
                optional={name: json_scalars for name in COVERED_HEADERS[2:]},
            ),
            odd_values,
        )
    )
    body = data.draw(odd_values)
    queue = data.draw(st.one_of(st.sampled_from(c.ROLES), odd_values))
    role = data.draw(st.sampled_from(c.ROLES))
    # When it is verified Then only a MessageRejected with a known reason comes out
    _assert_only_rejections(keyring, headers=headers, body=body, queue=queue, role=role)


def _view(headers: Any, body: Any, queue: Any, role: Any) -> Any:
    """Everything the signature and the route checks depend on, in a type-exact form (or a marker)."""

    def canon(value: Any) -> Any:
        try:
            return canonical_json(value)
        except (TypeError, ValueError, RecursionError):
            return ("not json", id(value))

    if not isinstance(headers, dict):
        return ("not a dict", id(headers))
    sig = headers.get(SIG_HEADER)
    sig_view = {k: canon(sig.get(k)) for k in SIG_FIELDS} if isinstance(sig, dict) else canon(sig)
    return (
        {k: canon(headers.get(k)) for k in COVERED_HEADERS},
        sig_view,
        canon(body),
        canon(queue),
        canon(role),
    )


MUTATIONS = ("none", "header", "drop_header", "sig_field", "drop_sig_field", "sig_char", "body", "route")


@FUZZ
@given(data=st.data())
def test_mutated_valid_messages_fail_unless_unchanged(
    keyring_and_signers: tuple[Keyring, dict[str, Signer]], data: st.DataObject
) -> None:
    # Given a valid message signed by copilot for a random role, with random JSON arguments
    keyring, signers = keyring_and_signers
    role = data.draw(st.sampled_from(c.WORKER_ROLES))
    task = f"{role}.{data.draw(st.sampled_from(['generate', 'synthesize', 'index']))}"
    body = [
        data.draw(st.lists(json_values, max_size=3)),
        data.draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
        {"callbacks": None},
    ]
    headers: dict[str, Any] = {
        "task": task,
        "id": data.draw(st.uuids()).hex,
        "eta": data.draw(st.one_of(st.none(), st.just("2023-11-14T22:13:20+00:00"))),
        "expires": None,
        "retries": data.draw(st.integers(0, 5)),
        "parent_id": None,
        "root_id": "root",
        "group": None,
        "argsrepr": "()",
    }
    headers[SIG_HEADER] = sign_message(signers["copilot"], headers=headers, body=body, queue=role, now=T0)
    original = _view(headers, body, role, role)
    assert verify_message(keyring, headers=headers, body=body, queue=role, now=T0, max_age_s=MAX_AGE, role=role)

    # When one thing is mutated
    new_headers, new_body, queue, new_role = copy.deepcopy(headers), copy.deepcopy(body), role, role
    sig = new_headers[SIG_HEADER]
    mutation = data.draw(st.sampled_from(MUTATIONS))
    if mutation == "header":
        name = data.draw(st.sampled_from([*COVERED_HEADERS, SIG_HEADER, "argsrepr", "other"]))
        new_headers[name] = data.draw(odd_values)
    elif mutation == "drop_header":
        new_headers.pop(data.draw(st.sampled_from(sorted(new_headers))))
    elif mutation == "sig_field":
        sig[data.draw(st.sampled_from([*SIG_FIELDS, "extra"]))] = data.draw(odd_values)
    elif mutation == "drop_sig_field":
        sig.pop(data.draw(st.sampled_from(sorted(sig))))
    elif mutation == "sig_char":
        pos = data.draw(st.integers(0, len(sig["sig"]) - 1))
        sig["sig"] = sig["sig"][:pos] + data.draw(st.characters()) + sig["sig"][pos + 1 :]
    elif mutation == "body":
        part = data.draw(st.integers(0, 2))
        new_body[part] = data.draw(odd_values)
    elif mutation == "route":
        queue = data.draw(st.one_of(st.sampled_from(c.ROLES), odd_values))
        new_role = data.draw(st.sampled_from(c.ROLES))

    # Then it verifies exactly when nothing the signature covers changed, and otherwise is rejected
    unchanged = _view(new_headers, new_body, queue, new_role) == original
    try:
        verified = verify_message(
            keyring, headers=new_headers, body=new_body, queue=queue, now=T0, max_age_s=MAX_AGE, role=new_role
        )
    except MessageRejected as exc:
        assert exc.reason in REASONS
        assert not exc.detail.startswith("unexpected"), exc.detail
        assert not unchanged, f"unchanged message refused: {exc} after {mutation}"
    else:
        assert unchanged, f"changed message accepted after {mutation}"
        assert verified.task == task and math.isfinite(verified.ts)
