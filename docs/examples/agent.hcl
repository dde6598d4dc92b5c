# Vault Agent renders the router's secrets file and re-renders it whenever a
# rotation changes the key. The token in /etc/vault-agent/token carries the
# provisioner policy (docs/policies/provisioner.hcl).
vault {
  address = "https://vault.example.internal:8200"
}

auto_auth {
  method "token_file" {
    config = { token_file_path = "/etc/vault-agent/token" }
  }
}

template {
  source      = "/etc/vault-agent/ipsec.secrets.tpl"
  destination = "/etc/ipsec.secrets"
  perms       = "0600"
  command     = "ipsec rereadsecrets"
}
