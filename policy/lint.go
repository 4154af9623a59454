package policy

import "fmt"

// WarnDuplicates adds a warning to every policy whose namespace/name another policy of
// ps also has. A Store keeps one policy per namespace/name, the last one put, so of such
// a group only the last is enforced. origins, when not nil, says where each policy of ps
// came from ("policies.yaml object 3"), for the messages; without it they count
// positions in ps.
func WarnDuplicates(ps []*Policy, origins []string) {
	where := func(i int) string {
		if origins != nil && i < len(origins) && origins[i] != "" {
			return origins[i]
		}
		return fmt.Sprintf("policy %d of the input", i+1)
	}
	byKey := map[string][]int{}
	var keys []string
	for i, p := range ps {
		k := p.Key()
		if byKey[k] == nil {
			keys = append(keys, k)
		}
		byKey[k] = append(byKey[k], i)
	}
	for _, k := range keys {
		idx := byKey[k]
		if len(idx) < 2 {
			continue
		}
		last := idx[len(idx)-1]
		for _, i := range idx {
			var msg string
			if i == last {
				msg = fmt.Sprintf("%s is defined %d times (here, %s); this last one replaces the others", k, len(idx), where(i))
			} else {
				msg = fmt.Sprintf("%s is defined again later (%s replaces this one, %s), so this one is not enforced", k, where(last), where(i))
			}
			ps[i].Warnings = append(ps[i].Warnings, Warning{Policy: k, Rule: -1, Message: msg})
		}
	}
}
