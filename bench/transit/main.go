// transitbench makes one Vault/OpenBao transit call (encrypt or decrypt of a 32-byte data key, as kleidi sends
// it) from N goroutines, each with its own http.Client and one kept-alive connection: the lean reference that
// kleidi's Vault backend is measured against. Prints: ops/s p50-ms p99-ms, like bench/goclient/main.go.
// The token is read from -token-file, never taken from argv. Standard library only; built by bench/goclient.py
// with Debian's golang-go, offline, in GOPATH mode.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

type reply struct {
	Data struct {
		Ciphertext string `json:"ciphertext"`
		Plaintext  string `json:"plaintext"`
	} `json:"data"`
	Errors []string `json:"errors"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "transitbench: "+format+"\n", args...)
	os.Exit(1)
}

// call POSTs body to url and returns the field the operation answers with; any failure ends the program.
func call(client *http.Client, url, token string, body []byte, field string) string {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		fail("%v", err)
	}
	req.Header.Set("X-Vault-Token", token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		fail("%v", err)
	}
	data, err := io.ReadAll(resp.Body)
	resp.Body.Close() // the body is read to the end, so the connection goes back to the pool
	if err != nil {
		fail("reading the reply of %s: %v", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		fail("%s: HTTP %d: %s", url, resp.StatusCode, strings.TrimSpace(string(data)))
	}
	var r reply
	if err := json.Unmarshal(data, &r); err != nil {
		fail("%s: %v", url, err)
	}
	value := r.Data.Ciphertext
	if field == "plaintext" {
		value = r.Data.Plaintext
	}
	if value == "" {
		fail("%s: no %s in the reply: %s", url, field, strings.TrimSpace(string(data)))
	}
	return value
}

func main() {
	address := flag.String("address", "http://127.0.0.1:8200", "Vault/OpenBao address")
	key := flag.String("key", "", "transit key name")
	mount := flag.String("mount", "transit", "transit mount path")
	tokenFile := flag.String("token-file", "", "file holding the Vault token")
	op := flag.String("op", "encrypt", "encrypt or decrypt")
	ciphertext := flag.String("ciphertext", "", "vault:v1:... ciphertext to decrypt (for -op decrypt)")
	clients := flag.Int("clients", 1, "concurrent clients")
	calls := flag.Int("calls", 2000, "calls per client")
	flag.Parse()
	if *key == "" || *tokenFile == "" {
		fail("-key and -token-file are required")
	}
	raw, err := os.ReadFile(*tokenFile)
	if err != nil {
		fail("%v", err)
	}
	token := strings.TrimSpace(string(raw))
	seed := make([]byte, 32)
	if _, err := rand.Read(seed); err != nil {
		fail("%v", err)
	}
	var body map[string]string
	field := ""
	switch *op {
	case "encrypt":
		body, field = map[string]string{"plaintext": base64.StdEncoding.EncodeToString(seed)}, "ciphertext"
	case "decrypt":
		if !strings.HasPrefix(*ciphertext, "vault:") {
			fail("-op decrypt needs -ciphertext vault:v...")
		}
		body, field = map[string]string{"ciphertext": *ciphertext}, "plaintext"
	default:
		fail("-op must be encrypt or decrypt, not %q", *op)
	}
	payload, err := json.Marshal(body)
	if err != nil {
		fail("%v", err)
	}
	url := fmt.Sprintf("%s/v1/%s/%s/%s", strings.TrimRight(*address, "/"), strings.Trim(*mount, "/"), *op, *key)

	conns := make([]*http.Client, *clients)
	for i := range conns {
		transport := &http.Transport{MaxIdleConns: 1, MaxIdleConnsPerHost: 1, MaxConnsPerHost: 1, IdleConnTimeout: time.Minute}
		conns[i] = &http.Client{Transport: transport, Timeout: 5 * time.Second}
		for j := 0; j < 20; j++ {
			call(conns[i], url, token, payload, field)
		}
	}
	lat := make([][]time.Duration, *clients)
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			lat[i] = make([]time.Duration, 0, *calls)
			for j := 0; j < *calls; j++ {
				t0 := time.Now()
				call(conns[i], url, token, payload, field)
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
