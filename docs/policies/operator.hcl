# Network operators: rotate any tunnel's PSK and see rotation state, but never
# read a key or the engine's API token.
path "cloudflare-ipsec/psk/*" {
  capabilities = ["create", "update"]
}

# Operators may reschedule without rotating: psk/<account>/<tunnel>/schedule
# moves a tunnel's next rotation (rotation_period, or rotation_schedule with
# rotation_window) and never calls Cloudflare. Read shows the schedule, never
# a key. A team that may reschedule but not rotate gets only this block.
path "cloudflare-ipsec/psk/+/+/schedule" {
  capabilities = ["create", "read", "update"]
}

path "cloudflare-ipsec/metadata/*" {
  capabilities = ["read", "list"]
}
