#!/usr/bin/env bash
# Start a single-node Ray head for development: bound to 127.0.0.1, token authentication on,
# dashboard / Jobs API on 127.0.0.1:8265. Extra arguments go to `ray start` (e.g. --num-cpus 2 --block).
#
#   cluster/start-local-head.sh                      # then: ermgap submit sweeps/demo.yaml --follow
#   HOST=10.0.0.5 cluster/start-local-head.sh        # expose on a LAN address (keep token auth on!)
#   RAY_AUTH_MODE=disabled cluster/start-local-head.sh   # no token (loopback only; prints a warning)
#
# Environment: HOST (127.0.0.1), DASHBOARD_PORT (8265), GCS_PORT (6379), RAY (the ray executable).
# Stop it with `ray stop` — note that `ray stop` stops EVERY Ray process of this machine; with
# --block, Ctrl-C (SIGTERM/SIGINT to this process) stops only this head.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${RAY:-}" ]]; then
  if [[ -x "$here/.venv/bin/ray" ]]; then RAY="$here/.venv/bin/ray"; else RAY="ray"; fi
fi
HOST="${HOST:-127.0.0.1}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
GCS_PORT="${GCS_PORT:-6379}"
# Ray 2.60 turns token auth on by default for a new head; say so explicitly so it cannot be lost.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

case "$HOST" in
  127.*|localhost|::1) loopback=1 ;;
  *) loopback=0 ;;
esac
if [[ "$RAY_AUTH_MODE" != "token" ]]; then
  if [[ $loopback == 0 ]]; then
    echo "WARNING: exposing Ray on $HOST WITHOUT token authentication: anyone who can reach it can run code here." >&2
  else
    echo "warning: token authentication is disabled (RAY_AUTH_MODE=$RAY_AUTH_MODE); any local user can submit jobs." >&2
  fi
else
  # The token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (generated on first start).
  if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    "$RAY" get-auth-token --generate >/dev/null
  fi
  cat >&2 <<MSG
Ray head: dashboard and Jobs API on http://$HOST:$DASHBOARD_PORT, token authentication ON.
Clients need the token: on this machine \`ray get-auth-token\` prints it (file ~/.ray/auth_token);
elsewhere:  export RAY_AUTH_TOKEN=<token>   # never commit it, never put it into a config file
Submit:     ermgap submit sweeps/demo.yaml --address http://$HOST:$DASHBOARD_PORT --follow
MSG
fi

exec "$RAY" start --head \
  --node-ip-address "$HOST" \
  --dashboard-host "$HOST" \
  --dashboard-port "$DASHBOARD_PORT" \
  --port "$GCS_PORT" \
  --include-dashboard true \
  --disable-usage-stats \
  "$@"
