// soakclient makes a mix of KMS calls on a unix socket for a while, from N goroutines with their own grpc-go
// connection each (as apiservers do), and never stops at an error: once a second it prints one JSON line with the
// outcomes since the last line, by method and gRPC code: {"t":12,"counts":{"Encrypt OK":310,"Decrypt Unavailable":2}}.
// Built by bench/goclient.py like the benchmark client (Debian's grpc-go, GOPATH mode, offline).
package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	*(v.(*[]byte)) = append([]byte(nil), data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type call struct {
	method string
	name   string
	req    []byte
}

type calls []call

func (c *calls) String() string { return fmt.Sprint(len(*c)) }
func (c *calls) Set(value string) error {
	method, reqHex, ok := strings.Cut(value, "=")
	if !ok {
		return fmt.Errorf("want /service/Method=hex, got %q", value)
	}
	req, err := hex.DecodeString(reqHex)
	if err != nil {
		return err
	}
	*c = append(*c, call{method, method[strings.LastIndex(method, "/")+1:], req})
	return nil
}

func main() {
	sock := flag.String("socket", "", "unix socket")
	clients := flag.Int("clients", 4, "concurrent clients")
	duration := flag.Duration("duration", 30*time.Minute, "how long to run")
	pause := flag.Duration("pause", 0, "pause between one client's calls (0: back to back)")
	var mix calls
	flag.Var(&mix, "call", "/service/Method=hex-request, repeatable: each client cycles through them")
	flag.Parse()
	if len(mix) == 0 {
		fmt.Fprintln(os.Stderr, "soakclient: give at least one -call")
		os.Exit(2)
	}
	var mu sync.Mutex
	counts := map[string]int{}
	dial := func(ctx context.Context, addr string) (net.Conn, error) { return net.Dial("unix", *sock) }
	start := time.Now()
	until := start.Add(*duration)
	var wg sync.WaitGroup
	for i := 0; i < *clients; i++ {
		conn, err := grpc.Dial("localhost", grpc.WithInsecure(), grpc.WithContextDialer(dial),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			panic(err)
		}
		wg.Add(1)
		go func(i int, conn *grpc.ClientConn) {
			defer wg.Done()
			for j := i; time.Now().Before(until); j++ {
				c := mix[j%len(mix)]
				var out []byte
				ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
				err := conn.Invoke(ctx, c.method, &c.req, &out)
				cancel()
				key := c.name + " " + status.Code(err).String()
				mu.Lock()
				counts[key]++
				mu.Unlock()
				if err != nil {
					time.Sleep(10 * time.Millisecond) // an outage is counted, not hammered
				}
				time.Sleep(*pause)
			}
		}(i, conn)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(time.Second)
	report := func() {
		mu.Lock()
		line, _ := json.Marshal(map[string]interface{}{"t": int(time.Since(start).Seconds()), "counts": counts})
		counts = map[string]int{}
		mu.Unlock()
		fmt.Println(string(line))
	}
	for {
		select {
		case <-tick.C:
			report()
		case <-done:
			report()
			return
		}
	}
}
