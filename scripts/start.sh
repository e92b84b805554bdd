#!/usr/bin/env bash
# The README's first command: set up (.venv, pinned packages, model pack), ingest the sample knowledge base
# 「使用指南」 (docs/guide; kept in sync with the guide on every start), then start the page and API (python app.py;
# host/port from settings). Re-running is cheap: setup is idempotent and unchanged guide pages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SAMPLE_KB="${ZHIWEN_SAMPLE_KB-使用指南}"
if [ -n "$SAMPLE_KB" ]; then
  # Incremental: the first start embeds the guide (~20 s); later starts only pick up guide pages that changed
  # (e.g. after `git pull`) and take about a second. ZHIWEN_SAMPLE_KB="" skips the sample KB entirely.
  echo "示例知识库「$SAMPLE_KB」：同步 docs/guide（只处理新增和改动的页面）…"
  .venv/bin/python ingest.py docs/guide --kb "$SAMPLE_KB" --prune --quiet \
    || echo "警告：示例知识库未能同步（见上方原因），照常启动网页。" >&2
fi
exec .venv/bin/python app.py "$@"
