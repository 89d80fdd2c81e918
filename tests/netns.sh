#!/usr/bin/env bash
# Run a command inside a private network namespace that this script creates.
#
# Neither WebRTC stack talks over loopback by default (aioice skips 127.0.0.1, the livekit SDK
# never offers loopback candidates), so tests get their own namespace: `lo` up plus a veth pair
# with a private address. No packet can leave it; nothing reaches the host's real interfaces.
set -euo pipefail
if [ "${AVATAR_GATEWAY_TEST_NETNS:-}" != "1" ]; then
  exec unshare --user --map-root-user --net env AVATAR_GATEWAY_TEST_NETNS=1 "$0" "$@"
fi
ip link set lo up
ip link add gwtest0 type veth peer name gwtest1
ip addr add 10.203.0.1/24 dev gwtest0
ip link set gwtest0 up
ip link set gwtest1 up
exec "$@"
