// Package e2e holds nftmesh's end-to-end tests and benchmarks: two "nodes" and their
// "pods" as network namespaces on one machine, in-pod rules applied with the project's
// apply code, one `nftmesh proxy` process per node, and the tests playing the agent's
// side of ZDS. Everything lives in the tests; this file only documents the package.
//
// Run as root: go test ./e2e/ (tests) and go test -run '^$' -bench . ./e2e/ (benchmarks).
package e2e
