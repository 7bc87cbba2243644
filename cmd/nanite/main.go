// Command nanite runs and talks to Nanite clusters: agents, mapper daemons,
// requests, cluster listings and a private development cluster. Run
// "nanite --help" for the commands, the configuration and the exit codes.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first signal, a second one kills the process at once
		// instead of waiting for a graceful shutdown.
		<-ctx.Done()
		stop()
	}()
	code := execute(ctx, newFactory(), os.Args[1:])
	stop()
	os.Exit(code)
}
