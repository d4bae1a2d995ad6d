// Command peer is vaccelray's Go ttrpc interop peer, built from Debian's
// containerd ttrpc 1.1.1 (gogo protobuf) by tests/interop/build.py, which
// generates the vaccel and interop message packages from the .proto files
// and compiles this folder in GOPATH mode.
//
//	peer server -addr tcp://127.0.0.1:0
//	    serves vaccel.VaccelAgent (a noop backend) and interop.Echo, then prints
//	    "LISTENING <address>" on stdout.
//	peer client -addr ADDRESS [-check all|NAME[,NAME...]]
//	    runs scripted checks against a vAccel agent and prints one JSON object
//	    per line on stdout.
//	peer bench -addr ADDRESS -concurrency N -duration 3s -image-size BYTES
//	    drives ImageClassification over one connection and prints one JSON object.
//
// Addresses: tcp://HOST:PORT, unix:///absolute/path, unix:@abstract-name.
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = runServer(os.Args[2:])
	case "client":
		err = runClient(os.Args[2:])
	case "bench":
		err = runBench(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "peer %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: peer server|client|bench -addr ADDRESS [options]")
	os.Exit(2)
}

// splitAddress turns an endpoint string into a Go network and address.
func splitAddress(addr string) (network, address string, err error) {
	switch {
	case strings.HasPrefix(addr, "tcp://"):
		return "tcp", strings.TrimPrefix(addr, "tcp://"), nil
	case strings.HasPrefix(addr, "unix:@"):
		// Linux abstract namespace: Go spells it with a leading "@".
		return "unix", "@" + strings.TrimPrefix(addr, "unix:@"), nil
	case strings.HasPrefix(addr, "unix://"):
		return "unix", strings.TrimPrefix(addr, "unix://"), nil
	}
	return "", "", fmt.Errorf("unsupported address %q (want tcp://HOST:PORT, unix:///PATH or unix:@NAME)", addr)
}

// formatAddress renders a listener's real address in endpoint syntax.
func formatAddress(a net.Addr) string {
	switch a.Network() {
	case "tcp", "tcp4", "tcp6":
		return "tcp://" + a.String()
	case "unix":
		s := a.String()
		if strings.HasPrefix(s, "@") {
			return "unix:" + s
		}
		return "unix://" + s
	}
	return a.Network() + "://" + a.String()
}

func dial(addr string) (net.Conn, error) {
	network, address, err := splitAddress(addr)
	if err != nil {
		return nil, err
	}
	conn, err := net.DialTimeout(network, address, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	return conn, nil
}

// emit prints one JSON object on its own line.
func emit(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(b, '\n'))
}
