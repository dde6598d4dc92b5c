{{- /*
Cisco IOS XE for one site's Cloudflare IPsec tunnels, rendered by Vault Agent
(agent.hcl) from one read of cloudflare-ipsec/psk/<account>/<tunnel> per
tunnel. The output is configuration to merge into the running configuration
(copy <file> running-config, or through RESTCONF/NETCONF): Agent runs on a
management host, and its exec pushes the file.

Agent's environment (see swanctl.conf.tpl):
  CF_ACCOUNT_ID, CF_TUNNEL_IDS  as there
  CF_TUNNEL_SOURCE             the uplink interface (default GigabitEthernet1)

Route-based: one Tunnel interface per tunnel (Tunnel10<position>), as in
Cloudflare's IOS XE guide, with IKEv2 (AES-256-CBC, SHA-256, DH group 14),
PFS group 14 and no anti-replay.

IOS XE has no quoting for pre-shared-key: the rest of the line is the key,
so a line break would end the command and start another, a space or a
leading "0 " or "6 " changes what is read, and "?" asks the CLI for help.
The template therefore writes a key only if it is letters and digits, the
form of Cloudflare's keys and the only one the engine stores, and refuses to
render any other (sprig_fail; a function_denylist that disables it refuses as
well): Agent then writes nothing.
*/ -}}
{{- $account := mustEnv "CF_ACCOUNT_ID" -}}
{{- $tunnels := mustEnv "CF_TUNNEL_IDS" | split "," -}}
{{- $source := or (env "CF_TUNNEL_SOURCE") "GigabitEthernet1" -}}
! Rendered by Vault Agent from ios-xe.cfg.tpl: it is pushed again at each
! rotation, so make changes in the template.
crypto ikev2 proposal CF_IKEV2_PROPOSAL
 encryption aes-cbc-256
 integrity sha256
 group 14
!
crypto ikev2 policy CF_IKEV2_POLICY
 match fvrf any
 proposal CF_IKEV2_PROPOSAL
!
crypto ikev2 keyring CF_KEYRING
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- if not (regexMatch "^[A-Za-z0-9]+$" .Data.psk) }}{{ sprig_fail (printf "the key of tunnel %s has characters other than letters and digits, which an IOS XE pre-shared-key cannot carry: nothing is rendered" .Data.tunnel_id) }}{{ end }}
 peer CF{{ add 1 $i }}
  address {{ .Data.cloudflare_endpoint }}
  pre-shared-key {{ .Data.psk }}
 !
{{- end }}
{{- end }}
!
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- $n := add 1 $i }}
{{- $localID := or .Data.custom_fqdn_id .Data.ipsec_id (printf "%s.%s.ipsec.cloudflare.com" .Data.tunnel_id .Data.account_id) }}
{{- $inside := split "/" .Data.customer_interface_address }}
! {{ .Data.name }}: tunnel {{ .Data.tunnel_id }}, key version {{ .Data.version }} ({{ .Data.state }})
crypto ikev2 profile CF{{ $n }}
 match identity remote address {{ .Data.cloudflare_endpoint }} 255.255.255.255
 identity local fqdn {{ $localID }}
 authentication remote pre-share
 authentication local pre-share
 keyring local CF_KEYRING
 no config-exchange request
!
crypto ipsec profile CF{{ $n }}
 set security-association lifetime kilobytes disable
 set security-association replay disable
 set pfs group14
 set ikev2-profile CF{{ $n }}
!
interface Tunnel10{{ $n }}
 description Cloudflare {{ .Data.name }} {{ .Data.tunnel_id }}
 ip address {{ index $inside 0 }} {{ if eq (index $inside 1) "30" }}255.255.255.252{{ else }}255.255.255.254{{ end }}
{{- with .Data.customer_interface_address6 }}
 ! Cloudflare also gave this tunnel {{ . }}: IPv6 over it needs
 ! "tunnel mode ipsec dual-overlay" where the platform supports it.
{{- end }}
 ip mtu 1450
 ip tcp adjust-mss 1350
 tunnel source {{ $source }}
 tunnel mode ipsec ipv4
 tunnel destination {{ .Data.cloudflare_endpoint }}
 tunnel path-mtu-discovery
 tunnel protection ipsec profile CF{{ $n }}
!
{{- end }}
{{- end }}
end
