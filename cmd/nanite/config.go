package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// DefaultURL is the broker used when no flag, environment variable or
// config file names one: a local RabbitMQ, user guest, vhost "/".
const DefaultURL = "amqp://guest:guest@localhost:5672/"

// Environment variables read by the global settings.
const (
	envURL       = "NANITE_URL"
	envConfig    = "NANITE_CONFIG"
	envLogLevel  = "NANITE_LOG_LEVEL"
	envLogFormat = "NANITE_LOG_FORMAT"
)

// configHelp documents the settings in the root command's --help.
const configHelp = `Configuration:
  Every setting is taken from the first of these that sets it:
    1. a command-line flag        (--url, --log-level, --log-format, and the
                                   flags of each command)
    2. an environment variable    (NANITE_URL, NANITE_LOG_LEVEL, NANITE_LOG_FORMAT)
    3. the config file            (--config, else NANITE_CONFIG, else
                                   $XDG_CONFIG_HOME/nanite/config.yaml if it exists)
    4. the built-in default       (url ` + DefaultURL + `, log format text,
                                   log level info for daemons, warn otherwise)

  The config file is YAML or JSON; unknown keys are errors. Relative paths in
  it are relative to the file:

    url: amqp://app:secret@rabbit.example:5672/app
    log_level: info          # debug, info, warn, error
    log_format: json         # text or json
    agent:                   # defaults for "nanite agent" (its flags win)
      identity: web-1
      data_dir: /var/lib/nanite
      tags: [web, eu]
      heartbeat: 2s
      prefetch: 16
      actors: actors.yaml    # external actors, see "nanite agent --help"
      no_examples: true`

// FileConfig is the config file.
type FileConfig struct {
	URL       string           `json:"url"`
	LogLevel  string           `json:"log_level"`
	LogFormat string           `json:"log_format"`
	Agent     AgentFileConfig  `json:"agent"`
	TLS       TLSFileConfig    `json:"tls"`    // see tls.go
	Secure    SecureFileConfig `json:"secure"` // see secure.go
}

// AgentFileConfig is the agent section of the config file: defaults for
// the flags of "nanite agent".
type AgentFileConfig struct {
	Identity   string   `json:"identity"`
	DataDir    string   `json:"data_dir"`
	Tags       []string `json:"tags"`
	Heartbeat  duration `json:"heartbeat"`
	Prefetch   int      `json:"prefetch"`
	Actors     string   `json:"actors"`
	NoExamples bool     `json:"no_examples"`
}

// Settings are the resolved global settings.
type Settings struct {
	URL        string
	LogLevel   string // "" means the command's default
	LogFormat  string
	ConfigFile string     // the config file read, "" when none
	File       FileConfig // its contents, paths made absolute
	TLS        TLSSettings
	Secure     SecureSettings // see secure.go
}

// settingsInput is everything the global settings are resolved from.
type settingsInput struct {
	// Flags holds the global flags given on the command line, by name
	// ("url", "config", "log-level", "log-format"). Flags left at their
	// defaults must be absent.
	Flags     map[string]string
	LookupEnv func(string) (string, bool)
	ReadFile  func(string) ([]byte, error)
}

// resolveSettings applies the precedence of the global settings. For each
// setting the first of these that sets it wins:
//
//  1. the command-line flag,
//  2. the environment variable (NANITE_URL, NANITE_LOG_LEVEL,
//     NANITE_LOG_FORMAT),
//  3. the config file: --config, else NANITE_CONFIG, else
//     $XDG_CONFIG_HOME/nanite/config.yaml (~/.config/... when XDG_CONFIG_HOME
//     is unset) when that file exists,
//  4. the default (DefaultURL, text logs, the command's log level).
//
// A config file named by --config or NANITE_CONFIG must exist.
func resolveSettings(in settingsInput) (*Settings, error) {
	env := func(k string) string {
		if in.LookupEnv == nil {
			return ""
		}
		v, _ := in.LookupEnv(k)
		return v
	}
	s := &Settings{}
	path := firstNonEmpty(in.Flags["config"], env(envConfig))
	explicit := path != ""
	if !explicit {
		path = defaultConfigPath(env)
	}
	if path != "" {
		data, err := in.ReadFile(path)
		switch {
		case err == nil:
			fc, err := parseFileConfig(data, filepath.Dir(path))
			if err != nil {
				return nil, &usageError{fmt.Errorf("config file %s: %w", path, err)}
			}
			s.ConfigFile, s.File = path, fc
		case explicit || !errors.Is(err, fs.ErrNotExist):
			return nil, &usageError{fmt.Errorf("config file: %w", err)}
		}
	}
	s.URL = firstNonEmpty(in.Flags["url"], env(envURL), s.File.URL, DefaultURL)
	tlsSettings, err := resolveTLS(in, s.File.TLS, s.URL)
	if err != nil {
		return nil, err
	}
	s.TLS = tlsSettings
	if s.Secure, err = resolveSecure(in, s.File.Secure); err != nil {
		return nil, err
	}
	s.LogLevel = firstNonEmpty(in.Flags["log-level"], env(envLogLevel), s.File.LogLevel)
	s.LogFormat = firstNonEmpty(in.Flags["log-format"], env(envLogFormat), s.File.LogFormat, "text")
	if s.LogLevel != "" {
		var l slog.Level
		if err := l.UnmarshalText([]byte(s.LogLevel)); err != nil {
			return nil, usageErrorf("log level %q: want debug, info, warn or error", s.LogLevel)
		}
	}
	if s.LogFormat != "text" && s.LogFormat != "json" {
		return nil, usageErrorf("log format %q: want text or json", s.LogFormat)
	}
	return s, nil
}

// firstNonEmpty returns the first non-empty value: the precedence rule of
// every string setting.
func firstNonEmpty(vals ...string) string {
	for _, v := range vals {
		if v != "" {
			return v
		}
	}
	return ""
}

// pick is the precedence rule of the settings that have no environment
// variable (the agent's): the flag when given, else the config file's value
// when set, else the flag's default.
func pick[T comparable](given bool, flagVal, fileVal T) T {
	var zero T
	if given || fileVal == zero {
		return flagVal
	}
	return fileVal
}

func defaultConfigPath(env func(string) string) string {
	dir := env("XDG_CONFIG_HOME")
	if dir == "" {
		home := env("HOME")
		if home == "" {
			return ""
		}
		dir = filepath.Join(home, ".config")
	}
	return filepath.Join(dir, "nanite", "config.yaml")
}

// parseFileConfig decodes a YAML or JSON config file strictly and makes its
// paths absolute against dir.
func parseFileConfig(data []byte, dir string) (FileConfig, error) {
	var fc FileConfig
	if err := decodeYAMLOrJSON(data, &fc); err != nil {
		return FileConfig{}, err
	}
	abs := func(p string) string {
		if p == "" || filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(dir, p)
	}
	fc.Agent.DataDir = abs(fc.Agent.DataDir)
	fc.Agent.Actors = abs(fc.Agent.Actors)
	fc.TLS.CA, fc.TLS.Cert, fc.TLS.Key = abs(fc.TLS.CA), abs(fc.TLS.Cert), abs(fc.TLS.Key)
	fc.Secure = fc.Secure.absPaths(abs)
	return fc, nil
}

// decodeYAMLOrJSON decodes YAML (JSON is valid YAML) into v through JSON, so
// that v needs only json tags: unknown keys are errors.
func decodeYAMLOrJSON(data []byte, v any) error {
	b, err := yamlToJSON(data)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	return nil
}

// yamlToJSON converts a YAML (or JSON) document to JSON.
func yamlToJSON(data []byte) ([]byte, error) {
	var doc any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	doc, err := jsonable(doc)
	if err != nil {
		return nil, err
	}
	return json.Marshal(doc)
}

// jsonable turns YAML maps with non-string keys into errors and the rest
// into values encoding/json accepts.
func jsonable(v any) (any, error) {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			x[k] = j
		}
		return x, nil
	case map[any]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			ks, ok := k.(string)
			if !ok {
				return nil, fmt.Errorf("key %v is not a string", k)
			}
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			m[ks] = j
		}
		return m, nil
	case []any:
		for i, e := range x {
			j, err := jsonable(e)
			if err != nil {
				return nil, err
			}
			x[i] = j
		}
		return x, nil
	}
	return v, nil
}

// duration is a time.Duration written as "2s" (or a number of seconds) in
// a config file.
type duration time.Duration

func (d *duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return err
		}
		*d = duration(v)
		return nil
	}
	var secs float64
	if err := json.Unmarshal(b, &secs); err != nil {
		return fmt.Errorf("duration must be a string such as \"2s\" or a number of seconds, not %s", b)
	}
	*d = duration(secs * float64(time.Second))
	return nil
}

// newLogger builds the logger of a command: level and format from the
// settings, def when no level is set.
func (s *Settings) newLogger(w io.Writer, def slog.Level) *slog.Logger {
	level := def
	if s.LogLevel != "" {
		_ = level.UnmarshalText([]byte(s.LogLevel)) // checked by resolveSettings
	}
	opts := &slog.HandlerOptions{Level: level}
	if strings.EqualFold(s.LogFormat, "json") {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
