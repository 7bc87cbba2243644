package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/nanite-go/nanite/nanite"
)

// parse runs cmd with args and returns the error (RunE's, including
// runF's).
func parse(t *testing.T, cmd *cobra.Command, args ...string) error {
	t.Helper()
	cmd.SetArgs(args)
	cmd.SetOut(&strings.Builder{})
	cmd.SetErr(&strings.Builder{})
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &usageError{err} })
	return cmd.ExecuteContext(t.Context())
}

func TestAgentFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)
	var got *AgentOptions
	cmd := NewCmdAgent(f, func(_ context.Context, o *AgentOptions) error { got = o; return nil })
	err := parse(t, cmd, "--identity", "web-1", "--data-dir", "/var/lib/n", "--tags", "a,b", "--tags", "c",
		"--heartbeat", "500ms", "--prefetch", "4", "--actors", "acts.yaml", "--no-examples", "--shutdown-grace", "3s")
	if err != nil {
		t.Fatal(err)
	}
	if got.Identity != "web-1" || got.DataDir != "/var/lib/n" || !slices.Equal(got.Tags, []string{"a", "b", "c"}) ||
		got.Heartbeat != 500*time.Millisecond || got.Prefetch != 4 || got.ActorsFile != "acts.yaml" ||
		!got.NoExamples || got.ShutdownGrace != 3*time.Second {
		t.Errorf("options %+v", got)
	}
	if !got.Given("heartbeat") || got.Given("url") {
		t.Error("Given does not report the flags given")
	}

	cmd = NewCmdAgent(f, func(_ context.Context, o *AgentOptions) error { got = o; return nil })
	if err := parse(t, cmd); err != nil {
		t.Fatal(err)
	}
	if got.Identity != "" || got.Heartbeat != nanite.DefaultHeartbeatInterval || got.Prefetch != nanite.DefaultPrefetch ||
		got.NoExamples || got.Tags != nil || got.Given("heartbeat") {
		t.Errorf("defaults %+v", got)
	}

	for _, bad := range [][]string{{"--identity", "a b"}, {"--prefetch", "-1"}, {"--heartbeat", "soon"}, {"x"}} {
		cmd = NewCmdAgent(f, func(context.Context, *AgentOptions) error { t.Error("runF called"); return nil })
		if err := parse(t, cmd, bad...); exitCode(err) != exitUsage {
			t.Errorf("%v: %v, want a usage error", bad, err)
		}
	}
}

func TestRequestFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)
	var got *RequestOptions
	runF := func(_ context.Context, o *RequestOptions) error { got = o; return nil }

	if err := parse(t, NewCmdRequest(f, runF), "/echo/say", `{"a":1}`); err != nil {
		t.Fatal(err)
	}
	if got.Service != "/echo/say" || got.Payload != `{"a":1}` || !got.HasPayload || got.Selector != nanite.SelectLeastLoaded ||
		got.Timeout != 10*time.Second || got.JSON || got.Persistent || got.Failsafe || got.MatchAny || got.Target != "" || got.Tags != nil {
		t.Errorf("defaults %+v", got)
	}

	err := parse(t, NewCmdRequest(f, runF), "--selector", "all", "--target", "agent-1", "--tag", "eu", "--tag", "web",
		"--match-any-tag", "--timeout", "2s", "--persistent", "--failsafe", "--json", "/echo")
	if err != nil {
		t.Fatal(err)
	}
	if got.Service != "/echo/index" || got.HasPayload || got.Selector != "all" || got.Target != "agent-1" ||
		!slices.Equal(got.Tags, []string{"eu", "web"}) || !got.MatchAny || got.Timeout != 2*time.Second ||
		!got.Persistent || !got.Failsafe || !got.JSON {
		t.Errorf("options %+v", got)
	}
	if n := len(got.requestOptions()); n != 7 {
		t.Errorf("%d request options, want 7", n)
	}

	if err := parse(t, NewCmdRequest(f, runF), "--target", "xmpp:app@nanite.site-b.test/agent-x", "/a/b"); err != nil || got.Target != "xmpp:app@nanite.site-b.test/agent-x" {
		t.Errorf("xmpp: target: %v %+v", err, got)
	}
	if err := parse(t, NewCmdRequest(f, runF), "-s", "rr", "-t", "1m", "/a/b", "-"); err != nil {
		t.Fatal(err)
	}
	if got.Selector != "rr" || got.Timeout != time.Minute || got.Payload != "-" {
		t.Errorf("short flags %+v", got)
	}

	for _, bad := range [][]string{
		{}, {"a/b"}, {"/a/b/c"}, {"/a/b", "1", "2"}, {"--selector", "x", "/a/b"}, {"--timeout", "-1s", "/a/b"},
		{"--target", "bad target", "/a/b"}, {"--target", "xmpp:", "/a/b"}, {"--target", "xmpp:a@b@c", "/a/b"},
	} {
		cmd := NewCmdRequest(f, func(context.Context, *RequestOptions) error { t.Error("runF called"); return nil })
		if err := parse(t, cmd, bad...); exitCode(err) != exitUsage {
			t.Errorf("%v: %v, want a usage error", bad, err)
		}
	}
}

func TestPushFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)
	var got *RequestOptions
	runF := func(_ context.Context, o *RequestOptions) error { got = o; return nil }
	if err := parse(t, NewCmdPush(f, runF), "--selector", "random", "--tag", "x", "--persistent", "/ops/reload", "now"); err != nil {
		t.Fatal(err)
	}
	if got.Service != "/ops/reload" || got.Payload != "now" || got.Selector != "random" || !got.Persistent || got.Tags[0] != "x" {
		t.Errorf("options %+v", got)
	}
	if err := parse(t, NewCmdPush(f, runF), "--json", "/a/b"); exitCode(err) != exitUsage {
		t.Errorf("push --json: %v, want a usage error", err)
	}
}

func TestAgentsMapperDevVersionFlags(t *testing.T) {
	f, _, _ := testFactory("", nil)

	var ao *AgentsOptions
	if err := parse(t, NewCmdAgents(f, func(_ context.Context, o *AgentsOptions) error { ao = o; return nil }),
		"--wait", "3s", "--services", "--json"); err != nil {
		t.Fatal(err)
	}
	if ao.Wait != 3*time.Second || !ao.Services || !ao.JSON {
		t.Errorf("agents %+v", ao)
	}
	if err := parse(t, NewCmdAgents(f, func(_ context.Context, o *AgentsOptions) error { ao = o; return nil })); err != nil {
		t.Fatal(err)
	}
	if ao.Wait != 1500*time.Millisecond || ao.Services || ao.JSON {
		t.Errorf("agents defaults %+v", ao)
	}

	var mo *MapperOptions
	if err := parse(t, NewCmdMapper(f, func(_ context.Context, o *MapperOptions) error { mo = o; return nil }),
		"--identity", "m1", "--agent-timeout", "5s", "--request-timeout", "1m", "--report-interval", "10s"); err != nil {
		t.Fatal(err)
	}
	if mo.Identity != "m1" || mo.AgentTimeout != 5*time.Second || mo.RequestTimeout != time.Minute || mo.ReportInterval != 10*time.Second {
		t.Errorf("mapper %+v", mo)
	}

	var do *DevOptions
	if err := parse(t, NewCmdDev(f, func(_ context.Context, o *DevOptions) error { do = o; return nil }),
		"-n", "5", "--actors", "a.yaml"); err != nil {
		t.Fatal(err)
	}
	if do.Agents != 5 || do.ActorsFile != "a.yaml" {
		t.Errorf("dev %+v", do)
	}

	var vo *VersionOptions
	if err := parse(t, NewCmdVersion(f, func(_ context.Context, o *VersionOptions) error { vo = o; return nil }), "--json"); err != nil {
		t.Fatal(err)
	}
	if !vo.JSON {
		t.Errorf("version %+v", vo)
	}
}

// TestGlobalFlagsReachSettings checks that the root's persistent flags,
// parsed by cobra into the subcommand's flag set, reach the settings.
func TestGlobalFlagsReachSettings(t *testing.T) {
	f, _, _ := testFactory("", map[string]string{envURL: "amqp://env/", envLogLevel: "error"})
	root := NewCmdRoot(f)
	var got *Settings
	sub, _, err := root.Find([]string{"agents"})
	if err != nil {
		t.Fatal(err)
	}
	sub.RunE = func(*cobra.Command, []string) error {
		var err error
		got, err = f.Settings()
		return err
	}
	root.SetArgs([]string{"agents", "--url", "amqp://flag/", "--log-format", "json"})
	if err := root.ExecuteContext(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got.URL != "amqp://flag/" || got.LogFormat != "json" || got.LogLevel != "error" {
		t.Errorf("settings %+v", got)
	}
}

func TestRootCommands(t *testing.T) {
	root := NewCmdRoot(&Factory{})
	var names []string
	for _, c := range root.Commands() {
		names = append(names, c.Name())
	}
	for _, want := range []string{"agent", "agents", "dev", "mapper", "push", "request", "version"} {
		if !slices.Contains(names, want) {
			t.Errorf("no %s command in %v", want, names)
		}
	}
}
