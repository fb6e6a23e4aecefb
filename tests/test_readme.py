"""The README, followed literally: ``make run``'s stack in a fresh directory, then every example.

Each example is the text of a README code block marked ``<!-- readme-test: NAME -->``, run as a
user would copy it: Python blocks with the venv's Python, console blocks command by command
through ``sh`` (a command is polled again, as a user would, until its answer has the README's
status fields). No variable is set by hand: ``llmstream dev`` starts with KAFKA_*/REDIS_*/
LLMSTREAM_*/OPENAI_*/ANTHROPIC_* removed from its environment. When a conventional port is busy on
this machine, the test does what the README says to do then: take the stack file's variables and
use the ingress's printed address in place of ``localhost:8080``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dotenv import dotenv_values

from llmstream.devtools.processes import free_port, port_is_free

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

README = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```(\w+)\n(.*?)\n```", re.S)
_CLEARED = ("KAFKA_", "REDIS_", "LLMSTREAM_", "OPENAI_", "ANTHROPIC_")
# The answer fields that say what happened (ids, times and token counts vary run to run).
# Whether a request has its response or error, null or not.
_OUTCOME = {"response", "error"}
_STABLE = {"status", "duplicate", "code", "type", "object", "error_type", "status_code", "content"}


def readme_blocks() -> dict[str, str]:
    return {name: text for name, _lang, text in _BLOCK.findall(README)}


def console_steps(text: str) -> list[tuple[str, str]]:
    """``(command, expected output)`` for each ``$ `` line (with its continuation lines)."""
    lines, steps, i = text.splitlines(), [], 0
    while i < len(lines):
        assert lines[i].startswith("$ "), lines[i]
        command = lines[i][2:]
        i += 1
        while not _complete(command):
            command += "\n" + lines[i]
            i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append((command, "\n".join(output)))
    return steps


def _complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:
        return False
    return True


def _matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return False
        return all(
            key in actual and _matches(value, actual[key])
            for key, value in expected.items()
            if key in _STABLE or isinstance(value, dict | list) or key in _OUTCOME
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) == len(actual)
            and all(_matches(e, a) for e, a in zip(expected, actual, strict=True))
        )
    return bool(expected == actual)


def _columns(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip())[:2] for line in text.splitlines() if line.strip()]


def output_matches(expected: str, actual: str) -> bool:
    if not expected.strip():
        return True
    try:
        wanted = json.loads(expected)
    except json.JSONDecodeError:
        return _columns(expected) == _columns(actual)
    try:
        return _matches(wanted, json.loads(actual))
    except json.JSONDecodeError:
        return False


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Stack:
    """``llmstream dev`` running in ``cwd``, as ``make run`` starts it."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.stack_variables: set[str] = set()  # the stack file's, once make run is up
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_CLEARED)}
        # What `source .venv/bin/activate` does.
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"
        self.out = cwd / "dev.out"
        self.process = subprocess.Popen(
            [str(BIN / "llmstream"), "dev"],
            cwd=cwd,
            env=self.env,
            stdout=self.out.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's process group: Ctrl-C goes to all of it
        )
        self.substitutions: dict[str, str] = {}
        self.background: list[subprocess.Popen[bytes]] = []

    def wait_up(self) -> None:
        deadline = time.monotonic() + 240
        while "Ctrl-C stops everything" not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.5)
        stack = {k: v for k, v in dotenv_values(self.cwd / ".llmstream/stack.env").items() if v}
        self.stack_variables = set(stack)
        if "NOTICE" in self.output():
            # What the README says to do when make run moved a port: source the stack file and
            # use the addresses it printed.
            self.env.update(stack)
            ingress = stack["LLMSTREAM_INGRESS_URL"].removeprefix("http://")
            self.substitutions["localhost:8080"] = ingress
            sim = stack["OPENAI_BASE_URL"].removeprefix("http://").removesuffix("/v1")
            self.substitutions["localhost:8090"] = sim
        if not port_is_free(8081):  # the README's second ingress
            port = free_port()
            self.substitutions["localhost:8081"] = f"localhost:{port}"
            self.substitutions["--port 8081"] = f"--port {port}"

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def literal(self, text: str) -> str:
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        return text

    def python(self, code: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", self.literal(code)],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def console(self, text: str) -> None:
        prefix: list[str] = []  # the block's shell variables so far, as one shell would keep them
        for command, expected in console_steps(self.literal(text)):
            script = "\n".join([*prefix, command])
            if re.match(r"(export )?[A-Z_]+=", command):
                prefix.append(command)
            if command.endswith("&"):
                script = "\n".join([*prefix, "exec " + command.rstrip("& ")])
                self.background.append(self._sh(script))
                continue
            deadline = time.monotonic() + 90
            while True:
                done = subprocess.run(
                    ["sh", "-c", script],
                    cwd=self.cwd,
                    env=self.env,
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if done.returncode == 0 and output_matches(expected, done.stdout):
                    with (self.cwd / "transcript.txt").open("a") as transcript:
                        transcript.write(f"$ {command}\n{done.stdout}\n")
                    break
                assert time.monotonic() < deadline, (
                    f"{command}\nexpected:\n{expected}\ngot ({done.returncode}):\n"
                    f"{done.stdout}{done.stderr[-2000:]}"
                )
                time.sleep(1)

    def _sh(self, script: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["sh", "-c", script],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=(self.cwd / "background.log").open("ab"),
            start_new_session=True,
        )

    def stop_background(self) -> None:
        for process in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(30)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    running = Stack(tmp_path)
    try:
        yield running
    finally:
        running.stop_background()
        if running.process.poll() is None:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(30)


def _get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return dict(json.loads(response.read()))


def _ready(url: str, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while True:
        try:
            if _get(url).get("status") == "ready":
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.5)


def test_every_readme_example_answers_against_make_run(stack: Stack) -> None:
    blocks = readme_blocks()
    assert set(blocks) == {
        "aiokafka",
        "confluent-kafka",
        "avro",
        "replay",
        "ingress-requests",
        "ingress-chat",
        "openai-sdk",
        "ingress-error",
        "ingress-keys",
        "kafka-stream",
        "openai-stream",
        "openai-tools",
    }
    stack.wait_up()

    assert re.search(
        r"^llm-responses \{.*'request_id': 'order-2'", stack.python(blocks["aiokafka"])
    )
    out = stack.python(blocks["confluent-kafka"])
    assert re.search(r"^llm-responses \{.*'request_id': 'order-3'", out)

    # The header the README shows is the one the code prints and the worker accepts.
    shown = re.search(r"print\(header.hex\(\" \"\)\)  # ([0-9a-f ]+)\n", blocks["avro"])
    assert shown is not None
    assert stack.python(blocks["avro"]).strip() == shown.group(1).strip()
    outcome = re.search(
        r"Its outcome, read like any other \(here through the ingress\): `([^`]+)`", README
    )
    assert outcome is not None
    stack.console(f"$ {outcome.group(1)}\n" + '{"request_id":"order-4","status":"completed"}')

    stack.console(blocks["replay"])
    stack.console(blocks["ingress-requests"])
    stack.console(blocks["ingress-chat"])
    sdk = blocks["openai-sdk"]
    printed = stack.python(sdk).split()
    assert printed[1:] == sdk.rstrip().splitlines()[-1].lstrip("# ").split()[1:]
    assert printed[0].startswith("chatcmpl-")
    for name in ("openai-stream", "openai-tools"):
        code = blocks[name]
        assert stack.python(code).strip() == code.rstrip().splitlines()[-1].lstrip("# ")
    streamed = stack.python(blocks["kafka-stream"])
    assert streamed.strip() == "echo: Tell me a story about a river"
    stack.console(blocks["ingress-error"])
    stack.console(blocks["ingress-keys"])
    stack.stop_background()

    # "Running the pieces": a worker started by hand, with no settings, joins make run's stack.
    worker_port = 9100 if port_is_free(9100) else free_port()
    worker_log = stack.cwd / "worker-by-hand.log"
    worker = subprocess.Popen(
        [str(BIN / "llmstream"), "worker"],
        cwd=stack.cwd,
        # With no settings, as the README says: not even the stack file's variables, which the
        # examples above were given when make run had to move a port.
        env={
            **{k: v for k, v in stack.env.items() if k not in stack.stack_variables},
            **({} if worker_port == 9100 else {"LLMSTREAM_HTTP_PORT": str(worker_port)}),
        },
        stdout=worker_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.background.append(worker)
    _ready(f"http://127.0.0.1:{worker_port}/ready")
    assert "using the running dev stack from .llmstream/stack.env" in worker_log.read_text()
    stack.stop_background()
    assert "Traceback" not in worker_log.read_text()

    # Ctrl-C in make run's terminal: the whole process group gets SIGINT.
    children = _descendants(stack.process.pid)
    assert len(children) >= 5, stack.output()  # broker, Redis, simulator, worker, ingress
    began = time.monotonic()
    os.killpg(stack.process.pid, signal.SIGINT)
    stack.process.wait(10)
    assert time.monotonic() - began < 10
    lingering = [pid for pid in children if _alive(pid)]
    assert not lingering, [Path(f"/proc/{p}/cmdline").read_bytes() for p in lingering]
    output = stack.output()
    assert stack.process.returncode == 0, output[-3000:]
    for name in ("worker (draining in-flight requests)", "ingress", "simulator", "redis", "kafka"):
        assert f"  {name}" in output.split("stopping:")[1]
    assert not (stack.cwd / ".llmstream/stack.env").exists()
    logs = stack.cwd / ".llmstream/logs"
    for log in logs.glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log
