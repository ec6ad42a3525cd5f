#!/usr/bin/env bash
# Install bubblewrap (`bwrap`), the kernel isolation that model-written code runs under (nanojax/sandbox.py), when it is
# missing and this machine lets us: apt-get as root, or through passwordless sudo. Quiet; never fails the caller.
# Elsewhere it says what to do: HumanEval is then not run (or run without isolation with --allow-unisolated-exec).
command -v bwrap >/dev/null 2>&1 && exit 0
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
  if [ "$sudo" != none ]; then
    echo "[bubblewrap] installing it for the code sandbox (apt-get install bubblewrap)"
    { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq bubblewrap; } \
      >/dev/null 2>&1 || true
  fi
fi
command -v bwrap >/dev/null 2>&1 ||
  echo "[bubblewrap] not installed and cannot be installed here: model-written code (HumanEval) will not be run;" \
       "install the 'bubblewrap' package (see README, 'Running model-written code')" >&2
exit 0
