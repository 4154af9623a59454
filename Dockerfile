# syntax=docker/dockerfile:1
# The image deploy/'s DaemonSets run: nftmesh (agent, proxy, CLI) and nftmesh-cni, static
# binaries (CGO_ENABLED=0), in /usr/local/bin, side by side: the agent installs the
# nftmesh-cni beside its own executable onto the node. `just image` builds it:
#
#   docker build -t ghcr.io/nftmesh/nftmesh:dev .
#   docker build --build-arg VERSION=v0.1.0 --platform linux/amd64,linux/arm64 ...
#
# The base is distroless/static (CA certificates, tzdata, /etc/passwd; no shell, no
# package manager) as root: the agent needs root on the node anyway (privileged), and the
# proxy needs root for its capabilities (NET_ADMIN, SYS_ADMIN) to be effective. Pin the
# bases by digest in a release build.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS TARGETARCH
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X main.version=$VERSION" -o /out/nftmesh ./cmd/nftmesh && \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w" -o /out/nftmesh-cni ./cmd/nftmesh-cni

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/nftmesh /out/nftmesh-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/nftmesh"]
