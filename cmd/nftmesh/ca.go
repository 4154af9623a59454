package main

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

const caUsage = `Usage: nftmesh ca <subcommand> [flags]

Manage the mesh certificate authority that signs workload identities (SPIFFE X.509
certificates, one per service account) for HBONE mutual TLS.

Subcommands:
  init      write a new self-signed root CA certificate and key, for demos and tests

Run 'nftmesh ca <subcommand> --help' for its flags.

Exit codes: 0 success (or --help); 2 bad flags, unknown subcommand, or failure.
`

func runCA(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, caUsage)
		return exitError
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, caUsage)
		return exitOK
	case "init":
		return runCAInit(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "nftmesh ca: unknown subcommand %q (see --help)\n", args[0])
	return exitError
}

func runCAInit(args []string, stdout, stderr io.Writer) int {
	var (
		trustDomain, certFile, keyFile string
		ttl                            time.Duration
		force                          bool
	)
	fs := newFlagSet("ca init", "ca init [--trust-domain cluster.local] [--ttl 8760h] --cert ca.pem --key ca-key.pem [--force]",
		"Generate a new self-signed root CA for the mesh (ECDSA P-256, subject O=nftmesh,\n"+
			"CN=nftmesh root CA <trust domain>, URI SAN spiffe://<trust domain>) and write its\n"+
			"certificate (PEM, mode 0644) and private key (PKCS#8 PEM, mode 0600). The proxy signs\n"+
			"short-lived workload certificates with them. For demos and tests: a production mesh\n"+
			"brings its own CA. Existing files are left alone unless --force is given.",
		"0 written (or --help); 2 bad flags, a file exists without --force, or a write failure.", stdout)
	fs.StringVar(&trustDomain, "trust-domain", identity.DefaultTrustDomain, "the mesh's SPIFFE trust `DOMAIN`")
	fs.DurationVar(&ttl, "ttl", 365*24*time.Hour, "how long the root is valid (a Go `DURATION`: 8760h, 720h30m)")
	fs.StringVar(&certFile, "cert", "", "write the CA certificate to `FILE` (required)")
	fs.StringVar(&keyFile, "key", "", "write the CA private key to `FILE` (required)")
	fs.BoolVar(&force, "force", false, "overwrite existing files")
	if done, code := parseFlags(fs, args, stderr); done {
		return code
	}
	fail := func(format string, a ...any) int {
		fmt.Fprintf(stderr, "nftmesh ca init: "+format+"\n", a...)
		return exitError
	}
	switch {
	case certFile == "" || keyFile == "":
		return fail("--cert and --key are required (see --help)")
	case filepath.Clean(certFile) == filepath.Clean(keyFile):
		return fail("--cert and --key are the same file, %s", certFile)
	case ttl <= 0:
		return fail("--ttl %v is not positive", ttl)
	}
	if !force {
		for _, f := range []string{certFile, keyFile} {
			if _, err := os.Lstat(f); err == nil {
				return fail("%s exists; not overwriting it without --force", f)
			} else if !errors.Is(err, os.ErrNotExist) {
				return fail("%v", err)
			}
		}
	}
	certPEM, keyPEM, err := identity.GenerateRoot(trustDomain, ttl)
	if err != nil {
		return fail("%v", err)
	}
	// The key first: a certificate without its key is of no use.
	if err := writeFileAtomic(keyFile, keyPEM, 0o600, force); err != nil {
		return fail("%v", err)
	}
	if err := writeFileAtomic(certFile, certPEM, 0o644, force); err != nil {
		if !force {
			os.Remove(keyFile) // written just now, by us
		}
		return fail("%v", err)
	}
	block, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fail("%v", err)
	}
	sum := sha256.Sum256(cert.Raw)
	fmt.Fprintf(stdout, "wrote %s: root CA certificate %q, trust domain %s, valid until %s\n",
		certFile, cert.Subject.CommonName, trustDomain, cert.NotAfter.UTC().Format(time.RFC3339))
	fmt.Fprintf(stdout, "  SHA-256 fingerprint %s\n", colonHex(sum[:]))
	fmt.Fprintf(stdout, "wrote %s: its ECDSA P-256 private key (PKCS#8, mode 0600)\n", keyFile)
	return exitOK
}

// writeFileAtomic writes data to path with mode perm: through a temporary file renamed
// over path when overwrite is set (so that an existing file's mode does not carry over),
// else by creating path exclusively (so that a file appearing meanwhile is not clobbered).
func writeFileAtomic(path string, data []byte, perm os.FileMode, overwrite bool) error {
	if !overwrite {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
		if err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%s exists; not overwriting it without --force", path)
			}
			return err
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			os.Remove(path)
			return err
		}
		if err := f.Close(); err != nil {
			os.Remove(path)
			return err
		}
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // a no-op once renamed
	if err := tmp.Chmod(perm); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

func colonHex(b []byte) string {
	var s strings.Builder
	for i, c := range b {
		if i > 0 {
			s.WriteByte(':')
		}
		fmt.Fprintf(&s, "%02X", c)
	}
	return s.String()
}
