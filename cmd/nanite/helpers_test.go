package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/nanite-go/nanite/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// testFactory returns a factory with buffers for streams and the given
// environment instead of the process's.
func testFactory(stdin string, env map[string]string) (*Factory, *syncBuffer, *syncBuffer) {
	out, errOut := &syncBuffer{}, &syncBuffer{}
	return &Factory{
		IO: IOStreams{In: strings.NewReader(stdin), Out: out, ErrOut: errOut},
		LookupEnv: func(k string) (string, bool) {
			v, ok := env[k]
			return v, ok
		},
		ReadFile: os.ReadFile,
	}, out, errOut
}

// result is what one run of the command line gave.
type result struct {
	code        int
	out, errOut string
}

// runCLI runs the nanite command line in-process.
func runCLI(ctx context.Context, stdin string, args ...string) result {
	f, out, errOut := testFactory(stdin, nil)
	code := execute(ctx, f, args)
	return result{code, out.String(), errOut.String()}
}

var _ io.Writer = (*syncBuffer)(nil)
