# Network operators: rotate any tunnel's PSK and see rotation state, but never
# read a key or the engine's API token.
path "cloudflare-ipsec/psk/*" {
  capabilities = ["create", "update"]
}

# Operators may reschedule without rotating: psk/<account>/<tunnel>/schedule
# moves a tunnel's next rotation (rotation_period, or rotation_schedule with
# rotation_window) and never calls Cloudflare. Read shows the schedule, never
# a key. A team that may reschedule but not rotate gets only this block.
# What it can cause, exactly: never a rotation at once; scheduled
# rotations, each an outage until the tunnel's routers have the new key, one
# per scheduled time and, by schedule, at most one per tunnel per
# min_rotation_period (config, 1h by default: a schedule that falls due
# more often is refused, and a change never sets the next rotation closer
# than that to the tunnel's last key, or to a rotation whose outcome is not
# known yet). The one way two keys come closer: a scheduled rotation that
# starts late, because the mount's budget was spent (the team's own
# schedules can spend it, by putting many tunnels at one time) or Vault was
# down, is followed by the tunnel's next scheduled time. And it can put
# scheduled rotation off, or turn it off.
path "cloudflare-ipsec/psk/+/+/schedule" {
  capabilities = ["create", "read", "update"]
}

path "cloudflare-ipsec/metadata/*" {
  capabilities = ["read", "list"]
}

# The mount's health: counts by state, the tunnels that need an operator,
# the budget (no key, no token).
path "cloudflare-ipsec/status" {
  capabilities = ["read"]
}
