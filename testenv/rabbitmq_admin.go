package testenv

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// api calls the management HTTP API as guest. A nil in is sent as no body;
// a non-nil out receives the decoded JSON answer.
func (r *RabbitMQ) api(ctx context.Context, method, path string, in, out any) error {
	if r.mgmtPort == 0 {
		return fmt.Errorf("testenv: %v has no management plugin", r)
	}
	var body io.Reader
	if in != nil {
		data, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("testenv: %w", err)
		}
		body = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, r.ManagementURL()+path, body)
	if err != nil {
		return fmt.Errorf("testenv: %w", err)
	}
	req.SetBasicAuth("guest", "guest")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := r.httpc.Do(req)
	if err != nil {
		return fmt.Errorf("testenv: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 2048))
		return &apiError{Method: method, Path: path, Status: resp.StatusCode, Body: string(bytes.TrimSpace(msg))}
	}
	if out != nil {
		if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
			return fmt.Errorf("testenv: %s %s: decoding answer: %w", method, path, err)
		}
	} else {
		_, _ = io.Copy(io.Discard, resp.Body)
	}
	return nil
}

type apiError struct {
	Method, Path string
	Status       int
	Body         string
}

func (e *apiError) Error() string {
	return fmt.Sprintf("testenv: management API %s %s: %d %s: %s", e.Method, e.Path, e.Status, http.StatusText(e.Status), e.Body)
}

func isNotFound(err error) bool {
	var e *apiError
	if errors.As(err, &e) {
		return e.Status == http.StatusNotFound
	}
	return err != nil && (strings.Contains(err.Error(), "does not exist") || strings.Contains(err.Error(), "not_found"))
}

// API calls the management HTTP API as guest: method on path (for example
// "/api/queues/%2F/q1"), with in encoded as the JSON body unless nil, and
// the JSON answer decoded into out unless nil.
func (r *RabbitMQ) API(ctx context.Context, method, path string, in, out any) error {
	return r.api(ctx, method, path, in, out)
}

func seg(s string) string { return url.PathEscape(s) }

// AddVhost creates vhost (no error if it exists).
func (r *RabbitMQ) AddVhost(ctx context.Context, vhost string) error {
	if r.mgmtPort == 0 {
		_, err := r.Ctl(ctx, "add_vhost", vhost)
		if err != nil && strings.Contains(err.Error(), "already exists") {
			return nil
		}
		return err
	}
	return r.api(ctx, http.MethodPut, "/api/vhosts/"+seg(vhost), struct{}{}, nil)
}

// DeleteVhost deletes vhost with everything in it (no error if it does not
// exist).
func (r *RabbitMQ) DeleteVhost(ctx context.Context, vhost string) error {
	var err error
	if r.mgmtPort == 0 {
		_, err = r.Ctl(ctx, "delete_vhost", vhost)
	} else {
		err = r.api(ctx, http.MethodDelete, "/api/vhosts/"+seg(vhost), nil, nil)
	}
	if isNotFound(err) {
		return nil
	}
	return err
}

// AddUser creates user with password pass and the given tags (for example
// "administrator", "management"), or updates them if user exists. A new
// user has no permissions: see SetPermissions.
func (r *RabbitMQ) AddUser(ctx context.Context, user, pass string, tags ...string) error {
	if r.mgmtPort != 0 {
		return r.api(ctx, http.MethodPut, "/api/users/"+seg(user),
			map[string]string{"password": pass, "tags": strings.Join(tags, ",")}, nil)
	}
	if _, err := r.Ctl(ctx, "add_user", user, pass); err != nil {
		if !strings.Contains(err.Error(), "already exists") {
			return err
		}
		if _, err := r.Ctl(ctx, "change_password", user, pass); err != nil {
			return err
		}
	}
	_, err := r.Ctl(ctx, append([]string{"set_user_tags", user}, tags...)...)
	return err
}

// DeleteUser deletes user (no error if it does not exist).
func (r *RabbitMQ) DeleteUser(ctx context.Context, user string) error {
	var err error
	if r.mgmtPort == 0 {
		_, err = r.Ctl(ctx, "delete_user", user)
	} else {
		err = r.api(ctx, http.MethodDelete, "/api/users/"+seg(user), nil, nil)
	}
	if isNotFound(err) {
		return nil
	}
	return err
}

// SetPermissions gives user the configure, write and read permissions
// (regular expressions over resource names, ".*" for all) on vhost.
func (r *RabbitMQ) SetPermissions(ctx context.Context, vhost, user, configure, write, read string) error {
	if r.mgmtPort == 0 {
		_, err := r.Ctl(ctx, "set_permissions", "-p", vhost, user, configure, write, read)
		return err
	}
	return r.api(ctx, http.MethodPut, "/api/permissions/"+seg(vhost)+"/"+seg(user),
		map[string]string{"configure": configure, "write": write, "read": read}, nil)
}

// NewVhost creates a vhost for t, named after t.Name() plus a random suffix,
// and a user of the same name with all permissions on it and a random
// password. It returns the AMQP URL for that user and vhost, and deletes
// both when the test ends. It fails t if the node refuses.
func (r *RabbitMQ) NewVhost(t testing.TB) string {
	t.Helper()
	name := sanitize(t.Name(), "_-.", 80)
	if name == "" {
		name = "test"
	}
	name += "-" + randomHex(4)
	pass := randomHex(12)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if !r.Running() {
			return // stopped or killed by the test; nothing to clean
		}
		if err := r.DeleteVhost(ctx, name); err != nil {
			t.Logf("testenv: cleanup: %v", err)
		}
		if err := r.DeleteUser(ctx, name); err != nil {
			t.Logf("testenv: cleanup: %v", err)
		}
	})
	if err := r.AddVhost(ctx, name); err != nil {
		t.Fatal(err)
	}
	if err := r.AddUser(ctx, name, pass); err != nil {
		t.Fatal(err)
	}
	if err := r.SetPermissions(ctx, name, name, ".*", ".*", ".*"); err != nil {
		t.Fatal(err)
	}
	return r.VhostURL(name, name, pass)
}
