#!/usr/bin/env bash
# Starts a Vault dev server with this plugin registered (by SHA-256) and
# mounted at cloudflare-ipsec/, configured against a local Cloudflare API
# simulator seeded with one account and three tunnels. Runs until Ctrl-C,
# then stops both servers and removes their files.
#
#   VAULT_PORT   Vault's port on 127.0.0.1 (default 8200)
#   CF_SIM_PORT  the simulator's port on 127.0.0.1 (default 8787)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
vault_port=${VAULT_PORT:-8200}
sim_port=${CF_SIM_PORT:-8787}
# VAULT_BIN comes from scripts/vault-bin.sh (see the Makefile).
vault="${VAULT_BIN:-$root/tools/vault/bin/vault}"
plugin_dir="$root/bin/plugins"
plugin=vault-plugin-secrets-cloudflare-ipsec

work=$(mktemp -d "${TMPDIR:-/tmp}/cf-ipsec-dev.XXXXXX")
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

"$root/bin/cloudflare-sim" -listen "127.0.0.1:$sim_port" -seed-file "$work/sim.env" 2>"$work/sim.log" &
pids+=($!)
for _ in $(seq 50); do [[ -s $work/sim.env ]] && break; sleep 0.1; done
[[ -s $work/sim.env ]] || { cat "$work/sim.log" >&2; exit 1; }
# shellcheck disable=SC1091
source "$work/sim.env"

printf 'plugin_directory = "%s"\n' "$plugin_dir" >"$work/plugins.hcl"
"$vault" server -dev -dev-root-token-id=root -dev-listen-address="127.0.0.1:$vault_port" \
  -config="$work/plugins.hcl" >"$work/vault.log" 2>&1 &
pids+=($!)

export VAULT_ADDR="http://127.0.0.1:$vault_port" VAULT_TOKEN=root
for _ in $(seq 100); do "$vault" status >/dev/null 2>&1 && break; sleep 0.2; done
"$vault" status >/dev/null || { cat "$work/vault.log" >&2; exit 1; }

sha=$(sha256sum "$plugin_dir/$plugin" | cut -d' ' -f1)
"$vault" plugin register -sha256="$sha" secret "$plugin" >/dev/null
"$vault" secrets enable -path=cloudflare-ipsec "$plugin" >/dev/null
# The token goes in on stdin ("-"), so it is on no command line.
printf '%s' "$CF_SIM_API_TOKEN" |
  "$vault" write cloudflare-ipsec/config api_token=- base_url="$CF_SIM_BASE_URL" >/dev/null

read -r tunnel _ <<<"$CF_SIM_TUNNELS_1"
cat <<MSG
Vault dev server:       $VAULT_ADDR (root token: root)
Cloudflare simulator:   $CF_SIM_BASE_URL
Engine:                 cloudflare-ipsec/ ($("$vault" read -field=token_id cloudflare-ipsec/config | sed 's/^/token id /'))
Account:                $CF_SIM_ACCOUNT_1
Tunnels:                $CF_SIM_TUNNELS_1

Try, in another shell:
  export PATH=$(dirname "$vault"):\$PATH VAULT_ADDR=$VAULT_ADDR VAULT_TOKEN=root
  vault write -f cloudflare-ipsec/psk/$CF_SIM_ACCOUNT_1/$tunnel
  vault read cloudflare-ipsec/psk/$CF_SIM_ACCOUNT_1/$tunnel

Server log: $work/vault.log. Ctrl-C stops both servers.
MSG
wait "${pids[1]}"
