"""scripts/mutants.py stays applicable: every mutant's text occurs exactly once in its file and its tests exist.

The mutation run itself takes ~6 minutes and is not part of CI; this keeps it from going stale silently when the
code it mutates moves (it refuses to run then, naming the mutant)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_mutant_applies_once_and_names_existing_tests():
    spec = importlib.util.spec_from_file_location("srds_mutants_script", ROOT / "scripts" / "mutants.py")
    mutants = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("srds_mutants_script", mutants)  # dataclasses look their module up while defining
    spec.loader.exec_module(mutants)
    assert len(mutants.MUTANTS) >= 20 and len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)
    for m in mutants.MUTANTS:
        text = (ROOT / m.path).read_text()
        assert text.count(m.old) == 1, f"mutant {m.name}: its text occurs {text.count(m.old)} times in {m.path}"
        assert m.new != m.old and text.replace(m.old, m.new) != text
        assert all((ROOT / t.split("::")[0]).is_file() for t in m.tests), m.name  # a path or a test node id
