# nftmesh tasks. `just --list` shows them.

bin := "bin/nftmesh"

# Build the nftmesh binary into bin/.
build:
    go build -o {{bin}} ./cmd/nftmesh

# Build, then print the pod ruleset of the built-in default intent.
compile *args: build
    {{bin}} compile {{args}}

# Run every test. Needs root: tests create network namespaces and run the real nft.
test: lint
    go test -count=1 ./...

# Rewrite the golden rulesets in fixtures/golden from fixtures/intents.
golden:
    go test -count=1 ./compiler -run 'TestGolden$' -update

# Formatting and static checks.
lint:
    @test -z "$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
    go vet ./...

# Fuzz the intent parser and compiler for a while.
fuzz time="30s":
    go test ./compiler -run '^$' -fuzz FuzzParseCompile -fuzztime {{time}}
