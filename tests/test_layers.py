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
