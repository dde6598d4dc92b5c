# A router provisioning tool: read the PSKs of one account's tunnels, nothing
# else. Replace ACCOUNT_ID with the Cloudflare account id (lower case).
path "cloudflare-ipsec/psk/ACCOUNT_ID/*" {
  capabilities = ["read"]
}
