package main

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

func TestCAHelp(t *testing.T) {
	out, errOut, code := runCLI("ca", "--help")
	if code != exitOK || errOut != "" {
		t.Fatalf("ca --help: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{"Usage: nftmesh ca <subcommand>", "init", "Exit codes: 0", "2 bad flags"} {
		if !strings.Contains(out, want) {
			t.Errorf("ca --help lacks %q:\n%s", want, out)
		}
	}
	out, errOut, code = runCLI("ca", "init", "--help")
	if code != exitOK || errOut != "" {
		t.Fatalf("ca init --help: exit %d, stderr %q", code, errOut)
	}
	for _, want := range []string{
		"Usage: nftmesh ca init", "--trust-domain DOMAIN", `(default "cluster.local")`, "--ttl DURATION",
		`(default "8760h0m0s")`, "--cert FILE", "--key FILE", "--force", "0600", "Exit codes: 0 written", "2 bad flags",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("ca init --help lacks %q:\n%s", want, out)
		}
	}
	if out, _, _ := runCLI("--help"); !strings.Contains(out, "  ca ") {
		t.Errorf("nftmesh --help does not list ca:\n%s", out)
	}
}

func TestCAInit(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	out, errOut, code := runCLI("ca", "init", "--trust-domain", "example.org", "--ttl", "48h", "--cert", certFile, "--key", keyFile)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	for _, want := range []string{"wrote " + certFile, "wrote " + keyFile, "trust domain example.org", "0600"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	certPEM, err := os.ReadFile(certFile)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("certificate file is not PEM")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if !cert.IsCA || cert.Subject.CommonName != "nftmesh root CA example.org" {
		t.Errorf("IsCA %v, CN %q", cert.IsCA, cert.Subject.CommonName)
	}
	if life := time.Until(cert.NotAfter); life < 47*time.Hour || life > 48*time.Hour {
		t.Errorf("valid for %v more, want --ttl 48h", life)
	}
	// The files make an issuer whose certificates verify to the root.
	iss, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{TrustDomain: "example.org"})
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := iss.Certificate(context.Background(), identity.ForServiceAccount("example.org", "default", "sleep"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leaf.Leaf.Verify(x509.VerifyOptions{Roots: iss.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Error(err)
	}
}

func TestCAInitDefaults(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	if _, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile); code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	if _, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{}); err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(cert.URIs) != 1 || cert.URIs[0].String() != "spiffe://cluster.local" {
		t.Errorf("URIs %v, want spiffe://cluster.local", cert.URIs)
	}
	if life := time.Until(cert.NotAfter); life < 8759*time.Hour || life > 8760*time.Hour {
		t.Errorf("valid for %v more, want the default 8760h", life)
	}
}

func TestCAInitRefusesToOverwrite(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, existing := range []string{certFile, keyFile} {
		os.Remove(certFile)
		os.Remove(keyFile)
		if err := os.WriteFile(existing, []byte("precious"), 0o644); err != nil {
			t.Fatal(err)
		}
		out, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile)
		if code != exitError {
			t.Errorf("%s exists: exit %d, want 2", existing, code)
		}
		if !strings.Contains(errOut, existing) || !strings.Contains(errOut, "--force") {
			t.Errorf("%s exists: stderr %q does not name it and --force", existing, errOut)
		}
		if out != "" {
			t.Errorf("stdout %q", out)
		}
		if b, _ := os.ReadFile(existing); string(b) != "precious" {
			t.Errorf("%s overwritten", existing)
		}
		// Nothing else written either.
		entries, _ := os.ReadDir(dir)
		if len(entries) != 1 {
			t.Errorf("%d files in the directory, want the existing one only", len(entries))
		}
	}
}

func TestCAInitForce(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, f := range []string{certFile, keyFile} {
		if err := os.WriteFile(f, []byte("old"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if _, errOut, code := runCLI("ca", "init", "--cert", certFile, "--key", keyFile, "--force"); code != exitOK {
		t.Fatalf("--force: exit %d: %s", code, errOut)
	}
	if st, err := os.Stat(keyFile); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("key file overwritten over a 0644 one: %v, mode %v; want 0600", err, st.Mode().Perm())
	}
	certPEM, _ := os.ReadFile(certFile)
	keyPEM, _ := os.ReadFile(keyFile)
	if _, err := identity.NewCAIssuer(certPEM, keyPEM, identity.CAOptions{}); err != nil {
		t.Errorf("overwritten files: %v", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 2 {
		t.Errorf("%d files in the directory, want 2 (temporary files left?)", len(entries))
	}
}

func TestCAInitBadUsage(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
	for _, tc := range []struct {
		args []string
		why  string
	}{
		{[]string{"ca"}, "Usage: nftmesh ca"},
		{[]string{"ca", "bogus"}, `unknown subcommand "bogus"`},
		{[]string{"ca", "init"}, "--cert and --key are required"},
		{[]string{"ca", "init", "--cert", certFile}, "--cert and --key are required"},
		{[]string{"ca", "init", "--key", keyFile}, "--cert and --key are required"},
		{[]string{"ca", "init", "--cert", certFile, "--key", certFile}, "same file"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--trust-domain", "Evil.Local"}, `"Evil.Local"`},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--trust-domain", ""}, "trust domain is empty"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--ttl", "0s"}, "--ttl 0s is not positive"},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "--ttl", "a year"}, `invalid value "a year" for flag -ttl`},
		{[]string{"ca", "init", "--cert", certFile, "--key", keyFile, "extra"}, `unexpected argument "extra"`},
		{[]string{"ca", "init", "--cert", filepath.Join(dir, "no", "such", "dir", "ca.pem"), "--key", keyFile}, "no such file"},
	} {
		out, errOut, code := runCLI(tc.args...)
		if code != exitError {
			t.Errorf("%q: exit %d, want 2", tc.args, code)
		}
		if !strings.Contains(errOut, tc.why) {
			t.Errorf("%q: stderr %q lacks %q", tc.args, errOut, tc.why)
		}
		if out != "" {
			t.Errorf("%q: stdout %q", tc.args, out)
		}
	}
	// No failure left a file behind (the missing directory one had written the key first).
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("failures left %d files behind", len(entries))
	}
}
