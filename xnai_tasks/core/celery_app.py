"""The Celery application. ``celery -A xnai_tasks ...`` finds it as ``xnai_tasks.app``.

Its configuration is a promise: it is built from the environment the first time Celery needs it,
not at import time, so importing the package never fails on a bad setting.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

import celeryconfig
from xnai_tasks.admission.channel import XnaiAMQP
from xnai_tasks.core.signal_handlers import install_signals
from xnai_tasks.ops.flower import add_flower_defaults
from xnai_tasks.security.control import SignedControl
from xnai_tasks.security.results import SignedRedisBackend
from xnai_tasks.security.tls import TlsFiles, is_tls_url, redis_ssl_options
from xnai_tasks.settings import Settings, process_settings

#: Modules that define each role's tasks (README, Role tasks: one module per role).
ROLE_MODULES = ("workers.copilot", "workers.cline", "workers.grok", "workers.curation")


class XnaiCelery(Celery):  # type: ignore[misc]
    """Celery whose results are stored signed, in per-role namespaces (:class:`SignedRedisBackend`), and whose
    pushes to a role queue respect its cap (:class:`XnaiAMQP`)."""

    backend_cls = SignedRedisBackend
    amqp_cls = XnaiAMQP


def create_app(settings: Settings | None = None, *, main: str = "xnai_tasks", current: bool = False) -> Celery:
    """A Celery app for ``settings``; with ``None``, settings are read from the environment when first needed.

    Only the package's own ``app`` is Celery's current app (Flower builds its results on the current app).
    """
    install_signals()
    application = XnaiCelery(main, include=list(ROLE_MODULES), set_as_current=current, control=SignedControl)
    add_flower_defaults(application)  # `celery -A ... flower`: 127.0.0.1, basic auth, the flower ACL user
    if settings is not None:
        application.conf.update(_config(settings))
    else:

        def from_env() -> dict[str, Any]:
            return _config(process_settings())

        application.add_defaults(from_env)
    return application


def _config(settings: Settings) -> dict[str, Any]:
    """celeryconfig's settings, and where this process's keys are for signed remote control."""
    config = celeryconfig.build(settings)
    # Remote control is signed (xnai_tasks.security.control): where this process's keys are, and which agent it
    # signs commands as when it has no agent of its own (Flower: inspect only; anything else: the copilot).
    config["xnai_home"] = str(settings.home)
    _, user = celeryconfig.identity(settings)
    config["xnai_control_agent"] = "flower" if user == "flower" else "copilot"
    if is_tls_url(str(config["broker_url"])):  # rediss://: verify the server, show this host's client certificate
        options = redis_ssl_options(TlsFiles.of(settings.home))
        config["broker_use_ssl"] = options
        config["redis_backend_use_ssl"] = options
    return config


app = create_app(current=True)
