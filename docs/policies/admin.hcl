# Engine administrators: configure the engine, roll its Cloudflare token,
# run and watch bulk rotations and see every tunnel's state, but never read
# a PSK through Vault (the token itself is never readable by anyone).
#
# Updating config is more than that: whoever sets base_url, with an api_token
# of their own, controls every answer the engine gets, the new keys included,
# and can hand it keys they know. So an administrator can know every later
# key without reading one. Grant this policy only to people trusted with the
# keys, or leave "update" on config out of it and keep config writes for a
# smaller group.
path "cloudflare-ipsec/config" {
  capabilities = ["create", "read", "update", "delete"]
}

path "cloudflare-ipsec/config/rotate-root" {
  capabilities = ["update"]
}

path "cloudflare-ipsec/rotate/*" {
  capabilities = ["read", "update"]
}

path "cloudflare-ipsec/tunnels/*" {
  capabilities = ["read", "list"]
}

path "cloudflare-ipsec/metadata/*" {
  capabilities = ["read", "list"]
}

# The mount's health: counts by state, the tunnels that need an operator,
# the budget (no key, no token).
path "cloudflare-ipsec/status" {
  capabilities = ["read"]
}

# What of key_source vault is still in flight (before a downgrade).
path "cloudflare-ipsec/key-source" {
  capabilities = ["read"]
}
