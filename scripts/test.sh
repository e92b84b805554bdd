#!/usr/bin/env bash
# The README's test command: set up .venv (dev requirements, model pack, Chromium) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=requirements-dev.txt bash scripts/setup.sh
# Debian tools the tests use: Chromium for the browser tests (with a CJK font, so screenshots show Chinese, not
# boxes), antiword + catdoc for legacy .doc files.
missing=()
for pair in chromium:chromium chromedriver:chromium-driver antiword:antiword catdoc:catdoc; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
fc-list 2>/dev/null | grep -qi "noto.*cjk" || missing+=(fonts-noto-cjk)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
      || echo "warning: could not install ${missing[*]}; the tests that need them will fail" >&2
  else
    echo "warning: missing ${missing[*]}; install them with apt-get (as root)" >&2
  fi
fi
exec .venv/bin/python -m pytest "$@"
