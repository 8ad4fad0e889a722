#!/bin/sh
# The DaemonSet's first init container, run as root with only CAP_CHOWN.
# 1. Two plugins cannot serve one socket, and the apiserver cannot tell which one answers, so the chart refuses a
#    node where the Ansible install's static pod runs kleidi: its manifest is in the kubelet's static pod
#    directory. (A systemd install is refused by kleidi itself: it never binds a socket another process serves.)
# 2. /run is empty after a reboot, and the kubelet makes a missing hostPath directory owned by root, where the
#    plugin's user could not create its socket: such a directory is handed to the plugin's user. The directory
#    itself is never removed or replaced: a running apiserver keeps its bind mount of the one it saw first.
# Inputs: KLEIDI_STATIC_POD (where the Ansible static pod manifest would be), KLEIDI_SOCKET_DIR, KLEIDI_UID,
# KLEIDI_GID (the plugin's user and group).
set -eu

dir=$(dirname "$KLEIDI_STATIC_POD")
if [ ! -x "$dir" ]; then
  echo "kleidi: cannot look into $dir as uid $(id -u); cannot tell whether the Ansible static pod runs here" >&2
  exit 1
fi
if [ -e "$KLEIDI_STATIC_POD" ]; then
  echo "kleidi: the Ansible static pod (kleidi.yaml in the kubelet's static pod directory) runs kleidi on this node;" \
    "the chart will not start a second plugin on its socket. Remove one install first: docs/helm.md," \
    "\"Moving between the static pod and the chart\"." >&2
  exit 1
fi
echo "kleidi: no kleidi static pod on this node"

owner=$(stat -c %u "$KLEIDI_SOCKET_DIR")
if [ "$owner" = 0 ]; then
  chmod 0750 "$KLEIDI_SOCKET_DIR"
  chown "$KLEIDI_UID:$KLEIDI_GID" "$KLEIDI_SOCKET_DIR"
  echo "kleidi: handed the socket directory $KLEIDI_SOCKET_DIR to $KLEIDI_UID:$KLEIDI_GID"
elif [ "$owner" != "$KLEIDI_UID" ]; then
  echo "kleidi: the socket directory $KLEIDI_SOCKET_DIR belongs to uid $owner, not to the plugin's user" \
    "$KLEIDI_UID; the chart will not take it over. Give it to $KLEIDI_UID or set securityContext.runAsUser." >&2
  exit 1
fi
