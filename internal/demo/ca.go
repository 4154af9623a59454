package demo

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/nftmesh/nftmesh/proxy/identity"
)

// showCA shows that every workload certificate came from the CA service: its count of
// certificates issued, no CA key on any node, and one request it refuses (a node's proxy
// asking for the identity of a pod on the other node).
func (d *demo) showCA(ctx context.Context) error {
	d.step("The CA service: every workload certificate came from it, and no node holds its key")
	d.say("GET http://%s/metrics:", d.caHTTP)
	metrics, err := httpGet("http://" + d.caHTTP + "/metrics")
	if err != nil {
		return err
	}
	issued := -1.0
	for line := range strings.Lines(metrics) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "nftmesh_ca_certificates_issued_total "):
			d.indent(line)
			issued, _ = strconv.ParseFloat(strings.TrimPrefix(line, "nftmesh_ca_certificates_issued_total "), 64)
		case strings.HasPrefix(line, "nftmesh_ca_refusals_total{") && !strings.HasSuffix(line, " 0"):
			d.indent(line)
		}
	}
	// httpbin's and sleep's identities on node1, notsleep's on node2.
	d.check(issued >= 3, "the CA issued %v certificates (at least one per identity in use: httpbin, sleep, notsleep)", issued)

	var holders []string
	for _, n := range d.nodes {
		if slices.ContainsFunc(n.proxyArgs, func(a string) bool { return a == "--ca-key" || a == "--ca-cert" }) {
			holders = append(holders, n.name+"'s proxy flags")
		}
		err := filepath.WalkDir(n.dir, func(path string, e fs.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return err
			}
			if data, err := os.ReadFile(path); err == nil && bytes.Contains(data, bytes.TrimSpace(d.caKey)) {
				holders = append(holders, path)
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	d.check(len(d.caKey) > 0 && len(holders) == 0,
		"no node holds the CA key: the proxies run with --ca-address, --ca-root-file and --ca-token-file only, and no file of node1's or node2's has the key%s",
		strings.Join(append([]string{""}, holders...), "; found in: "))

	// What a compromised node could try: node1's proxy token asks for the identity of
	// notsleep, whose only pod runs on node2.
	n1 := d.nodes[0]
	want := identity.ForServiceAccount(identity.DefaultTrustDomain, meshNamespace, "notsleep")
	d.say("node1's proxy token asks the CA for %s (notsleep runs on node2 only):", want)
	issuer, err := identity.NewRemoteIssuer(identity.RemoteOptions{Address: d.caAddr, RootFile: d.caRoot, TokenFile: n1.caToken,
		Timeout: 10 * time.Second, Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer issuer.Close()
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	_, err = issuer.Certificate(cctx, want)
	if err != nil {
		d.indent(err.Error())
	}
	var se interface{ GRPCStatus() *status.Status }
	d.check(err != nil && errors.As(err, &se) && se.GRPCStatus().Code() == codes.PermissionDenied,
		"the CA refuses it (PermissionDenied): a node gets only the identities of its own pods")
	if metrics, err = httpGet("http://" + d.caHTTP + "/metrics"); err != nil {
		return err
	}
	counted := false
	for line := range strings.Lines(metrics) {
		if strings.HasPrefix(line, `nftmesh_ca_refusals_total{reason="no-pod-on-node"} `) {
			d.indent(line)
			counted = !strings.HasSuffix(strings.TrimSpace(line), " 0")
		}
	}
	d.check(counted, "the CA counts the refusal (nftmesh_ca_refusals_total, reason no-pod-on-node)")
	return nil
}
