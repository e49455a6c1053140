"""The layout shows the design: small modules that say what they own, no import cycle, one public surface.

These read the source with ``ast``; they run nothing of it (but the last, which imports the package).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import executor

PACKAGE = Path(executor.__file__).resolve().parent
MAX_LINES = 400


@functools.cache
def parsed(path: Path) -> ast.Module:
    """One parse of each module for all the checks here (the tier's time is in these walks)."""
    return ast.parse(path.read_text())


@functools.cache
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every executor module ``name`` imports, at any depth of the file (a lazy import is still a
    dependency), resolved to the module (``from .x import y`` names module ``x.y`` when that exists)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ImportFrom):
            anchor = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def test_no_module_is_longer_than_400_lines():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules by role: {long}"


def test_every_module_says_what_it_owns_and_what_it_must_never_do():
    missing = []
    for name, path in modules().items():
        doc = ast.get_docstring(parsed(path)) or ""
        if not doc or (path.name != "__init__.py" and "must never" not in doc.lower()):
            missing.append(name)
    assert not missing, f"modules without a docstring naming what they own and must never do: {missing}"


def test_there_is_no_import_cycle():
    mods = modules()
    graph = {name: imports_of(name, path, set(mods)) for name, path in mods.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not (name.startswith(m + ".") and mods[m].name == "__init__.py")}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_public_surface_is_what_the_package_exports():
    for name in executor.__all__:
        assert getattr(executor, name) is not None, name
    assert issubclass(executor.TestsFailed, executor.ExecutorError)
    assert {"Settings", "Status", "ExecutorError"} <= set(executor.__all__)


def test_the_store_owns_every_query():
    """SQL, table access and each engine's dialect live in ``executor/store``: elsewhere the database is only
    opened (``store.engine``), its errors caught (``sqlalchemy.exc``) and its URL read."""
    import re

    allowed = {"sqlalchemy.exc", "sqlalchemy.engine"}
    sql = re.compile(r"\bSELECT\b[\s\S]*\bFROM\b|\bUPDATE\b\s+\w+\s+SET\b|\bINSERT\s+INTO\b")
    found = []
    for name, path in modules().items():
        if name == "executor.store" or name.startswith("executor.store."):
            continue
        for node in ast.walk(parsed(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("sqlalchemy",
                                                                                              "sqlmodel"):
                if node.module not in allowed:
                    found.append(f"{name} imports {node.module}")
            elif isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("sqlalchemy", "sqlmodel")
                                                      for a in node.names):
                found.append(f"{name} imports {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Attribute) and node.attr in ("session", "connect") and \
                    isinstance(node.value, ast.Attribute) and node.value.attr in ("store", "engine"):
                found.append(f"{name} uses {node.value.attr}.{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and sql.search(node.value):
                found.append(f"{name} holds SQL: {node.value.strip()[:60]!r}")
    assert not found, found


#: What only an agent's own package may name: its CLI's flags, files, environment, tool names and API headers.
AGENT_WORDS = {
    "claude_code": ("ANTHROPIC_", "CLAUDE_CODE_", "x-api-key", "anthropic-", ".claude", "--resume",
                    "--append-system-prompt", "--disallowedTools", "Bash", "MultiEdit",
                    "message_start", "<synthetic>"),
    "codex": ("OPENAI_", "CODEX_HOME", ".codex", "model_providers", "exec_command", "command_execution",
              "file_change", "x-ratelimit-", "response.completed", "thread.started", "turn.failed"),
    "gemini": ("GEMINI_", "GOOGLE_GEMINI", "x-goog-api-key", "streamGenerateContent", "usageMetadata",
               "run_shell_command", "selectedType"),
}


def test_only_an_agents_package_names_its_cli_or_imports_it():
    """The agent seam: nothing outside ``executor/agent/<agent>/`` names an agent's tools, files, flags or headers
    (string literals and docstrings alike), and only the registry imports an agent's package. Migrations record
    the history of the schema, as it was."""
    found = []
    known = set(modules())
    for name, path in modules().items():
        if ".migrations." in name:
            continue
        tree = parsed(path)
        imported = " ".join(imports_of(name, path, known))
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        for agent, words in AGENT_WORDS.items():
            if name.startswith(f"executor.agent.{agent}"):
                continue
            found += [f"{name} names {word!r} ({agent}'s)" for word in words if any(word in s for s in strings)]
            if name != "executor.agent.registry" and f"executor.agent.{agent}" in imported:
                found.append(f"{name} imports executor.agent.{agent}")
    assert found == []
