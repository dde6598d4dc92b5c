// Builds the Vault server that the end-to-end tests run against. It lives in
// its own module so that Vault's very large dependency graph never touches the
// plugin's go.mod. go.sum is the one that ships inside Vault's own module.
module vault-plugin-secrets-cloudflare-ipsec/tools/vault

go 1.25.1

require github.com/hashicorp/vault v1.21.0

// Vault's own go.mod carries these two replacements; a dependency's replace
// directives are ignored, so the build has to repeat them to get the same code.
replace github.com/99designs/keyring => github.com/Jeffail/keyring v1.2.3

replace github.com/ma314smith/signedxml v1.1.1 => github.com/moov-io/signedxml v1.1.1
