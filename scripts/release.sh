#!/usr/bin/env bash
# Builds release binaries of the plugin for Vault servers on Linux, with the
# version that `vault secrets list -detailed` shows, and a SHA256SUMS file
# whose sums are what `vault plugin register -sha256=...` takes.
#
#   scripts/release.sh v1.2.3   ->  dist/v1.2.3/vault-plugin-secrets-cloudflare-ipsec_v1.2.3_linux_{amd64,arm64}
#                                   dist/v1.2.3/SHA256SUMS
set -euo pipefail
version=${1:?usage: release.sh vX.Y.Z}
[[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] || { echo "release: version must look like v1.2.3, got $version" >&2; exit 2; }
cd "$(dirname "$0")/.."
out=dist/$version
rm -rf "$out"
mkdir -p "$out"
for arch in amd64 arm64; do
  name=vault-plugin-secrets-cloudflare-ipsec_${version}_linux_${arch}
  CGO_ENABLED=0 GOOS=linux GOARCH=$arch go build -trimpath \
    -ldflags "-s -w -X main.version=$version" -o "$out/$name" .
done
(cd "$out" && sha256sum vault-plugin-secrets-cloudflare-ipsec_* >SHA256SUMS)
cat "$out/SHA256SUMS"
