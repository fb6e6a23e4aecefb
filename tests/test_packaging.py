"""What `pip install llmstream` puts on a machine, and which way the parts of the code import.

The repository keeps ``schemas/``, ``processors/`` and ``ingress/`` at its top level; they install
as ``llmstream.schemas``, ``llmstream.processors`` and ``llmstream.ingress``. These tests build the
real wheel, install it outside the repository and run the commands from it, and read every
module's imports to hold the layering: commands → processors / ingress → core → schemas.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "llmstream"

# What each part may import besides itself. Commands (the `llmstream` CLI, replay) sit on top;
# development tooling (benchmarks, simulator, embedded services) sits beside them, and only the
# commands' dev/bench/simulate entry points reach it.
ALLOWED: dict[str, set[str]] = {
    "schemas": set(),
    "core": {"schemas"},
    "processors": {"core", "schemas"},
    "ingress": {"core", "schemas"},
    "devtools": {"processors", "ingress", "core", "schemas"},
    "commands": {"processors", "ingress", "core", "schemas", "devtools"},
}


def _part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ALLOWED:
        return parts[1]
    return "commands"  # llmstream, llmstream.cli, llmstream.replay


def _modules() -> Iterator[tuple[str, Path]]:
    # os.walk, not Path.rglob: before Python 3.13 rglob does not follow the links to the
    # top-level folders, and the contract, the processor and the ingress would go unchecked.
    paths = [
        Path(folder, name)
        for folder, _, names in os.walk(PACKAGE, followlinks=True)
        for name in names
        if name.endswith(".py")
    ]
    for path in sorted(paths):
        relative = path.relative_to(ROOT).with_suffix("")
        names = list(relative.parts)
        if names[-1] == "__init__":
            names.pop()
        yield ".".join(names), path


def _imports(path: Path) -> Iterator[str]:
    """Every llmstream module ``path`` imports, at module level or inside a function."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_the_walk_reaches_every_part() -> None:
    parts = {_part(module) for module, _ in _modules()}
    assert parts == set(ALLOWED), parts
    assert "llmstream.processors.providers.openai" in dict(_modules())


def test_every_module_imports_only_the_parts_below_it() -> None:
    wrong = []
    for module, path in _modules():
        part = _part(module)
        for imported in _imports(path):
            top = imported.split(".")[0]
            if top in {"schemas", "processors", "ingress"}:
                wrong.append(f"{module} imports {imported}: use llmstream.{imported}")
            elif top == "llmstream" and imported != "llmstream":
                target = _part(imported)
                if target != part and target not in ALLOWED[part]:
                    wrong.append(f"{module} ({part}) imports {imported} ({target})")
    assert not wrong, "\n".join(wrong)


def test_the_layering_has_no_cycle() -> None:
    # The allowed edges themselves must form a DAG, or the test above proves nothing about cycles.
    order = ["schemas", "core", "processors", "ingress", "devtools", "commands"]
    rank = {name: index for index, name in enumerate(order)}
    for part, below in ALLOWED.items():
        for target in below:
            assert rank[target] < rank[part], f"{part} may import {target}, which sits above it"


def test_no_production_module_is_over_600_lines() -> None:
    long = {
        module: n
        for module, path in _modules()
        if _part(module) != "devtools"
        and (n := len(path.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert not long, long


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the image copies, so setuptools' build/ folder stays out of the
    # working tree (another run, ruff or mypy would read it).
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("llmstream", "schemas", "processors", "ingress"):
        shutil.copytree(
            ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("llmstream-*.whl")
    return built


def test_the_wheel_installs_one_import_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        top_level = {name.split("/")[0] for name in names}
        dist_info = next(name for name in top_level if name.endswith(".dist-info"))
        declared = archive.read(f"{dist_info}/top_level.txt").decode().split()
    assert top_level == {"llmstream", dist_info}
    assert declared == ["llmstream"]
    # The contract's Avro schemas travel with the code that reads them.
    assert any(name.startswith("llmstream/schemas/") and name.endswith(".avsc") for name in names)
    assert "llmstream/processors/providers/openai.py" in names


def test_the_installed_wheel_runs_outside_the_repository(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run(
        [*install, "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = (
        "import llmstream, llmstream.processors.worker, llmstream.ingress.app, llmstream.replay\n"
        f"assert llmstream.__file__.startswith({str(target)!r}), llmstream.__file__\n"
        "try:\n"
        "    import schemas\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('a bare top-level schemas package is importable')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, timeout=120
    )
    assert run.returncode == 0, run.stderr.decode()
    for command in ("worker", "ingress", "replay", "simulate", "dev", "bench"):
        helped = subprocess.run(
            [sys.executable, "-m", "llmstream.cli", command, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert helped.returncode == 0, (command, helped.stderr.decode())
        if command in {"worker", "ingress", "replay"}:
            # Each service's help names the variables it reads, with their defaults.
            assert b"KAFKA_BOOTSTRAP_SERVERS=localhost:9092" in helped.stdout
    worker_help = subprocess.run(
        [sys.executable, "-m", "llmstream.cli", "worker", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    ).stdout.decode()
    assert "LLMSTREAM_MAX_IN_FLIGHT=500" in worker_help
    assert "OPENAI_API_KEY=(unset)" in worker_help
    version = subprocess.run(
        [sys.executable, "-m", "llmstream.cli", "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert version.stdout.decode().strip() == "llmstream 0.1.0"


def test_a_bare_folder_import_is_refused() -> None:
    # Run from the repository root, where the folders themselves are importable by name.
    run = subprocess.run(
        [sys.executable, "-c", "import schemas"], cwd=ROOT, capture_output=True, timeout=120
    )
    assert run.returncode != 0
    assert b"import llmstream.schemas" in run.stderr
