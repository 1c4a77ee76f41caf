"""The layer rule: guard <- attacks <- training <- audit. Nothing imports upward."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"guard": 0, "attacks": 1, "training": 2, "audit": 3}


def test_no_upward_imports():
    bad = []
    for pkg, r in RANK.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                bad += [f"{f.relative_to(ROOT)} imports {n}" for n in names if RANK.get(n.split(".")[0], -1) > r]
    assert not bad, bad
