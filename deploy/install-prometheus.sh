#!/usr/bin/env bash
# Installs Debian's `prometheus` (server + promtool) for the end-to-end monitoring tests.
# Skips when present; never fails the setup on a machine without apt (the tests then skip).
set -u
if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup: apt-get not found; install prometheus yourself for the monitoring tests" >&2; exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "setup: prometheus (Debian package)"
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq prometheus >/dev/null \
  || echo "setup: could not install prometheus; the monitoring tests will be skipped" >&2
# The package starts a system service on :9090 on some systems; the tests run their own.
exit 0
