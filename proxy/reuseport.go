package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Upgrades without a dropped connection. During a proxy upgrade two proxies listen on
// each of a pod's ports, the old one's and the new one's sockets in one SO_REUSEPORT
// group. By default the kernel spreads new connections over the group by a hash, and when
// a listener closes, the connections in its accept queue (handshake done, not yet
// accepted) and its half-open ones (SYN received) are reset: the old proxy, closing its
// listeners on SIGTERM, would drop whatever the hash had just given it.
//
// So each listener, once it serves, attaches to its group a small BPF_PROG_TYPE_SK_REUSEPORT
// program (steer) that selects that listener for every new connection: the newest
// listener takes them all, and the old proxy gets none from then on. The program is
// loaded with expected attach type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE (Linux 5.14), which
// also makes the kernel migrate, when a listener of the group closes, its queued and
// half-open connections to a listener still open (the program picks it; see
// Documentation/networking/ip-sysctl.rst, tcp_migrate_req, which does the same for a
// whole namespace). The old proxy can then close its listeners at once: nothing is
// queued on them, and what is migrates. A listener that closes alone (a pod deleted, a
// proxy stopped without a successor) resets its queue as before: there is nowhere to go.
//
// Sources: Linux net/core/sock_reuseport.c (reuseport_select_sock,
// reuseport_stop_listen_sock, reuseport_migrate_sock), net/core/filter.c
// (sk_select_reuseport), tools/testing/selftests/bpf/progs/test_migrate_reuseport.c.

const (
	bpfFuncSkSelectReuseport = 82 // BPF_FUNC_sk_select_reuseport
	skPass                   = 1  // SK_PASS
)

// bpfInsn is struct bpf_insn.
type bpfInsn struct {
	code byte
	regs byte // dst_reg in the low 4 bits, src_reg in the high 4 (little-endian hosts)
	off  int16
	imm  int32
}

// steerProgram is, in BPF assembly, for map a REUSEPORT_SOCKARRAY whose entry 0 is the
// listener:
//
//	*(u32 *)(r10 - 4) = 0
//	r2 = map a
//	r3 = r10
//	r3 += -4
//	r4 = 0
//	call bpf_sk_select_reuseport   // r1 is still the context
//	r0 = SK_PASS                   // selected: that listener; not (it closed): the hash
//	exit
func steerProgram(mapFD int) []bpfInsn {
	const r0, r2, r3, r4, r10 = 0, 2, 3, 4, 10
	return []bpfInsn{
		{code: unix.BPF_ST | unix.BPF_MEM | unix.BPF_W, regs: r10, off: -4, imm: 0},
		{code: unix.BPF_LD | unix.BPF_IMM | unix.BPF_DW, regs: r2 | unix.BPF_PSEUDO_MAP_FD<<4, imm: int32(mapFD)},
		{}, // the upper half of the 64-bit immediate
		{code: unix.BPF_ALU64 | unix.BPF_MOV | unix.BPF_X, regs: r3 | r10<<4},
		{code: unix.BPF_ALU64 | unix.BPF_ADD | unix.BPF_K, regs: r3, imm: -4},
		{code: unix.BPF_ALU64 | unix.BPF_MOV | unix.BPF_K, regs: r4, imm: 0},
		{code: unix.BPF_JMP | unix.BPF_CALL, imm: bpfFuncSkSelectReuseport},
		{code: unix.BPF_ALU64 | unix.BPF_MOV | unix.BPF_K, regs: r0, imm: skPass},
		{code: unix.BPF_JMP | unix.BPF_EXIT},
	}
}

// bpfPtr is a pointer in a bpf(2) attribute (a 64-bit field; steerFD refuses to run on
// 32-bit and big-endian hosts): typed, so that the garbage collector sees it and a moving stack updates it.
type bpfPtr struct{ p unsafe.Pointer }

// The bpf(2) attributes used here, as the kernel lays them out (union bpf_attr).
type bpfMapCreateAttr struct {
	mapType, keySize, valueSize, maxEntries, mapFlags uint32
}

type bpfMapElemAttr struct {
	mapFD uint32
	_     uint32
	key   bpfPtr
	value bpfPtr
	flags uint64
}

type bpfProgLoadAttr struct {
	progType, insnCnt  uint32
	insns, license     bpfPtr
	logLevel, logSize  uint32
	logBuf             bpfPtr
	kernVersion, flags uint32
	name               [16]byte
	ifindex            uint32
	expectedAttachType uint32
}

func bpf(cmd uintptr, attr unsafe.Pointer, size uintptr) (int, error) {
	fd, _, errno := unix.Syscall(unix.SYS_BPF, cmd, uintptr(attr), size)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

var bpfLicense = []byte("Apache-2.0\x00")

// steer makes l take every new connection of its SO_REUSEPORT group, and the group
// migrate a closing listener's queue (see above). l must be listening.
func steer(l *net.TCPListener) error {
	rc, err := l.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = steerFD(int(fd)) }); err != nil {
		return err
	}
	return serr
}

func steerFD(fd int) error {
	if unsafe.Sizeof(bpfPtr{}) != 8 || binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		return errors.New("the program and its attributes are laid out for 64-bit little-endian hosts only")
	}
	mattr := bpfMapCreateAttr{mapType: unix.BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, keySize: 4, valueSize: 8, maxEntries: 1}
	mapFD, err := bpf(unix.BPF_MAP_CREATE, unsafe.Pointer(&mattr), unsafe.Sizeof(mattr))
	if err != nil {
		return fmt.Errorf("bpf map create (REUSEPORT_SOCKARRAY): %w", err)
	}
	defer unix.Close(mapFD) // the program holds the map, the group the program
	var key [4]byte
	var value [8]byte
	binary.NativeEndian.PutUint64(value[:], uint64(fd))
	eattr := bpfMapElemAttr{mapFD: uint32(mapFD), key: bpfPtr{p: unsafe.Pointer(&key)}, value: bpfPtr{p: unsafe.Pointer(&value)}}
	if _, err := bpf(unix.BPF_MAP_UPDATE_ELEM, unsafe.Pointer(&eattr), unsafe.Sizeof(eattr)); err != nil {
		return fmt.Errorf("bpf map update (the listener): %w", err)
	}
	insns := steerProgram(mapFD)
	pattr := bpfProgLoadAttr{
		progType: unix.BPF_PROG_TYPE_SK_REUSEPORT, insnCnt: uint32(len(insns)),
		insns:              bpfPtr{p: unsafe.Pointer(&insns[0])},
		license:            bpfPtr{p: unsafe.Pointer(&bpfLicense[0])},
		expectedAttachType: unix.BPF_SK_REUSEPORT_SELECT_OR_MIGRATE,
	}
	copy(pattr.name[:], "nftmesh_steer")
	progFD, err := bpf(unix.BPF_PROG_LOAD, unsafe.Pointer(&pattr), unsafe.Sizeof(pattr))
	if err != nil {
		return fmt.Errorf("bpf prog load (SK_REUSEPORT, SELECT_OR_MIGRATE; Linux 5.14 or later, CAP_BPF or CAP_SYS_ADMIN): %w", err)
	}
	defer unix.Close(progFD)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_EBPF, progFD); err != nil {
		return fmt.Errorf("SO_ATTACH_REUSEPORT_EBPF: %w", err)
	}
	return nil
}
