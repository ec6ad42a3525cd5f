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
# Test files in parallel (pytest-xdist; a file's tests stay in one process, so its module fixtures compile once): as
# many workers as cores, at most 4 (each simulates 8 devices). NANOJAX_TEST_WORKERS=0 runs in this process.
workers="${NANOJAX_TEST_WORKERS:-$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')}"
exec python -m pytest -n "$workers" --dist loadfile "$@"
