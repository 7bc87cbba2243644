# The two commands of the README:
#   make demo   install what is missing, then run a cluster on a private broker and show it working
#   make test   install what is missing, then run the whole test suite against real servers
export PATH := /usr/local/go/bin:$(PATH)
GO ?= go

.PHONY: demo test deps build vet bench dev

deps:
	./scripts/install-deps

build:
	$(GO) build -o bin/nanite ./cmd/nanite

demo: deps build
	$(GO) run ./examples/demo

dev: deps build
	./bin/nanite dev

test: deps
	test -z "$$(gofmt -l .)" || (gofmt -l . && echo "gofmt needed" && false)
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m ./...

bench: deps build
	./bin/nanite bench
