#!/usr/bin/env bash
# e2e/ansible_test.go runs docs/examples/ansible/ with ansible-playbook against
# a real Vault: `make test` installs Debian's ansible (7.7, which bundles
# community.hashi_vault 4.2.1) when it is missing, with python3-hvac, the Vault
# client that collection imports and that ansible does not pull in.
# Recommends are left out: the test runs on localhost and needs none of them.
# apt's output is shown only when it fails. Without ansible the test fails,
# saying so; it never skips.
set -euo pipefail
missing=""
for pkg in ansible python3-hvac; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing="$missing $pkg"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-ansible: not root, cannot install$missing; the Ansible test will fail" >&2
  exit 0
fi
echo "install-ansible: installing$missing for the Ansible test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq &&
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-ansible: apt-get failed" >&2
  exit 1
fi
