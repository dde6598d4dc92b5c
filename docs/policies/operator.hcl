# Network operators: rotate any tunnel's PSK and see rotation state, but never
# read a key or the engine's API token.
path "cloudflare-ipsec/psk/*" {
  capabilities = ["create", "update"]
}

path "cloudflare-ipsec/metadata/*" {
  capabilities = ["read", "list"]
}
