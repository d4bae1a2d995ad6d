"""Daemon options reach the configuration the daemon is started with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from vaccelray import cli
from vaccelray.scheduler import SchedulerConfig, SessionLimits


def scheduler_config(monkeypatch: pytest.MonkeyPatch, *args: str) -> SchedulerConfig:
    """The SchedulerConfig ``vaccelray scheduler ARGS`` would run, without running it."""
    from vaccelray.scheduler import daemon

    made: list[SchedulerConfig] = []

    def run_scheduler(config: SchedulerConfig) -> Any:
        made.append(config)

    monkeypatch.setattr(daemon, "run_scheduler", run_scheduler)
    monkeypatch.setattr(cli, "_run_daemon", lambda start: start())
    # What the command does to this whole process is not under test.
    monkeypatch.setattr(cli, "_setup_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "keep_heap", lambda: None)
    result = CliRunner().invoke(cli.main, ["scheduler", "--no-discover", *args])
    assert result.exit_code == 0, result.output
    (config,) = made
    return config


def test_the_scheduler_takes_a_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    assert scheduler_config(monkeypatch).grace == SchedulerConfig().grace
    assert scheduler_config(monkeypatch, "--grace", "0.25").grace == 0.25


def test_the_scheduler_takes_its_session_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert scheduler_config(monkeypatch).limits == SessionLimits()
    config = scheduler_config(
        monkeypatch,
        "--max-sessions", "5", "--max-sessions-per-connection", "4", "--max-resources", "3",
        "--max-resources-per-connection", "2", "--replay-bytes", "1",
    )  # fmt: skip
    assert config.limits == SessionLimits(5, 4, 3, 2, 1)


def test_the_scheduler_takes_its_credential_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = scheduler_config(monkeypatch)
    assert (config.allow_exec, config.socket_mode, config.token) == (False, 0o600, None)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    config = scheduler_config(
        monkeypatch, "--allow-exec", "--socket-mode", "0660", "--token-file", str(token)
    )
    assert (config.allow_exec, config.socket_mode, config.token) == (True, 0o660, "s3cret")
    for bad in ("999", "rw", "1000"):
        result = CliRunner().invoke(cli.main, ["scheduler", "--socket-mode", bad])
        assert result.exit_code == 2
        assert f"{bad!r} is not an octal mode from 000 to 777" in result.output
    token.chmod(0o644)
    result = CliRunner().invoke(cli.main, ["scheduler", "--token-file", str(token)])
    assert result.exit_code == 2
    assert f"run chmod 600 {token}" in result.output
