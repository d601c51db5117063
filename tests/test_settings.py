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


def test_reserved_cores_that_leave_no_core_for_the_workers_are_refused(home: Path) -> None:
    from xnai_tasks.settings import host_cores

    # Given more reserved cores than this host has (above the default, which the plan lets small hosts share)
    cores = host_cores()
    for value in (max(cores, 2) + 1, 99):
        # When settings are read, Then one line names the variable and the host's core count
        with pytest.raises(SettingsError) as err:
            Settings.from_env({"XNAI_HOME": str(home), "XNAI_RESERVED_CORES": str(value)})
        assert str(err.value) == (
            f"XNAI_RESERVED_CORES={value} leaves no core for the workers: "
            f"this host has {cores} core{'s' if cores > 1 else ''}"
        )


def test_reserved_cores_that_leave_a_core_or_are_the_default_are_accepted(home: Path) -> None:
    from xnai_tasks.settings import host_cores

    # Given a reservation that leaves a core, and the default (the plan shares every CPU when none is left)
    for value in {0, max(0, host_cores() - 1), 2}:
        # Then it is accepted as it is
        settings = Settings.from_env({"XNAI_HOME": str(home), "XNAI_RESERVED_CORES": str(value)})
        assert settings.reserved_cores == value


def test_redis_memory_cap_above_the_hosts_ram_is_refused(home: Path) -> None:
    import psutil

    # Given an embedded Redis cap larger than this host's RAM (it would be OOM-killed before refusing a write)
    ram_mb = psutil.virtual_memory().total // 2**20
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"XNAI_HOME": str(home), "XNAI_REDIS_MAXMEMORY_MB": str(ram_mb + 1)})
    # Then one line names the variable and the RAM
    assert str(err.value) == f"XNAI_REDIS_MAXMEMORY_MB={ram_mb + 1} is more than this host's RAM ({ram_mb} MiB)"
    # And a cap within the RAM is accepted
    assert Settings.from_env({"XNAI_HOME": str(home), "XNAI_REDIS_MAXMEMORY_MB": "64"}).redis_maxmemory_mb == 64


@pytest.mark.parametrize("name", ["XNAI_RESERVED_CORES", "XNAI_REDIS_MAXMEMORY_MB"])
def test_cli_refuses_a_setting_this_host_cannot_honour_in_one_line(home: Path, name: str) -> None:
    # Given a value legal in range but too big for this host
    env = {"XNAI_HOME": str(home), name: "99" if name == "XNAI_RESERVED_CORES" else str(1 << 20)}
    # When a command starts
    done = run_xnai(["plan"], env=env, timeout=30)
    # Then one line, exit 2, naming the variable and what this host has
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"xnai: {name}=") and "this host" in lines[0], lines
