"""The package's layering holds, checked on the import graph (every import, including ones inside functions).

* ``iotauth.pki`` is pure crypto: it imports only ``cryptography``, the standard
  library, and ``iotauth.errors``, ``iotauth.identity`` and ``iotauth.certs``;
  never the configuration, the registry or the file layout of a home.
* ``iotauth.registry`` does not import ``iotauth.pki``.
* Only ``iotauth.hsm`` imports the PKCS#11 binding, and only ``iotauth.keystore`` imports ``iotauth.hsm``
  (the signer seam: everything else gets key objects).
* ``iotauth.policy`` imports only the standard library, ``iotauth.identity`` and ``iotauth.errors``.
* amqtt stays behind its wall: ``iotauth.broker.amqtt_host`` is the only module of the
  package that imports ``amqtt`` (the guard, the gate and the engine never touch amqtt
  objects), and loading the native broker or the CLI loads no amqtt at all. Tests,
  examples and benchmarks (which run stock amqtt as a baseline) may import it.
* A CLI command module imports no other CLI module but the shared ``render``
  and ``context`` helpers (``main`` assembles the commands).
* No module imports itself through a cycle.
* No module is longer than 500 lines unless its docstring says why it is one piece.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "iotauth"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, level: int, importer: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(name: str) -> Iterator[str]:
    """Every module ``name`` imports, anywhere in its body; ``from pkg import sub`` counts as ``pkg.sub``."""
    path = modules()[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in modules() else base


def internal(targets: Iterator[str]) -> set[str]:
    return {t for t in targets if t == "iotauth" or t.startswith("iotauth.")}


def external(targets: Iterator[str]) -> set[str]:
    return {t.split(".")[0] for t in targets if t.split(".")[0] != "iotauth"}


def within(target: str, *prefixes: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


PKI = sorted(m for m in modules() if within(m, "iotauth.pki"))
REGISTRY = sorted(m for m in modules() if within(m, "iotauth.registry"))
CLI = sorted(m for m in modules() if within(m, "iotauth.cli") and m != "iotauth.cli.main")
STDLIB = sys.stdlib_module_names


@pytest.mark.parametrize("name", PKI)
def test_pki_is_pure_crypto(name: str) -> None:
    allowed = ("iotauth.pki", "iotauth.errors", "iotauth.identity", "iotauth.certs")
    assert {t for t in internal(imports_of(name)) if not within(t, *allowed)} == set()
    assert external(imports_of(name)) - STDLIB - {"cryptography"} == set()


def test_the_neutral_helpers_import_no_iotauth_layer() -> None:
    assert internal(imports_of("iotauth.certs")) == set()
    assert external(imports_of("iotauth.certs")) - STDLIB - {"cryptography"} == set()


@pytest.mark.parametrize("name", REGISTRY)
def test_registry_does_not_import_pki(name: str) -> None:
    assert {t for t in internal(imports_of(name)) if within(t, "iotauth.pki")} == set()


def test_only_the_keystore_reaches_a_token() -> None:
    binding = {name for name in modules() if "pkcs11" in external(imports_of(name))}
    assert binding == {"iotauth.hsm"}
    assert {name for name in modules() if "iotauth.hsm" in internal(imports_of(name))} == {"iotauth.keystore"}


def test_policy_imports_only_identity_and_errors() -> None:
    assert internal(imports_of("iotauth.policy")) <= {"iotauth.identity", "iotauth.errors"}
    assert external(imports_of("iotauth.policy")) - STDLIB == set()


AMQTT_WALL = "iotauth.broker.amqtt_host"


@pytest.mark.parametrize("name", sorted(m for m in modules() if m != AMQTT_WALL))
def test_only_the_wall_imports_amqtt(name: str) -> None:
    assert "amqtt" not in external(imports_of(name)), f"{name} imports amqtt: move that code into {AMQTT_WALL}"


def test_the_native_broker_and_the_cli_load_no_amqtt() -> None:
    """Behind the static rule: importing them (and what they import) leaves amqtt unloaded."""
    code = ("import sys, iotauth.cli.main, iotauth.broker, iotauth.broker.server, iotauth.http; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'amqtt'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("name", CLI)
def test_cli_commands_share_only_rendering_and_context(name: str) -> None:
    shared = {"iotauth.cli.render", "iotauth.cli.context", name}
    assert {t for t in internal(imports_of(name)) if within(t, "iotauth.cli")} - shared == set()


def test_there_are_no_import_cycles() -> None:
    graph = {name: internal(imports_of(name)) & set(modules()) for name in modules()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_rooms_a_newcomer_can_find(name: str) -> None:
    path = modules()[name]
    text = path.read_text(encoding="utf-8")
    if len(text.splitlines()) <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "one piece" in docstring, f"{path.relative_to(ROOT)} has {len(text.splitlines())} lines"


def test_the_checks_see_the_package() -> None:
    """Guard against a vacuous pass: the graph has the modules and edges the rules are about."""
    assert {"iotauth.pki.ca", "iotauth.registry.service", "iotauth.policy", "iotauth.cli.devices"} <= set(modules())
    assert "iotauth.certs" in internal(imports_of("iotauth.pki.ca"))
    assert "iotauth.registry.rows" in internal(imports_of("iotauth.registry.issuance"))  # ``from pkg import sub``
    assert "iotauth.provisioning.results" in internal(imports_of("iotauth.cli.render"))
    assert "amqtt" in external(imports_of(AMQTT_WALL))  # the wall rule sees amqtt where it is
