{{- /* strongSwan ipsec.secrets for one Cloudflare IPsec tunnel. Replace the
       account and tunnel ids; 203.0.113.1 stands for the tunnel's Cloudflare
       endpoint (vault read cloudflare-ipsec/tunnels/<account>/<tunnel>). */ -}}
{{ with secret "cloudflare-ipsec/psk/ACCOUNT_ID/TUNNEL_ID" -}}
# Cloudflare IPsec tunnel {{ .Data.tunnel_id }}, key version {{ .Data.version }} ({{ .Data.state }})
203.0.113.1 : PSK "{{ .Data.psk }}"
{{ end }}
