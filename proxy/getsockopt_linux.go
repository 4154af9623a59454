package proxy

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// getsockopt reads a raw socket option value (x/sys/unix has no generic form for
// struct-valued options such as SO_ORIGINAL_DST).
func getsockopt(fd, level, opt int, buf []byte, size *uint32) error {
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt),
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(size)), 0)
	if errno != 0 {
		return syscall.Errno(errno)
	}
	return nil
}

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h), the
// IPv6 twin of SO_ORIGINAL_DST; x/sys/unix does not define it.
const ip6tSOOriginalDst = 80
