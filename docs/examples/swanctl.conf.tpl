{{- /*
strongSwan (swanctl.conf) for one site's Cloudflare IPsec tunnels, rendered by
Vault Agent (agent.hcl) from one read of cloudflare-ipsec/psk/<account>/<tunnel>
per tunnel: the key and everything Cloudflare says of the tunnel come from that
read, so nothing below is a fixed address.

Agent's environment names the tunnels (a systemd drop-in, for example):
  CF_ACCOUNT_ID  the Cloudflare account id
  CF_TUNNEL_IDS  the site's tunnel ids, comma separated. Cloudflare recommends
                 two tunnels per router and uplink, one to each of the
                 account's two anycast endpoints.

IKEv2, route-based: each tunnel gets an XFRM interface (if_id = its position
in CF_TUNNEL_IDS) carrying the router's inside address; the commands are in
the comments the template renders. Algorithms: AES-256-CBC, SHA-256 and DH
group 14, as in Cloudflare's router guides; Cloudflare accepts others (see its
"supported configuration parameters"), change both lists together.

The key is written as 0s<base64>: strongSwan decodes a secret that begins with
0x or 0s (hex, base64) even inside quotes, so a key that happened to begin that
way would be corrupted if it were written as it is; and base64 carries any key,
a quote or a line break included, without ending the value.
*/ -}}
{{- $account := mustEnv "CF_ACCOUNT_ID" -}}
{{- $tunnels := mustEnv "CF_TUNNEL_IDS" | split "," -}}
# Rendered by Vault Agent from swanctl.conf.tpl: changes made here are lost at
# the next rotation. Agent runs swanctl-reload.sh after each render.
connections {
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- $n := add 1 $i }}
{{- /* The IKE identity Cloudflare expects from the router: the tunnel's custom
FQDN id, else the id psk_generate named, else the FQDN id Cloudflare generates
(its strongSwan guide: <tunnel id>.<account id>.ipsec.cloudflare.com; the
dashboard shows it as the tunnel's FQDN ID). */}}
{{- $localID := or .Data.custom_fqdn_id .Data.ipsec_id (printf "%s.%s.ipsec.cloudflare.com" .Data.tunnel_id .Data.account_id) }}

  # {{ .Data.name }}: tunnel {{ .Data.tunnel_id }}, key version {{ .Data.version }} ({{ .Data.state }})
  # Its interface (once; swanctl does not create it):
  #   ip link add cf{{ $n }} type xfrm if_id {{ $n }}
  #   ip address add {{ .Data.customer_interface_address }} dev cf{{ $n }}
{{- with .Data.customer_interface_address6 }}
  #   ip address add {{ . }} dev cf{{ $n }}
{{- end }}
  #   ip link set cf{{ $n }} up
  cf{{ $n }} {
    version = 2
    local_addrs = {{ or .Data.customer_endpoint "%any" }}
    remote_addrs = {{ .Data.cloudflare_endpoint }}
    proposals = aes256-sha256-modp2048
    # Cloudflare never initiates: the router brings the tunnel up and keeps it.
    dpd_delay = 10s
    local {
      auth = psk
      id = {{ $localID }}
    }
    remote {
      auth = psk
      id = {{ .Data.cloudflare_endpoint }}
    }
    children {
      cf{{ $n }} {
        local_ts = 0.0.0.0/0{{ if .Data.interface_address6 }},::/0{{ end }}
        remote_ts = 0.0.0.0/0{{ if .Data.interface_address6 }},::/0{{ end }}
        if_id_in = {{ $n }}
        if_id_out = {{ $n }}
        esp_proposals = aes256-sha256-modp2048
        # Anycast: any Cloudflare server may send on this SA, so packets
        # arrive out of order. Cloudflare recommends no replay window.
        replay_window = 0
        start_action = start
        dpd_action = restart
        close_action = start
      }
    }
  }
{{- end }}
{{- end }}
}

secrets {
{{- range $i, $id := $tunnels }}
{{- with secret (printf "cloudflare-ipsec/psk/%s/%s" $account (trimSpace $id)) }}
{{- $n := add 1 $i }}
{{- $localID := or .Data.custom_fqdn_id .Data.ipsec_id (printf "%s.%s.ipsec.cloudflare.com" .Data.tunnel_id .Data.account_id) }}
  ike-cf{{ $n }} {
    id-local = {{ $localID }}
    id-remote = {{ .Data.cloudflare_endpoint }}
    secret = 0s{{ base64Encode .Data.psk }}
  }
{{- end }}
{{- end }}
}
