// Package compiler turns a declarative Intent into nftables rulesets: the in-pod ruleset
// that captures a pod's traffic for the node proxy, and the node (host) ruleset that
// gives kubelet probes their well-known source. It is pure: no I/O, no globals, and the
// same intent always compiles to the same ruleset.
package compiler

import (
	"bytes"
	"encoding/json"
	"fmt"
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
	Value *Hex32 `json:"value,omitempty"`
	Mask  *Hex32 `json:"mask,omitempty"`
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

// Hex32 is a 32-bit value written in YAML as a number (1337, 0x539) or a string ("0x539").
type Hex32 uint32

func (h *Hex32) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	v, err := strconv.ParseUint(s, 0, 32)
	if err != nil {
		return fmt.Errorf("%s is not a 32-bit number (write 1337 or 0x539)", string(b))
	}
	*h = Hex32(v)
	return nil
}

func (h Hex32) MarshalJSON() ([]byte, error) {
	return []byte(fmt.Sprintf(`"0x%x"`, uint32(h))), nil
}

func (h Hex32) String() string { return fmt.Sprintf("0x%x", uint32(h)) }

// Parse decodes an intent document strictly: unknown fields, a wrong apiVersion or kind,
// and trailing documents are errors.
func Parse(data []byte) (Intent, error) {
	var in Intent
	if len(bytes.TrimSpace(data)) == 0 {
		return in, fmt.Errorf("intent: empty document")
	}
	if err := yaml.UnmarshalStrict(data, &in); err != nil {
		return in, fmt.Errorf("intent: %w", cleanJSONError(err))
	}
	if in.APIVersion != APIVersion {
		return in, fmt.Errorf("intent: apiVersion: %q is not supported (want %q)", in.APIVersion, APIVersion)
	}
	if in.Kind != Kind {
		return in, fmt.Errorf("intent: kind: %q is not supported (want %q)", in.Kind, Kind)
	}
	return in, nil
}

// cleanJSONError drops the JSON-conversion wording that sigs.k8s.io/yaml adds, which
// means nothing to someone who wrote YAML.
func cleanJSONError(err error) error {
	msg := err.Error()
	for _, prefix := range []string{"error unmarshaling JSON: while decoding JSON: ", "error unmarshaling JSON: ", "json: "} {
		msg = strings.TrimPrefix(msg, prefix)
	}
	msg = strings.ReplaceAll(msg, "Go struct field ", "field ")
	return fmt.Errorf("%s", msg)
}

// Marshal returns the intent as YAML (used to print the built-in default).
func (in Intent) Marshal() ([]byte, error) {
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	return yaml.JSONToYAML(b)
}
