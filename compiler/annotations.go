package compiler

import (
	"fmt"
	"sort"
	"strings"
)

// The pod annotations Istio ambient reads, and nftmesh with it.
const (
	AnnotationBypassInboundCapture     = "ambient.istio.io/bypass-inbound-capture"
	AnnotationDNSCapture               = "ambient.istio.io/dns-capture"
	AnnotationRerouteVirtualInterfaces = "istio.io/reroute-virtual-interfaces"
)

// KnownAnnotations lists the annotations ApplyAnnotations reads.
var KnownAnnotations = []string{
	AnnotationBypassInboundCapture,
	AnnotationDNSCapture,
	AnnotationRerouteVirtualInterfaces,
}

// ApplyAnnotations returns p with the per-pod knobs found in a pod's annotations laid
// over it. Annotations it does not know are ignored (pods carry many); a known one with
// a bad value is an error naming it. Interface names are checked by Resolve.
func ApplyAnnotations(p PodOverrides, annotations map[string]string) (PodOverrides, error) {
	keys := make([]string, 0, len(annotations))
	for k := range annotations {
		keys = append(keys, k)
	}
	sort.Strings(keys) // deterministic error order
	for _, key := range keys {
		value := annotations[key]
		switch key {
		case AnnotationBypassInboundCapture:
			b, err := parseBoolAnnotation(key, value)
			if err != nil {
				return p, err
			}
			p.BypassInboundCapture = b
		case AnnotationDNSCapture:
			b, err := parseBoolAnnotation(key, value)
			if err != nil {
				return p, err
			}
			p.DNSCapture = &b
		case AnnotationRerouteVirtualInterfaces:
			p.RerouteVirtualInterfaces = nil
			for _, name := range strings.Split(value, ",") {
				if name = strings.TrimSpace(name); name != "" {
					p.RerouteVirtualInterfaces = append(p.RerouteVirtualInterfaces, name)
				}
			}
		}
	}
	return p, nil
}

func parseBoolAnnotation(key, value string) (bool, error) {
	switch value {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("annotation %s: %q is not \"true\" or \"false\"", key, value)
}
