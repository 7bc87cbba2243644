package nanite

import (
	"os"
	"testing"

	"github.com/nanite-go/nanite/testenv"
)

// TestMain runs the package's tests against shared private servers. When the
// test binary is started as a helper process (an agent that a test kills with
// SIGKILL), it runs that instead.
func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(runHelperAgent())
	}
	testenv.Main(m)
}
