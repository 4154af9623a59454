# nftmesh tasks. `just --list` shows them.

bin := "bin/nftmesh"

# Build the nftmesh binary into bin/.
build:
    go build -o {{bin}} ./cmd/nftmesh

# Build, then print the pod ruleset of the built-in default intent.
compile *args: build
    {{bin}} compile {{args}}

# The seed's walkthrough on this machine (as root): a real kube-apiserver and etcd, two
# nodes running nftmesh's agent and proxy, sleep, notsleep and httpbin, then the L4 policy.
# Builds what it needs first (the control plane once: minutes cold, then cached).
demo:
    #!/usr/bin/env bash
    set -euo pipefail
    echo "demo: the control plane (kube-apiserver, etcd, kubectl): scripts/controlplane"
    cp=$(./scripts/controlplane)
    echo "demo: building nftmesh, nftmesh-cni and nftmesh-demo into bin/"
    for c in nftmesh nftmesh-demo; do go build -o bin/$c ./cmd/$c; done
    # The plugin as it ships: static (a dynamically linked one starts slower on every ADD).
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o bin/nftmesh-cni ./cmd/nftmesh-cni
    exec bin/nftmesh-demo run --bin-dir bin --controlplane-dir "$cp" --repo-dir .

# Run every test. Needs root: tests create network namespaces and run the real nft.
test: lint
    go test -race -count=1 ./...

# Rewrite the golden rulesets in fixtures/golden from fixtures/intents, then the recorded
# netlink encoding of each in kernel/testdata, then the dataplane Fake's dump.
golden:
    go test -count=1 ./compiler -run 'TestGolden$' -update
    go test -count=1 ./kernel -run 'TestEncodeGolden$' -update
    go test -count=1 ./dataplane -run 'TestFakeDump$' -update

# Formatting and static checks.
lint:
    @test -z "$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
    go vet ./...

# Fuzz the intent parser and compiler for a while.
fuzz time="30s":
    go test ./compiler -run '^$' -fuzz FuzzParseCompile -fuzztime {{time}}

# Targets: the intent decoder and compiler, the policy decoder and evaluators, the ZDS
# client's handling of a packet, the HBONE CONNECT request parser. Their seed corpora
# also run in plain `go test`.
# Run every fuzz target for `time`, one after another.
fuzz-all time="30s":
    go test ./compiler -run '^$' -fuzz '^FuzzIntentRoundTrip$' -fuzztime {{time}}
    go test ./compiler -run '^$' -fuzz '^FuzzParseCompile$' -fuzztime {{time}}
    go test ./policy -run '^$' -fuzz '^FuzzParseDecide$' -fuzztime {{time}}
    go test ./zds -run '^$' -fuzz '^FuzzClientHandle$' -fuzztime {{time}}
    go test ./proxy/hbone -run '^$' -fuzz '^FuzzParseRequest$' -fuzztime {{time}}

# Regenerate zds/zdspb from zds/zds.proto (Debian's protobuf-compiler, and
# protoc-gen-go at the version of google.golang.org/protobuf in go.mod).
proto:
    go build -o bin/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
    protoc --proto_path=. --plugin=protoc-gen-go=bin/protoc-gen-go --go_out=. --go_opt=module=github.com/nftmesh/nftmesh zds/zds.proto

# nftmesh and nftmesh-cni, static, on distroless: what deploy/'s DaemonSets run. Needs a
# Docker engine (the development machine has none).
# Build the container image (Dockerfile).
image tag="ghcr.io/nftmesh/nftmesh:dev":
    docker build -t {{tag}} .
