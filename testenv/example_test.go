package testenv_test

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/nanite-go/nanite/testenv"
)

func ExampleGenerateTLS() {
	dir, err := os.MkdirTemp("", "testenv-example-*")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)

	files, err := testenv.GenerateTLS(dir, "127.0.0.1", "localhost")
	if err != nil {
		panic(err)
	}
	cfg, err := files.ClientConfig() // trusts the CA, presents the client certificate
	if err != nil {
		panic(err)
	}
	fmt.Println(filepath.Base(files.CACert), filepath.Base(files.Cert), filepath.Base(files.Key))
	fmt.Println(len(cfg.Certificates), "client certificate")
	// Output:
	// ca.pem server.pem server-key.pem
	// 1 client certificate
}
