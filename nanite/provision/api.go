package provision

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
)

// ManagementConfig says how to reach RabbitMQ's management HTTP API (the
// rabbitmq_management plugin) as an administrator.
type ManagementConfig struct {
	// URL is the API's base, for example http://rabbit.example:15672 (a
	// path prefix, as behind a reverse proxy, is kept).
	URL string
	// User and Password of an administrator ("administrator" tag).
	User, Password string
	// HTTPClient makes the calls (default: a client with a 30 s timeout).
	// Give one with a TLS configuration for an https URL signed by a
	// private CA.
	HTTPClient *http.Client
}

// APIError is an answer of the management API other than 2xx.
type APIError struct {
	Method, Path string
	Status       int    // HTTP status code
	ErrorKind    string // the API's "error" field, e.g. "not_authorised"
	Reason       string // the API's "reason" field, or the body
}

func (e *APIError) Error() string {
	msg := fmt.Sprintf("management API %s %s: %d %s", e.Method, e.Path, e.Status, http.StatusText(e.Status))
	switch {
	case e.ErrorKind != "" && e.Reason != "" && e.Reason != e.ErrorKind:
		msg += ": " + e.ErrorKind + ": " + e.Reason
	case e.Reason != "":
		msg += ": " + e.Reason
	case e.ErrorKind != "":
		msg += ": " + e.ErrorKind
	}
	return msg
}

// ErrUnauthorized is matched (errors.Is) by an APIError with status 401:
// the administrator's credentials were refused, or the user is not an
// administrator.
var ErrUnauthorized = errors.New("the management API refused the administrator credentials")

// Is lets errors.Is(err, ErrUnauthorized) and errors.Is(err, ErrNotFound)
// work on API errors.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrUnauthorized:
		return e.Status == http.StatusUnauthorized
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	}
	return false
}

// client calls the management API.
type client struct {
	base       string
	user, pass string
	hc         *http.Client
}

var defaultHTTPClient = &http.Client{Timeout: 30 * time.Second}

func newClient(api ManagementConfig) (*client, error) {
	if api.URL == "" {
		return nil, errors.New("provision: no management API URL")
	}
	u, err := url.Parse(api.URL)
	if err != nil {
		return nil, fmt.Errorf("provision: management API URL: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("provision: management API URL %q: the scheme must be http or https", u.Redacted())
	}
	user, pass := api.User, api.Password
	if u.User != nil && user == "" {
		user = u.User.Username()
		pass, _ = u.User.Password()
	}
	u.User = nil
	hc := api.HTTPClient
	if hc == nil {
		hc = defaultHTTPClient
	}
	return &client{base: strings.TrimRight(u.String(), "/"), user: user, pass: pass, hc: hc}, nil
}

// seg escapes one path segment (a vhost "/" becomes %2F).
func seg(s string) string { return url.PathEscape(s) }

// do calls method on path ("/api/..."), sending in as JSON unless nil and
// decoding the answer into out unless nil.
func (c *client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("provision: %w", err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return fmt.Errorf("provision: %w", err)
	}
	req.SetBasicAuth(c.user, c.pass)
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return fmt.Errorf("provision: management API %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		e := &APIError{Method: method, Path: path, Status: resp.StatusCode}
		var answer struct {
			Error  string `json:"error"`
			Reason string `json:"reason"`
		}
		if json.Unmarshal(data, &answer) == nil && (answer.Error != "" || answer.Reason != "") {
			e.ErrorKind, e.Reason = answer.Error, answer.Reason
		} else {
			e.Reason = strings.TrimSpace(string(data))
		}
		return e
	}
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return fmt.Errorf("provision: management API %s %s: decoding the answer: %w", method, path, err)
		}
		return nil
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	return nil
}

func isNotFound(err error) bool { return errors.Is(err, ErrNotFound) }

// The calls this package makes.

type vhostInfo struct {
	Name        string  `json:"name"`
	Description string  `json:"description"`
	Tags        tagList `json:"tags"`
}

// tagList reads a vhost's tags as a JSON list (RabbitMQ 3.8 and later) or
// as one comma-separated string.
type tagList []string

func (t *tagList) UnmarshalJSON(b []byte) error {
	var list []string
	if err := json.Unmarshal(b, &list); err == nil {
		*t = list
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("vhost tags: %s", b)
	}
	*t = nil
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			*t = append(*t, p)
		}
	}
	return nil
}

// hasTag reports whether the vhost carries tag.
func (v vhostInfo) hasTag(tag string) bool {
	return slices.Contains(v.Tags, tag)
}

func (c *client) getVhost(ctx context.Context, name string) (*vhostInfo, error) {
	var v vhostInfo
	if err := c.do(ctx, http.MethodGet, "/api/vhosts/"+seg(name), nil, &v); err != nil {
		return nil, err
	}
	return &v, nil
}

func (c *client) putVhost(ctx context.Context, name, description string, tags []string) error {
	return c.do(ctx, http.MethodPut, "/api/vhosts/"+seg(name),
		map[string]string{"description": description, "tags": strings.Join(tags, ",")}, nil)
}

func (c *client) listVhosts(ctx context.Context) ([]vhostInfo, error) {
	var vs []vhostInfo
	return vs, c.do(ctx, http.MethodGet, "/api/vhosts", nil, &vs)
}

func (c *client) deleteVhost(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/api/vhosts/"+seg(name), nil, nil)
}

func (c *client) userExists(ctx context.Context, name string) (bool, error) {
	err := c.do(ctx, http.MethodGet, "/api/users/"+seg(name), nil, &struct{}{})
	if isNotFound(err) {
		return false, nil
	}
	return err == nil, err
}

func (c *client) putUser(ctx context.Context, name, password string) error {
	// No tags: the user cannot log in to the management API or UI.
	return c.do(ctx, http.MethodPut, "/api/users/"+seg(name),
		map[string]string{"password": password, "tags": ""}, nil)
}

func (c *client) deleteUser(ctx context.Context, name string) error {
	err := c.do(ctx, http.MethodDelete, "/api/users/"+seg(name), nil, nil)
	if isNotFound(err) {
		return nil
	}
	return err
}

type permissionInfo struct {
	User  string `json:"user"`
	Vhost string `json:"vhost"`
	Permissions
}

func (c *client) listPermissions(ctx context.Context) ([]permissionInfo, error) {
	var ps []permissionInfo
	return ps, c.do(ctx, http.MethodGet, "/api/permissions", nil, &ps)
}

func (c *client) userPermissions(ctx context.Context, user string) ([]permissionInfo, error) {
	var ps []permissionInfo
	return ps, c.do(ctx, http.MethodGet, "/api/users/"+seg(user)+"/permissions", nil, &ps)
}

func (c *client) putPermissions(ctx context.Context, vhost, user string, p Permissions) error {
	return c.do(ctx, http.MethodPut, "/api/permissions/"+seg(vhost)+"/"+seg(user), p, nil)
}

func (c *client) putExchange(ctx context.Context, vhost, name, kind string) error {
	return c.do(ctx, http.MethodPut, "/api/exchanges/"+seg(vhost)+"/"+seg(name), map[string]any{
		"type": kind, "durable": true, "auto_delete": false, "internal": false, "arguments": map[string]any{},
	}, nil)
}

func (c *client) putQueue(ctx context.Context, vhost, name string, args map[string]any) error {
	return c.do(ctx, http.MethodPut, "/api/queues/"+seg(vhost)+"/"+seg(name), map[string]any{
		"durable": true, "auto_delete": false, "arguments": args,
	}, nil)
}
