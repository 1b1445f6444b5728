// containerd's own snapshotter test suite (snapshots/testsuite, from Debian's
// golang-github-containerd-containerd-dev) against `pylayers containerd-snapshotter`,
// through containerd's proxy client (snapshots/proxy): one server per test root, on a
// fresh store. Built offline in GOPATH mode by tests/test_containerd_gosuite.py, which
// runs the binary with -test.root and $PYLAYERS naming the pylayers command.
package pylayerstest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestPylayers(t *testing.T) {
	testsuite.SnapshotterSuite(t, "pylayers", newSnapshotter)
}

func newSnapshotter(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(root, "s.sock")
	cmd := exec.Command(os.Getenv("PYLAYERS"), "--store", filepath.Join(root, "store"),
		"containerd-snapshotter", "--address", sock)
	cmd.Stdout = os.Stderr
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, nil, fmt.Errorf("pylayers did not start: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "pylayers")
	return sn, func() error {
		conn.Close()
		cmd.Process.Signal(syscall.SIGTERM)
		return cmd.Wait()
	}, nil
}
