#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 10) from its committed seeds (seeds/TARGET)
# plus a scratch corpus (corpus/TARGET, not committed). Installs cargo-fuzz if missing. Fails on
# the first crash, leak or timeout: its input is left in crates/fuzz/artifacts/TARGET/; turn
# it into a regression test next to the code it broke. CI runs it as a smoke test; a longer
# local run: crates/fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-10}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# Stable Rust: no sanitizer (ASan needs nightly); debug assertions and Rust's bounds and
# overflow checks are on in cargo-fuzz builds.
cargo fuzz build --fuzz-dir . --sanitizer none
for t in $(cargo fuzz list --fuzz-dir .); do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if cargo fuzz run --fuzz-dir . --sanitizer none "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 >"$log" 2>&1; then
    printf '%-24s %s\n' "$t" "$(grep -a -E '^Done [0-9]+ runs' "$log" | tail -1)"
  else
    tail -n 40 "$log"
    echo "fuzz target $t failed; input in crates/fuzz/artifacts/$t/" >&2
    exit 1
  fi
  rm -f "$log"
done
