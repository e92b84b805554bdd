"""Documentation stays true: every default quoted in README.md and in the user guide equals configs/default.yaml."""
import re

import pytest
import yaml

from configs import PROJECT_ROOT

DEFAULTS = yaml.safe_load((PROJECT_ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))
ROW = re.compile(r"^\| `([a-z_]+)\.([a-z_]+)` \| `?([^|`]*?)`? \|", re.M)


def _documented(path):
    rows = ROW.findall((PROJECT_ROOT / path).read_text(encoding="utf-8"))
    assert len(rows) >= 15, f"{path}: configuration table not found"
    return rows


def _same(doc_value: str, real) -> bool:
    doc_value = doc_value.strip().strip('"')
    if doc_value in ("空", "") or doc_value == "[]":
        return real in ("", [], None)
    if isinstance(real, bool):
        return doc_value == str(real).lower()
    if isinstance(real, (int, float)):
        return float(doc_value) == float(real)
    return doc_value == str(real)


@pytest.mark.parametrize("path", ["README.md", "docs/guide/05-配置说明.md"])
def test_documented_defaults_match_default_yaml(path):
    wrong = [(f"{s}.{k}", v, DEFAULTS[s][k]) for s, k, v in _documented(path)
             if not _same(v, DEFAULTS[s][k])]
    assert not wrong, f"{path} quotes defaults that configs/default.yaml no longer has: {wrong}"
