"""Settings are read once, typed and validated; a bad value is one clear error naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from xnai_tasks.errors import SettingsError
from xnai_tasks.settings import Settings

from support import run_xnai


def test_defaults_use_embedded_redis_under_home(home: Path) -> None:
    # Given only XNAI_HOME
    settings = Settings.from_env({"XNAI_HOME": str(home)})
    # Then the embedded Redis socket under it is the broker, and the documented defaults apply
    assert settings.embedded
    assert settings.broker_url == f"redis+socket://{home}/redis/redis.sock"
    assert settings.reserved_cores == 2
    assert settings.visibility_timeout > settings.task_time_limit


def test_external_redis_url_is_used_as_is(home: Path) -> None:
    settings = Settings.from_env({"XNAI_HOME": str(home), "XNAI_REDIS_URL": "redis://127.0.0.1:6379/3"})
    assert not settings.embedded
    assert settings.broker_url == "redis://127.0.0.1:6379/3"


def test_to_env_round_trips(home: Path) -> None:
    settings = Settings.from_env({"XNAI_HOME": str(home), "XNAI_RESERVED_CORES": "1", "XNAI_FLOWER_PORT": "6000"})
    assert Settings.from_env(settings.to_env()) == settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("XNAI_RESERVED_CORES", "abc"),
        ("XNAI_RESERVED_CORES", "-1"),
        ("XNAI_FLOWER_PORT", "70000"),
        ("XNAI_REDIS_URL", "http://127.0.0.1:6379"),
        ("XNAI_REDIS_URL", "redis://"),
        ("XNAI_REDIS_URL", "redis://127.0.0.1:99999"),
        ("XNAI_REDIS_URL", "redis+socket://"),
        ("XNAI_LLM_MODEL", "/nonexistent/model.gguf"),
        ("XNAI_LOG_LEVEL", "LOUD"),
        ("XNAI_VISIBILITY_TIMEOUT", "60"),
    ],
)
def test_bad_value_names_the_variable(home: Path, name: str, value: str) -> None:
    # Given one bad variable
    env = {"XNAI_HOME": str(home), name: value}
    # When settings are read, Then one error names it
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    assert name in str(err.value)
    assert "\n" not in str(err.value)


def test_home_that_cannot_be_created_is_refused(tmp_path: Path) -> None:
    # Given XNAI_HOME below a regular file (root can write anywhere, so permissions cannot show this)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SettingsError, match="XNAI_HOME"):
        Settings.from_env({"XNAI_HOME": str(blocker / "home")})


@pytest.mark.parametrize(
    ("name", "value"),
    [("XNAI_RESERVED_CORES", "abc"), ("XNAI_REDIS_URL", "redis://:bad"), ("XNAI_HOME", "/proc/version/x")],
)
def test_cli_reports_bad_setting_in_one_line_with_exit_2(home: Path, name: str, value: str) -> None:
    # Given a bad variable
    env = {"XNAI_HOME": str(home), name: value}
    # When any command starts
    done = run_xnai(["status"], env=env, timeout=30)
    # Then it exits 2 with one line naming the variable, never a traceback
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and name in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_readme_documents_every_variable() -> None:
    from xnai_tasks.settings import VARIABLES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for variable in VARIABLES:
        assert f"| `{variable.name}` | {variable.default} | {variable.meaning} |" in readme
