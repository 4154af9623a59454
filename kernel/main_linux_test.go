package kernel

import (
	"os"
	"testing"

	"github.com/nftmesh/nftmesh/internal/nettest"
)

func TestMain(m *testing.M) { os.Exit(nettest.RunGuarded(m)) }
