"""The `llmstream` command's answers to a bad configuration: which variable, never its value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "sk-live-do-not-print-0123456789"


def run(command: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    # Outside the repository: a running `make run` leaves a stack file there that commands read.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMSTREAM_", "KAFKA_"))}
    return subprocess.run(
        [sys.executable, "-m", "llmstream.cli", command],
        cwd=cwd,
        env={**env, **variables},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("command", "variables", "named"),
    [
        (
            "replay",
            {"LLMSTREAM_KAFKA_SASL_USERNAME": "svc", "LLMSTREAM_KAFKA_SASL_PASSWORD": SECRET},
            "use SASL_SSL",
        ),
        (
            "worker",
            {"LLMSTREAM_PROVIDERS": f'{{"x": {{"base_url": "http://a", "api_key": "{SECRET}"}}}}'},
            "LLMSTREAM_PROVIDERS.x.kind",
        ),
        ("ingress", {"LLMSTREAM_API_KEYS": f'{{"{SECRET}": "team-a"}}'}, "LLMSTREAM_API_KEYS"),
        ("worker", {"LLMSTREAM_MAX_IN_FLIGHT": SECRET}, "LLMSTREAM_MAX_IN_FLIGHT"),
    ],
)
def test_invalid_settings_name_the_variable_and_never_echo_a_secret(
    command: str, variables: dict[str, str], named: str, tmp_path: Path
) -> None:
    result = run(command, tmp_path, **variables)
    assert result.returncode == 2
    assert f"llmstream {command}: invalid configuration" in result.stderr
    assert named in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert SECRET[:12] not in result.stderr  # not even half of it
    assert "Traceback" not in result.stderr
