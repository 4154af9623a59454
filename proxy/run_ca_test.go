package proxy

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRunCAChoice: Run takes exactly one CA, a CA service or a CA key here, and names the
// flag at fault.
func TestRunCAChoice(t *testing.T) {
	absent := filepath.Join(t.TempDir(), "absent")
	for _, c := range []struct {
		name string
		edit func(*Options)
		want string
	}{
		{"none", func(o *Options) { o.CACertFile, o.CAKeyFile = "", "" }, "a CA is required: --ca-address, or --ca-cert and --ca-key"},
		{"both", func(o *Options) { o.CAAddress = "127.0.0.1:1" }, "--ca-address and --ca-cert/--ca-key are alternatives"},
		{"certificate alone", func(o *Options) { o.CAKeyFile = "" }, "--ca-cert and --ca-key go together"},
		{"no root file", func(o *Options) {
			o.CAAddress, o.CARootFile, o.CATokenFile = "127.0.0.1:1", absent, o.CACertFile
			o.CACertFile, o.CAKeyFile = "", ""
		}, "--ca-root-file: identity: CA roots: open " + absent},
		{"no token file", func(o *Options) {
			o.CAAddress, o.CARootFile, o.CATokenFile = "127.0.0.1:1", o.CACertFile, absent
			o.CACertFile, o.CAKeyFile = "", ""
		}, "--ca-token-file: identity: CA token: open " + absent},
		{"bad address", func(o *Options) {
			o.CAAddress, o.CARootFile, o.CATokenFile = "grpc://ca:1", o.CACertFile, o.CACertFile
			o.CACertFile, o.CAKeyFile = "", ""
		}, "--ca-address: identity: CA address \"grpc://ca:1\""},
	} {
		o := runOptions(t)
		o.MetricsAddr, o.ReadyAddr = "127.0.0.1:0", "127.0.0.1:0"
		c.edit(&o)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // a missing check must not hang the test
		err := Run(ctx, o)
		cancel()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q in the error", c.name, err, c.want)
		}
	}
}

// TestRunWithCAService: with a CA service, Run starts and serves without reaching it
// (certificates are asked for when pods come), and stops cleanly.
func TestRunWithCAService(t *testing.T) {
	o := runOptions(t)
	token := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(token, []byte("t"), 0o600); err != nil {
		t.Fatal(err)
	}
	o.CAAddress, o.CARootFile, o.CATokenFile = freeAddr(t), o.CACertFile, token
	o.CACertFile, o.CAKeyFile = "", ""
	o.MetricsAddr, o.ReadyAddr = freeAddr(t), freeAddr(t)
	startRun(t, o, o.MetricsAddr, o.ReadyAddr)
	if code, _ := status(t, "GET", o.MetricsAddr, "/metrics"); code != 200 {
		t.Errorf("/metrics: %d", code)
	}
}
