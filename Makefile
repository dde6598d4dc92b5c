# The two commands a newcomer needs: `make dev` and `make test`.

PLUGIN      := vault-plugin-secrets-cloudflare-ipsec
VERSION     ?= v0.1.0-dev
LDFLAGS     := -X main.version=$(VERSION)
GO_TEST     := go test -race -count=1 -timeout 50m

.PHONY: build sim vault dev test test-unit test-e2e bench release vet fmt clean

## build: the plugin binary, into bin/plugins/ (Vault's plugin directory for make dev)
build:
	go build -trimpath -ldflags "$(LDFLAGS)" -o bin/plugins/$(PLUGIN) .

## sim: the Cloudflare API simulator that make dev runs
sim:
	go build -o bin/cloudflare-sim ./cmd/cloudflare-sim

## vault: the Vault v1.21.0 server, built once from Vault's own module
vault:
	scripts/build-vault.sh

# dev, test, test-e2e and bench run an installed Vault v1.21.x when VAULT_BIN
# names one or `vault` on PATH is one, and build it from the module only when
# none is there (scripts/vault-bin.sh).

## dev: a Vault dev server with the plugin mounted against the simulator
dev: build sim
	bin=$$(scripts/vault-bin.sh) && VAULT_BIN=$$bin scripts/dev.sh

## test: every test, unit and end-to-end, under the race detector
test:
	scripts/install-strongswan.sh
	scripts/install-ansible.sh
	bin=$$(scripts/vault-bin.sh) && VAULT_BIN=$$bin $(GO_TEST) ./...

test-unit:
	$(GO_TEST) $$(go list ./... | grep -v /e2e)

test-e2e:
	scripts/install-strongswan.sh
	scripts/install-ansible.sh
	bin=$$(scripts/vault-bin.sh) && VAULT_BIN=$$bin $(GO_TEST) ./e2e/...

## release: static binaries for linux/amd64 and linux/arm64 with VERSION set,
## and their SHA256SUMS, in dist/$(VERSION)/ (VERSION=v1.2.3 make release)
release:
	scripts/release.sh $(VERSION)

## bench: the figures of docs/benchmarks.md (about sixteen minutes; no -race)
bench:
	scripts/install-strongswan.sh
	bin=$$(scripts/vault-bin.sh) && VAULT_BIN=$$bin go test -run '^$$' -bench . -benchtime 1x -count 1 -timeout 30m . ./e2e/

vet:
	go vet ./...

fmt:
	gofmt -w .

clean:
	rm -rf bin dist
