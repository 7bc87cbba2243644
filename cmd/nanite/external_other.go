//go:build !unix

package main

import (
	"errors"
	"log/slog"

	"github.com/nanite-go/nanite/nanite"
)

// loadExternalActors is not available: external actors need Unix process
// groups.
func loadExternalActors(string, *slog.Logger) ([]*nanite.Actor, error) {
	return nil, usageErrorf("%w", errors.New("external actors (--actors) are only supported on Unix"))
}
