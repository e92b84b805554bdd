#!/usr/bin/env bash
# The README's first command: set up (.venv, pinned packages, model pack), ingest the sample knowledge base
# 「使用指南」 (docs/guide) on first start, then start the page and API (python app.py; host/port from settings).
# Re-running is cheap: setup is idempotent and an existing sample KB is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SAMPLE_KB="${ZHIWEN_SAMPLE_KB:-使用指南}"
if ! .venv/bin/python -c "
import sys
from configs import load_settings
from retrieval.store import list_knowledge_bases
sys.exit(0 if sys.argv[1] in list_knowledge_bases(load_settings()) else 1)" "$SAMPLE_KB"; then
  echo "首次启动：导入示例知识库「$SAMPLE_KB」（docs/guide）…"
  .venv/bin/python ingest.py docs/guide --kb "$SAMPLE_KB"
fi
exec .venv/bin/python app.py "$@"
