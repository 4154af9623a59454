// Package input reads the files nftmesh takes as input (intents, workloads, policies)
// with a size cap, so that a wrong path (/dev/zero, a log file, a pipe that never ends)
// is an error instead of a process that grows until the kernel kills it.
package input

import (
	"fmt"
	"io"
	"os"
)

// MaxSize is the most an input file may hold: 16 MiB, far above any intent, workload
// list or set of policies a node holds (10,000 policies are about 5 MiB).
const MaxSize = 16 << 20

// Stdin is the name that reads standard input.
const Stdin = "-"

// Read reads all of r, up to MaxSize bytes; more is an error naming name.
func Read(r io.Reader, name string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxSize+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxSize {
		return nil, tooLarge(name)
	}
	return data, nil
}

// ReadFile reads the file at path, up to MaxSize bytes; a larger file is an error
// naming it. A regular file is refused before it is read.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Mode().IsRegular() && st.Size() > MaxSize {
		return nil, tooLarge(path)
	}
	data, err := Read(f, path)
	if err != nil {
		return nil, err
	}
	return data, nil
}

// ReadFileOr reads path, or stdin when path is "-" (named "stdin" in errors).
func ReadFileOr(path string, stdin io.Reader) ([]byte, error) {
	if path == Stdin {
		return Read(stdin, "stdin")
	}
	return ReadFile(path)
}

func tooLarge(name string) error {
	return fmt.Errorf("%s: larger than %d MiB, the input size limit", name, MaxSize>>20)
}
