#!/bin/sh
# The DaemonSet's first init container. Two plugins cannot serve one socket, and the apiserver cannot tell which
# one answers, so the chart refuses a node where the Ansible install's static pod runs kleidi: its manifest is in
# the kubelet's static pod directory. (A systemd install is refused by kleidi itself: it never binds a socket
# another process serves.) Input: KLEIDI_STATIC_POD, where the Ansible static pod manifest would be.
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
