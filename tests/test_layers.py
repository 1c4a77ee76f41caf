"""The layer rule: underfire.guard <- attacks <- training <- audit. Nothing imports upward, and nothing imports
the folders by their bare names (``guard``, ``audit``, ...), which a user's own packages would shadow."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"guard": 0, "attacks": 1, "training": 2, "audit": 3}


def test_no_upward_imports():
    bad, bare = [], []
    for pkg, r in RANK.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                bad += [f"{f.relative_to(ROOT)} imports {n}" for n in names if RANK.get(_layer(n), -1) > r]
                bare += [f"{f.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in RANK]
    assert not bad, bad
    assert not bare, f"imports outside the underfire namespace (a user's own folder would shadow them): {bare}"


def _layer(module: str) -> str:
    """The layer of ``underfire.<layer>.…``; '' for anything else."""
    parts = module.split(".")
    return parts[1] if parts[0] == "underfire" and len(parts) > 1 else ""


MAX_LINES = 500  # a module longer than this does more than one job: split it by job (docs/architecture.md)


def _modules() -> dict[str, Path]:
    """underfire.<pkg>.… module name → its file, for every module of the four packages."""
    out = {}
    for pkg in RANK:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = ("underfire", *f.relative_to(ROOT).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def test_no_module_is_longer_than_its_job():
    long = {str(f.relative_to(ROOT)): n for f in _modules().values()
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_circle_anywhere():
    """Every import counts, function-level ones too: an import deferred into a function is still a circle."""
    mods = _modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m if f.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[m] |= {t for t in targets if t in mods and t != m}
    circles, state = [], {}

    def visit(m, path):  # depth-first search; a grey node met again closes a circle
        state[m] = "grey"
        for n in sorted(graph[m]):
            if state.get(n) == "grey":
                circles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "black"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "import circles: " + "; ".join(" → ".join(c) for c in circles)
