package cloudflare

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"vault-plugin-secrets-cloudflare-ipsec/internal/cloudflaresim"
)

// TestRedirectsAreNeverFollowed puts a server that answers every request
// with a redirect in front of a working simulator. Following the redirect
// would hand the bearer token to whatever the Location names (another host,
// plain http); the client must stop at the 3xx, and the simulator must see
// nothing.
func TestRedirectsAreNeverFollowed(t *testing.T) {
	const marker = "LOCATIONMARKER"
	sim := cloudflaresim.New()
	token := sim.AddToken(cloudflaresim.Token{})
	account := cloudflaresim.NewID()
	tunnel := sim.AddTunnel(account, cloudflaresim.Tunnel{}).ID
	var reached, withAuth atomic.Int32
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reached.Add(1)
		if r.Header.Get("Authorization") != "" {
			withAuth.Add(1)
		}
		sim.ServeHTTP(w, r)
	}))
	t.Cleanup(elsewhere.Close)

	ops := []struct {
		op   Op
		call func(c *Client) error
	}{
		{OpGeneratePSK, func(c *Client) error {
			_, err := c.GeneratePSK(context.Background(), account, tunnel, false)
			return err
		}},
		{OpVerifyToken, func(c *Client) error { _, err := c.VerifyToken(context.Background(), ""); return err }},
		{OpGetTunnel, func(c *Client) error { _, err := c.GetTunnel(context.Background(), account, tunnel); return err }},
		{OpListTunnels, func(c *Client) error { _, err := c.ListTunnels(context.Background(), account); return err }},
		{OpRollToken, func(c *Client) error { _, err := c.RollToken(context.Background(), "", token.ID); return err }},
	}
	for _, status := range []int{301, 302, 303, 307, 308} {
		for _, tc := range ops {
			t.Run(strconv.Itoa(status)+" "+string(tc.op), func(t *testing.T) {
				reached.Store(0)
				withAuth.Store(0)
				var redirected atomic.Int32
				redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					redirected.Add(1)
					w.Header().Set("Location", elsewhere.URL+r.URL.Path+"?next="+marker)
					w.WriteHeader(status)
				}))
				t.Cleanup(redirector.Close)
				client, err := New(Config{APIToken: token.Value, BaseURL: redirector.URL + cloudflaresim.BasePath, RequestTimeout: 5 * time.Second})
				if err != nil {
					t.Fatal(err)
				}
				err = tc.call(client)
				if n := reached.Load(); n != 0 {
					t.Fatalf("the redirect was followed: %d requests reached the other server, %d with an Authorization header", n, withAuth.Load())
				}
				var malformed *MalformedResponseError
				if !errors.As(err, &malformed) || malformed.HTTPStatus != status || malformed.Op != tc.op {
					t.Fatalf("err = %#v, want a MalformedResponseError for HTTP %d of %s", err, status, tc.op)
				}
				// For psk_generate a refusal would mean "no key changed";
				// a redirect proves nothing of the kind.
				var apiErr *APIError
				if errors.As(err, &apiErr) {
					t.Errorf("a redirect became an APIError (Rejected: %v)", apiErr.Rejected())
				}
				msg := err.Error()
				for _, want := range []string{"cloudflare " + string(tc.op), "HTTP " + strconv.Itoa(status), "redirect"} {
					if !strings.Contains(msg, want) {
						t.Errorf("error %q does not say %q", msg, want)
					}
				}
				for _, secret := range []string{marker, strings.TrimPrefix(elsewhere.URL, "http://"), token.Value} {
					if strings.Contains(msg, secret) {
						t.Errorf("error %q quotes the Location header or the token", msg)
					}
				}
				if n := redirected.Load(); n != 1 {
					t.Errorf("%d requests were sent; a redirect is not worth retrying", n)
				}
			})
		}
	}
}
