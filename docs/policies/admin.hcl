# Engine administrators: configure the engine, roll its Cloudflare token,
# run and watch bulk rotations and see every tunnel's state, but never read
# a PSK (the token itself is never readable by anyone).
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
