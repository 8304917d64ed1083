"""The docs list every spelling the pattern table fuses."""
from pathlib import Path

from ct3d_fx import patterns

ROOT = Path(__file__).resolve().parents[1]


def test_patterns_doc_lists_every_spelling():
    doc = (ROOT / "docs" / "patterns.md").read_text()
    missing = [sp for _, _, sps in patterns.supported_table() for sp in sps.split(", ")
               if sp not in doc]
    assert not missing, f"docs/patterns.md lacks {missing}: regenerate its table"
