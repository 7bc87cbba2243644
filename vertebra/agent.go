package vertebra

import (
	"context"
	"encoding/xml"
	"errors"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"mellium.im/xmpp"
	"mellium.im/xmpp/jid"
	"mellium.im/xmpp/mux"
	"mellium.im/xmpp/stanza"
)

// AgentConfig configures an XMPP agent.
type AgentConfig struct {
	// Dial says how to log in (a client account; see DialConfig). Give the
	// JID a resource so that the agent keeps its address across
	// reconnections.
	Dial DialConfig
	// Handler runs the services (for example a *nanite.Dispatcher).
	Handler Handler
	// Authorizer, Verifier and RequireSignature: see ActorServer.
	Authorizer       Authorizer
	Verifier         Verifier
	RequireSignature bool
	// Load returns the agent's load, shown as its presence status. Default:
	// the one-minute load average of the machine.
	Load func() float64
	// StatusInterval is how often the presence is refreshed. Default 15 s.
	StatusInterval time.Duration
	// Directory, when set, is told (/security/advertise) of the agent's
	// services and Resources, with AdvertiseTTL (default 60 s), and again
	// every half TTL while connected; it also gets the agent's presence so
	// that it forgets the agent as soon as it goes offline.
	Directory    jid.JID
	Resources    []string
	AdvertiseTTL time.Duration
	// Endpoint configures the protocol engine (timeouts, retries, limits);
	// its Handler and Features are set by the agent.
	Endpoint Config
	// Options add handlers to the session's mux.
	Options []mux.Option
	// Logger receives the agent's events; nil discards them.
	Logger *slog.Logger
}

// Agent is an XMPP client that serves a Handler's services as ops: the same
// actors an AMQP agent runs. It keeps its presence (available, its load as
// status), answers disco#info (listing its services) and XEP-0199 pings,
// and reconnects when the server goes away.
type Agent struct {
	cfg    AgentConfig
	log    *slog.Logger
	actors *ActorServer
	ep     *Endpoint
	conn   *Conn
}

// NewAgent returns an agent; Run connects it.
func NewAgent(cfg AgentConfig) (*Agent, error) {
	if cfg.Handler == nil {
		return nil, errors.New("vertebra: AgentConfig.Handler is required")
	}
	if cfg.Dial.IsComponent() || cfg.Dial.JID.Localpart() == "" {
		return nil, errors.New("vertebra: an agent logs in as a client: give a JID user@domain[/resource] and a password")
	}
	if cfg.Load == nil {
		cfg.Load = loadAverage
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = 15 * time.Second
	}
	if cfg.AdvertiseTTL <= 0 {
		cfg.AdvertiseTTL = time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	a := &Agent{cfg: cfg, log: cfg.Logger}
	a.actors = &ActorServer{Handler: cfg.Handler, Authorizer: cfg.Authorizer, Verifier: cfg.Verifier,
		RequireSignature: cfg.RequireSignature}
	ecfg := cfg.Endpoint
	ecfg.Handler = a.actors
	ecfg.Features = a.actors.Features
	if ecfg.Logger == nil {
		ecfg.Logger = cfg.Logger
	}
	a.ep = NewEndpoint(ecfg)
	a.conn = NewConn(ConnConfig{Dial: cfg.Dial, Endpoint: a.ep, Options: cfg.Options, OnConnect: a.onConnect,
		Logger: cfg.Logger})
	return a, nil
}

// Endpoint returns the agent's endpoint, to make calls from the agent.
func (a *Agent) Endpoint() *Endpoint { return a.ep }

// Ready is closed once the agent is first connected.
func (a *Agent) Ready() <-chan struct{} { return a.conn.Ready() }

// JID returns the agent's address (its full JID once connected).
func (a *Agent) JID() jid.JID {
	if j := a.ep.LocalAddr(); j.String() != "" {
		return j
	}
	return a.cfg.Dial.JID
}

// Run connects the agent and serves until ctx ends (nil) or the server
// refuses its credentials (ErrAuth).
func (a *Agent) Run(ctx context.Context) error {
	defer a.ep.Close()
	return a.conn.Run(ctx)
}

func (a *Agent) onConnect(ctx context.Context, s *xmpp.Session) {
	t := time.NewTicker(a.cfg.StatusInterval)
	defer t.Stop()
	var nextAd time.Time
	for {
		if err := sendPresence(ctx, s, jid.JID{}, a.cfg.Load()); err != nil {
			a.log.Debug("vertebra: presence", "err", err)
		}
		if a.cfg.Directory.String() != "" && !time.Now().Before(nextAd) {
			if err := sendPresence(ctx, s, a.cfg.Directory, a.cfg.Load()); err != nil {
				a.log.Debug("vertebra: presence to the directory", "err", err)
			}
			actx, cancel := context.WithTimeout(ctx, a.cfg.AdvertiseTTL/2)
			res := append(a.cfg.Handler.Services(), a.cfg.Resources...)
			err := Advertise(actx, a.ep, a.cfg.Directory, res, a.cfg.AdvertiseTTL)
			cancel()
			if err != nil {
				a.log.Warn("vertebra: advertise to the directory failed", "directory", a.cfg.Directory, "err", err)
				nextAd = time.Now().Add(a.cfg.StatusInterval)
			} else {
				nextAd = time.Now().Add(a.cfg.AdvertiseTTL / 2)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// sendPresence sends available presence with the load as status (to the
// server for broadcast, or directed to `to`).
func sendPresence(_ context.Context, s *xmpp.Session, to jid.JID, load float64) error {
	p := stanza.Presence{To: to}
	status := xml.Name{Local: "status"}
	toks := []xml.Token{xml.StartElement{Name: status}, xml.CharData(FormatLoad(load)), xml.EndElement{Name: status}}
	// Not ctx: see Endpoint.write.
	return sendStanza(s, p.Wrap(&tokenSlice{toks: toks}))
}

// FormatLoad is how an agent's load is written in its presence status.
func FormatLoad(load float64) string { return strconv.FormatFloat(load, 'f', 2, 64) }

// ParseLoad reads a presence status written by FormatLoad.
func ParseLoad(status string) (float64, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(status), 64)
	return f, err == nil
}

func loadAverage() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
