package ruleset

// Routing is a pod namespace's policy routing: `ip rule add fwmark Mark/Mask lookup
// Table pref Priority` and `ip route add local default dev lo table Table`, for IPv4
// and, when IPv6 is set, for IPv6. It is model, like Table: the kernel package writes it.
type Routing struct {
	Mark     uint32
	Mask     uint32
	Table    int
	Priority int
	IPv6     bool
}

// Desired is everything one namespace should hold: nftmesh's table and, for a pod, its
// policy routing (nil for the node, which has none).
type Desired struct {
	Table   *Table
	Routing *Routing
}
