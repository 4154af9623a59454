package input

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadCaps(t *testing.T) {
	dir := t.TempDir()
	small := filepath.Join(dir, "small")
	os.WriteFile(small, []byte("hello"), 0o644)
	big := filepath.Join(dir, "big")
	os.WriteFile(big, make([]byte, MaxSize+1), 0o644)
	exact := filepath.Join(dir, "exact")
	os.WriteFile(exact, make([]byte, MaxSize), 0o644)

	if b, err := ReadFile(small); err != nil || string(b) != "hello" {
		t.Errorf("small: %q, %v", b, err)
	}
	if b, err := ReadFile(exact); err != nil || len(b) != MaxSize {
		t.Errorf("exactly MaxSize: %d bytes, %v", len(b), err)
	}
	for _, path := range []string{big, "/dev/zero"} {
		if _, err := ReadFile(path); err == nil || !strings.Contains(err.Error(), path+": larger than 16 MiB") {
			t.Errorf("%s: %v, want the size limit named", path, err)
		}
	}
	if _, err := ReadFileOr("-", bytes.NewReader(make([]byte, MaxSize+1))); err == nil || !strings.Contains(err.Error(), "stdin: larger than 16 MiB") {
		t.Errorf("stdin: %v", err)
	}
	if b, err := ReadFileOr("-", strings.NewReader("x")); err != nil || string(b) != "x" {
		t.Errorf("stdin: %q, %v", b, err)
	}
	if _, err := ReadFile(filepath.Join(dir, "absent")); err == nil || !os.IsNotExist(err) {
		t.Errorf("absent: %v", err)
	}
}
