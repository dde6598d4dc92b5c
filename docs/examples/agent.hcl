# Vault Agent renders a router's whole IPsec configuration from the engine, and
# renders it again whenever a read returns something new: a rotated key, or an
# endpoint or address Cloudflare changed. Run it on the router (strongSwan,
# VyOS) or on the management host that configures it (IOS XE, Junos).
#
# Agent's environment names the site's tunnels; a systemd drop-in, for example:
#   [Service]
#   Environment=CF_ACCOUNT_ID=<account id>
#   Environment=CF_TUNNEL_IDS=<tunnel id>,<tunnel id>
# (and CF_WAN_INTERFACE, CF_TUNNEL_SOURCE or CF_EXTERNAL_INTERFACE for the
# router's uplink, see each template). The e2e suite (e2e/templates_test.go)
# renders every template below with a real Agent and compares the result with
# golden files.

vault {
  address = "https://vault.example.internal:8200"
  ca_cert = "/etc/vault-agent/vault-ca.pem"
}

# AppRole: the role carries only docs/policies/provisioner.hcl (read psk/ of
# one account). The secret id is delivered by whatever provisions the router
# and removed once read (the default): for an unattended restart, deliver a
# response-wrapped one again, or use the cert method instead. token_file is for
# the local demo only (README).
auto_auth {
  method "approle" {
    mount_path = "auth/approle"
    config = {
      role_id_file_path   = "/etc/vault-agent/role-id"
      secret_id_file_path = "/etc/vault-agent/secret-id"
    }
  }
}

template_config {
  # A template that cannot render (a renamed field, a missing variable) stops
  # Agent instead of leaving the router with a half-written configuration.
  exit_on_retry_failure = true
  # How often Agent reads a tunnel without a schedule again (5m by default),
  # so a manual rotation (vault write) reaches the router within about this
  # long; each read is one request to Vault per tunnel. A tunnel with a
  # schedule is read again when the ttl of the last read runs out (its
  # next_rotation, plus a second), whatever this says: a manual rotation of
  # such a tunnel reaches the router only then, up to one rotation period
  # later, unless Agent is restarted (it renders on start).
  static_secret_render_interval = "10s"
}

# strongSwan. Keep the stanza for your router and delete the others.
template {
  source               = "/etc/vault-agent/swanctl.conf.tpl"
  destination          = "/etc/swanctl/conf.d/cloudflare.conf"
  perms                = "0600"
  error_on_missing_key = true
  # exec, not the deprecated command: run after each render that changed the
  # file. swanctl-reload.sh (next to this file) loads the keys and
  # connections and starts each tunnel that has no IKE SA: Cloudflare drops
  # the tunnel when its key changes, and strongSwan does not retry a failed
  # authentication, so `swanctl --load-all` alone would leave it down.
  # e2e/ikev2_test.go runs it against a real strongSwan peer.
  exec {
    command = ["/etc/vault-agent/swanctl-reload.sh"]
    timeout = "30s"
  }
}

# VyOS: the rendered script configures and commits the tunnels.
# template {
#   source               = "/config/vault-agent/vyos.vbash.tpl"
#   destination          = "/config/vault-agent/cloudflare-ipsec.vbash"
#   perms                = "0700"
#   error_on_missing_key = true
#   exec {
#     command = ["/bin/vbash", "/config/vault-agent/cloudflare-ipsec.vbash"]
#     timeout = "120s"
#   }
# }

# Cisco IOS XE, from a management host: the command is the site's own push
# (scp and "copy <file> running-config", RESTCONF, an Ansible playbook...).
# template {
#   source               = "/etc/vault-agent/ios-xe.cfg.tpl"
#   destination          = "/var/lib/vault-agent/router-1.cfg"
#   perms                = "0600"
#   error_on_missing_key = true
#   exec {
#     command = ["/usr/local/sbin/push-ios-xe", "router-1", "/var/lib/vault-agent/router-1.cfg"]
#     timeout = "120s"
#   }
# }

# Juniper SRX, from a management host: the command loads the file with
# "load set" and commits ("commit confirmed" guards against a lock-out).
# template {
#   source               = "/etc/vault-agent/junos.set.tpl"
#   destination          = "/var/lib/vault-agent/srx-1.set"
#   perms                = "0600"
#   error_on_missing_key = true
#   exec {
#     command = ["/usr/local/sbin/push-junos", "srx-1", "/var/lib/vault-agent/srx-1.set"]
#     timeout = "120s"
#   }
# }
