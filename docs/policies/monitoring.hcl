# Monitoring: read the mount's status and nothing else. status holds no key
# and no token, and names tunnels only by their ids: a monitoring system
# with this policy cannot read a key, a tunnel's metadata or config, and
# cannot rotate, reschedule or queue anything.
path "cloudflare-ipsec/status" {
  capabilities = ["read"]
}
