// kmsbench calls one KMS method on a unix socket from N goroutines, each with its own grpc-go connection
// (as each apiserver has), sending a pre-serialized request. Prints: ops/s p50-ms p99-ms.
// Built by bench/goclient.py with Debian's golang-go and golang-google-grpc-dev, offline, in GOPATH mode.
package main

import (
	"context"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

func main() {
	sock := flag.String("socket", "", "unix socket")
	method := flag.String("method", "/v2.KeyManagementService/Status", "full method")
	reqHex := flag.String("request", "", "request bytes, hex")
	clients := flag.Int("clients", 1, "concurrent clients")
	calls := flag.Int("calls", 2000, "calls per client")
	flag.Parse()
	req, err := hex.DecodeString(*reqHex)
	if err != nil {
		panic(err)
	}
	dial := func(ctx context.Context, addr string) (net.Conn, error) { return net.Dial("unix", *sock) }
	lat := make([][]time.Duration, *clients)
	var wg sync.WaitGroup
	conns := make([]*grpc.ClientConn, *clients)
	for i := range conns {
		c, err := grpc.Dial("localhost", grpc.WithInsecure(), grpc.WithContextDialer(dial), grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			panic(err)
		}
		conns[i] = c
		for j := 0; j < 20; j++ {
			var out []byte
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			if err := c.Invoke(ctx, *method, &req, &out); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			cancel()
		}
	}
	start := time.Now()
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for j := 0; j < *calls; j++ {
				var out []byte
				t0 := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				if err := conns[i].Invoke(ctx, *method, &req, &out); err != nil {
					fmt.Fprintln(os.Stderr, err)
					os.Exit(1)
				}
				cancel()
				lat[i] = append(lat[i], time.Since(t0))
			}
		}(i)
	}
	wg.Wait()
	elapsed := time.Since(start)
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(a, b int) bool { return all[a] < all[b] })
	fmt.Printf("%.0f %.4f %.4f\n", float64(len(all))/elapsed.Seconds(), float64(all[len(all)/2].Microseconds())/1000, float64(all[len(all)*99/100].Microseconds())/1000)
}
