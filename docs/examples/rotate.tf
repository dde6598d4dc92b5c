# Rotating a tunnel's PSK from Terraform, with the Vault provider's generic
# endpoint. The write answers with metadata only, so the key never enters
# Terraform state; reading the path would put it there, hence disable_read.
variable "account_id" { type = string }
variable "tunnel_id" { type = string }

resource "vault_generic_endpoint" "branch_1_psk" {
  path                 = "cloudflare-ipsec/psk/${var.account_id}/${var.tunnel_id}"
  disable_read         = true # a read returns the key: keep it out of state
  disable_delete       = true # destroying the resource must not forget the key
  ignore_absent_fields = true

  # Rotate now, and every 30 days from now on. Change any value here (a
  # "rotated_by" note, say) to rotate again on the next apply.
  data_json = jsonencode({
    rotation_period = "720h"
  })

  # Only these response fields are kept in state: no key is among them.
  write_fields = ["version", "last_generated_on", "next_rotation"]
}
