package testenv

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// Federation (s2s) of private prosody servers.
//
// mod_s2s finds the server of a remote domain with net.resolvers.service: a
// DNS SRV lookup of _xmpp-server._tcp.<domain>, then A/AAAA. Test domains
// are not in DNS, and changing the machine's resolver is out of the
// question, so a small plugin of ours (s2sRoutesModule, written to the
// server's own plugin directory) replaces that resolver, inside the prosody
// process only, by a lookup in a routes file that testenv writes and the
// plugin reads again for every new s2s connection. docs/xmpp.md ("s2s in
// tests") lists the other ways that were measured.

const (
	s2sRoutesModuleName = "testenv_s2s_routes"
	// Log lines of the plugin, checked by waitReady.
	s2sRoutesLoaded = "testenv: static s2s routes from "
	s2sRoutesFailed = "testenv: static s2s routes unavailable"
	// What prosody logs when a module cannot be loaded or initialized.
	s2sRoutesModuleError = "module '" + s2sRoutesModuleName + "'"
)

// s2sRoutesModule is the prosody plugin (Lua) that routes s2s connections
// statically. It is written for prosody 0.12's net.resolvers API; if that
// API is missing it logs s2sRoutesFailed and the server does not start.
const s2sRoutesModule = `-- Written by github.com/nanite-go/nanite/testenv: static s2s routes for tests.
-- mod_s2s resolves remote domains with net.resolvers.service (DNS SRV, then
-- A/AAAA). This module replaces that constructor, for this process, by one
-- that reads the file named by testenv_s2s_routes_file (lines "domain ip
-- port", read again for every new connection) and never asks DNS: a domain
-- without a route is unreachable at once.
local logger = require "util.logger".init("testenv_s2s_routes");
local routes_file = module:get_option_string("testenv_s2s_routes_file");

local ok, err = pcall(function ()
	local service = require "net.resolvers.service";
	local basic = require "net.resolvers.basic";
	local manual = require "net.resolvers.manual";
	if type(service.new) ~= "function" or type(basic.new) ~= "function" or type(manual.new) ~= "function" then
		error("unexpected net.resolvers API");
	end
	if service.testenv_original_new then return; end -- loaded for another host already
	local original_new = service.new;
	service.testenv_original_new = original_new;

	local function read_routes()
		local routes = {};
		local f, ferr = io.open(routes_file);
		if not f then
			logger("error", "cannot read the routes: %s", ferr);
			return routes;
		end
		for line in f:lines() do
			local domain, ip, port = line:match("^(%S+)%s+(%S+)%s+(%d+)$");
			if domain then routes[domain] = { ip, tonumber(port) }; end
		end
		f:close();
		return routes;
	end

	service.new = function (hostname, svc, conn_type, extra)
		if svc ~= "xmpp-server" and svc ~= "xmpps-server" then
			return original_new(hostname, svc, conn_type, extra);
		end
		local route = read_routes()[hostname];
		if route and svc == "xmpp-server" then
			logger("info", "s2s route for %s: [%s]:%d", hostname, route[1], route[2]);
			return basic.new(route[1], route[2], conn_type, extra);
		end
		-- No direct TLS (xmpps-server); nothing at all for unrouted domains.
		local none = manual.new({}, conn_type, extra);
		if not route then
			logger("info", "no s2s route for %s", hostname);
			none.last_error = "no testenv s2s route for " .. hostname;
		end
		return none;
	end
end);
if ok then
	module:log("info", "` + s2sRoutesLoaded + `%s", routes_file);
else
	module:log("error", "` + s2sRoutesFailed + `: %s", err);
end
`

// loopbackInterface checks ProsodyOptions.Interface ("" means 127.0.0.1).
func loopbackInterface(s string) (string, error) {
	if s == "" {
		return "127.0.0.1", nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || !a.IsLoopback() || a.Zone() != "" {
		return "", fmt.Errorf("testenv: prosody Interface %q: want a loopback address such as 127.0.0.2", s)
	}
	return a.String(), nil
}

// parseS2SRoutes checks ProsodyOptions.S2SRoutes.
func parseS2SRoutes(s2s bool, m map[string]string) (map[string]netip.AddrPort, error) {
	if len(m) > 0 && !s2s {
		return nil, errors.New("testenv: prosody S2SRoutes without S2S")
	}
	routes := make(map[string]netip.AddrPort, len(m))
	for d, a := range m {
		ap, err := parseS2SRoute(d, a)
		if err != nil {
			return nil, err
		}
		routes[d] = ap
	}
	return routes, nil
}

func parseS2SRoute(domain, addr string) (netip.AddrPort, error) {
	if domain == "" || strings.ContainsFunc(domain, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return netip.AddrPort{}, fmt.Errorf("testenv: s2s route: bad domain %q", domain)
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
		return netip.AddrPort{}, fmt.Errorf("testenv: s2s route for %s: %q is not an IP address and port", domain, addr)
	}
	return ap, nil
}

func (p *Prosody) routesPath() string { return filepath.Join(p.dir, "s2s-routes.txt") }
func (p *Prosody) pluginDir() string  { return filepath.Join(p.dir, "plugins") }

// setupS2S writes the routing plugin and the initial routes.
func (p *Prosody) setupS2S() error {
	if err := os.MkdirAll(p.pluginDir(), 0o750); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	mod := filepath.Join(p.pluginDir(), "mod_"+s2sRoutesModuleName+".lua")
	if err := os.WriteFile(mod, []byte(s2sRoutesModule), 0o644); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.writeRoutesLocked()
}

// writeRoutesLocked replaces the routes file (atomically: the plugin may be
// reading it). p.mu must be held.
func (p *Prosody) writeRoutesLocked() error {
	domains := make([]string, 0, len(p.routes))
	for d := range p.routes {
		domains = append(domains, d)
	}
	slices.Sort(domains)
	var b strings.Builder
	for _, d := range domains {
		ap := p.routes[d]
		fmt.Fprintf(&b, "%s %s %d\n", d, ap.Addr(), ap.Port())
	}
	tmp := p.routesPath() + ".tmp"
	if err := os.WriteFile(tmp, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	if err := os.Rename(tmp, p.routesPath()); err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	return nil
}

func (p *Prosody) writeS2SConfig(b *strings.Builder) {
	q := luaString
	fmt.Fprintf(b, "s2s_ports = { %d }\n", p.s2sPort)
	fmt.Fprintf(b, "plugin_paths = { %s }\n", q(p.pluginDir()))
	fmt.Fprintf(b, `modules_enabled = { "roster"; "saslauth"; "tls"; "disco"; "ping"; "posix"; "dialback"; %s }
`, q(s2sRoutesModuleName))
	fmt.Fprintf(b, "testenv_s2s_routes_file = %s\n", q(p.routesPath()))
	fmt.Fprintf(b, "s2s_ssl = { cafile = %s }\n", q(p.CAFile()))
	b.WriteString(`-- TLS always (every domain has a certificate); certificates from another CA
-- fall back to dialback instead of failing.
s2s_require_encryption = true
s2s_secure_auth = false
s2s_timeout = 10
s2s_stanza_size_limit = 16*1024*1024
`)
}

// S2SAddr returns the address of the s2s listener (Interface:port), or ""
// without [ProsodyOptions].S2S.
func (p *Prosody) S2SAddr() string {
	if p.s2sPort == 0 {
		return ""
	}
	return p.addr(p.s2sPort)
}

// AddS2SRoute routes s2s connections for domain to addr, the IP address and
// port of another server's s2s listener ([Prosody.S2SAddr]), replacing any
// route the domain had. It applies at once to new s2s connections, whether
// the server runs or not; existing connections stay. It needs
// [ProsodyOptions].S2S.
func (p *Prosody) AddS2SRoute(domain, addr string) error {
	if !p.opts.S2S {
		return fmt.Errorf("testenv: %v: s2s is off", p)
	}
	ap, err := parseS2SRoute(domain, addr)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.routes[domain] = ap
	return p.writeRoutesLocked()
}

// S2SRoutes returns the server's s2s routes: domain -> address.
func (p *Prosody) S2SRoutes() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[string]string, len(p.routes))
	for d, ap := range p.routes {
		m[d] = ap.String()
	}
	return m
}

// S2SLink is an s2s connection as the server logged it when it was
// established and authenticated.
type S2SLink struct {
	Incoming bool   // accepted from a remote server (else opened by this one)
	From, To string // the stream's domains: From is the sending side
}

func (l S2SLink) String() string {
	dir := "outgoing"
	if l.Incoming {
		dir = "incoming"
	}
	return dir + " " + l.From + "->" + l.To
}

var s2sLinkLine = regexp.MustCompile(`(Incoming|Outgoing) s2s connection (\S+)->(\S+) complete`)

// S2SLinks returns the s2s connections the server established since it was
// created (across restarts), oldest first, read from its log. Tests use it
// to prove that stanzas really crossed s2s.
func (p *Prosody) S2SLinks() []S2SLink {
	var links []S2SLink
	for _, m := range s2sLinkLine.FindAllStringSubmatch(readFrom(p.logPath(), 0), -1) {
		links = append(links, S2SLink{Incoming: m[1] == "Incoming", From: m[2], To: m[3]})
	}
	return links
}

// StartFederatedProsody starts one private prosody server per options, with
// [ProsodyOptions].S2S on, and routes each server's domains (virtual hosts
// and components) to its s2s listener on every other server, so that a
// stanza from a domain of one server to a domain of another travels over
// s2s. Servers whose Interface is empty get 127.0.0.2, 127.0.0.3, ... in
// order: each has a loopback address of its own. The servers share one CA
// (their CAFile holds it and their s2s trusts it), so their s2s connections
// use TLS and authenticate by certificate (SASL EXTERNAL). Routes given in
// the options are kept unless they name a domain of another server of the
// federation. Two servers may not serve the same domain (give each its
// VirtualHosts). Starting takes about 0.1 s per server.
//
// On error the servers already started are closed.
func StartFederatedProsody(ctx context.Context, opts ...ProsodyOptions) ([]*Prosody, error) {
	ca, err := newCA("testenv prosody federation CA")
	if err != nil {
		return nil, err
	}
	var servers []*Prosody
	fail := func(err error) ([]*Prosody, error) {
		for _, p := range servers {
			_ = p.Close()
		}
		return nil, err
	}
	owner := map[string]int{}
	for i, o := range opts {
		o.S2S = true
		o.ca = ca
		if o.Interface == "" {
			o.Interface = fmt.Sprintf("127.0.0.%d", i+2)
		}
		p, err := StartProsody(ctx, o)
		if err != nil {
			return fail(err)
		}
		servers = append(servers, p)
		for _, d := range p.Domains() {
			if j, dup := owner[d]; dup {
				return fail(fmt.Errorf("testenv: federated prosody servers %d and %d both serve %s", j, i, d))
			}
			owner[d] = i
		}
	}
	for i, p := range servers {
		for j, peer := range servers {
			if i == j {
				continue
			}
			for _, d := range peer.Domains() {
				if err := p.AddS2SRoute(d, peer.S2SAddr()); err != nil {
					return fail(err)
				}
			}
		}
	}
	return servers, nil
}
