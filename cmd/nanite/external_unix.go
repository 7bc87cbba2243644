//go:build unix

package main

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/nanite-go/nanite/nanite"
)

// loadExternalActors reads an external-actors file (YAML or JSON, see
// nanite.ExternalActors) and returns its actors. Relative paths in it are
// relative to the file. Every problem in the file is a usage error.
func loadExternalActors(path string, log *slog.Logger) ([]*nanite.Actor, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, usageErrorf("actors file: %w", err)
	}
	js, err := yamlToJSON(data)
	if err != nil {
		return nil, usageErrorf("actors file %s: %w", path, err)
	}
	cfg, err := nanite.ParseExternalConfig(js)
	if err != nil {
		return nil, usageErrorf("actors file %s: %w", path, err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("actors file: %w", err)
	}
	cfg.Dir = filepath.Dir(abs)
	cfg.Logger = log
	actors, err := nanite.ExternalActors(cfg)
	if err != nil {
		return nil, usageErrorf("actors file %s:\n%w", path, err)
	}
	return actors, nil
}
