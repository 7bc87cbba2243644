package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"mellium.im/xmpp/jid"

	"github.com/nanite-go/nanite/nanite"
	"github.com/nanite-go/nanite/vertebra"
)

// The site directory (config "directory"): the bridge hosts vertebra's
// directory at directory@<domain>. XMPP agents of the site advertise the
// ops and resources they serve; callers discover who serves an op. A
// discovery of an op also finds the bridge's clusters whose exports let
// the caller call it and where an agent offers it (clusters advertise
// nothing: what they offer depends on who asks).

func (b *Bridge) newDirectory(dc *DirectoryConfig) error {
	for _, a := range dc.Allow {
		p, err := parsePeer(a)
		if err != nil {
			return fmt.Errorf("directory: %w", err)
		}
		b.dirAllow = append(b.dirAllow, p)
	}
	j, err := jid.New(dc.Localpart, b.domain.Domainpart(), "")
	if err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	b.dirJID = j
	b.dir = vertebra.NewDirectory(vertebra.DirectoryConfig{Authorizer: vertebra.AuthorizerFunc(b.authorizeDirectory)})
	return nil
}

// authorizeDirectory lets the allowed peers advertise and discover (and
// the policy, when configured, have its say).
func (b *Bridge) authorizeDirectory(ctx context.Context, caller, signedBy, op string) error {
	who, err := jid.Parse(caller)
	if err != nil {
		return fmt.Errorf("bridge: directory: %w", err)
	}
	if !slices.ContainsFunc(b.dirAllow, func(p peer) bool { return p.matches(who, "") }) {
		b.count(RefusePeer)
		return fmt.Errorf("%s: %s may not use the directory %s", RefusePeer, who.Bare(), b.dirJID)
	}
	if b.policy != nil {
		pa := vertebra.PolicyAuthorizer{Policy: b.policy}
		if err := pa.Authorize(ctx, caller, signedBy, op); err != nil {
			b.count(RefusePolicy)
			return fmt.Errorf("%s: %w", RefusePolicy, err)
		}
	}
	return nil
}

// Directory returns the site directory the bridge hosts (nil without the
// "directory" config) and its JID.
func (b *Bridge) Directory() (*vertebra.Directory, jid.JID) { return b.dir, b.dirJID }

// serveDirectory answers the directory's ops; discoveries of an op also
// list the clusters that would serve it to the caller.
func (b *Bridge) serveDirectory(ctx context.Context, req *vertebra.Request, w *vertebra.Reply) error {
	if req.Type != vertebra.OpDiscover {
		return b.dir.ServeOp(ctx, req, w)
	}
	if err := b.authorizeDirectory(ctx, req.From.String(), "", req.Type); err != nil {
		return w.Nack(ctx, vertebra.CodeUnauthorized, err.Error())
	}
	var a vertebra.DiscoverArgs
	if err := json.Unmarshal(req.Payload, &a); err != nil {
		return w.Nack(ctx, vertebra.CodeBadRequest, fmt.Sprintf("bridge: directory: %v", err))
	}
	js, err := b.dir.Discover(a.Op, a.Resources)
	if err != nil {
		return w.Nack(ctx, vertebra.CodeBadRequest, err.Error())
	}
	res := vertebra.DiscoverResult{JIDs: []string{}}
	for _, j := range js {
		res.JIDs = append(res.JIDs, j.String())
	}
	if svc, err := nanite.NormalizeService(a.Op); err == nil && a.Op != "" && len(a.Resources) == 0 {
		for _, c := range b.clusters {
			agents, _ := c.localAgents()
			if c.allowed(svc, req.From) && offers(agents, svc, "", nil) {
				res.JIDs = append(res.JIDs, c.jid.String())
			}
		}
	}
	body, err := json.Marshal(res)
	if err != nil {
		return errors.Join(err, w.Fail(ctx, vertebra.CodeInternal, err.Error()))
	}
	if err := w.Data(ctx, body); err != nil {
		return err
	}
	return w.Final(ctx)
}
