"""Fixtures: a private XNAI_HOME, the embedded Redis, and a real running stack of role workers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from xnai_tasks.bench.harness import start_worker, stop_worker, wait_online
from xnai_tasks.client.sync import Client
from xnai_tasks.core.celery_app import create_app
from xnai_tasks.ops.redis_server import EmbeddedRedis
from xnai_tasks.ops.supervisor import Stack
from xnai_tasks.settings import Settings

from support import admin_connection, free_port, short_home


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_home()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(home: Path) -> Iterator[EmbeddedRedis]:
    """A private embedded Redis for one test."""
    with EmbeddedRedis(Settings(home=home)) as server:
        yield server


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    path = short_home()
    # test_security floods a queue with 1,000 refused messages while good ones are submitted: a cap above the
    # flood, so the good ones are not shed (tests/test_load_shedding.py tests the cap)
    yield Settings(home=path, flower_port=free_port(), metrics_port=free_port(), max_queue=4096)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def control_app(stack_settings: Settings) -> Iterator[Celery]:
    """A Celery app on the stack's broker, for control commands and raw sends."""
    app = create_app(stack_settings, main="xnai_test_control")
    yield app
    app.close()


@pytest.fixture(scope="session")
def stack(stack_settings: Settings, control_app: Celery) -> Iterator[Stack]:
    """The whole system, real processes: embedded Redis, one worker per role (copilot with beat), Flower, metrics."""
    with Stack(stack_settings, flower=True, metrics=True) as running:
        running.wait_workers(control_app)
        yield running


@pytest.fixture(scope="session")
def client(stack: Stack, stack_settings: Settings) -> Iterator[Client]:
    c = Client(stack_settings)
    yield c
    c.close()


# ---- a private Redis for a module that starts its own workers: the module defines `private_settings` ----


@pytest.fixture(scope="module")
def private_stack(private_settings: Settings) -> Iterator[Stack]:
    """The embedded Redis with keys and ACLs, and no worker: the module's tests start their own."""
    with Stack(private_settings, roles=(), flower=False) as running:
        yield running
    shutil.rmtree(private_settings.home, ignore_errors=True)


@pytest.fixture(scope="module")
def private_app(private_stack: Stack, private_settings: Settings) -> Iterator[Celery]:
    """A Celery app on the private Redis, for ``ping`` and raw sends."""
    app = create_app(private_settings, main="xnai_test_private")
    yield app
    app.close()


@pytest.fixture(scope="module")
def private_client(private_stack: Stack, private_settings: Settings) -> Iterator[Client]:
    made = Client(private_settings)
    yield made
    made.close()


@pytest.fixture(scope="module")
def admin(private_stack: Stack, private_settings: Settings) -> Iterator[Any]:
    """The module's private Redis as its admin user (a module on another stack defines its own ``admin``)."""
    with admin_connection(private_settings) as conn:
        yield conn


@pytest.fixture(scope="module")
def grok_worker(private_stack: Stack, private_settings: Settings, private_app: Celery) -> Iterator[None]:
    """One grok worker (one pool process) on the module's private Redis."""
    proc = start_worker(private_settings, "grok", concurrency=1)
    try:
        wait_online(proc, private_app, "grok", timeout=120)
        yield
    finally:
        stop_worker(proc)
