// Package mount is one mount's settings and its way to Cloudflare: the
// config as stored (Config), and the Cloudflare client built from it
// (Clients), cached under a lock, sharing the mount's call budget, with
// Cloudflare's rate-limit block kept in storage as well as in memory. The
// root's config paths change them; the rotation engine and the background
// reach Cloudflare through Clients.Connect. It knows nothing of Vault's
// request handling: it is handed storage, never a request.
package mount
