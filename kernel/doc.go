// Package kernel is where nftmesh's model (package ruleset) meets the Linux kernel, in
// one network namespace at a time:
//
//   - Conn applies a ruleset.Table as one nftables transaction (nothing when the live
//     table already matches), deletes it, edits single set elements, and reads the table
//     back as a Live, which renders and compares against the model; Check and
//     ApplyChecked split an apply into a read-only look and a write made under a lock
//     the caller holds (package dataplane), so that a no-op takes no lock;
//   - Cache lets a long-running applier skip the read while the namespace's nftables
//     generation has not moved;
//   - RoutingConn checks, adds and removes a pod's policy routing (ruleset.Routing).
//
// encode_linux.go encodes a transaction straight from the model into the bytes of one
// nfnetlink batch, the bytes google/nftables v0.3.0 produced for it (docs/encoding.md);
// the batch goes out on a blocking netlink socket of our own. Every socket belongs to the
// namespace of the thread that made it: NewConn and NewRoutingConn must run on a thread
// inside the target namespace (netns.NS.Do or DoHere); Dial does that for a Conn.
// EncodeFresh and FreshWrites.Send measure the kernel's own cost of an enroll.
//
// The package is Linux only; ruleset, the model, builds anywhere.
package kernel
