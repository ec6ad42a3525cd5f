#!/usr/bin/env bash
# The test command: creates/uses .venv, installs what is needed, runs the suite on 8 simulated CPU devices.
# Extra arguments go to pytest (e.g. `bash tests/run.sh -m "not slow"` or `bash tests/run.sh tests/test_gpt.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh dev
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null \
    && [ -z "${NANOJAX_CHROMIUM:-}" ]; then
  echo "note: no chromium found: the browser test of the chat page (tests/test_app.py) will be SKIPPED" \
       "(apt-get install chromium to run it)" >&2
fi
exec python -m pytest "$@"
