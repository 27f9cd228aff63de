# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_full.sh: a run of named, time-limited steps with
# a summary table. The caller sets DRY (1: list the steps, run nothing), LOGS, SUMMARY and FAILED=0.

# summary_header TITLE: start SUMMARY (a real run only)
summary_header() {
  {
    echo "# $1"
    echo
    echo "| step | result | seconds |"
    echo "|---|---|---|"
  } >"$SUMMARY"
}

# step NAME LIMIT_S COMMAND...: run it (log in logs/NAME.log), or list it under --dry-run
step() {
  local name=$1 limit=$2
  shift 2
  if (( DRY )); then
    local shown=() a
    for a in "$@"; do [[ $a == *$'\n'* ]] && a="<inline check: $(grep -c '' <<<"$a") lines>"; shown+=("$a"); done
    printf '%-24s %s\n' "$name" "${shown[*]}"
    return 0
  fi
  local t0=$SECONDS rc
  echo "== $name" >&2
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local result=ok
  if (( rc == 124 )); then result="failed: over ${limit}s"; FAILED=1
  elif (( rc != 0 )); then
    result="failed: exit $rc, $(tail -n 1 "$LOGS/$name.log" | cut -c1-160 | tr '|' '/')"
    FAILED=1
  fi
  echo "| $name | $result | $((SECONDS - t0)) |" >>"$SUMMARY"
  echo "   $result ($((SECONDS - t0)) s)" >&2
}

skip() {  # NAME REASON
  if (( DRY )); then printf '%-24s skipped here: %s\n' "$1" "$2"; return 0; fi
  echo "| $1 | skipped: $2 | 0 |" >>"$SUMMARY"
  echo "== $1: skipped: $2" >&2
}
