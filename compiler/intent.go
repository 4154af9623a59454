// Package compiler turns a declarative Intent into nftables rulesets: the in-pod ruleset
// that captures a pod's traffic for the node proxy, and the node (host) ruleset that
// gives kubelet probes their well-known source. It is pure: no I/O, no globals, and the
// same intent always compiles to the same ruleset.
package compiler

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// APIVersion and Kind identify an intent document.
const (
	APIVersion = "nftmesh.dev/v1alpha1"
	Kind       = "Intent"
)

// Intent is the declarative description of how nftmesh captures traffic. Unset fields
// take Istio's defaults (see Defaults and the README's intent reference).
type Intent struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Metadata   Metadata `json:"metadata,omitempty"`
	Spec       Spec     `json:"spec"`
}

// Metadata names an intent, for people.
type Metadata struct {
	Name string `json:"name,omitempty"`
}

// Spec holds the node-wide settings and the per-pod overrides.
type Spec struct {
	Marks          Marks        `json:"marks,omitempty"`
	Ports          Ports        `json:"ports,omitempty"`
	ProbeSource    ProbeSource  `json:"probeSource,omitempty"`
	InboundCapture *CaptureMode `json:"inboundCapture,omitempty"`
	DNSCapture     *bool        `json:"dnsCapture,omitempty"`
	IPv6           *bool        `json:"ipv6,omitempty"`
	Pod            PodOverrides `json:"pod,omitempty"`
}

// Marks are the packet and connection marks nftmesh shares with the proxy.
type Marks struct {
	// Proxy is set (SO_MARK) on every socket the proxy opens in a pod; packets that carry
	// it are never captured.
	Proxy *MaskedMark `json:"proxy,omitempty"`
	// Connection marks connections the proxy originated inbound, so that replies route
	// back to it through the policy routing table.
	Connection *MaskedMark `json:"connection,omitempty"`
}

// MaskedMark is a mark value compared and written under a mask.
type MaskedMark struct {
	Value *Number `json:"value,omitempty"`
	Mask  *Number `json:"mask,omitempty"`
}

// Ports are the proxy's listeners in the pod's network namespace. They are ints, not
// uint16, so that an out-of-range value reaches validation and gets a clear error.
type Ports struct {
	Outbound         *int `json:"outbound,omitempty"`
	InboundPlaintext *int `json:"inboundPlaintext,omitempty"`
	HBONE            *int `json:"hbone,omitempty"`
	DNS              *int `json:"dns,omitempty"`
}

// ProbeSource is the address kubelet probes are SNATed to on the node.
type ProbeSource struct {
	IPv4 *string `json:"ipv4,omitempty"`
	IPv6 *string `json:"ipv6,omitempty"`
}

// CaptureMode is how inbound TCP reaches the proxy.
type CaptureMode string

const (
	// CaptureTProxy delivers inbound TCP with TPROXY in the mangle prerouting hook: the
	// accepted socket's local address is the original destination (Istio 1.21).
	CaptureTProxy CaptureMode = "tproxy"
	// CaptureRedirect uses nat REDIRECT in prerouting: the proxy reads SO_ORIGINAL_DST
	// (current Istio).
	CaptureRedirect CaptureMode = "redirect"
)

// PodOverrides are the per-pod knobs; the agent and `nftmesh compile --pod-annotation`
// take them from pod annotations.
type PodOverrides struct {
	// BypassInboundCapture turns inbound capture off for the pod (the mark rules and
	// HBONE stay).
	BypassInboundCapture bool `json:"bypassInboundCapture,omitempty"`
	// DNSCapture, when set, overrides the node-wide DNSCapture for the pod.
	DNSCapture *bool `json:"dnsCapture,omitempty"`
	// RerouteVirtualInterfaces lists interfaces whose inbound TCP is treated as outbound.
	RerouteVirtualInterfaces []string `json:"rerouteVirtualInterfaces,omitempty"`
}

// Number is a 32-bit value as written in YAML: a number (1337, 0x539) or a string
// ("0x539"). It is kept as text and parsed by Resolve, so that a bad value is reported
// with its field path.
type Number string

func (n *Number) UnmarshalJSON(b []byte) error {
	*n = Number(strings.Trim(string(b), `"`))
	return nil
}

func (n Number) parse() (uint32, error) {
	v, err := strconv.ParseUint(string(n), 0, 32)
	if err != nil {
		return 0, fmt.Errorf("%q is not a 32-bit number (write 1337 or 0x539)", string(n))
	}
	return uint32(v), nil
}

// Parse decodes an intent document strictly: unknown fields (all of them, each with its
// path), duplicate keys, a wrong apiVersion or kind are errors. The data holds one intent:
// a second YAML document (after ---), valid or not, is an error naming it, so that
// nothing in the file is silently ignored; empty documents (a leading ---, comments)
// are allowed.
func Parse(data []byte) (Intent, error) {
	var in Intent
	if len(bytes.TrimSpace(data)) == 0 {
		return in, fmt.Errorf("intent: empty document")
	}
	doc, err := oneDocument(data)
	if err != nil {
		return in, fmt.Errorf("intent: %w", err)
	}
	data = doc
	var generic any
	if err := yaml.Unmarshal(data, &generic); err != nil {
		return in, fmt.Errorf("intent: %w", cleanDecodeError(err))
	}
	if err := unknownFields(generic, reflect.TypeOf(in), ""); err != nil {
		return in, fmt.Errorf("intent: %w", err)
	}
	if err := yaml.UnmarshalStrict(data, &in); err != nil {
		return in, fmt.Errorf("intent: %w", cleanDecodeError(err))
	}
	if in.APIVersion != APIVersion {
		return in, fmt.Errorf("intent: apiVersion: %q is not supported (want %q)", in.APIVersion, APIVersion)
	}
	if in.Kind != Kind {
		return in, fmt.Errorf("intent: kind: %q is not supported (want %q)", in.Kind, Kind)
	}
	return in, nil
}

// oneDocument returns the one document of a YAML stream that has content, with the lines
// before it blanked so that decode errors keep the file's line numbers. Documents are cut
// at lines that start with "---" followed by nothing, white space or a comment, or
// content ("--- {a: 1}").
func oneDocument(data []byte) ([]byte, error) {
	type document struct {
		n, line    int // 1-based
		sep        int // offset of its "---" line; -1 for the first document
		start, end int // offsets of its content in data
	}
	var docs []document
	cur := document{n: 1, line: 1, sep: -1}
	line := 1
	for off := 0; off < len(data); line++ {
		next := len(data)
		if i := bytes.IndexByte(data[off:], '\n'); i >= 0 {
			next = off + i + 1
		}
		if rest, ok := bytes.CutPrefix(data[off:next], []byte("---")); ok && (len(bytes.TrimSpace(rest)) == 0 || rest[0] == ' ' || rest[0] == '\t') {
			cur.end = off
			docs = append(docs, cur)
			cur = document{n: cur.n + 1, line: line, sep: off, start: off + 3}
		}
		off = next
	}
	cur.end = len(data)
	docs = append(docs, cur)
	// What comes before a leading "---" (nothing, blank lines, comments) is no document
	// in YAML: the "---" starts the first one. Count from there.
	if empty, err := emptyDocument(data[docs[0].start:docs[0].end]); len(docs) > 1 && err == nil && empty {
		docs = docs[1:]
		for i := range docs {
			docs[i].n--
		}
	}

	var found *document
	for i := range docs {
		d := &docs[i]
		if empty, err := emptyDocument(data[d.start:d.end]); err == nil && empty {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("document %d (line %d): a file holds one intent, and document %d (line %d) is one already",
				d.n, d.line, found.n, found.line)
		}
		found = d
	}
	if found == nil {
		return nil, errors.New("empty document")
	}
	// Blank everything before the document (newlines kept), so that line numbers hold;
	// its "---" stays, for content on the same line.
	keep := found.start
	if found.sep >= 0 {
		keep = found.sep
	}
	out := make([]byte, 0, found.end)
	for _, b := range data[:keep] {
		if b == '\n' {
			out = append(out, b)
		} else {
			out = append(out, ' ')
		}
	}
	return append(out, data[keep:found.end]...), nil
}

// emptyDocument reports whether a YAML document holds nothing but white space and
// comments. A document that does not parse is not empty.
func emptyDocument(doc []byte) (bool, error) {
	if len(bytes.TrimSpace(doc)) == 0 {
		return true, nil
	}
	var v any
	if err := yaml.Unmarshal(doc, &v); err != nil {
		return false, err
	}
	return v == nil, nil
}

// unknownFields walks a decoded YAML value against the Go type it will fill and names
// every key the type does not have, with its path and the keys it does have.
func unknownFields(v any, t reflect.Type, path string) error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return nil // a type mismatch; the typed decode reports it
		}
		fields := map[string]reflect.Type{}
		var known []string
		for i := 0; i < t.NumField(); i++ {
			name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
			fields[name] = t.Field(i).Type
			known = append(known, name)
		}
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var errs []error
		for _, k := range keys {
			ft, ok := fields[k]
			if !ok {
				errs = append(errs, fmt.Errorf("%s: unknown field %q (known: %s)", join(path, k), k, strings.Join(known, ", ")))
				continue
			}
			if err := unknownFields(m[k], ft, join(path, k)); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	case reflect.Slice:
		items, _ := v.([]any)
		var errs []error
		for i, item := range items {
			if err := unknownFields(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				errs = append(errs, err)
			}
		}
		return errors.Join(errs...)
	}
	return nil
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

var typeError = regexp.MustCompile(`cannot unmarshal (\w+) into (?:Go struct )?field \w+\.(\S+) of type (\S+)`)

// cleanDecodeError drops the JSON-conversion wording that sigs.k8s.io/yaml adds, which
// means nothing to someone who wrote YAML, and puts the field path first.
func cleanDecodeError(err error) error {
	msg := err.Error()
	for _, prefix := range []string{"error unmarshaling JSON: ", "while decoding JSON: ", "error converting YAML to JSON: ", "json: ", "yaml: "} {
		msg = strings.TrimPrefix(msg, prefix)
	}
	msg = typeError.ReplaceAllString(msg, "$2: a $1 is not a valid $3")
	return errors.New(msg)
}

// Marshal returns the intent as YAML (used to print the built-in default).
func (in Intent) Marshal() ([]byte, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	return yaml.JSONToYAML(b)
}
