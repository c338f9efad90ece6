#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the end-to-end tests need and is
# missing (curl, Python requests and headless Chromium as clients; tinyproxy and microsocks as
# real upstreams; Prometheus and promtool to check the metrics, dashboards and alert rules; from
# Debian and PyPI), builds the gateway binary the tests run, then runs every test of the
# workspace.
# Extra arguments go to `cargo test` (e.g. tests/run.sh -p proxygate-tests --test failover).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/tinyproxy ] || [ -x /usr/sbin/tinyproxy ] || need+=(tinyproxy)
[ -x /usr/bin/microsocks ] || need+=(microsocks)
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
# tests/tests/chromium.rs: a CHROMIUM binary of the caller's, or any Chromium on PATH.
[ -n "${CHROMIUM:-}" ] || { command -v chromium-headless-shell || command -v chromium; } >/dev/null 2>&1 \
  || need+=(chromium-headless-shell)
if [ "${#need[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "tests/run.sh: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Python requests is one of the real clients the end-to-end tests drive; openapi-spec-validator
# checks the admin API's description.
python3 -c 'import requests, openapi_spec_validator' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check requests openapi-spec-validator

cargo build --locked -p proxygate --bin proxygate
exec cargo test --locked --workspace "$@"
