# Sourced by gpu_check.sh and gpu_embed_check.sh: `step NAME SECONDS COMMAND...` runs COMMAND under
# its own time limit with its output in $OUT/logs/NAME.log, prints one status line (and the log's
# last lines when it failed) and never stops the script.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  printf '%-16s rc=%-3s %4ss (limit %ss)\n' "$name" "$rc" "$(($(date +%s) - start))" "$limit"
  [ "$rc" -ne 0 ] && tail -n 5 "$OUT/logs/$name.log" | sed 's/^/    /'
  return 0
}
