#!/usr/bin/env bash
# Container smoke test (docs/operations.md, "Container"): build the image from the Dockerfile with podman, run
# it with the queue and the mailboxes on host folders, send one message with swaks to the published port, find
# it in the mounted Maildir, check the HEALTHCHECK command, reload the server inside the container, and stop it
# (SIGTERM: it must drain and exit 0 within docker stop's 10 s). Prints how long each step took.
#
#   scripts/container-smoke.sh            (as root; CI runs it after the tests: .ci/run)
#
# No registry is needed: the base image (BASE in the Dockerfile, python:3.11-slim elsewhere) is made here once
# with debootstrap (Debian bookworm, minbase, python3 and python3-venv) and imported as $BASE_IMAGE; later runs
# reuse it. pip inside the build reaches PyPI through the host's pip configuration and CA bundle when the host
# has them (/etc/pip.conf, /etc/ssl/certs/ca-certificates.crt: a site behind a TLS-inspecting proxy).
# podman settings for a root sandbox (../shared/docs/RECIPES.md, section 6): vfs storage, runc, explicit
# ulimits; the build on the host network, the container on podman's own with the port published.
#
# Env: BASE_IMAGE (localhost/mailflow-base:bookworm), MIRROR (the Debian mirror; default: the host's apt source),
# KEEP=1 keeps the work folder, the container and the built image. Needs: podman, runc, debootstrap (when the
# base image is missing), swaks, python3. Exits non-zero naming the step that failed.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/mailflow-base:bookworm}
IMAGE=localhost/mailflow:smoke
NAME=mailflow-smoke-$$
PODMAN=(podman --storage-driver=vfs)
SANDBOX=(--runtime=runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
UID_IN_IMAGE=2525  # the Dockerfile's user
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mailflow-container.XXXXXX")
STARTED=$SECONDS

step() { printf 'container-smoke: %s\n' "$*"; }
die() { printf 'container-smoke: FAILED: %s\n' "$*" >&2; "${PODMAN[@]}" logs "$NAME" 2>/dev/null | tail -20 >&2 || true; exit 1; }
logged() { "${PODMAN[@]}" logs "$NAME" 2>&1 | grep -F -- "$1" > /dev/null; }  # (no grep -q: pipefail, SIGPIPE)
took() { printf 'container-smoke: %-38s %4ds\n' "$1" "$(( SECONDS - $2 ))"; }
cleanup() {
    if [ "${KEEP:-0}" != 1 ]; then
        "${PODMAN[@]}" rm -f "$NAME" >/dev/null 2>&1 || true
        "${PODMAN[@]}" rmi -f "$IMAGE" >/dev/null 2>&1 || true
        rm -rf --one-file-system "$WORK"  # never into a /proc an interrupted debootstrap left mounted
    else
        step "kept $WORK, container $NAME and image $IMAGE"
    fi
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "run it as root (podman with the vfs driver, debootstrap)"
for tool in podman runc swaks python3; do command -v "$tool" >/dev/null || die "$tool is not installed (.ci/run)"; done

# 1. the base image, once
t=$SECONDS
if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    took "base image (cached)" "$t"
else
    command -v debootstrap >/dev/null || die "debootstrap is not installed (.ci/run)"
    mirror=${MIRROR:-$( (sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources;
                         sed -n 's/^deb *\(http[^ ]*\) .*/\1/p' /etc/apt/sources.list) 2>/dev/null | head -1 || true)}
    mirror=${mirror:-http://deb.debian.org/debian}
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$WORK/rootfs" "$mirror" \
        > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" > /dev/null 2>&1 || die "importing the base image"
    rm -rf --one-file-system "$WORK/rootfs"
    took "base image (debootstrap + import)" "$t"
fi

# 2. the image (no intermediate layers: with vfs each one is a full copy)
t=$SECONDS
mounts=()
for f in /etc/pip.conf /etc/ssl/certs/ca-certificates.crt; do
    [ -f "$f" ] && mounts+=(-v "$f:$f:ro")
done
"${PODMAN[@]}" build "${SANDBOX[@]}" --network=host --layers=false --format docker "${mounts[@]}" \
    --build-arg BASE="$BASE_IMAGE" -t "$IMAGE" -f Dockerfile . > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; die "podman build"; }
took "image build" "$t"

# 3. run it: a virtual mailbox domain, the queue and the mailboxes on host folders, port 25 published
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/queue" "$WORK/mail"
chown "$UID_IN_IMAGE:$UID_IN_IMAGE" "$WORK/queue" "$WORK/mail"
cat > "$WORK/config.toml" <<TOML
myhostname = "smoke.mailflow.test"
queue_directory = "/var/spool/mailflow"
mynetworks = []
virtual_mailbox_base = "/var/mail/vhosts"
virtual_mailbox_domains = ["example.test"]
virtual_mailbox_maps = ["inline:{alice@example.test=example.test/alice/}"]
shutdown_grace = "8s"
[smtpd]
listen = ["0.0.0.0:25"]
TOML
t=$SECONDS
"${PODMAN[@]}" run -d --name "$NAME" "${SANDBOX[@]}" --sysctl net.ipv4.ip_unprivileged_port_start=0 \
    -p "127.0.0.1:$port:25" -v "$WORK/queue:/var/spool/mailflow" -v "$WORK/mail:/var/mail" \
    -v "$WORK/config.toml:/etc/mailflow/config.toml:ro" "$IMAGE" > /dev/null 2> "$WORK/run.log" \
    || { cat "$WORK/run.log" >&2; die "podman run"; }
for _ in $(seq 1 120); do  # up to 60 s: with vfs the container's file system is a full copy of the image
    logged "mailflow started" && break
    sleep 0.5
done
logged "mailflow started" || die "the server did not start"
took "container start" "$t"

# 4. one message through the published port, into the mounted Maildir
t=$SECONDS
token="smoke-$$-$RANDOM"
swaks --server 127.0.0.1 --port "$port" --ehlo client.test --from sender@remote.test --to alice@example.test \
    --header "Subject: $token" --body "container smoke" --timeout 20 > "$WORK/swaks.log" 2>&1 \
    || { cat "$WORK/swaks.log" >&2; die "swaks"; }
grep -q "250 2.0.0 Ok: queued as" "$WORK/swaks.log" || die "no 250 queued from the container"
maildir="$WORK/mail/vhosts/example.test/alice/new"
for _ in $(seq 1 100); do
    grep -rqs "Subject: $token" "$maildir" && break
    sleep 0.1
done
grep -rqs "Subject: $token" "$maildir" || die "the message is not in $maildir"
took "swaks -> Maildir" "$t"

# 5. the HEALTHCHECK command and a reload, inside the container
t=$SECONDS
"${PODMAN[@]}" healthcheck run "$NAME" 2>/dev/null || die "healthcheck"
"${PODMAN[@]}" exec "$NAME" mailflow reload > /dev/null || die "mailflow reload in the container"
for _ in $(seq 1 50); do
    logged "reload: configuration, tables and certificates in force" && break
    sleep 0.1
done
logged "reload: configuration, tables and certificates in force" || die "reload"
took "healthcheck + reload" "$t"

# 6. stop: SIGTERM, drained, exit status 0, well within the 10 s before the runtime would kill it
t=$SECONDS
"${PODMAN[@]}" stop -t 10 "$NAME" > /dev/null 2>&1 || die "podman stop"
status=$("${PODMAN[@]}" inspect "$NAME" --format '{{.State.ExitCode}}')
[ "$status" = 0 ] || die "exit status $status after SIGTERM"
[ $(( SECONDS - t )) -lt 10 ] || die "the stop took $(( SECONDS - t ))s: the runtime would have killed it"
took "stop (SIGTERM, exit 0)" "$t"

took "total" "$STARTED"
step "passed"
