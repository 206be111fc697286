#!/usr/bin/env bash
# Run the black-box SMTP acceptance battery against a real `mailflow serve`, wired as the battery's
# README asks: its own config and spool in a temporary folder, the battery's capture sink as relayhost
# (so relay_domains mail and anything that escapes lands there), the battery's client untrusted,
# a local Maildir user, and a SERVER_RESTART_CMD that SIGKILLs the server and starts it again.
#
#   BATTERY=../shared/battery PYTEST_ARGS="test_protocol.py test_relay.py" scripts/battery.sh
#
# The server offers STARTTLS with a trustme certificate made in the temporary folder, AUTH after STARTTLS
# (user `battery`), and enforces the recipient and per-client connection limits the battery is told about.
#
# Env: BATTERY (folder of the battery), PYTEST_ARGS, IDLE_TIMEOUT (10), RCPT_LIMIT (100), CONN_LIMIT (20),
# REQUIRE_STARTTLS (1), KEEP=1 keeps the temporary folder. Exits with pytest's status. Needs `mailflow` and
# `python` with pytest and trustme on PATH (the venv's).
set -euo pipefail

# The battery lives beside the project (../shared/battery). A clone made elsewhere (git clone . /tmp/x/c) looks
# beside the repository it was cloned from; no battery at all is a failure, not a skip.
find_battery() {
    local wanted=${BATTERY:-../shared/battery} origin
    if [ -d "$wanted" ]; then (cd "$wanted" && pwd); return; fi
    origin=$(git config --get remote.origin.url 2>/dev/null || true)
    if [ -n "$origin" ] && [ -d "$origin/$wanted" ]; then (cd "$origin/$wanted" && pwd); return; fi
    echo "battery.sh: no battery at $wanted (nor beside $origin); set BATTERY=/path/to/battery" >&2
    return 1
}
BATTERY=$(find_battery)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailflow-battery.XXXXXX")
PYTHON=${PYTHON:-python}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-10}
RCPT_LIMIT=${RCPT_LIMIT:-100}
CONN_LIMIT=${CONN_LIMIT:-20}
REQUIRE_STARTTLS=${REQUIRE_STARTTLS:-1}
free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SMTP_PORT=${SMTP_PORT:-$(free_port)}
SINK_PORT=${SINK_PORT:-$(free_port)}

# The certificate (trustme: a throwaway CA) and the AUTH user table.
"$PYTHON" -c 'import sys, trustme; trustme.CA().issue_cert("localhost", "127.0.0.1", "mx.battery.test").private_key_and_cert_chain_pem.write_to_path(sys.argv[1])' "$WORK/cert.pem"
printf 'battery-password\n' | mailflow auth hash-password battery --stdin > "$WORK/sasl_users"

cat > "$WORK/mailflow.toml" <<TOML
myhostname = "mx.battery.test"
mydestination = ["localhost", "local.test"]
relay_domains = ["relay.test"]
mynetworks = []
relayhost = "[127.0.0.1]:$SINK_PORT"
queue_directory = "$WORK/queue"
local_recipient_maps = ["inline:{alice=ok, postmaster=ok}"]

[smtpd]
listen = ["127.0.0.1:$SMTP_PORT"]
timeout = "${IDLE_TIMEOUT}s"
recipient_limit = $RCPT_LIMIT
client_connection_count_limit = $CONN_LIMIT
tls_cert_file = "$WORK/cert.pem"
sasl_auth_enable = true
sasl_user_maps = ["texthash:$WORK/sasl_users"]

[local]
maildir_base = "$WORK/mail"

[smtp]
connect_timeout = "5s"

[queue]
queue_run_delay = "1s"
minimal_backoff_time = "1s"
maximal_backoff_time = "2s"
TOML

# start.sh starts the server detached and records its pid; restart.sh is the battery's restart hook.
cat > "$WORK/start.sh" <<SH
#!/bin/sh
cd "$WORK" && setsid mailflow serve --config "$WORK/mailflow.toml" >> "$WORK/server.log" 2>&1 < /dev/null &
echo \$! > "$WORK/server.pid"
SH
cat > "$WORK/restart.sh" <<SH
#!/bin/sh
pid=\$(cat "$WORK/server.pid")
kill -9 "\$pid" 2>/dev/null
for i in \$(seq 100); do kill -0 "\$pid" 2>/dev/null || break; sleep 0.1; done
exec "$WORK/start.sh"
SH
chmod +x "$WORK/start.sh" "$WORK/restart.sh"

stop_server() {
    local pid
    pid=$(cat "$WORK/server.pid" 2>/dev/null) || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
    stop_server
    [ "${KEEP:-0}" = 1 ] && echo "battery: kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

"$WORK/start.sh"
for _ in $(seq 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$SMTP_PORT") 2>/dev/null && break
    sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$SMTP_PORT") 2>/dev/null || { echo "battery: mailflow did not start"; cat "$WORK/server.log"; exit 1; }

status=0
(
    cd "$BATTERY"
    SMTP_HOST=127.0.0.1 SMTP_PORT=$SMTP_PORT SINK_HOST=127.0.0.1 SINK_PORT=$SINK_PORT \
    RELAY_DOMAIN=relay.test LOCAL_DOMAIN=local.test LOCAL_USER=alice \
    LOCAL_MAILDIR="$WORK/mail/alice/Maildir" IDLE_TIMEOUT=$IDLE_TIMEOUT \
    RCPT_LIMIT=$RCPT_LIMIT CONN_LIMIT=$CONN_LIMIT REQUIRE_STARTTLS=$REQUIRE_STARTTLS \
    SERVER_RESTART_CMD="$WORK/restart.sh" \
    "$PYTHON" -m pytest -p no:asyncio -p no:timeout ${PYTEST_ARGS:-}
) || status=$?
if [ "$status" != 0 ]; then
    echo "battery: pytest exited $status; last lines of the server log:"
    tail -n 40 "$WORK/server.log"
fi
exit "$status"
