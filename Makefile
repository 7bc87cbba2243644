# The commands of the README:
#   make demo         install what is missing, then run a cluster on a private broker and show it working
#   make federation   install what is missing, then run two sites joined by XMPP bridges and show them working
#   make test         install what is missing, then run the whole test suite against real servers
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

.PHONY: demo federation test deps build vet bench bench-bridge dev

deps:
	./scripts/install-deps

build:
	$(GO) build -o bin/nanite ./cmd/nanite

demo: deps build
	$(GO) run ./examples/demo

# The bridges run as the binary just built: bin/nanite bridge --config FILE.
federation: deps build
	$(GO) run ./examples/federation -nanite bin/nanite

dev: deps build
	./bin/nanite dev

test: deps
	test -z "$$(gofmt -l .)" || (gofmt -l . && echo "gofmt needed" && false)
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...

bench: deps build
	./bin/nanite bench

bench-bridge: deps build
	./bin/nanite bench-bridge
