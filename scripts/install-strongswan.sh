#!/usr/bin/env bash
# e2e/ikev2_test.go runs two strongSwan daemons in network namespaces (as
# root): `make test` installs them when missing. Without them the test fails,
# saying so; it never skips.
set -euo pipefail
missing=""
for pkg in charon-systemd strongswan-swanctl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "install-strongswan: installing$missing for the IKEv2 test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
  else
    echo "install-strongswan: not root, cannot install$missing; the IKEv2 test will fail" >&2
  fi
fi
