package main

// version is set at build time (-ldflags "-X main.version=v1.2.3") and shown
// by `vault secrets list -detailed` as the mount's running version.
var version = "v0.1.0-dev"
