package ruleset

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
)

// MaxCommentLen is the kernel's limit for rule comments (NFT_USERDATA_MAXLEN is 256,
// nft allows 128 characters of comment).
const MaxCommentLen = 128

// MaxInterfaceNameLen is IFNAMSIZ less the terminating NUL.
const MaxInterfaceNameLen = 15

// userDataMax is NFT_USERDATA_MAXLEN: the room for a rule's comment and its stamp.
const userDataMax = 256

// userDataLen is the length of the user data package kernel writes for a rule: the
// comment and the stamp (the body) as TLVs of type, length, value and NUL.
func userDataLen(body, comment string) int {
	n := 2 + len(body) + 1
	if comment != "" {
		n += 2 + len(comment) + 1
	}
	return n
}

var identRE = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9_-]{0,63}$`)

// Validate reports every way the table would be rejected by nft or the kernel, or would
// not print back as rendered, naming the object. It returns nil for a valid table.
func (t *Table) Validate() error { return t.ValidateBodies(t.RuleBodies()) }

// ValidateBodies is Validate with the rule bodies already rendered by t.RuleBodies.
func (t *Table) ValidateBodies(rb [][]string) error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if !identRE.MatchString(t.Name) {
		add("table %q: invalid name", t.Name)
	}
	names := map[string]bool{}
	for _, s := range t.Sets {
		if !identRE.MatchString(s.Name) {
			add("set %q: invalid name", s.Name)
		}
		if names["set "+s.Name] {
			add("set %q: defined twice", s.Name)
		}
		names["set "+s.Name] = true
		if err := s.validate(); err != nil {
			add("set %s: %w", s.Name, err)
		}
	}
	for _, c := range t.Chains {
		if !identRE.MatchString(c.Name) {
			add("chain %q: invalid name", c.Name)
		}
		if names["chain "+c.Name] {
			add("chain %q: defined twice", c.Name)
		}
		names["chain "+c.Name] = true
		if c.Base != nil {
			if err := c.Base.validate(); err != nil {
				add("chain %s: %w", c.Name, err)
			}
		}
	}
	for ci, c := range t.Chains {
		for i, r := range c.Rules {
			if err := t.validateRule(c, r, rb[ci][i]); err != nil {
				add("chain %s: rule %d (%s): %w", c.Name, i+1, r, err)
			}
		}
	}
	return errors.Join(errs...)
}

func (s *Set) validate() error {
	switch s.Type {
	case SetTypeIPv4Addr, SetTypeIPv6Addr:
		if len(s.Ports) > 0 {
			return fmt.Errorf("type %s holds addresses, not ports", s.Type)
		}
		seen := map[string]bool{}
		for _, a := range s.Addrs {
			if !a.IsValid() || a.Is4() != (s.Type == SetTypeIPv4Addr) {
				return fmt.Errorf("element %v is not of type %s", a, s.Type)
			}
			if seen[a.String()] {
				return fmt.Errorf("element %v listed twice", a)
			}
			seen[a.String()] = true
		}
	case SetTypeInetService:
		if len(s.Addrs) > 0 {
			return fmt.Errorf("type %s holds ports, not addresses", s.Type)
		}
		seen := map[uint16]bool{}
		for _, p := range s.Ports {
			if seen[p] {
				return fmt.Errorf("element %d listed twice", p)
			}
			seen[p] = true
		}
	default:
		return fmt.Errorf("unsupported type %q", s.Type)
	}
	return nil
}

// hooksByType lists the hooks each chain type may attach to in an inet table.
var hooksByType = map[ChainType][]Hook{
	ChainTypeFilter: {HookPrerouting, HookInput, HookForward, HookOutput, HookPostrouting},
	ChainTypeNAT:    {HookPrerouting, HookInput, HookOutput, HookPostrouting},
	ChainTypeRoute:  {HookOutput},
}

func (bc *BaseChain) validate() error {
	hooks, ok := hooksByType[bc.Type]
	if !ok {
		return fmt.Errorf("unknown chain type %q", bc.Type)
	}
	if !containsHook(hooks, bc.Hook) {
		return fmt.Errorf("a %s chain cannot attach to hook %q", bc.Type, bc.Hook)
	}
	switch bc.Policy {
	case "", PolicyAccept, PolicyDrop:
	default:
		return fmt.Errorf("unknown policy %q", bc.Policy)
	}
	return nil
}

func containsHook(hooks []Hook, h Hook) bool {
	for _, x := range hooks {
		if x == h {
			return true
		}
	}
	return false
}

// ruleContext tracks what a rule's matches imply, to catch what nft rejects as
// "conflicting protocols" and what it would print differently.
type ruleContext struct {
	family IPFamily
	proto  L4Proto
	hasL4  bool // a MetaL4Proto match is present
	hasTH  bool // a th (protocol-less) port match is present
}

func (ctx *ruleContext) setFamily(f IPFamily) error {
	if ctx.family != "" && ctx.family != f {
		return fmt.Errorf("conflicting families %s and %s in one rule", ctx.family, f)
	}
	ctx.family = f
	return nil
}

func (ctx *ruleContext) setProto(p L4Proto) error {
	if ctx.proto != "" && ctx.proto != p {
		return fmt.Errorf("conflicting protocols %s and %s in one rule", ctx.proto, p)
	}
	ctx.proto = p
	return nil
}

func (t *Table) validateRule(c *Chain, r Rule, body string) error {
	if len(r.Statements) == 0 {
		return errors.New("a rule needs at least one statement")
	}
	if len(r.Comment) > MaxCommentLen {
		return fmt.Errorf("comment longer than %d bytes", MaxCommentLen)
	}
	if strings.ContainsAny(r.Comment, "\"\n\\") {
		return fmt.Errorf("comment %q holds a quote, backslash or newline", r.Comment)
	}
	if n := userDataLen(body, r.Comment); n > userDataMax {
		return fmt.Errorf("rule text and comment need %d bytes of user data, the kernel keeps %d", n, userDataMax)
	}
	var ctx ruleContext
	for _, m := range r.Matches {
		if err := t.validateMatch(&ctx, m); err != nil {
			return err
		}
	}
	if ctx.hasL4 && ctx.hasTH {
		return errors.New("meta l4proto with a th port match: nft prints it as a protocol port match; use Port.Proto")
	}
	for i, s := range r.Statements {
		if v, ok := s.(Verdict); ok && i != len(r.Statements)-1 {
			return fmt.Errorf("verdict %s must be the last statement", v.Kind)
		}
		if err := t.validateStatement(c, &ctx, s); err != nil {
			return err
		}
	}
	return nil
}

func (t *Table) validateMatch(ctx *ruleContext, m Match) error {
	switch m := m.(type) {
	case MetaL4Proto:
		if m.Proto != TCP && m.Proto != UDP {
			return fmt.Errorf("meta l4proto: unknown protocol %q", m.Proto)
		}
		if ctx.proto != "" {
			return fmt.Errorf("meta l4proto %s after a %s match: nft drops it as implied", m.Proto, ctx.proto)
		}
		ctx.hasL4 = true
		return ctx.setProto(m.Proto)
	case Mark:
		if m.Kind != MetaMark && m.Kind != CtMark {
			return fmt.Errorf("unknown mark kind %q", m.Kind)
		}
		if m.Mask == 0 {
			return fmt.Errorf("%s: mask 0 matches every packet", m.Kind)
		}
		if m.Value&^m.Mask != 0 {
			return fmt.Errorf("%s: value %s has bits outside mask %s", m.Kind, hex32(m.Value), hex32(m.Mask))
		}
	case Interface:
		if err := ValidateInterfaceName(m.Name); err != nil {
			return err
		}
	case SocketUID:
		switch m.Op {
		case "", OpEq, OpNeq, OpLt, OpGt, OpLe, OpGe:
		default:
			return fmt.Errorf("meta skuid: unknown operator %q", m.Op)
		}
	case Addr:
		if m.Family != IPv4 && m.Family != IPv6 {
			return fmt.Errorf("address match: family must be ip or ip6, not %q", m.Family)
		}
		if m.Dir != Source && m.Dir != Destination {
			return fmt.Errorf("address match: unknown direction %q", m.Dir)
		}
		if err := ctx.setFamily(m.Family); err != nil {
			return err
		}
		if m.Set != "" {
			want := SetTypeIPv4Addr
			if m.Family == IPv6 {
				want = SetTypeIPv6Addr
			}
			return t.checkSetRef(m.Set, want)
		}
		if !m.Prefix.IsValid() {
			return fmt.Errorf("%s %s: no address, prefix or set", m.Family, m.Dir)
		}
		if m.Prefix.Addr().Is4() != (m.Family == IPv4) {
			return fmt.Errorf("%s %s: %s is not an %s address", m.Family, m.Dir, m.Prefix, m.Family)
		}
		if m.Prefix.Masked() != m.Prefix {
			return fmt.Errorf("%s %s: prefix %s has host bits set (want %s)", m.Family, m.Dir, m.Prefix, m.Prefix.Masked())
		}
	case Port:
		if m.Dir != DPort && m.Dir != SPort {
			return fmt.Errorf("port match: unknown direction %q", m.Dir)
		}
		switch m.Proto {
		case "":
			ctx.hasTH = true
		case TCP, UDP:
			if err := ctx.setProto(m.Proto); err != nil {
				return err
			}
		default:
			return fmt.Errorf("port match: unknown protocol %q", m.Proto)
		}
		if m.Set != "" {
			return t.checkSetRef(m.Set, SetTypeInetService)
		}
	case CtState:
		if m.States == 0 {
			return errors.New("ct state: no state given")
		}
	default:
		return fmt.Errorf("unknown match %T", m)
	}
	return nil
}

func (t *Table) checkSetRef(name string, want SetType) error {
	s := t.Set(name)
	if s == nil {
		return fmt.Errorf("set @%s is not defined", name)
	}
	if s.Type != want {
		return fmt.Errorf("set @%s has type %s, want %s", name, s.Type, want)
	}
	return nil
}

func (t *Table) validateStatement(c *Chain, ctx *ruleContext, s Statement) error {
	switch s := s.(type) {
	case SetMark:
		if s.Target != MetaMark && s.Target != CtMark {
			return fmt.Errorf("mark set: unknown target %q", s.Target)
		}
		if s.From != "" && s.From != MetaMark && s.From != CtMark {
			return fmt.Errorf("mark set: unknown source %q", s.From)
		}
		if s.From == "" && s.Mask != 0 {
			return errors.New("mark set: a mask needs a source mark to keep bits from")
		}
		if s.Mask == 0xffffffff {
			return errors.New("mark set: mask 0xffffffff keeps nothing; set the value without a source")
		}
		if s.Value&^s.Mask != 0 && s.From != "" {
			return fmt.Errorf("mark set: value %s has bits outside mask %s", hex32(s.Value), hex32(s.Mask))
		}
	case SetCtZone, Counter:
	case TProxy:
		if c.Base != nil && c.Base.Hook != HookPrerouting {
			return fmt.Errorf("tproxy only works in prerouting, not %s", c.Base.Hook)
		}
		if s.Family != IPAny {
			if err := ctx.setFamily(s.Family); err != nil {
				return err
			}
		}
		if s.Port == 0 {
			return errors.New("tproxy: port 0")
		}
		if ctx.proto == "" {
			return errors.New("tproxy needs a tcp or udp match in the rule")
		}
	case Redirect:
		if c.Base != nil && c.Base.Type != ChainTypeNAT {
			return fmt.Errorf("redirect only works in nat chains, not %s", c.Base.Type)
		}
		if s.Port == 0 {
			return errors.New("redirect: port 0")
		}
	case SNAT:
		if c.Base != nil && (c.Base.Type != ChainTypeNAT || (c.Base.Hook != HookPostrouting && c.Base.Hook != HookInput)) {
			return fmt.Errorf("snat only works in nat postrouting or input chains, not %s %s", c.Base.Type, c.Base.Hook)
		}
		if !s.Addr.IsValid() {
			return errors.New("snat: no address")
		}
		if err := ctx.setFamily(familyOf(s.Addr)); err != nil {
			return err
		}
	case Verdict:
		switch s.Kind {
		case Accept, Drop, Return:
		case Jump:
			target := t.Chain(s.Chain)
			if target == nil {
				return fmt.Errorf("jump to undefined chain %q", s.Chain)
			}
			if target.Base != nil {
				return fmt.Errorf("jump to base chain %q", s.Chain)
			}
			if target == c {
				return fmt.Errorf("chain %q jumps to itself", s.Chain)
			}
		default:
			return fmt.Errorf("unknown verdict %q", s.Kind)
		}
	default:
		return fmt.Errorf("unknown statement %T", s)
	}
	return nil
}

// ValidateInterfaceName reports whether name can be matched with iifname/oifname: the
// kernel's rules for interface names (at most 15 bytes, no '/', ':' or white space, not
// "." or ".."), with nft's one wildcard: a trailing '*' matches every name that starts
// with what precedes it. A '*' anywhere else, or alone, is an error: nft would read it as
// a literal character (or refuse it), and two readings of one name is what the rule
// avoids. So is a backslash, which nft takes for an escape ("eth\\*" is the literal
// name "eth*").
func ValidateInterfaceName(name string) error {
	switch {
	case name == "":
		return errors.New("interface name is empty")
	case len(name) > MaxInterfaceNameLen:
		return fmt.Errorf("interface name %q is longer than %d bytes", name, MaxInterfaceNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("interface name %q is not allowed", name)
	case name == "*":
		return fmt.Errorf("interface name %q: a wildcard needs a prefix (it would match every interface)", name)
	case strings.Contains(name, `\*`):
		return fmt.Errorf("interface name %q: an escaped '*' is not supported (a '*' is only a trailing wildcard)", name)
	}
	if i := strings.IndexByte(name, '*'); i >= 0 && i != len(name)-1 {
		return fmt.Errorf("interface name %q: '*' is only allowed at the end, as a wildcard", name)
	}
	for _, r := range name {
		if r <= ' ' || r == '/' || r == ':' || r == '"' || r == '\\' || r >= 0x7f {
			return fmt.Errorf("interface name %q holds %q", name, r)
		}
	}
	return nil
}
