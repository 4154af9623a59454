package workload

import (
	"net/netip"
	"strings"
	"testing"
)

const doc = `
workloads:
- {uid: u1, name: sleep, namespace: demo, serviceAccount: sleep, ips: [10.0.1.2, "fd00::2"], inMesh: true, labels: {app: sleep}}
- {uid: u2, name: httpbin-a, namespace: demo, serviceAccount: httpbin, ips: [10.0.1.3], inMesh: true}
- {uid: u3, name: httpbin-b, namespace: demo, serviceAccount: httpbin, ips: [10.0.2.3], inMesh: true}
- {uid: u4, name: legacy, namespace: other, ips: [10.0.2.9]}
services:
- name: httpbin
  namespace: demo
  vips: [10.96.0.10]
  ports: [{port: 80, targetPort: 8080}]
  endpoints: [{uid: u2, ready: true}, {uid: u3, ready: true}, {uid: u4, ready: false}]
- name: httpbin-b
  namespace: demo
  vips: [10.96.0.11]
  ports: [{port: 80, targetPort: 8080}, {port: 90}]
  endpoints: [{uid: u3, ready: true}]
`

func TestStatic(t *testing.T) {
	f, err := Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewStatic(f)
	if err != nil {
		t.Fatal(err)
	}
	if w, ok := s.WorkloadByIP(netip.MustParseAddr("fd00::2")); !ok || w.Name != "sleep" {
		t.Errorf("by IPv6: %v %v", w, ok)
	}
	if w, ok := s.WorkloadByIP(netip.MustParseAddr("::ffff:10.0.1.2")); !ok || w.Name != "sleep" {
		t.Errorf("by v4-mapped IP: %v %v", w, ok)
	}
	if w, _ := s.WorkloadByUID("u4"); w.ServiceAccount != "default" || w.InMesh {
		t.Errorf("defaults: %+v", w)
	}
	seen := map[string]int{}
	for i := 0; i < 10; i++ {
		tg, ok := s.Resolve(netip.MustParseAddrPort("10.96.0.10:80"))
		if !ok || tg.Service == nil || tg.Addr.Port() != 8080 {
			t.Fatalf("resolve VIP: %+v %v", tg, ok)
		}
		seen[tg.Workload.Name]++
	}
	if seen["httpbin-a"] == 0 || seen["httpbin-b"] == 0 || seen["legacy"] != 0 {
		t.Errorf("endpoints picked: %v (want both ready ones, never the unready)", seen)
	}
	if tg, ok := s.Resolve(netip.MustParseAddrPort("10.0.1.3:9000")); !ok || tg.Workload.UID != "u2" || tg.Service != nil || tg.Addr.Port() != 9000 {
		t.Errorf("resolve pod IP: %+v", tg)
	}
	if _, ok := s.Resolve(netip.MustParseAddrPort("192.0.2.1:80")); ok {
		t.Error("unknown IP resolved")
	}
	if _, ok := s.Resolve(netip.MustParseAddrPort("10.96.0.10:81")); ok {
		t.Error("unknown service port resolved")
	}
	if h := (&Service{Name: "a", Namespace: "b", Hostname: "a.b.svc.corp.example"}).Host(); h != "a.b.svc.corp.example" {
		t.Errorf("Host with a hostname: %s", h)
	}
	// The destination's view: a connection to an endpoint's target port belongs to the
	// first service (in file order) that has it; a port without a target port targets itself.
	if svc, ok := s.ServiceOf("u3", 8080); !ok || svc.Name != "httpbin" || svc.Host() != "httpbin.demo.svc.cluster.local" {
		t.Errorf("ServiceOf(u3, 8080): %+v %v", svc, ok)
	}
	if svc, ok := s.ServiceOf("u3", 90); !ok || svc.Name != "httpbin-b" {
		t.Errorf("ServiceOf(u3, 90): %+v %v", svc, ok)
	}
	for _, c := range []struct {
		uid  string
		port uint16
	}{{"u3", 80}, {"u1", 8080}} {
		if svc, ok := s.ServiceOf(c.uid, c.port); ok {
			t.Errorf("ServiceOf(%s, %d): %s, want none", c.uid, c.port, svc.Name)
		}
	}
}

func TestStaticErrors(t *testing.T) {
	cases := map[string]string{
		"workloads:\n- {uid: a, name: x, namespace: ns, ips: [10.0.0.1]}\n- {uid: a, name: y, namespace: ns}\n":                  `uid "a" is used twice`,
		"workloads:\n- {uid: a, name: x, namespace: ns, ips: [10.0.0.1]}\n- {uid: b, name: y, namespace: ns, ips: [10.0.0.1]}\n": "IP 10.0.0.1 is also ns/x's",
		"workloads:\n- {uid: a, namespace: ns}\n":                            "uid, name and namespace are required",
		"services:\n- {name: s, endpoints: [{uid: nope}]}\n":                 `endpoint uid "nope" is not a workload`,
		"workloads:\n- {uid: a, name: x, namespace: ns, ipz: []}\n":          `unknown field "ipz"`,
		"workloads:\n- {uid: a, name: x, namespace: ns, ips: [not-an-ip]}\n": "not-an-ip",
	}
	for in, want := range cases {
		f, err := Parse([]byte(in))
		if err == nil {
			_, err = NewStatic(f)
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want %q", in, err, want)
		}
	}
}
