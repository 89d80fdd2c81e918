#!/usr/bin/env bash
# Run a command inside a private network namespace that this script creates.
#
# Neither WebRTC stack talks over loopback by default (aioice skips 127.0.0.1, the livekit SDK
# never offers loopback candidates), so tests get their own namespace: `lo` up plus a veth pair
# with a private address. No packet can leave it; nothing reaches the host's real interfaces.
#
# Where a namespace cannot be created (no user namespaces), the command runs without one:
# aiortc tests then pin ICE to 127.0.0.1 and the livekit-SDK tests skip, saying why. In CI
# (CI=true) that is an error instead: those tests must run there.
#
# AVATAR_GATEWAY_TEST_CPU_HOG=1 also keeps one CPU busy (a busy loop) while the command runs and
# kills it afterwards, whatever the outcome: the suite must pass on a shared, loaded machine.
set -euo pipefail

run() {
  if [ "${AVATAR_GATEWAY_TEST_CPU_HOG:-}" != "1" ]; then
    exec "$@"
  fi
  # The loop also ends by itself once this script is gone (even SIGKILLed): its parent changes.
  python3 -c 'import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:  # avatar-gateway test CPU hog
    for _ in range(1_000_000):
        pass' "$$" &
  local hog=$!
  trap 'kill "$hog" 2>/dev/null || true' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  echo "netns.sh: CPU hog running (pid $hog)" >&2
  local status=0
  "$@" || status=$?
  exit "$status"
}

if [ "${AVATAR_GATEWAY_TEST_NETNS:-}" != "1" ]; then
  if unshare --user --map-root-user --net true 2>/dev/null; then
    exec unshare --user --map-root-user --net env AVATAR_GATEWAY_TEST_NETNS=1 "$0" "$@"
  fi
  if [ "${CI:-}" = "true" ]; then
    echo "netns.sh: cannot create a network namespace (unshare --user --net failed); CI needs one" >&2
    exit 1
  fi
  echo "netns.sh: cannot create a network namespace here; running without one" \
       "(livekit SDK tests will skip)" >&2
  run "$@"
fi
ip link set lo up
ip link add gwtest0 type veth peer name gwtest1
ip addr add 10.203.0.1/24 dev gwtest0
ip link set gwtest0 up
ip link set gwtest1 up
run "$@"
