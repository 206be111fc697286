#!/usr/bin/env bash
# Contract: a throwaway Postfix relay instance for the benchmark (adapted from shared/bench/run_postfix_anchor.sh).
#
#   postfix_instance.sh start PORT RELAYPORT   # smtpd on 127.0.0.1:PORT, relays ALL mail to [127.0.0.1]:RELAYPORT
#   postfix_instance.sh stop  PORT             # postfix stop (bounded wait) + delete the instance dir
#
# Instance dir: $PF_BASE/pf-relay-PORT/{etc,queue,data,maillog}; PF_BASE is required (bench/run.py passes its temp
# dir), so nothing is ever written to /etc/postfix or the default queue, and port 25 is never touched.
# PF_EXTRA="key=value ..." adds main.cf settings (run.py sets the queue/backoff timers mailflow also gets).
# Ports must be 2500-2599. Needs root and Postfix 3.x (apt-get install postfix). Exit 0 on success.
set -euo pipefail
ACTION=${1:?start|stop}; PORT=${2:?port}; RELAYPORT=${3:-}
(( PORT >= 2500 && PORT <= 2599 )) || { echo "port must be 2500-2599" >&2; exit 2; }
BASE=${PF_BASE:?PF_BASE must name the benchmark temp dir}
D=$BASE/pf-relay-$PORT
C=$D/etc

master_alive() {
  [[ -e $D/queue/pid/master.pid ]] && kill -0 "$(tr -d ' ' < "$D/queue/pid/master.pid" 2>/dev/null)" 2>/dev/null
}

if [[ $ACTION == stop ]]; then
  [[ -d $C ]] && postfix -c "$C" stop >/dev/null 2>&1 || true
  for _ in $(seq 50); do master_alive || break; sleep 0.2; done
  if master_alive; then kill -9 "$(tr -d ' ' < "$D/queue/pid/master.pid")" 2>/dev/null || true; fi
  [[ ${KEEP:-0} == 1 ]] || rm -rf "$D"
  exit 0
fi

[[ $ACTION == start ]] || { echo "unknown action $ACTION" >&2; exit 2; }
(( RELAYPORT >= 2500 && RELAYPORT <= 2599 )) || { echo "relay port must be 2500-2599" >&2; exit 2; }
rm -rf "$D"; mkdir -p "$C" "$D/queue" "$D/data"
chmod 755 "$BASE" "$D"; chown postfix "$D/data"
cp /etc/postfix/master.cf "$C/master.cf"
cat > "$C/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $D/queue
data_directory = $D/data
multi_instance_name = pfbench-relay-$PORT
myhostname = bench.localdomain
mydomain = localdomain
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_relay_restrictions = permit_mynetworks, reject
smtputf8_enable = no
relayhost = [127.0.0.1]:$RELAYPORT
maillog_file_prefixes = /var, /dev/stdout, $BASE
maillog_file = $D/maillog
EOF
# smtpd on 127.0.0.1:PORT instead of *:25; no chroot (nothing copied into the queue dir)
sed -i "s/^smtp      inet  n       -       y/127.0.0.1:$PORT inet n - n/" "$C/master.cf"
grep -q "^127.0.0.1:$PORT inet" "$C/master.cf" || { echo "could not rewrite the smtpd line of master.cf" >&2; exit 1; }
postconf -c "$C" -F '*/*/chroot = n'
for kv in ${PF_EXTRA:-}; do postconf -c "$C" -e "$kv"; done
postfix -c "$C" check
postfix -c "$C" start >/dev/null 2>&1 || { echo "postfix -c $C start failed" >&2; exit 1; }
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && exit 0; sleep 0.2; done
echo "postfix instance $D did not listen on 127.0.0.1:$PORT within 10 s" >&2
exit 1
