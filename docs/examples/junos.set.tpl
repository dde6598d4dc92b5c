{{- /*
Juniper SRX (Junos) for one site's Cloudflare IPsec tunnels, rendered by Vault
Agent (agent.hcl) from one read of cloudflare-ipsec/psk/<account>/<tunnel> per
tunnel. The output is "set" commands for `load set` followed by
`commit confirmed`: Agent runs on a management host, and its exec pushes the
file (over NETCONF, or ssh and the CLI).

Agent's environment (see swanctl.conf.tpl):
  CF_ACCOUNT_ID, CF_TUNNEL_IDS  as there
  CF_EXTERNAL_INTERFACE        the uplink unit (default ge-0/0/0.0)

Route-based: one st0 unit per tunnel (st0.<position - 1>) in security zone
"cloudflare", as in Cloudflare's SRX guide; IKEv2 only (AES-256-CBC, SHA-256,
DH group 14), PFS group 14, no anti-replay, and the SRX initiates. Junos
stores the key encrypted ($9$) once committed.

The file holds nothing but set and delete statements, no comments: the
tunnel's name and id go into the st0 unit's description. Each tunnel's part
is deleted and set again, so that nothing of a changed endpoint or address
stays behind. It is loaded again at each rotation: make changes here.

The key is a quoted string with \ and " escaped by a backslash, as Junos
reads them, so no key can end the string or add a statement of its own. What
a set statement cannot carry, the template refuses to render (sprig_fail; a
function_denylist that disables it refuses as well), and Agent writes
nothing: a character that is not printable ASCII (a line break above all),
and a key that begins with $<digits>$, which Junos would take for a key it
had encrypted ($9$). Cloudflare's keys are letters and digits, and the engine
stores no other, so neither happens; the checks keep the template safe for
any key.
*/ -}}
{{- $account := mustEnv "CF_ACCOUNT_ID" -}}
{{- $tunnels := mustEnv "CF_TUNNEL_IDS" | split "," -}}
{{- $external := or (env "CF_EXTERNAL_INTERFACE") "ge-0/0/0.0" -}}
set security ike proposal cf-ike-prop authentication-method pre-shared-keys
set security ike proposal cf-ike-prop dh-group group14
set security ike proposal cf-ike-prop authentication-algorithm sha-256
set security ike proposal cf-ike-prop encryption-algorithm aes-256-cbc
set security ike proposal cf-ike-prop lifetime-seconds 28800
set security ipsec proposal cf-ipsec-prop protocol esp
set security ipsec proposal cf-ipsec-prop authentication-algorithm hmac-sha-256-128
set security ipsec proposal cf-ipsec-prop encryption-algorithm aes-256-cbc
set security ipsec proposal cf-ipsec-prop lifetime-seconds 28800
set security ipsec policy cf-ipsec-pol perfect-forward-secrecy keys group14
set security ipsec policy cf-ipsec-pol proposals cf-ipsec-prop
set security zones security-zone untrust interfaces {{ $external }} host-inbound-traffic system-services ike
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- $n := add 1 $i }}
{{- $localID := or .Data.custom_fqdn_id .Data.ipsec_id (printf "%s.%s.ipsec.cloudflare.com" .Data.tunnel_id .Data.account_id) }}
{{- if regexMatch "[^ -~]" .Data.psk }}{{ sprig_fail (printf "the key of tunnel %s has a character that is not printable ASCII (a line break, say), which a Junos set statement cannot carry: nothing is rendered" .Data.tunnel_id) }}{{ end }}
{{- if regexMatch "^[$][0-9]+[$]" .Data.psk }}{{ sprig_fail (printf "the key of tunnel %s begins like a key Junos encrypted ($9$), and Junos would read it as one: nothing is rendered" .Data.tunnel_id) }}{{ end }}
delete interfaces st0 unit {{ $i }}
delete security ike policy cf-ike-pol-{{ $n }}
delete security ike gateway cf-gw-{{ $n }}
delete security ipsec vpn cf-vpn-{{ $n }}
set interfaces st0 unit {{ $i }} description "Cloudflare {{ .Data.name }} {{ .Data.tunnel_id }}"
set interfaces st0 unit {{ $i }} family inet address {{ .Data.customer_interface_address }}
{{- with .Data.customer_interface_address6 }}
set interfaces st0 unit {{ $i }} family inet6 address {{ . }}
{{- end }}
set security zones security-zone cloudflare interfaces st0.{{ $i }} host-inbound-traffic system-services ping
set security ike policy cf-ike-pol-{{ $n }} proposals cf-ike-prop
set security ike policy cf-ike-pol-{{ $n }} pre-shared-key ascii-text "{{ .Data.psk | replaceAll "\\" "\\\\" | replaceAll "\"" "\\\"" }}"
set security ike gateway cf-gw-{{ $n }} ike-policy cf-ike-pol-{{ $n }}
set security ike gateway cf-gw-{{ $n }} address {{ .Data.cloudflare_endpoint }}
set security ike gateway cf-gw-{{ $n }} local-identity hostname {{ $localID }}
set security ike gateway cf-gw-{{ $n }} remote-identity inet {{ .Data.cloudflare_endpoint }}
set security ike gateway cf-gw-{{ $n }} external-interface {{ $external }}
{{- with .Data.customer_endpoint }}
set security ike gateway cf-gw-{{ $n }} local-address {{ . }}
{{- end }}
set security ike gateway cf-gw-{{ $n }} version v2-only
set security ipsec vpn cf-vpn-{{ $n }} bind-interface st0.{{ $i }}
set security ipsec vpn cf-vpn-{{ $n }} ike gateway cf-gw-{{ $n }}
set security ipsec vpn cf-vpn-{{ $n }} ike ipsec-policy cf-ipsec-pol
set security ipsec vpn cf-vpn-{{ $n }} ike no-anti-replay
set security ipsec vpn cf-vpn-{{ $n }} establish-tunnels immediately
{{- end }}
{{- end }}
