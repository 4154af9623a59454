package kernel

import (
	"crypto/sha256"
	"strconv"
	"sync"

	"github.com/nftmesh/nftmesh/ruleset"
)

// Cache lets a long-running applier skip reading a table back when nothing can have
// changed it. The kernel bumps a namespace's nftables generation on every committed
// transaction, whoever commits; so if the live table matched a rendered table at
// generation G, and the generation is still G, it still matches. A no-op apply then costs
// one small netlink request instead of dumping every chain and rule.
//
// Entries are keyed by the namespace's cookie (SO_NETNS_COOKIE, never reused) and the
// table name, and vouch for a generation only after a read that no commit raced. An
// entry also remembers the content last written there without a generation (wrote):
// Check uses it to guess whether a lock-free read is likely to find nothing to do.
type Cache struct {
	mu sync.Mutex
	m  map[cacheKey]cacheEntry
}

type cacheKey struct {
	cookie uint64
	table  string
}

type cacheEntry struct {
	gen    uint32
	hasGen bool // gen was verified; false after our own write (its generation unread)
	hash   string
}

// NewCache returns an empty cache.
func NewCache() *Cache { return &Cache{m: map[cacheKey]cacheEntry{}} }

func (c *Cache) verified(k cacheKey, gen uint32, hash string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	return ok && e.hasGen && e.gen == gen && e.hash == hash
}

// has reports whether anything was verified or written at k.
func (c *Cache) has(k cacheKey) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.m[k]
	return ok
}

// known reports whether hash is what was last verified or written at k.
func (c *Cache) known(k cacheKey, hash string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[k]
	return ok && e.hash == hash
}

func (c *Cache) store(k cacheKey, gen uint32, hash string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[k] = cacheEntry{gen: gen, hasGen: true, hash: hash}
}

// wrote records that hash was just committed at k, at a generation not read.
func (c *Cache) wrote(k cacheKey, hash string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.m[k] = cacheEntry{hash: hash}
}

func (c *Cache) forget(k cacheKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, k)
}

// Forget drops every entry of the namespace with this cookie, for when it is gone.
func (c *Cache) Forget(cookie uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k := range c.m {
		if k.cookie == cookie {
			delete(c.m, k)
		}
	}
}

// contentKey is a digest of everything Render prints, from already rendered bodies
// (rb, from t.RuleBodies). The text is gathered in one pooled buffer, without fmt: it
// is computed on every apply, the fresh ones included.
func contentKey(t *ruleset.Table, rb [][]string) string {
	bp := keyBufPool.Get().(*[]byte)
	b := append((*bp)[:0], t.Name...)
	for _, s := range t.Sets {
		b = append(b, s.Render()...)
	}
	for ci, c := range t.Chains {
		b = append(b, "\x00chain "...)
		b = append(b, c.Name...)
		if c.Base != nil {
			b = append(b, ' ')
			b = append(b, c.Base.Type...)
			b = append(b, ' ')
			b = append(b, c.Base.Hook...)
			b = append(b, ' ')
			b = strconv.AppendInt(b, int64(c.Base.Priority), 10)
			b = append(b, ' ')
			b = append(b, c.Base.EffectivePolicy()...)
		}
		for i, r := range c.Rules {
			b = append(b, 0)
			b = append(b, rb[ci][i]...)
			b = append(b, 1)
			b = append(b, r.Comment...)
		}
	}
	sum := sha256.Sum256(b)
	*bp = b
	keyBufPool.Put(bp)
	return string(sum[:16])
}

var keyBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}
