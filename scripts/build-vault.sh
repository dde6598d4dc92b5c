#!/usr/bin/env bash
# Builds the Vault v1.21.0 server that `make dev` and the end-to-end tests
# run, from Vault's own Go module (see tools/vault/go.mod), into
# tools/vault/bin/vault. The first build takes about ten minutes; after that
# the binary is reused until tools/vault/go.mod or go.sum changes.
set -euo pipefail
cd "$(dirname "$0")/../tools/vault"

want="Vault v1.21.0"
bin=bin/vault
if [[ -x $bin && $bin -nt go.mod && $bin -nt go.sum ]] && "$bin" version 2>/dev/null | grep -q "^$want,"; then
  exit 0
fi
echo "build-vault: building $want into tools/vault/$bin (the first build takes several minutes)" >&2
mkdir -p bin
# -s -w: no symbol tables; the binary is for running tests, not debugging Vault.
go build -ldflags "-s -w" -o "$bin.tmp" github.com/hashicorp/vault
mv "$bin.tmp" "$bin"
"$bin" version
