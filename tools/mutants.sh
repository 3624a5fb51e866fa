#!/usr/bin/env bash
# Mutation testing (cargo-mutants) of the code that decides: the scope grammar, the
# decision, response and write verification, request classification, the JSON reader.
# A mutant no test kills is a decision the tests would not notice breaking: kill it with
# a test, or name it in .cargo/mutants.toml as equivalent (with why).
#
#   tools/mutants.sh                 every mutant of those files (hours on two cores)
#   tools/mutants.sh --in-diff REV   only those in lines changed since REV (CI: HEAD~1)
#   MUTANTS_TESTS=all tools/mutants.sh …   run every test per mutant, not the unit tests
#
# Exit status: non-zero when a mutant survives (or times out).
set -euo pipefail
cd "$(dirname "$0")/.."
files=(src/smart/scope.rs src/policy/mod.rs src/policy/verify.rs src/fhir/request.rs src/json/mod.rs src/json/scan.rs)
if ! command -v cargo-mutants >/dev/null; then
  cargo install cargo-mutants --locked --version 27.1.0
fi
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
if [ "${1:-}" = "--in-diff" ]; then
  base="${2:?--in-diff needs a revision}"
  diff=$(mktemp)
  trap 'rm -f "$diff"' EXIT
  git diff "$base" -- "${files[@]}" > "$diff"
  if [ ! -s "$diff" ]; then
    echo "mutants: nothing changed in ${files[*]} since $base"
    exit 0
  fi
  args+=(--in-diff "$diff")
fi
test_args=(--lib)
[ "${MUTANTS_TESTS:-lib}" = "all" ] && test_args=()
out="${MUTANTS_OUT:-target/mutants}"
mkdir -p "$out"
# Exit status 3 means some mutants made the tests time out: a loop that never ends
# (`at += 1` as `at *= 1` in the JSON scanner). The tests did not pass on them, so they
# count as caught. Status 3 takes precedence over 2 (missed), so missed.txt decides.
status=0
cargo mutants "${args[@]}" --output "$out" --timeout 120 -j 1 -- "${test_args[@]}" || status=$?
if [ "$status" = 3 ]; then
  if [ -s "$out/mutants.out/missed.txt" ]; then
    echo "mutants: missed:"; cat "$out/mutants.out/missed.txt"
    exit 2
  fi
  echo "mutants: nothing missed; the timeouts hung the tests (caught)"
  exit 0
fi
exit "$status"
