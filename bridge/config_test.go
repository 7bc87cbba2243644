package bridge

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

const goodConfig = `xmpp:
  server: 127.0.0.1:5347
  domain: nanite.site-a.test
  secret: s3cret
hop_limit: 3
clusters:
  - name: app
    url: amqp://u:p@127.0.0.1:5672/app
    exports:
      - services: ["/echo/*", "/ops/restart"]
        to: ["*@site-b.test", "nanite.site-b.test", "alice@site-a.test", "bob@site-a.test/x", "*"]
    imports:
      - from: app@nanite.site-b.test
        services: ["*"]
  - name: root
    url: amqp://u:p@127.0.0.1:5672
    vhost: /nanite
`

// localImport adds to goodConfig an import of cluster app by cluster root
// (a relay between two local vhosts).
const localImport = goodConfig + `    imports:
      - from: app@nanite.site-a.test
        services: ["/echo/*"]
`

func TestConfigGood(t *testing.T) {
	if _, err := ParseConfig("b.yaml", []byte(localImport)); err != nil {
		t.Errorf("local import: %v", err)
	}
	cfg, err := ParseConfig("b.yaml", []byte(goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HopLimit != 3 || cfg.Clusters[0].Vhost != "app" || cfg.Clusters[1].Vhost != "/nanite" {
		t.Errorf("config %+v", cfg)
	}
	u, err := cfg.Clusters[1].brokerURL(cfg)
	if err != nil || u != "amqp://u:p@127.0.0.1:5672/%2Fnanite" {
		t.Errorf("brokerURL = %q, %v", u, err)
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct {
		name, yaml string
		want       []string // substrings of the error, each
	}{
		{"unknown field", strings.Replace(goodConfig, "hop_limit: 3", "hop_limt: 3", 1),
			[]string{"b.yaml:5:", "hop_limt", "not found"}},
		{"unknown nested field", strings.Replace(goodConfig, "    imports:", "    import:", 1),
			[]string{"b.yaml:12:", "import"}},
		{"missing secret", strings.Replace(goodConfig, "  secret: s3cret\n", "", 1),
			[]string{"b.yaml:1: xmpp: secret or secret_file is required"}},
		{"bad glob", strings.Replace(goodConfig, `"/ops/restart"`, `"ops"`, 1),
			[]string{"b.yaml:10: clusters[0].exports[0].services[1]:", "must start with /"}},
		{"bad peer", strings.Replace(goodConfig, `"bob@site-a.test/x"`, `"a@b@c"`, 1),
			[]string{"b.yaml:11: clusters[0].exports[0].to[3]:"}},
		{"cert without trust", strings.Replace(goodConfig, `"bob@site-a.test/x"`, `"cert:ops"`, 1),
			[]string{"b.yaml:11: clusters[0].exports[0].to[3]:", "needs trust.ca_files"}},
		{"bad cert name", strings.Replace(goodConfig, `"bob@site-a.test/x"`, `"cert:"`, 1),
			[]string{"clusters[0].exports[0].to[3]:", "certificate name"}},
		{"bad url", strings.Replace(goodConfig, "amqp://u:p@127.0.0.1:5672/app", "http://x/app", 1),
			[]string{"b.yaml:8: clusters[0].url:"}},
		{"duplicate cluster JID", strings.Replace(goodConfig, "vhost: /nanite", "vhost: App", 1),
			[]string{"b.yaml:17: clusters[1].vhost:", "also that of clusters[0]"}},
		{"hop limit", strings.Replace(goodConfig, "hop_limit: 3", "hop_limit: 99", 1),
			[]string{"b.yaml:5: hop_limit:"}},
		{"vhost conflict", strings.Replace(goodConfig, "5672/app\n", "5672/app\n    vhost: other\n", 1),
			[]string{"clusters[0].vhost:", "differs"}},
		{"no exports to", strings.Replace(goodConfig, `        to: ["*@site-b.test", "nanite.site-b.test", "alice@site-a.test", "bob@site-a.test/x", "*"]`+"\n", "", 1),
			[]string{"clusters[0].exports[0].to:", "at least one"}},
		{"secret file", strings.Replace(goodConfig, "secret: s3cret", "secret_file: /nonexistent/secret", 1),
			[]string{"b.yaml:4: xmpp.secret_file:"}},
		{"import from a domain", strings.Replace(goodConfig, "from: app@nanite.site-b.test", "from: nanite.site-b.test", 1),
			[]string{"b.yaml:13: clusters[0].imports[0].from:", "not a cluster JID"}},
		{"import from an unknown local cluster", strings.Replace(goodConfig, "from: app@nanite.site-b.test", "from: root@nanite.site-a.test", 1),
			[]string{"b.yaml:13: clusters[0].imports[0].from:", "is no cluster of it"}},
		{"state file in no directory", goodConfig + "state_file: no/such/dir/state.json\n",
			[]string{"state_file:", "its directory", "no such file or directory"}},
		{"directory without allow", goodConfig + "directory:\n  localpart: dir\n",
			[]string{"directory.allow:", "at least one entry"}},
		{"directory on a cluster JID", goodConfig + "directory:\n  localpart: app\n  allow: [\"*\"]\n",
			[]string{"directory.localpart:", "also the JID of clusters[0]"}},
		{"secure without identity and trust", goodConfig + "    secure: true\n",
			[]string{"clusters[1].secure: needs the bridge's identity", "clusters[1].secure: needs trust.ca_files"}},
		{"proxy identity outside secure mode", strings.Replace(goodConfig, `        services: ["*"]`+"\n", `        services: ["*"]`+"\n        identity: {cert_file: a.crt, key_file: a.key}\n", 1),
			[]string{"clusters[0].imports[0].identity: only for a cluster in secure mode"}},
		{"import itself", strings.Replace(goodConfig, "from: app@nanite.site-b.test", "from: app@nanite.site-a.test", 1),
			[]string{"b.yaml:13: clusters[0].imports[0].from:", "cannot import itself"}},
		{"import empty tag", strings.Replace(goodConfig, `        services: ["*"]`+"\n", `        services: ["*"]`+"\n        as_tags: [\"\"]\n", 1),
			[]string{"clusters[0].imports[0].as_tags[0]:", "empty tag"}},
	}
	for _, c := range cases {
		_, err := ParseConfig("b.yaml", []byte(c.yaml))
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not contain %q", c.name, err, w)
			}
		}
	}
}

// TestConfigDocExample checks that the example of docs/bridge.md has no
// error other than its files being absent here.
func TestConfigDocExample(t *testing.T) {
	doc, err := os.ReadFile("../docs/bridge.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "```yaml\n")
	if !ok {
		t.Fatal("no yaml block in docs/bridge.md")
	}
	example, _, _ := strings.Cut(rest, "```")
	_, err = ParseConfig(filepath.Join(t.TempDir(), "bridge.yaml"), []byte(example))
	if err == nil {
		return
	}
	for _, line := range strings.Split(err.Error(), "\n") {
		if !strings.Contains(line, "no such file or directory") {
			t.Errorf("docs example: %s", line)
		}
	}
}
