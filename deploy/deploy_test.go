// Package deploy_test checks the manifests under deploy/ (a kustomize base that
// `kubectl apply -k deploy` installs): the kustomizations list exactly the YAML files
// there, every object validates against a real kube-apiserver (server-side apply,
// dry-run), and every nftmesh container's arguments parse with the real binary's flags.
//
// No kubectl runs here: the test reads each kustomization's resources (plain YAML files,
// several documents each) and applies its image overrides itself, which is all these
// kustomizations use (strict decoding refuses any other field).
package deploy_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"sigs.k8s.io/yaml"

	"github.com/nftmesh/nftmesh/agent"
	"github.com/nftmesh/nftmesh/ca"
	cakube "github.com/nftmesh/nftmesh/ca/kube"
	"github.com/nftmesh/nftmesh/compiler"
	"github.com/nftmesh/nftmesh/internal/controlplane"
	"github.com/nftmesh/nftmesh/internal/kubetest"
	"github.com/nftmesh/nftmesh/internal/textdiff"
	"github.com/nftmesh/nftmesh/policy"
	proxykube "github.com/nftmesh/nftmesh/proxy/kube"
)

const (
	// base is the install, relative to this package's directory (deploy/).
	base = "."
	// image is nftmesh's image: containers running it are checked against the binary.
	image = "ghcr.io/nftmesh/nftmesh"
	// binary is where the image puts nftmesh (Dockerfile).
	binary = "/usr/local/bin/nftmesh"
	// namespace is nftmesh's own.
	namespace    = "nftmesh-system"
	fieldManager = "nftmesh-test"
)

func TestMain(m *testing.M) {
	code := m.Run()
	kubetest.StopShared()
	os.Exit(code)
}

// kustomization is the part of kustomize's Kustomization these files use. Decoding is
// strict: a field the test does not apply itself (patches, namePrefix, generators...)
// fails, rather than being validated as if it were not there.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Images     []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
		Digest  string `json:"digest,omitempty"`
	} `json:"images,omitempty"`
}

// object is one document of a resource file.
type object struct {
	*unstructured.Unstructured
	source string // file#document, for errors
}

func (o object) String() string {
	return fmt.Sprintf("%s %s (%s)", o.GetKind(), path.Join(o.GetNamespace(), o.GetName()), o.source)
}

// kustomizationDirs are the directories under deploy/ that hold a kustomization.yaml.
func kustomizationDirs(t *testing.T) []string {
	t.Helper()
	var dirs []string
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		switch d.Name() {
		case "kustomization.yaml":
			dirs = append(dirs, filepath.Dir(p))
		case "kustomization.yml", "Kustomization":
			return fmt.Errorf("%s: name it kustomization.yaml (the only name this test reads)", p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(dirs, base) {
		t.Fatal("no deploy/kustomization.yaml")
	}
	return dirs
}

func readKustomization(t *testing.T, dir string) kustomization {
	t.Helper()
	file := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		t.Fatalf("%s: apiVersion %q, kind %q: want kustomize.config.k8s.io/v1beta1 Kustomization", file, k.APIVersion, k.Kind)
	}
	if len(k.Resources) == 0 {
		t.Fatalf("%s: no resources", file)
	}
	return k
}

// resourceFile checks a kustomization's resource entry: a YAML file inside deploy/, and
// returns its path.
func resourceFile(dir, res string) (string, error) {
	p := filepath.Join(dir, filepath.FromSlash(res))
	switch {
	case strings.Contains(res, "://") || filepath.IsAbs(res):
		return "", fmt.Errorf("resource %q: not a file of this directory", res)
	case !strings.HasSuffix(res, ".yaml"):
		return "", fmt.Errorf("resource %q: not a .yaml file (another kustomization or a URL is not plain YAML)", res)
	case !filepath.IsLocal(p):
		return "", fmt.Errorf("resource %q: outside deploy/", res)
	}
	st, err := os.Stat(p)
	if err != nil {
		return "", fmt.Errorf("resource %q: %w", res, err)
	}
	if !st.Mode().IsRegular() {
		return "", fmt.Errorf("resource %q: not a regular file", res)
	}
	return filepath.Clean(p), nil
}

// Every listed resource exists, once; every YAML file under deploy/ is a kustomization or
// listed by one (deploy/crds/ included), so that nothing is written and never installed.
func TestKustomizationsListEveryFile(t *testing.T) {
	listed := map[string]string{} // file -> the kustomization listing it
	for _, dir := range kustomizationDirs(t) {
		k := readKustomization(t, dir)
		for _, res := range k.Resources {
			p, err := resourceFile(dir, res)
			if err != nil {
				t.Errorf("%s: %v", filepath.Join(dir, "kustomization.yaml"), err)
				continue
			}
			if by, ok := listed[p]; ok {
				t.Errorf("%s is listed twice (%s and %s)", p, by, filepath.Join(dir, "kustomization.yaml"))
			}
			listed[p] = filepath.Join(dir, "kustomization.yaml")
		}
	}
	err := filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if ext := filepath.Ext(p); (ext == ".yaml" || ext == ".yml") && d.Name() != "kustomization.yaml" {
			if _, ok := listed[filepath.Clean(p)]; !ok {
				t.Errorf("deploy/%s is in no kustomization's resources: list it (or remove it)", filepath.ToSlash(p))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// loadObjects reads a kustomization's resources, document by document, and applies its
// image overrides.
func loadObjects(t *testing.T, dir string) []object {
	t.Helper()
	k := readKustomization(t, dir)
	var objs []object
	for _, res := range k.Resources {
		p, err := resourceFile(dir, res)
		if err != nil {
			t.Fatalf("%s: %v", filepath.Join(dir, "kustomization.yaml"), err)
		}
		data, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
		for doc := 1; ; doc++ {
			raw, err := r.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("deploy/%s: document %d: %v", filepath.ToSlash(p), doc, err)
			}
			src := fmt.Sprintf("deploy/%s#%d", filepath.ToSlash(p), doc)
			var m map[string]any
			// Strict: a duplicate key is an error, not a silently overwritten field.
			if err := yaml.UnmarshalStrict(raw, &m); err != nil {
				t.Fatalf("%s: %v", src, err)
			}
			if m == nil {
				continue // comments only
			}
			u := &unstructured.Unstructured{Object: m}
			if u.GetAPIVersion() == "" || u.GetKind() == "" || u.GetName() == "" {
				t.Fatalf("%s: apiVersion, kind and metadata.name are required", src)
			}
			for _, img := range k.Images {
				setImage(u, img.Name, img.NewName, img.NewTag, img.Digest)
			}
			objs = append(objs, object{u, src})
		}
	}
	return objs
}

// podSpecPath is where a workload kind keeps its pod spec.
var podSpecPath = map[string][]string{
	"Pod":         {"spec"},
	"DaemonSet":   {"spec", "template", "spec"},
	"Deployment":  {"spec", "template", "spec"},
	"StatefulSet": {"spec", "template", "spec"},
	"Job":         {"spec", "template", "spec"},
}

// setImage is kustomize's images transformer for containers and init containers.
func setImage(u *unstructured.Unstructured, name, newName, newTag, digest string) {
	specPath, ok := podSpecPath[u.GetKind()]
	if !ok {
		return
	}
	for _, field := range []string{"containers", "initContainers"} {
		cs, found, _ := unstructured.NestedSlice(u.Object, append(slices.Clone(specPath), field)...)
		if !found {
			continue
		}
		for _, c := range cs {
			c := c.(map[string]any)
			img, _ := c["image"].(string)
			n, tag, dig := splitImage(img)
			if n != name {
				continue
			}
			if newName != "" {
				n = newName
			}
			switch {
			case digest != "":
				c["image"] = n + "@" + digest
			case newTag != "":
				c["image"] = n + ":" + newTag
			case dig != "":
				c["image"] = n + "@" + dig
			case tag != "":
				c["image"] = n + ":" + tag
			default:
				c["image"] = n
			}
		}
		unstructured.SetNestedSlice(u.Object, cs, append(slices.Clone(specPath), field)...)
	}
}

// splitImage splits name[:tag][@digest].
func splitImage(img string) (name, tag, digest string) {
	name, digest, _ = strings.Cut(img, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name, tag = name[:i], name[i+1:]
	}
	return name, tag, digest
}

// allObjects are the objects of every kustomization under deploy/: the install, and the
// others (the uninstall DaemonSet), which must validate too.
func allObjects(t *testing.T) []object {
	t.Helper()
	var objs []object
	seen := map[string]string{}
	for _, dir := range kustomizationDirs(t) {
		for _, o := range loadObjects(t, dir) {
			key := key(o)
			if prev, ok := seen[key]; ok {
				t.Fatalf("%s is defined twice: %s and %s", key, prev, o.source)
			}
			seen[key] = o.source
			objs = append(objs, o)
		}
	}
	return objs
}

func find(t *testing.T, objs []object, kind, name string) object {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %s in deploy/", kind, name)
	return object{}
}

func typed[T any](t *testing.T, o object) *T {
	t.Helper()
	var v T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, &v, true); err != nil {
		t.Fatalf("%s: %v", o, err)
	}
	return &v
}

// cluster is the shared control plane, prepared once for the objects of deploy/: what no
// dry run can stand in for is created for real. CRDs, which must be Established before
// objects of their kinds validate, and the Namespaces, without which nothing namespaced is
// admitted, even in a dry run (`kubectl apply --dry-run=server` on an empty cluster fails
// the same way). Then the CA Secret, as a user creates it (`kubectl create secret`), so
// that applying the placeholder over it can be checked to leave its keys alone.
type cluster struct {
	cp     *kubetest.ControlPlane
	dyn    dynamic.Interface
	mapper meta.RESTMapper
	crds   int
}

var prepared struct {
	sync.Mutex
	c *cluster
}

// caKeys are the prepared CA Secret's data.
var caKeys = map[string][]byte{"ca.pem": []byte("cert"), "ca-key.pem": []byte("key")}

func prepare(t *testing.T, objs []object) *cluster {
	t.Helper()
	prepared.Lock()
	defer prepared.Unlock()
	if prepared.c != nil {
		return prepared.c
	}
	cp := kubetest.Shared(t)
	c := &cluster{cp: cp}
	var err error
	if c.dyn, err = dynamic.NewForConfig(cp.RESTConfig); err != nil {
		t.Fatal(err)
	}
	disc, err := discovery.NewDiscoveryClientForConfig(cp.RESTConfig)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	c.mapper = waitMapper(t, disc, nil)
	for _, o := range objs {
		if o.GetKind() != "Namespace" && o.GetKind() != "CustomResourceDefinition" {
			continue
		}
		if _, err := c.apply(ctx, o, false); err != nil {
			t.Fatalf("%s: create: %v", o, err)
		}
		if o.GetKind() == "CustomResourceDefinition" {
			c.crds++
			waitEstablished(ctx, t, c.dyn, o)
		}
	}
	c.mapper = waitMapper(t, disc, objs) // with the CRDs' kinds
	_, err = cp.Client.CoreV1().Secrets(namespace).Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "nftmesh-ca", Namespace: namespace},
		Type:       corev1.SecretTypeOpaque, Data: caKeys,
	}, metav1.CreateOptions{FieldManager: "kubectl-create"})
	if err != nil {
		t.Fatal(err)
	}
	prepared.c = c
	return c
}

// waitMapper maps every kind of objs, waiting for discovery to serve new CRDs' kinds.
func waitMapper(t *testing.T, disc discovery.DiscoveryInterface, objs []object) meta.RESTMapper {
	t.Helper()
	var missing error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		groups, err := restmapper.GetAPIGroupResources(disc)
		if err != nil {
			missing = err
			continue
		}
		m := restmapper.NewDiscoveryRESTMapper(groups)
		missing = nil
		for _, o := range objs {
			gvk := o.GroupVersionKind()
			if _, err := m.RESTMapping(gvk.GroupKind(), gvk.Version); err != nil {
				missing = fmt.Errorf("%s: %w", o, err)
				break
			}
		}
		if missing == nil {
			return m
		}
	}
	t.Fatalf("discovery: %v", missing)
	return nil
}

// apply is a server-side apply of o, as field manager nftmesh-test, a dry run or not.
func (c *cluster) apply(ctx context.Context, o object, dryRun bool) (*unstructured.Unstructured, error) {
	mapping, err := c.mapper.RESTMapping(o.GroupVersionKind().GroupKind(), o.GroupVersionKind().Version)
	if err != nil {
		return nil, err
	}
	var ri dynamic.ResourceInterface = c.dyn.Resource(mapping.Resource)
	if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
		if o.GetNamespace() == "" {
			return nil, errors.New("namespaced, and no metadata.namespace: it would land in the current context's namespace")
		}
		ri = c.dyn.Resource(mapping.Resource).Namespace(o.GetNamespace())
	} else if o.GetNamespace() != "" {
		return nil, fmt.Errorf("cluster-scoped, and metadata.namespace is %q", o.GetNamespace())
	}
	opts := metav1.ApplyOptions{FieldManager: fieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	return ri.Apply(ctx, o.GetName(), o.Unstructured, opts)
}

// The objects as they are installed, every one a server-side apply with DryRun All: the
// server validates them against its schemas (the CRD's included), its admission plugins
// (Pod Security, priority classes) and RBAC's escalation check.
func TestServerSideDryRun(t *testing.T) {
	objs := allObjects(t)
	c := prepare(t, objs)
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	for _, o := range objs {
		got, err := c.apply(ctx, o, true)
		if err != nil {
			t.Errorf("%s: server-side apply (dry run): %v", o, err)
			continue
		}
		if o.GetKind() == "Secret" && o.GetName() == "nftmesh-ca" {
			data, _, _ := unstructured.NestedStringMap(got.Object, "data")
			for k := range caKeys {
				if data[k] == "" {
					t.Errorf("%s: applying the placeholder over the CA removes key %s", o, k)
				}
			}
		}
	}
	t.Logf("%d objects validated (%d CRDs and the namespace created for real first)", len(objs), c.crds)
}

// kubectlPath is the control plane's kubectl (scripts/controlplane builds it, for the
// demo), or else one on $PATH; "" when there is none.
func kubectlPath() string {
	if dir, err := controlplane.Binaries(); err == nil {
		if p := filepath.Join(dir, "kubectl"); fileExists(p) {
			return p
		}
	}
	p, _ := exec.LookPath("kubectl")
	return p
}

func fileExists(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// Where there is a kubectl, the install command itself: `kubectl kustomize` builds the
// same objects this test reads (so the reader above is kustomize's equal), and
// `kubectl apply -k --server-side --dry-run=server` accepts them.
func TestKubectl(t *testing.T) {
	kubectl := kubectlPath()
	if kubectl == "" {
		t.Skip("no kubectl (scripts/controlplane builds one; TestServerSideDryRun validates the same objects through the API)")
	}
	objs := allObjects(t)
	c := prepare(t, objs)
	for _, dir := range kustomizationDirs(t) {
		t.Run(strings.ReplaceAll(filepath.Join("deploy", dir), "/", "_"), func(t *testing.T) {
			built := runKubectl(t, kubectl, "kustomize", dir)
			ours := map[string]object{}
			for _, o := range loadObjects(t, dir) {
				ours[key(o)] = o
			}
			r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(built)))
			n := 0
			for {
				raw, err := r.Read()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				var m map[string]any
				if err := yaml.Unmarshal(raw, &m); err != nil {
					t.Fatal(err)
				}
				if m == nil {
					continue
				}
				n++
				got := object{&unstructured.Unstructured{Object: m}, "kubectl kustomize"}
				want, ok := ours[key(got)]
				if !ok {
					t.Errorf("kubectl kustomize builds %s, which the test does not read", got)
					continue
				}
				if !reflect.DeepEqual(got.Object, want.Object) {
					a, _ := yaml.Marshal(got.Object)
					b, _ := yaml.Marshal(want.Object)
					t.Errorf("%s: kubectl kustomize builds it otherwise than the test reads it:\n%s", want, textdiff.Unified("test", "kubectl kustomize", string(b), string(a)))
				}
			}
			if n != len(ours) {
				t.Errorf("kubectl kustomize builds %d objects, the test reads %d", n, len(ours))
			}
			out := runKubectl(t, kubectl, "--kubeconfig", c.cp.Kubeconfig, "apply", "-k", dir,
				"--server-side", "--dry-run=server", "--field-manager", fieldManager, "--force-conflicts")
			t.Logf("kubectl apply -k deploy/%s --server-side --dry-run=server:\n%s", dir, out)
		})
	}
}

func key(o object) string {
	return o.GroupVersionKind().GroupKind().String() + " " + path.Join(o.GetNamespace(), o.GetName())
}

func runKubectl(t *testing.T, kubectl string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, kubectl, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return string(out)
}

func waitEstablished(ctx context.Context, t *testing.T, dyn dynamic.Interface, o object) {
	t.Helper()
	gvr := schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	for {
		crd, err := dyn.Resource(gvr).Get(ctx, o.GetName(), metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(crd.Object, "status", "conditions")
			for _, c := range conds {
				c, _ := c.(map[string]any)
				if c["type"] == "Established" && c["status"] == "True" {
					return
				}
			}
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not Established: %v (last error: %v)", o, ctx.Err(), err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Every nftmesh container's command is the image's binary and its arguments parse with
// that subcommand's real flags (types and values included): they run as
// `nftmesh <subcommand> <args...> --help`, which exits 0 only when every argument before
// --help parsed as a flag, and never starts the command.
func TestContainerArgsParse(t *testing.T) {
	objs := allObjects(t)
	bin := filepath.Join(t.TempDir(), "nftmesh")
	build := exec.Command("go", "build", "-o", bin, "./cmd/nftmesh")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/nftmesh: %v\n%s", err, out)
	}
	checked := map[string]bool{}
	for _, o := range objs {
		specPath, ok := podSpecPath[o.GetKind()]
		if !ok {
			continue
		}
		spec, _, _ := unstructured.NestedMap(o.Object, specPath...)
		var pod corev1.PodSpec
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(spec, &pod); err != nil {
			t.Fatalf("%s: %v", o, err)
		}
		for _, c := range append(slices.Clone(pod.InitContainers), pod.Containers...) {
			if name, _, _ := splitImage(c.Image); name != image {
				continue
			}
			where := fmt.Sprintf("%s container %s", o, c.Name)
			if !slices.Equal(c.Command, []string{binary}) {
				t.Errorf("%s: command %q, want [%s] (the image's binary)", where, c.Command, binary)
				continue
			}
			args := expandEnv(c.Args, c.Env)
			sub := subcommand(args)
			if sub == "" {
				t.Errorf("%s: args %q start with no subcommand", where, args)
				continue
			}
			help := run(t, bin, append(strings.Fields(sub), "--help"))
			if !help.ok {
				t.Fatalf("nftmesh %s --help: %s", sub, help.out)
			}
			if res := run(t, bin, append(slices.Clone(args), "--help")); !res.ok {
				t.Errorf("%s: the args do not parse as `nftmesh %s` flags: %s", where, sub, firstLine(res.out))
			}
			checked[sub] = true
		}
	}
	for _, sub := range []string{"agent", "proxy", "agent uninstall", "delete"} {
		if !checked[sub] {
			t.Errorf("no container runs nftmesh %s", sub)
		}
	}
}

// subcommand is the nftmesh command the args run: "agent", "agent uninstall", "proxy"...
func subcommand(args []string) string {
	var words []string
	for _, a := range args {
		if strings.HasPrefix(a, "-") {
			break
		}
		words = append(words, a)
	}
	return strings.Join(words, " ")
}

type result struct {
	ok  bool
	out string
}

func run(t *testing.T, bin string, args []string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = []string{} // nothing from the test's environment (NODE_NAME...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("%s %q: %v", bin, args, err)
	}
	return result{ok: err == nil, out: string(out)}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}

// expandEnv is the kubelet's $(VAR) expansion of args: a variable of the container's env
// (one from the Downward API as a stand-in value), $$ for a literal $.
func expandEnv(args []string, env []corev1.EnvVar) []string {
	vals := map[string]string{}
	for _, e := range env {
		vals[e.Name] = e.Value
		if e.ValueFrom != nil {
			vals[e.Name] = "node-1"
		}
	}
	ref := regexp.MustCompile(`\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)`)
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = ref.ReplaceAllStringFunc(a, func(m string) string {
			if m == "$$" {
				return "$"
			}
			if v, ok := vals[m[2:len(m)-1]]; ok {
				return v
			}
			return m
		})
	}
	return out
}

// flagValue is --name's value in args (--name=v or --name v), and whether it is there.
func flagValue(args []string, name string) (string, bool) {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v, true
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1], true
		}
	}
	return "", false
}

func portOf(t *testing.T, where, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: %q: %v", where, addr, err)
	}
	return port
}

// The two DaemonSets as the agent and the proxy need them: the ports their flags listen on
// are the ones probed, declared and scraped; the files their flags read come from the
// ConfigMap and Secret mounted there.
func TestDaemonSets(t *testing.T) {
	objs := allObjects(t)
	cms := map[string]*corev1.ConfigMap{}
	for _, o := range objs {
		if o.GetKind() == "ConfigMap" {
			cms[o.GetName()] = typed[corev1.ConfigMap](t, o)
		}
	}
	for _, tc := range []struct {
		name, component string
		metricsFlag     string // the flag of the port Prometheus scrapes
		readyFlag       string // the flag of the port the readiness probe asks
		readyPath       string
		livePath        string // "" for no liveness probe
		files           []string
	}{
		{"nftmesh-agent", "agent", "metrics-addr", "metrics-addr", "/readyz", "/healthz", []string{"intent"}},
		{"nftmesh-proxy", "proxy", "metrics-addr", "ready-addr", "/healthz/ready", "", []string{"intent", "ca-root-file", "ca-token-file"}},
	} {
		t.Run(tc.component, func(t *testing.T) {
			ds := typed[appsv1.DaemonSet](t, find(t, objs, "DaemonSet", tc.name))
			pod := ds.Spec.Template
			if got := pod.Labels["nftmesh.dev/component"]; got != tc.component {
				t.Errorf("pod label nftmesh.dev/component=%q, want %q (the agent never enrolls pods with it)", got, tc.component)
			}
			if pod.Spec.PriorityClassName != "system-node-critical" {
				t.Errorf("priorityClassName %q", pod.Spec.PriorityClassName)
			}
			if !slices.ContainsFunc(pod.Spec.Tolerations, func(tol corev1.Toleration) bool {
				return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
			}) {
				t.Error("no toleration of every taint (operator: Exists, no key, no effect)")
			}
			if len(pod.Spec.Containers) != 1 {
				t.Fatalf("%d containers, want 1", len(pod.Spec.Containers))
			}
			c := pod.Spec.Containers[0]
			args := expandEnv(c.Args, c.Env)
			metrics, ok := flagValue(args, tc.metricsFlag)
			if !ok {
				t.Fatalf("no --%s in args", tc.metricsFlag)
			}
			if got, want := pod.Annotations["prometheus.io/port"], portOf(t, "--"+tc.metricsFlag, metrics); got != want {
				t.Errorf("prometheus.io/port %q, want %s (--%s)", got, want, tc.metricsFlag)
			}
			if pod.Annotations["prometheus.io/scrape"] != "true" || pod.Annotations["prometheus.io/path"] != "/metrics" {
				t.Errorf("prometheus.io annotations: %v", pod.Annotations)
			}
			ready, ok := flagValue(args, tc.readyFlag)
			if !ok {
				t.Fatalf("no --%s in args", tc.readyFlag)
			}
			readyPort := portOf(t, "--"+tc.readyFlag, ready)
			probe := func(kind string, p *corev1.Probe, wantPath string) {
				switch {
				case wantPath == "" && p != nil:
					t.Errorf("%s probe: want none", kind)
				case wantPath == "":
				case p == nil || p.HTTPGet == nil:
					t.Errorf("%s probe: want GET %s on %s", kind, wantPath, readyPort)
				case p.HTTPGet.Path != wantPath || p.HTTPGet.Port.String() != readyPort:
					t.Errorf("%s probe: GET %s on %s, want %s on %s", kind, p.HTTPGet.Path, p.HTTPGet.Port.String(), wantPath, readyPort)
				}
			}
			probe("readiness", c.ReadinessProbe, tc.readyPath)
			probe("liveness", c.LivenessProbe, tc.livePath)
			for _, port := range []string{portOf(t, "metrics", metrics), readyPort} {
				if !slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return fmt.Sprint(p.ContainerPort) == port }) {
					t.Errorf("port %s is not among the container's ports", port)
				}
			}
			for _, flag := range tc.files {
				file, ok := flagValue(args, flag)
				if !ok {
					t.Errorf("no --%s in args", flag)
					continue
				}
				checkMountedFile(t, &pod.Spec, &c, cms, "--"+flag, file)
			}
			// No node holds the mesh's signing key: only the CA's Deployment mounts it.
			for _, v := range pod.Spec.Volumes {
				if v.Secret != nil && v.Secret.SecretName == "nftmesh-ca" {
					t.Errorf("volume %q mounts the CA Secret on every node", v.Name)
				}
			}
			if _, ok := flagValue(args, "ca-key"); ok {
				t.Error("--ca-key: a node holds the signing key")
			}
		})
	}
}

// The CA service's Deployment: its flags' files come from the CA Secret, its Service and
// probe match --listen, and it publishes the root the proxies mount.
func TestCADeployment(t *testing.T) {
	objs := allObjects(t)
	d := typed[appsv1.Deployment](t, find(t, objs, "Deployment", "nftmesh-ca"))
	pod := d.Spec.Template
	if pod.Labels["nftmesh.dev/component"] != "ca" {
		t.Errorf("pod label nftmesh.dev/component=%q, want ca (the agent never enrolls pods with it)", pod.Labels["nftmesh.dev/component"])
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Error("fewer than 2 replicas: a restart would stall every proxy's renewals")
	}
	c := pod.Spec.Containers[0]
	args := expandEnv(c.Args, c.Env)
	if subcommand(args) != "ca serve" {
		t.Fatalf("args %q: not `ca serve`", args)
	}
	for _, flag := range []string{"ca-cert", "ca-key"} {
		file, ok := flagValue(args, flag)
		if !ok {
			t.Errorf("no --%s in args", flag)
			continue
		}
		checkMountedFile(t, &pod.Spec, &c, nil, "--"+flag, file)
	}
	listen, _ := flagValue(args, "listen")
	port := portOf(t, "--listen", listen)
	svc := typed[corev1.Service](t, find(t, objs, "Service", "nftmesh-ca"))
	if len(svc.Spec.Ports) != 1 || fmt.Sprint(svc.Spec.Ports[0].Port) != port {
		t.Errorf("Service ports %v, want %s (--listen)", svc.Spec.Ports, port)
	}
	for k, v := range svc.Spec.Selector {
		if pod.Labels[k] != v {
			t.Errorf("the Service selects %s=%s, which the pods lack", k, v)
		}
	}
	metrics, _ := flagValue(args, "metrics-addr")
	metricsPort := portOf(t, "--metrics-addr", metrics)
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" || p.HTTPGet.Port.String() != metricsPort {
		t.Errorf("readiness probe %+v, want GET /readyz on %s (ready once the pod cache synced, not when it listens)", p, metricsPort)
	}
	if got, want := pod.Annotations["prometheus.io/port"], metricsPort; got != want {
		t.Errorf("prometheus.io/port %q, want %s (--metrics-addr)", got, want)
	}
	// The proxies dial the name the CA's certificate holds, and mount the ConfigMap it writes.
	ds := typed[appsv1.DaemonSet](t, find(t, objs, "DaemonSet", "nftmesh-proxy"))
	proxyArgs := ds.Spec.Template.Spec.Containers[0].Args
	addr, _ := flagValue(proxyArgs, "ca-address")
	host, p, _ := strings.Cut(addr, ":")
	if dns, _ := flagValue(args, "dns-name"); dns != host || p != port {
		t.Errorf("the proxies dial %s; the CA's certificate names %s, and it listens on %s", addr, dns, port)
	}
	cm, _ := flagValue(args, "root-configmap")
	if cm != namespace+"/"+publishedRoot {
		t.Errorf("--root-configmap %q, want %s/%s (the proxies mount it)", cm, namespace, publishedRoot)
	}
}

// publishedRoot is the ConfigMap the CA service writes at its start (--root-configmap):
// not in deploy/, the proxies mount it.
const publishedRoot = "nftmesh-ca-root"

// checkMountedFile checks that file comes from a key of a ConfigMap of deploy/ (or the one
// the CA publishes), from a key a Secret volume names (the Secret is a placeholder, filled
// by the user), or from a projected ServiceAccount token.
func checkMountedFile(t *testing.T, pod *corev1.PodSpec, c *corev1.Container, cms map[string]*corev1.ConfigMap, flag, file string) {
	t.Helper()
	for _, vm := range c.VolumeMounts {
		rel, err := filepath.Rel(vm.MountPath, file)
		if err != nil || !filepath.IsLocal(rel) {
			continue
		}
		i := slices.IndexFunc(pod.Volumes, func(v corev1.Volume) bool { return v.Name == vm.Name })
		if i < 0 {
			t.Errorf("%s %s: volume %q is not defined", flag, file, vm.Name)
			return
		}
		v := pod.Volumes[i]
		key, items := rel, []corev1.KeyToPath(nil)
		switch {
		case v.ConfigMap != nil:
			items = v.ConfigMap.Items
		case v.Secret != nil:
			items = v.Secret.Items
		case v.Projected != nil:
			// A token for the CA: bound to the pod, for the audience the CA checks.
			for _, src := range v.Projected.Sources {
				if tok := src.ServiceAccountToken; tok != nil && tok.Path == rel {
					if tok.Audience != "istio-ca" {
						t.Errorf("%s %s: token audience %q, want istio-ca (the CA's --token-audience)", flag, file, tok.Audience)
					}
					return
				}
			}
			t.Errorf("%s %s: projected volume %q has no serviceAccountToken at %s", flag, file, v.Name, rel)
			return
		default:
			t.Errorf("%s %s: volume %q is neither a ConfigMap nor a Secret", flag, file, v.Name)
			return
		}
		if len(items) > 0 {
			j := slices.IndexFunc(items, func(it corev1.KeyToPath) bool { return it.Path == rel })
			if j < 0 {
				t.Errorf("%s %s: volume %q maps no key to %s", flag, file, v.Name, rel)
				return
			}
			key = items[j].Key
		} else if v.Secret != nil {
			t.Errorf("%s %s: Secret volume %q should name its keys (items), so that a Secret without them holds the pod with an event", flag, file, v.Name)
			return
		}
		if v.ConfigMap != nil && v.ConfigMap.Name == publishedRoot {
			if key != "root-cert.pem" {
				t.Errorf("%s %s: ConfigMap %s holds root-cert.pem, not %s", flag, file, publishedRoot, key)
			}
			return
		}
		if v.ConfigMap != nil {
			cm, ok := cms[v.ConfigMap.Name]
			if !ok {
				t.Errorf("%s %s: ConfigMap %s is not in deploy/", flag, file, v.ConfigMap.Name)
			} else if _, ok := cm.Data[key]; !ok {
				t.Errorf("%s %s: ConfigMap %s has no key %s", flag, file, cm.Name, key)
			}
		}
		return
	}
	t.Errorf("%s %s: no volume is mounted there", flag, file)
}

// The intent ConfigMap holds the built-in default intent (compiler.DefaultIntent): it
// parses, and compiles to the same pod and node rulesets. To regenerate it, marshal
// compiler.DefaultIntent() (Intent.Marshal).
func TestIntentConfigMapIsTheDefault(t *testing.T) {
	cm := typed[corev1.ConfigMap](t, find(t, allObjects(t), "ConfigMap", "nftmesh-intent"))
	data, ok := cm.Data["intent.yaml"]
	if !ok {
		t.Fatal("ConfigMap nftmesh-intent: no key intent.yaml")
	}
	in, err := compiler.Parse([]byte(data))
	if err != nil {
		t.Fatalf("ConfigMap nftmesh-intent: %v", err)
	}
	for _, target := range []compiler.Target{compiler.TargetPod, compiler.TargetHost} {
		got, err := compiler.Compile(in, target)
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		want, err := compiler.Compile(compiler.DefaultIntent(), target)
		if err != nil {
			t.Fatal(err)
		}
		if got.Render() != want.Render() {
			t.Errorf("%s ruleset of ConfigMap nftmesh-intent differs from the built-in default's", target)
		}
	}
	want, err := compiler.DefaultIntent().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if data != string(want) {
		t.Errorf("ConfigMap nftmesh-intent's intent.yaml is not compiler.DefaultIntent().Marshal():\n%s\nwant:\n%s", data, want)
	}
}

// The CA Secret is a placeholder: with keys in it, `kubectl apply -k deploy` would put
// them back over the user's CA on every upgrade (and a key would be in the repository).
func TestCASecretIsAPlaceholder(t *testing.T) {
	s := find(t, allObjects(t), "Secret", "nftmesh-ca")
	for _, field := range []string{"data", "stringData"} {
		if _, ok := s.Object[field]; ok {
			t.Errorf("%s has %s: keep it empty", s, field)
		}
	}
	if typ, _, _ := unstructured.NestedString(s.Object, "type"); typ != string(corev1.SecretTypeOpaque) {
		t.Errorf("%s: type %q, want Opaque (what `kubectl create secret generic` makes; the type is immutable)", s, typ)
	}
}

// Each half's RBAC is enough for its real Kubernetes code, run as its service account
// (impersonated) against the API server: the agent's informers, its get of a pod the cache
// has not seen, the redirection annotation through pods/status and an event; the proxy's
// informers (pods, Services, EndpointSlices, AuthorizationPolicies) all synced. And it is
// no more: what neither needs is refused.
func TestRBAC(t *testing.T) {
	objs := allObjects(t)
	c := prepare(t, objs)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	for _, o := range objs {
		switch o.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			if _, err := c.apply(ctx, o, false); err != nil {
				t.Fatalf("%s: %v", o, err)
			}
		}
	}
	as := func(sa string) *rest.Config {
		cfg := rest.CopyConfig(c.cp.RESTConfig)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: saUser(sa), Groups: saGroups}
		return cfg
	}
	log := slog.New(slog.NewTextHandler(t.Output(), nil))

	t.Run("agent", func(t *testing.T) {
		const node = "node-rbac"
		ns := c.cp.Namespace(t, nil)
		pod := c.cp.RunningPod(t, kubetest.PodSpec{Namespace: ns, Name: "app", NodeName: node, PodIPs: []string{"10.244.9.9"}})
		client, err := kubernetes.NewForConfig(as("nftmesh-agent"))
		if err != nil {
			t.Fatal(err)
		}
		k := agent.NewKube(client, node, log)
		defer k.Stop()
		sctx, stop := context.WithTimeout(ctx, 30*time.Second)
		defer stop()
		if err := k.Start(sctx); err != nil {
			t.Fatalf("informers: %v", err)
		}
		if _, err := k.Pod(ctx, ns, "not-yet-in-the-cache"); !apierrors.IsNotFound(err) {
			t.Errorf("get a pod: %v, want NotFound", err)
		}
		p := agent.Pod{UID: string(pod.UID), Name: pod.Name, Namespace: ns}
		if err := k.SetRedirection(ctx, p, true); err != nil {
			t.Fatalf("annotate: %v", err)
		}
		got, err := c.cp.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if v := got.Annotations[agent.AnnotationRedirection]; v != agent.RedirectionEnabled {
			t.Errorf("annotation %s=%q after SetRedirection", agent.AnnotationRedirection, v)
		}
		k.Event(p, "EnrollFailed", "deploy_test: RBAC check")
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			evs, err := c.cp.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if slices.ContainsFunc(evs.Items, func(e corev1.Event) bool { return e.Reason == "EnrollFailed" }) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("the agent's event never reached the API server (its log above says why)")
			}
		}
	})

	t.Run("proxy", func(t *testing.T) {
		src, err := proxykube.New(as("nftmesh-proxy"), proxykube.Options{
			Policies: policy.NewStore(policy.Options{}), SyncTimeout: 30 * time.Second, Log: log})
		if err != nil {
			t.Fatal(err)
		}
		sctx, stop := context.WithCancel(ctx)
		defer stop()
		if err := src.Start(sctx); err != nil {
			t.Fatalf("informers: %v", err)
		}
		if c.crds > 0 && src.PolicyVersion() == "" {
			t.Error("the AuthorizationPolicy informer did not start, with the CRD installed")
		}
	})

	t.Run("ca", func(t *testing.T) {
		client, err := kubernetes.NewForConfig(as("nftmesh-ca"))
		if err != nil {
			t.Fatal(err)
		}
		authz, err := cakube.NewNodeAuthorizer(client, []string{namespace + "/nftmesh-proxy"}, log)
		if err != nil {
			t.Fatal(err)
		}
		sctx, stop := context.WithTimeout(ctx, 30*time.Second)
		defer stop()
		if err := authz.Start(sctx); err != nil {
			t.Fatalf("pod informer: %v", err)
		}
		// A TokenReview: a bogus token is refused by the API server, not forbidden to ask.
		_, err = cakube.NewAuthenticator(client, nil).Authenticate(ctx, "not-a-token")
		if ca.RefusalReason(err) != "unauthenticated" {
			t.Errorf("token review as nftmesh-ca: %v, want a refusal of the token", err)
		}
		if _, err := cakube.PublishRoot(ctx, client, namespace, publishedRoot, []byte("root")); err != nil {
			t.Errorf("publish the root: %v", err)
		}
		if _, err := cakube.PublishRoot(ctx, client, namespace, publishedRoot, []byte("root 2")); err != nil {
			t.Errorf("publish a new root: %v", err)
		}
	})

	t.Run("least", func(t *testing.T) {
		for _, tc := range []struct {
			sa      string
			allowed bool
			attr    authorizationv1.ResourceAttributes
		}{
			{"nftmesh-agent", true, authorizationv1.ResourceAttributes{Verb: "patch", Resource: "pods", Subresource: "status"}},
			{"nftmesh-agent", false, authorizationv1.ResourceAttributes{Verb: "patch", Resource: "pods"}},
			{"nftmesh-agent", false, authorizationv1.ResourceAttributes{Verb: "update", Resource: "pods", Subresource: "status"}},
			{"nftmesh-agent", false, authorizationv1.ResourceAttributes{Verb: "delete", Resource: "pods"}},
			{"nftmesh-agent", false, authorizationv1.ResourceAttributes{Verb: "get", Resource: "secrets"}},
			{"nftmesh-agent", false, authorizationv1.ResourceAttributes{Verb: "patch", Resource: "namespaces"}},
			{"nftmesh-proxy", true, authorizationv1.ResourceAttributes{Verb: "watch", Group: "discovery.k8s.io", Resource: "endpointslices"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "patch", Resource: "pods", Subresource: "status"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "create", Resource: "events"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "get", Resource: "secrets"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "create", Group: "security.istio.io", Resource: "authorizationpolicies"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "list", Resource: "namespaces"}},
			{"nftmesh-proxy", false, authorizationv1.ResourceAttributes{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}},
			{"nftmesh-ca", true, authorizationv1.ResourceAttributes{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}},
			{"nftmesh-ca", false, authorizationv1.ResourceAttributes{Verb: "get", Resource: "secrets", Namespace: namespace, Name: "nftmesh-ca"}},
			{"nftmesh-ca", false, authorizationv1.ResourceAttributes{Verb: "update", Resource: "configmaps", Namespace: namespace, Name: "nftmesh-intent"}},
			{"nftmesh-ca", false, authorizationv1.ResourceAttributes{Verb: "patch", Resource: "pods"}},
			{"nftmesh-ca", false, authorizationv1.ResourceAttributes{Verb: "create", Resource: "serviceaccounts", Subresource: "token"}},
		} {
			sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
				User:               saUser(tc.sa),
				Groups:             saGroups,
				ResourceAttributes: &tc.attr,
			}}
			got, err := c.cp.Client.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if got.Status.Allowed != tc.allowed {
				t.Errorf("%s: %s %s/%s (group %q): allowed %v, want %v", tc.sa, tc.attr.Verb, tc.attr.Resource,
					tc.attr.Subresource, tc.attr.Group, got.Status.Allowed, tc.allowed)
			}
		}
	})
}

// saUser and saGroups are who a service account of nftmesh-system is to the API server.
func saUser(sa string) string { return "system:serviceaccount:" + namespace + ":" + sa }

var saGroups = []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace, "system:authenticated"}
