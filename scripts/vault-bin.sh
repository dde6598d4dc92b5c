#!/usr/bin/env bash
# Prints the path of the Vault v1.21.x server that `make dev` and `make test`
# run: $VAULT_BIN when it names one, else `vault` on PATH when it is one, else
# the server built from Vault's own Go module (scripts/build-vault.sh), which
# is built first when it is missing (about ten minutes the first time on two
# cores; seconds after that). Progress goes to stderr, the path to stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

is_wanted() { [[ -x $1 ]] && "$1" version 2>/dev/null | grep -q '^Vault v1\.21\.'; }

if [[ -n ${VAULT_BIN:-} ]]; then
  # Absolute: the end-to-end suite runs in e2e/, where a relative path
  # names nothing.
  if [[ $VAULT_BIN != /* && -e $VAULT_BIN ]]; then
    VAULT_BIN="$(cd "$(dirname "$VAULT_BIN")" && pwd)/$(basename "$VAULT_BIN")"
  fi
  if is_wanted "$VAULT_BIN"; then
    echo "$VAULT_BIN"
    exit 0
  fi
  echo "vault-bin: VAULT_BIN=$VAULT_BIN is not a Vault v1.21.x binary; using one built from Vault's module instead" >&2
fi
if onpath=$(command -v vault 2>/dev/null) && is_wanted "$onpath"; then
  echo "$onpath"
  exit 0
fi
"$root/scripts/build-vault.sh" >&2
echo "$root/tools/vault/bin/vault"
