"""common/: the helpers several rooms share, and the import rule that keeps the rooms layered."""
from __future__ import annotations

import ast
import hashlib
from datetime import UTC, datetime, timedelta

from common.files import now_iso, sha256_file
from common.text import CJK, char_bigrams
from configs import PROJECT_ROOT


def test_sha256_file_reads_the_whole_file(tmp_path):
    data = ("知问" * 400_000).encode("utf-8") + b"\0tail"  # several MB: more than one read block
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    assert sha256_file(f) == sha256_file(str(f)) == hashlib.sha256(data).hexdigest()
    f.write_bytes(data[:-1])
    assert sha256_file(f) != hashlib.sha256(data).hexdigest()


def test_now_iso_is_utc_to_the_second():
    stamp = datetime.fromisoformat(now_iso())
    assert stamp.utcoffset() == timedelta(0) and stamp.microsecond == 0
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=1)


def test_cjk_ranges():
    assert [c for c in "知问，ABC１２３。㐀豈abc" if CJK.match(c)] == list("知问，１２３。㐀豈")


def test_char_bigrams():
    assert char_bigrams("年假天数") == {"年假", "假天", "天数"}
    assert char_bigrams("年") == {"年"} and char_bigrams("") == set()
    assert char_bigrams("a a") == {"a ", " a"}  # as given: callers normalise first


# Each room and the rooms it may import (below it in the data path). bench/ and tests/ may import anything.
ALLOWED = {
    "common": set(),
    "configs": {"common"},
    "retrieval": {"common", "configs"},
    "llm": {"common", "configs"},
    "modelpack": {"common", "configs"},
    "prompts": {"common", "configs", "retrieval"},
    "grounding": {"common", "configs", "retrieval", "prompts", "llm"},
    "ingest": {"common", "configs", "retrieval", "prompts", "llm"},
    "app": {"common", "configs", "retrieval", "prompts", "llm", "grounding", "ingest"},  # not modelpack
}


def test_lower_rooms_never_import_higher_ones():
    wrong = []
    for room, allowed in ALLOWED.items():
        for f in sorted((PROJECT_ROOT / room).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top != room and (top in ALLOWED or top in ("bench", "tests")) and top not in allowed:
                        wrong.append(f"{f.relative_to(PROJECT_ROOT)} imports {name}")
    assert not wrong, "against the import rule (docs/ARCHITECTURE.md):\n" + "\n".join(wrong)
