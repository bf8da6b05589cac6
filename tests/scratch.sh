# Shared by the shell tests (sourced): a scratch folder $work, removed on exit after the daemon
# whose pid is in $daemon (if any) is stopped, and the wait for a daemon's listening line.
work=$(mktemp -d)
daemon=""
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

# The port a daemon logging to $1 listens on (it logs "msg=listening ... url=http://HOST:PORT"),
# waiting up to 30 s; empty if it did not start.
daemon_port() {
  port=""
  for _ in $(seq 300); do
    port=$(sed -n 's/.*msg=listening.*url=http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$1" | head -n 1)
    [ -n "$port" ] && break
    sleep 0.1
  done
  echo "$port"
}
