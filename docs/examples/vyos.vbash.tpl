{{- /*
VyOS (1.5 "circinus" configuration syntax, see secret-type below) for one site's Cloudflare
IPsec tunnels, rendered by Vault Agent (agent.hcl) from one read of
cloudflare-ipsec/psk/<account>/<tunnel> per tunnel. The output is a VyOS
configuration script: Agent runs it with /bin/vbash after each render, and it
commits the tunnels' part of the configuration.

Agent's environment (see swanctl.conf.tpl):
  CF_ACCOUNT_ID, CF_TUNNEL_IDS  as there
  CF_WAN_INTERFACE             the uplink the tunnels leave by (default eth0)

Route-based, one VTI per tunnel (vti<position in CF_TUNNEL_IDS>) with the
router's inside address; static routes or BGP over the VTIs are the site's
own. The key is given base64-encoded (secret-type base64): VyOS writes a
plain secret into swanctl.conf between double quotes, where a quote in the
key would end it, and strongSwan decodes a secret that begins with 0x or 0s;
base64, in single quotes here, carries any key. secret-type came with VyOS
1.5 (vyos-1x pull request 4198, November 2024): a release without it refuses
the commit; there, drop that line and write the key itself, which is safe for
a key of letters and digits (Cloudflare's form, the only one the engine
stores) unless it begins with 0x or 0s. Cloudflare
recommends no anti-replay window on anycast tunnels; its VyOS guide sets none,
so neither does this template: where your release has a replay-window option
for the peer, set it to 0.
*/ -}}
{{- $account := mustEnv "CF_ACCOUNT_ID" -}}
{{- $tunnels := mustEnv "CF_TUNNEL_IDS" | split "," -}}
{{- $wan := or (env "CF_WAN_INTERFACE") "eth0" -}}
#!/bin/vbash
# Rendered by Vault Agent from vyos.vbash.tpl: it rewrites this script at each
# rotation and runs it. Nothing is saved to config.boot: Agent renders and runs
# the script again when the router boots, so the key is not kept on disk twice.
source /opt/vyatta/etc/functions/script-template
configure

set vpn ipsec interface '{{ $wan }}'
set vpn ipsec options disable-route-autoinstall
set vpn ipsec ike-group CF-IKE key-exchange 'ikev2'
set vpn ipsec ike-group CF-IKE lifetime '28800'
set vpn ipsec ike-group CF-IKE dead-peer-detection action 'restart'
set vpn ipsec ike-group CF-IKE dead-peer-detection interval '30'
set vpn ipsec ike-group CF-IKE dead-peer-detection timeout '120'
set vpn ipsec ike-group CF-IKE proposal 1 dh-group '14'
set vpn ipsec ike-group CF-IKE proposal 1 encryption 'aes256'
set vpn ipsec ike-group CF-IKE proposal 1 hash 'sha256'
set vpn ipsec esp-group CF-ESP mode 'tunnel'
set vpn ipsec esp-group CF-ESP pfs 'dh-group14'
set vpn ipsec esp-group CF-ESP proposal 1 encryption 'aes256'
set vpn ipsec esp-group CF-ESP proposal 1 hash 'sha256'
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- $n := add 1 $i }}
{{- $localID := or .Data.custom_fqdn_id .Data.ipsec_id (printf "%s.%s.ipsec.cloudflare.com" .Data.tunnel_id .Data.account_id) }}

# {{ .Data.name }}: tunnel {{ .Data.tunnel_id }}, key version {{ .Data.version }} ({{ .Data.state }})
# Deleted and set again, so that nothing of a changed endpoint or address stays
# behind; a commit that changes nothing leaves the tunnel alone.
delete interfaces vti vti{{ $n }} address
delete vpn ipsec authentication psk cf{{ $n }}
delete vpn ipsec site-to-site peer cf{{ $n }}
set interfaces vti vti{{ $n }} address '{{ .Data.customer_interface_address }}'
{{- with .Data.customer_interface_address6 }}
set interfaces vti vti{{ $n }} address '{{ . }}'
{{- end }}
set interfaces vti vti{{ $n }} description 'Cloudflare {{ .Data.name }}'
set interfaces vti vti{{ $n }} ip adjust-mss '1350'
set vpn ipsec authentication psk cf{{ $n }} id '{{ $localID }}'
set vpn ipsec authentication psk cf{{ $n }} id '{{ .Data.cloudflare_endpoint }}'
set vpn ipsec authentication psk cf{{ $n }} secret '{{ base64Encode .Data.psk }}'
set vpn ipsec authentication psk cf{{ $n }} secret-type 'base64'
set vpn ipsec site-to-site peer cf{{ $n }} authentication mode 'pre-shared-secret'
set vpn ipsec site-to-site peer cf{{ $n }} authentication local-id '{{ $localID }}'
set vpn ipsec site-to-site peer cf{{ $n }} authentication remote-id '{{ .Data.cloudflare_endpoint }}'
set vpn ipsec site-to-site peer cf{{ $n }} connection-type 'initiate'
set vpn ipsec site-to-site peer cf{{ $n }} ike-group 'CF-IKE'
set vpn ipsec site-to-site peer cf{{ $n }} local-address '{{ or .Data.customer_endpoint "any" }}'
set vpn ipsec site-to-site peer cf{{ $n }} remote-address '{{ .Data.cloudflare_endpoint }}'
set vpn ipsec site-to-site peer cf{{ $n }} vti bind 'vti{{ $n }}'
set vpn ipsec site-to-site peer cf{{ $n }} vti esp-group 'CF-ESP'
{{- end }}
{{- end }}

commit
exit
