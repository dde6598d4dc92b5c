// Package store is what the engine keeps in Vault storage and how it is
// laid out: a tunnel's record (its key, rotation state, schedule and router
// facts, one entry per tunnel at psk/<account>/<tunnel>), the unresolved/
// index of records that are not current, the due/ index of rotations by
// minute, bulk jobs with their results, and the census (census.go): the
// mount's counts and the attention/ index of the tunnels that need an
// operator, kept as records change, for status reads. It uses only
// logical.Storage and knows nothing of Cloudflare or of Vault's request
// handling: what a record's state means, and when it changes, is the
// rotation package's.
package store
