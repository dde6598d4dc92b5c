#!/bin/sh
# check-status.sh: a monitoring check of a Cloudflare IPsec secrets engine
# mount, for Nagios, Icinga, Sensu, Zabbix or cron. It reads <mount>/status
# once (a token with docs/policies/monitoring.hcl is all it needs), prints
# one line, and exits with the plugin convention's status:
#
#   0 OK        nothing needs an operator
#   1 WARNING   tunnels whose background attempts fail, tunnels gone at
#               Cloudflare, overdue scheduled rotations, Cloudflare's
#               rate-limit block, or (MAX_KEY_AGE_DAYS) a key older than that
#   2 CRITICAL  stale tunnels: the edge uses a key Vault does not hold, so
#               the tunnel is down until both sides share a new one
#   3 UNKNOWN   status could not be read
#
# Usage: VAULT_ADDR=... VAULT_TOKEN=... check-status.sh [mount]
# (mount: cloudflare-ipsec by default). Needs the vault CLI and jq.
set -u
mount=${1:-cloudflare-ipsec}
mount=${mount%/}
max_age=${MAX_KEY_AGE_DAYS:-0}

if ! out=$(vault read -format=json "$mount/status" 2>&1); then
	echo "CF-IPSEC UNKNOWN - cannot read $mount/status: $(printf '%s' "$out" | tr -s '\n' ' ' | cut -c1-300)"
	exit 3
fi

line=$(printf '%s' "$out" | jq -r --arg mount "$mount" --argjson maxage "$max_age" '
  .data as $d
  | if ($d.tunnels | type) != "number" or ($d.states | type) != "object" then error("not a status answer") else . end
  | ($d.states.stale // 0) as $stale
  | ($d.failing_count // 0) as $failing
  | ($d.states.tunnel_gone // 0) as $gone
  | ($d.overdue // 0) as $overdue
  | (if ($d.oldest_key_stored_at // "") == "" then 0
     else ((now - ($d.oldest_key_stored_at | sub("\\.[0-9]+Z$"; "Z") | fromdateiso8601)) / 86400 | floor) end) as $age
  | [ (if $stale > 0 then "\($stale) stale" else empty end),
      (if $failing > 0 then "\($failing) failing" else empty end),
      (if $gone > 0 then "\($gone) tunnel_gone" else empty end),
      (if $overdue > 0 then "\($overdue)\(if $d.overdue_at_least then "+" else "" end) overdue" else empty end),
      (if ($d.rate_limited_until // "") != "" then "rate limited until \($d.rate_limited_until)" else empty end),
      (if $maxage > 0 and $age > $maxage then "oldest key \($age) days old" else empty end)
    ] as $problems
  | (if $stale > 0 then 2 elif ($problems | length) > 0 then 1 else 0 end) as $code
  | (["OK", "WARNING", "CRITICAL"][$code]) as $word
  | (if ($d.attention | length) > 0
     then " (first: \($d.attention[0].account_id)/\($d.attention[0].tunnel_id) \($d.attention[0].state))" else "" end) as $first
  | (if $d.counts_exact then "" else " [counts being recounted]" end) as $exact
  | "\($code) CF-IPSEC \($word) - \($mount): "
    + (if ($problems | length) > 0 then ($problems | join(", ")) + $first + "; " else "" end)
    + "\($d.tunnels) tunnels, \($d.scheduled) scheduled, "
    + (if ($d.oldest_key_stored_at // "") == "" then "no key stored" else "oldest key \($age) days old" end) + $exact
    + " | tunnels=\($d.tunnels) stale=\($stale) failing=\($failing) tunnel_gone=\($gone)"
    + " rotation_unknown=\($d.states.rotation_unknown // 0) overdue=\($overdue) budget_used=\($d.budget_used)"
' 2>/dev/null) || { echo "CF-IPSEC UNKNOWN - $mount/status is not what this check reads"; exit 3; }

code=${line%% *}
echo "${line#* }"
exit "$code"
