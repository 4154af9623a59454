package compiler

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// FuzzIntentRoundTrip decodes arbitrary bytes as an intent, resolves and compiles it. It
// must never panic; what Resolve accepts must compile for both targets, render, and pass
// the ruleset's own validation; and an accepted intent must marshal and parse back to an
// intent that resolves to the same Config and compiles to the same text. Seeded with
// every fixture in fixtures/intents.
//
//	go test ./compiler -run '^$' -fuzz FuzzIntentRoundTrip -fuzztime 60s
func FuzzIntentRoundTrip(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(intentDir, "*.yaml"))
	if len(files) == 0 {
		f.Fatal("no intents to seed the corpus")
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Add([]byte(header + "spec:\n  ports:\n    outbound: 1\n"))
	f.Add([]byte(header + "spec:\n  marks:\n    proxy: {value: \"0x539\", mask: 4095}\n  pod: {rerouteVirtualInterfaces: [\"eth*\", \"e*th\", \"l*\"]}\n"))
	f.Add([]byte(header + "spec:\n  probeSource: {ipv4: 10.0.0.1, ipv6: \"::ffff:10.0.0.1\"}\n  inboundCapture: redirect\n"))
	f.Add([]byte("---\n# nothing\n---\n" + header + "spec: {}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		in, err := Parse(data)
		if err != nil {
			return
		}
		cfg, err := Resolve(in)
		if err != nil {
			return
		}
		texts := map[Target]string{}
		for _, target := range []Target{TargetPod, TargetHost} {
			tbl, err := Compile(in, target)
			if err != nil {
				t.Fatalf("Resolve accepts what Compile(%s) refuses: %v", target, err)
			}
			if err := tbl.Validate(); err != nil {
				t.Fatalf("compiled %s ruleset does not validate: %v", target, err)
			}
			texts[target] = tbl.Render()
		}
		out, err := in.Marshal()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		back, err := Parse(out)
		if err != nil {
			t.Fatalf("the marshalled intent does not parse: %v\n%s", err, out)
		}
		cfg2, err := Resolve(back)
		if err != nil {
			t.Fatalf("the marshalled intent does not resolve: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(cfg, cfg2) {
			t.Fatalf("round trip changed the config:\n%+v\n%+v\n%s", cfg, cfg2, out)
		}
		for target, want := range texts {
			if tbl, err := Compile(back, target); err != nil || tbl.Render() != want {
				t.Fatalf("round trip compiles %s differently (%v)", target, err)
			}
		}
	})
}
