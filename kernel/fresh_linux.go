package kernel

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/nftmesh/nftmesh/ruleset"
)

// FreshWrites are the writes of a fresh enroll, encoded once, ahead of time: the policy
// routing's adds (one rule and one route per family, framed as Ensure sends them) and the
// table's create batch (as Apply sends it into a namespace without the table). Send
// replays them over sockets already open in a namespace that holds neither, and waits for
// the kernel's answers: what it costs is the kernel's own work for an enroll, the floor
// that package dataplane's benchmarks measure an enroll against.
type FreshWrites struct {
	routing *msgBuf // nil without routing (the node)
	table   *batch
}

// EncodeFresh encodes d's writes into a namespace that holds none of it.
func EncodeFresh(d ruleset.Desired) (*FreshWrites, error) {
	if d.Table == nil {
		return nil, errors.New("no table")
	}
	rb := d.Table.RuleBodies()
	if err := d.Table.ValidateBodies(rb); err != nil {
		return nil, fmt.Errorf("table inet %s: invalid: %w", d.Table.Name, err)
	}
	b, err := encodeApply(d.Table, nil, rb)
	if err != nil {
		return nil, err
	}
	w := &FreshWrites{table: b}
	if d.Routing != nil {
		var reqs []request
		for _, f := range routeFamilies(*d.Routing) {
			if f.wanted {
				reqs = append(reqs, ruleMsg(unix.RTM_NEWRULE, f, *d.Routing), routeMsg(unix.RTM_NEWROUTE, f, *d.Routing))
			}
		}
		w.routing = frameRequests(reqs)
	}
	return w, nil
}

// Writes is the number of messages Send writes: routing requests, then the table's
// batch between BATCH_BEGIN and BATCH_END.
func (w *FreshWrites) Writes() (routing, table int) {
	if w.routing != nil {
		routing = w.routing.count()
	}
	return routing, w.table.writes()
}

// Send writes the routing over rc (nil when there is none), then the table over c, as
// Manager.Apply orders them, and fails unless the kernel took every message.
func (w *FreshWrites) Send(c *Conn, rc *RoutingConn) error {
	if w.routing != nil {
		errs, err := rc.raw.sendRequests(w.routing)
		if err != nil {
			return err
		}
		if err := errors.Join(errs...); err != nil {
			return fmt.Errorf("routing: %w", err)
		}
	}
	return c.raw.sendBatch(w.table)
}
