package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"
	apiv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// The API versions and kind Parse accepts.
const (
	APIVersionV1      = "security.istio.io/v1"
	APIVersionV1beta1 = "security.istio.io/v1beta1"
	Kind              = "AuthorizationPolicy"
)

// Parse decodes the AuthorizationPolicies of a YAML or JSON file (several documents
// separated by ---, or a List such as `kubectl get -o yaml` prints) into Istio's
// published types and translates each. Decoding is strict: an unknown field, a value of
// the wrong type, a duplicate key, another kind or apiVersion, or an invalid policy is
// an error naming the document, the object and the field. Every error is reported.
func Parse(data []byte, opts Options) ([]*Policy, error) {
	var out []*Policy
	var errs []error
	for _, d := range splitDocuments(data) {
		ps, err := parseDocument(d, opts)
		out = append(out, ps...)
		// One line per error, each saying where.
		for _, e := range flatten(err) {
			errs = append(errs, fmt.Errorf("document %d (line %d): %w", d.n, d.line, e))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

type document struct {
	data []byte
	n    int // 1-based
	line int // line of its first line
}

// splitDocuments cuts at lines that are "---", optionally followed by a comment.
func splitDocuments(data []byte) []document {
	var docs []document
	start, startLine, line := 0, 1, 1
	for off := 0; off < len(data); {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
			next = off + end + 1
		}
		l := bytes.TrimRight(data[off:next], "\r\n")
		if rest, ok := bytes.CutPrefix(l, []byte("---")); ok {
			if r := bytes.TrimSpace(rest); len(r) == 0 || r[0] == '#' {
				docs = append(docs, document{data: data[start:off], line: startLine})
				start, startLine = next, line+1
			}
		}
		off = next
		line++
	}
	docs = append(docs, document{data: data[start:], line: startLine})
	// What precedes a leading "---" (nothing, blank lines, comments) is no document in
	// YAML: that "---" starts the first one.
	if len(docs) > 1 && blankOrComments(docs[0].data) {
		docs = docs[1:]
	}
	for i := range docs {
		docs[i].n = i + 1
	}
	return docs
}

func blankOrComments(b []byte) bool {
	for _, l := range bytes.Split(b, []byte("\n")) {
		if l = bytes.TrimSpace(l); len(l) > 0 && l[0] != '#' {
			return false
		}
	}
	return true
}

func parseDocument(d document, opts Options) ([]*Policy, error) {
	js, err := yaml.YAMLToJSONStrict(d.data)
	if err != nil {
		return nil, fmt.Errorf("%s", strings.TrimPrefix(err.Error(), "error converting YAML to JSON: "))
	}
	if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
		return nil, nil // an empty document, or comments only
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, err
	}
	obj, ok := v.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("not an object: want a mapping with apiVersion, kind, metadata and spec")
	}
	apiVersion, _ := obj["apiVersion"].(string)
	kind, _ := obj["kind"].(string)
	if (kind == "List" && apiVersion == "v1") || (kind == Kind+"List" && isSecurityAPI(apiVersion)) {
		items, ok := obj["items"].([]any)
		if !ok && obj["items"] != nil {
			return nil, fmt.Errorf("%s: items: must be a list", kind)
		}
		var out []*Policy
		var errs []error
		for i, it := range items {
			m, ok := it.(map[string]any)
			if !ok {
				errs = append(errs, fmt.Errorf("%s: items[%d]: must be an object", kind, i))
				continue
			}
			p, err := parseObject(m, opts)
			if err != nil {
				for _, e := range flatten(err) {
					errs = append(errs, fmt.Errorf("%s: items[%d]: %w", kind, i, e))
				}
				continue
			}
			out = append(out, p)
		}
		return out, errors.Join(errs...)
	}
	p, err := parseObject(obj, opts)
	if err != nil {
		return nil, err
	}
	return []*Policy{p}, nil
}

// flatten undoes errors.Join.
func flatten(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flatten(e)...)
		}
		return out
	}
	return []error{err}
}

func isSecurityAPI(v string) bool { return v == APIVersionV1 || v == APIVersionV1beta1 }

// objectName is "kind namespace/name" as far as the object says.
func objectName(obj map[string]any, opts Options) string {
	kind, _ := obj["kind"].(string)
	if kind == "" {
		kind = "object"
	}
	meta, _ := obj["metadata"].(map[string]any)
	name, _ := meta["name"].(string)
	ns, _ := meta["namespace"].(string)
	if ns == "" {
		ns = opts.defaultNamespace()
	}
	if name == "" {
		name = "(no name)"
	}
	return kind + " " + ns + "/" + name
}

func parseObject(obj map[string]any, opts Options) (*Policy, error) {
	name := objectName(obj, opts)
	fe := func(field, format string, args ...any) error {
		return &FieldError{Object: name, Field: field, Detail: fmt.Sprintf(format, args...)}
	}
	apiVersion, okV := obj["apiVersion"].(string)
	kind, okK := obj["kind"].(string)
	switch {
	case !okK || kind == "":
		return nil, fe("kind", "required (want %s)", Kind)
	case kind != Kind:
		return nil, fe("kind", "%q is not supported (want %s)", kind, Kind)
	case !okV || apiVersion == "":
		return nil, fe("apiVersion", "required (want %s or %s)", APIVersionV1, APIVersionV1beta1)
	case !isSecurityAPI(apiVersion):
		return nil, fe("apiVersion", "%q is not supported (want %s or %s)", apiVersion, APIVersionV1, APIVersionV1beta1)
	}
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(obj)) {
		switch k {
		case "apiVersion", "kind", "status":
		case "metadata":
			checkMetadata(obj[k], func(field, detail string) { errs = append(errs, fe(field, "%s", detail)) })
		case "spec":
			checkMessage(specDescriptor, obj[k], "spec", func(field, detail string) { errs = append(errs, fe(field, "%s", detail)) })
		default:
			errs = append(errs, fe(k, "unknown field (known: apiVersion, kind, metadata, spec, status)"))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// The shape is right; decode into Istio's types (status is not ours to read).
	delete(obj, "status")
	js, err := json.Marshal(obj)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if apiVersion == APIVersionV1 {
		var ap securityv1.AuthorizationPolicy
		if err := json.Unmarshal(js, &ap); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return FromV1(&ap, opts)
	}
	var ap securityv1beta1.AuthorizationPolicy
	if err := json.Unmarshal(js, &ap); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return FromV1beta1(&ap, opts)
}

// The generated decoder of Istio's spec types ignores unknown fields, which would turn
// a typo (`principal:`) into a rule that matches more than written. So the spec is
// first checked against the message descriptors those types carry.
var specDescriptor = (&apiv1beta1.AuthorizationPolicy{}).ProtoReflect().Descriptor()

// metadataFields are ObjectMeta's JSON names.
var metadataFields = func() map[string]reflect.Type {
	m := map[string]reflect.Type{}
	t := reflect.TypeFor[metav1.ObjectMeta]()
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		if name != "" && name != "-" {
			m[name] = t.Field(i).Type
		}
	}
	return m
}()

func checkMetadata(v any, bad func(field, detail string)) {
	m, ok := v.(map[string]any)
	if !ok {
		bad("metadata", "must be an object")
		return
	}
	for _, k := range slices.Sorted(maps.Keys(m)) {
		t, known := metadataFields[k]
		path := "metadata." + k
		switch {
		case !known:
			bad(path, "unknown field")
		case t.Kind() == reflect.String:
			if _, ok := m[k].(string); !ok && m[k] != nil {
				bad(path, "must be a string")
			}
		case t.Kind() == reflect.Map:
			mm, ok := m[k].(map[string]any)
			if !ok && m[k] != nil {
				bad(path, "must be an object")
			}
			for _, kk := range slices.Sorted(maps.Keys(mm)) {
				if _, ok := mm[kk].(string); !ok {
					bad(path+"."+kk, "must be a string")
				}
			}
		}
	}
	if name, isString := m["name"].(string); name == "" && (isString || m["name"] == nil) {
		bad("metadata.name", "required")
	}
}

// checkMessage walks a decoded JSON value against a protobuf message descriptor,
// reporting unknown fields and values of the wrong type with their path. Fields may be
// written with their JSON (camelCase) or proto (snake_case) names, as protojson allows.
func checkMessage(md protoreflect.MessageDescriptor, v any, path string, bad func(field, detail string)) {
	if v == nil {
		return // null is "unset"
	}
	m, ok := v.(map[string]any)
	if !ok {
		bad(path, "must be an object")
		return
	}
	fields := md.Fields()
	for _, k := range slices.Sorted(maps.Keys(m)) {
		fd := fields.ByJSONName(k)
		if fd == nil {
			fd = fields.ByName(protoreflect.Name(k))
		}
		fp := path + "." + k
		if fd == nil {
			known := make([]string, 0, fields.Len())
			for i := range fields.Len() {
				known = append(known, fields.Get(i).JSONName())
			}
			slices.Sort(known)
			bad(fp, fmt.Sprintf("unknown field (known: %s)", strings.Join(known, ", ")))
			continue
		}
		val := m[k]
		switch {
		case val == nil:
		case fd.IsMap():
			mm, ok := val.(map[string]any)
			if !ok {
				bad(fp, "must be an object")
				continue
			}
			for _, kk := range slices.Sorted(maps.Keys(mm)) {
				checkValue(fd.MapValue(), mm[kk], fp+"."+kk, bad)
			}
		case fd.IsList():
			list, ok := val.([]any)
			if !ok {
				bad(fp, "must be a list")
				continue
			}
			// Istio refuses `from: []` and `to: []`: an empty list would silently mean
			// "any source" or "any operation".
			if len(list) == 0 && fd.Message() != nil && (fd.Name() == "from" || fd.Name() == "to") {
				bad(fp, "must not be empty (leave it out to match any)")
			}
			for i, e := range list {
				if e == nil {
					// The generated decoder would turn `rules: [null]` into an empty
					// rule, which matches everything.
					bad(fmt.Sprintf("%s[%d]", fp, i), "must not be null")
					continue
				}
				checkValue(fd, e, fmt.Sprintf("%s[%d]", fp, i), bad)
			}
		default:
			checkValue(fd, val, fp, bad)
		}
	}
}

func checkValue(fd protoreflect.FieldDescriptor, v any, path string, bad func(field, detail string)) {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		checkMessage(fd.Message(), v, path, bad)
	case protoreflect.StringKind:
		if _, ok := v.(string); !ok {
			hint := ""
			if n, isNum := v.(json.Number); isNum {
				hint = fmt.Sprintf(" (quote it: %q)", n.String())
			}
			bad(path, "must be a string"+hint)
		}
	case protoreflect.EnumKind:
		s, _ := v.(string)
		values := fd.Enum().Values()
		if s == "" || values.ByName(protoreflect.Name(s)) == nil {
			names := make([]string, values.Len())
			for i := range values.Len() {
				names[i] = string(values.Get(i).Name())
			}
			bad(path, fmt.Sprintf("%v is not one of %s", jsonText(v), strings.Join(names, ", ")))
		}
	case protoreflect.BoolKind:
		if _, ok := v.(bool); !ok {
			bad(path, "must be true or false")
		}
	default: // numbers
		if _, ok := v.(json.Number); !ok {
			bad(path, "must be a number")
		}
	}
}

func jsonText(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}
