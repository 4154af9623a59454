module github.com/nftmesh/nftmesh

go 1.26
