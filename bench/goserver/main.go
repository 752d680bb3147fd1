// bench/goserver - the Go net/http peer of agentsmithy's benchmark.
//
// The same protocol as build/agentsmithy-server's built-in demo, written the
// way a Go service usually is: one goroutine per request (net/http's), a
// time.Ticker for the pacing, an http.Flusher after every event, and on
// SIGINT/SIGTERM the idiomatic Server.Shutdown with a context bounded by the
// grace period. Every request's context derives from a base context that a
// RegisterOnShutdown hook cancels, so each in-flight stream hears about the
// shutdown, writes the shutdown error and `done`, and returns; net/http then
// ends the chunked body with the terminating chunk and closes the connection.
//
//	POST /api/chat  {"messages":[{"role":"user","content":"..."}], "stream": true,
//	                 "dialog_id": "...", "context": {"demo": {"tokens": N, "interval_ms": M}}}
//	                -> text/event-stream: chat_start, N x chat (the first at once,
//	                   then one per interval_ms), chat_end, done
//	GET  /health    -> {"status":"ok",...}
//
// Flags as build/agentsmithy-server takes them (--port, --host,
// --max-streams, --grace-period; --workdir, --log-format, --log-level and
// --generator are accepted and ignored), so that the load client starts both
// with the same command line. --cancel-stamps FILE turns it into the peer of
// bench/cancelbench.cpp: each stream blocks in a read on a socketpair that
// only its cancellation closes, and the times are written to FILE at exit.
//
// Standard library only: `go build` needs no module download.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const shutdownMessage = "Server is shutting down (graceful shutdown)"

// Events, with their fields in the order agentsmithy writes them (sorted),
// so that both servers put the same bytes on the wire.
type chatEvent struct {
	Content  string `json:"content"`
	DialogID string `json:"dialog_id"`
	Type     string `json:"type"`
}

type typeEvent struct {
	DialogID string `json:"dialog_id"`
	Type     string `json:"type"`
}

type doneEvent struct {
	DialogID string `json:"dialog_id"`
	Done     bool   `json:"done"`
	Type     string `json:"type"`
}

type errorEvent struct {
	Code     string `json:"code"`
	DialogID string `json:"dialog_id"`
	Error    string `json:"error"`
	Type     string `json:"type"`
}

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type chatRequest struct {
	Messages []message `json:"messages"`
	Stream   *bool     `json:"stream"`
	DialogID string    `json:"dialog_id"`
	Context  struct {
		Demo struct {
			Tokens     *int64 `json:"tokens"`
			IntervalMs *int64 `json:"interval_ms"`
		} `json:"demo"`
	} `json:"context"`
}

// The demo's text: the same story as agentsmithy's demo, three words a chunk.
var storySentences = []string{
	"In a valley where the rivers ran backwards at dusk, there lived a smith who forged answers instead of swords.",
	"Every morning travellers climbed the hill to her forge with questions wrapped in cloth, and every evening they walked home lighter.",
	"She heated each question until it glowed, folded it over and over, and quenched it in a barrel of cold starlight.",
	"One winter a stranger arrived carrying a question so heavy that the road cracked under his boots.",
	"He asked how a thing could end well when nobody knew it was ending, and the smith set down her hammer for the first time in years.",
	"She told him that endings are kind only when they are announced, when every listener hears the last word before the door is closed.",
	"So together they built a bell that rang once for each traveller still on the road, so that no one would walk into a dark and silent forge.",
	"When the smith finally grew tired and banked her fire, the bell rang for every traveller, and each of them turned for home knowing why.",
	"Nobody was left waiting at the door, no question was left half forged, and the valley slept soundly that night.",
	"Years later children still told the story, and they always ended it the same way, with the ringing of the bell and a quiet word of goodbye.",
}

const wordsPerChunk = 3

var storyWords = func() []string {
	var all []string
	for chapter := 1; len(all) < 2200; chapter++ {
		all = append(all, "Chapter", strconv.Itoa(chapter)+".")
		for _, s := range storySentences {
			all = append(all, strings.Fields(s)...)
		}
	}
	return all
}()

func newDialogID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b[:])
}

func validDialogID(id string) bool {
	if len(id) < 1 || len(id) > 128 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// monotonicNs is CLOCK_MONOTONIC in nanoseconds, the clock the load client
// stamps with (Go's time package does not expose its monotonic reading).
func monotonicNs() int64 {
	var ts syscall.Timespec
	syscall.Syscall(syscall.SYS_CLOCK_GETTIME, 1 /* CLOCK_MONOTONIC */, uintptr(unsafe.Pointer(&ts)), 0)
	return ts.Nano()
}

type stamp struct {
	dialogID             string
	blocked, cb, release int64
}

type server struct {
	base       context.Context // cancelled when the shutdown starts
	sem        chan struct{}   // one slot per stream (--max-streams)
	cancelMode bool
	mu         sync.Mutex
	stamps     []stamp
}

func httpError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	b, _ := json.Marshal(map[string]string{"error": msg})
	w.Write(b)
}

// sse writes one event and flushes it: one chunk per event.
type sse struct {
	w  http.ResponseWriter
	f  http.Flusher
	id string
}

func (s *sse) send(v interface{}) bool {
	b, err := json.Marshal(v)
	if err != nil {
		return false
	}
	buf := make([]byte, 0, len(b)+8)
	buf = append(buf, "data: "...)
	buf = append(buf, b...)
	buf = append(buf, "\n\n"...)
	if _, err := s.w.Write(buf); err != nil {
		return false
	}
	s.f.Flush()
	return true
}

func (s *sse) shutdownTail() {
	s.send(errorEvent{Code: "shutdown", DialogID: s.id, Error: shutdownMessage, Type: "error"})
	s.send(doneEvent{DialogID: s.id, Done: true, Type: "done"})
}

func (srv *server) health(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"status":"ok","service":"goserver","pid":%d}`, os.Getpid())
}

func (srv *server) chat(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		httpError(w, http.StatusMethodNotAllowed, "Method not allowed")
		return
	}
	var req chatRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		httpError(w, http.StatusBadRequest, "Invalid JSON")
		return
	}
	query, hasUser := "", false
	for _, m := range req.Messages {
		if m.Role == "user" {
			query, hasUser = m.Content, true
		}
	}
	if !hasUser {
		httpError(w, http.StatusBadRequest, "No user message found")
		return
	}
	id := req.DialogID
	if id == "" {
		id = newDialogID()
	} else if !validDialogID(id) {
		httpError(w, http.StatusUnprocessableEntity, "dialog_id: must be 1 to 128 characters of [A-Za-z0-9_-]")
		return
	}
	tokens, interval := int64(0), int64(20)
	if t := req.Context.Demo.Tokens; t != nil {
		if *t < 1 || *t > 1000000 {
			httpError(w, http.StatusBadRequest, "context.demo.tokens must be an integer in [1, 1000000]")
			return
		}
		tokens = *t
	}
	if iv := req.Context.Demo.IntervalMs; iv != nil {
		if *iv < 0 || *iv > 60000 {
			httpError(w, http.StatusBadRequest, "context.demo.interval_ms must be an integer in [0, 60000]")
			return
		}
		interval = *iv
	}
	if srv.sem != nil {
		select {
		case srv.sem <- struct{}{}:
			defer func() { <-srv.sem }()
		default:
			w.Header().Set("Retry-After", "1")
			httpError(w, http.StatusServiceUnavailable, "Too many concurrent streams")
			return
		}
	}
	words := storyWords
	if tokens == 0 && !strings.Contains(strings.ToLower(query), "long story") {
		words = strings.Fields(`You said: "` + query + `". This is the agentsmithy demo generator; ask it to "Tell me a long story" to watch a long answer stream.`)
	}
	chunks := tokens
	if chunks == 0 {
		chunks = int64((len(words) + wordsPerChunk - 1) / wordsPerChunk)
	}
	word := 0
	nextChunk := func() string {
		var b strings.Builder
		for k := 0; k < wordsPerChunk && (tokens > 0 || word < len(words)); k++ {
			b.WriteString(words[word%len(words)])
			b.WriteByte(' ')
			word++
		}
		return b.String()
	}

	if req.Stream != nil && !*req.Stream {
		var text strings.Builder
		for i := int64(0); i < chunks; i++ {
			text.WriteString(nextChunk())
		}
		w.Header().Set("Content-Type", "application/json")
		b, _ := json.Marshal(map[string]interface{}{"content": text.String(), "done": true, "dialog_id": id})
		w.Write(b)
		return
	}

	flusher, ok := w.(http.Flusher)
	if !ok {
		httpError(w, http.StatusInternalServerError, "streaming unsupported")
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	out := &sse{w: w, f: flusher, id: id}
	ctx := r.Context() // done when the client goes away or the shutdown starts

	// The stream is cancelled: on shutdown it ends with the shutdown error
	// and done; a client that is gone gets nothing more.
	ended := func() {
		if srv.base.Err() != nil {
			out.shutdownTail()
		}
	}

	if !out.send(typeEvent{DialogID: id, Type: "chat_start"}) {
		return
	}
	if srv.cancelMode {
		srv.blockUntilCancelled(ctx, out, id)
		return
	}
	var tick <-chan time.Time
	for i := int64(1); i <= chunks; i++ {
		if i > 1 && interval > 0 {
			if tick == nil {
				t := time.NewTicker(time.Duration(interval) * time.Millisecond)
				defer t.Stop()
				tick = t.C
				// The ticker starts now: chunk 2 is due one interval after chunk 1.
			}
			select {
			case <-tick:
			case <-ctx.Done():
				ended()
				return
			}
		} else if ctx.Err() != nil {
			ended()
			return
		}
		if !out.send(chatEvent{Content: nextChunk(), DialogID: id, Type: "chat"}) {
			return
		}
	}
	out.send(typeEvent{DialogID: id, Type: "chat_end"})
	out.send(doneEvent{DialogID: id, Done: true, Type: "done"})
}

// blockUntilCancelled: the producer is blocked in a read on a socketpair
// that nothing writes to; only its cancellation (the request context being
// done: client gone or shutdown) interrupts it, by closing the socket.
func (srv *server) blockUntilCancelled(ctx context.Context, out *sse, id string) {
	if !out.send(chatEvent{Content: "blocked ", DialogID: id, Type: "chat"}) {
		return
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		log.Printf("socketpair: %v", err)
		return
	}
	f := os.NewFile(uintptr(fds[0]), "producer")
	conn, err := net.FileConn(f)
	f.Close()
	defer syscall.Close(fds[1])
	if err != nil {
		log.Printf("FileConn: %v", err)
		return
	}
	st := stamp{dialogID: id}
	var cbDone sync.WaitGroup
	cbDone.Add(1)
	stop := make(chan struct{})
	go func() { // the cancel callback
		defer cbDone.Done()
		select {
		case <-ctx.Done():
			st.cb = monotonicNs()
			conn.Close()
		case <-stop:
		}
	}()
	st.blocked = monotonicNs()
	var buf [64]byte
	conn.Read(buf[:]) // blocks until the callback closes conn
	st.release = monotonicNs()
	close(stop)
	cbDone.Wait()
	conn.Close()
	srv.mu.Lock()
	srv.stamps = append(srv.stamps, st)
	srv.mu.Unlock()
	if srv.base.Err() != nil {
		out.shutdownTail()
	}
}

func (srv *server) writeStamps(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "# dialog_id t_blocked_ns t_callback_ns t_released_ns (CLOCK_MONOTONIC)")
	srv.mu.Lock()
	for _, s := range srv.stamps {
		fmt.Fprintf(w, "%s %d %d %d\n", s.dialogID, s.blocked, s.cb, s.release)
	}
	srv.mu.Unlock()
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func main() {
	log.SetFlags(log.LstdFlags | log.Lmicroseconds | log.LUTC)
	host := flag.String("host", "127.0.0.1", "address to bind")
	port := flag.Int("port", 8765, "port, 0 for any free")
	maxStreams := flag.Int("max-streams", 256, "concurrent chat requests before 503 (0: no limit)")
	grace := flag.Float64("grace-period", 5, "drain limit at shutdown, seconds")
	stampsPath := flag.String("cancel-stamps", "", "cancel bench: block every stream until cancelled; write the times here at exit")
	flag.String("workdir", ".", "ignored (common command line)")
	flag.String("log-format", "pretty", "ignored")
	flag.String("log-level", "info", "ignored")
	flag.String("generator", "", "ignored")
	flag.Parse()

	base, cancelBase := context.WithCancel(context.Background())
	srv := &server{base: base, cancelMode: *stampsPath != ""}
	if *maxStreams > 0 {
		srv.sem = make(chan struct{}, *maxStreams)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/health", srv.health)
	mux.HandleFunc("/api/chat", srv.chat)
	hs := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       5 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return base },
		ErrorLog:          log.New(os.Stderr, "http: ", log.LstdFlags),
	}
	// Shutdown runs this hook as it starts: every request context is done.
	hs.RegisterOnShutdown(cancelBase)

	ln, err := net.Listen("tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Printf("cannot listen: %v", err)
		os.Exit(1)
	}
	sigCtx, stopSignals := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stopSignals()
	served := make(chan error, 1)
	go func() { served <- hs.Serve(ln) }()
	log.Printf("goserver ready on %s (GOMAXPROCS %d)", ln.Addr(), runtime.GOMAXPROCS(0))

	select {
	case <-sigCtx.Done():
	case err := <-served:
		log.Printf("serve: %v", err)
		os.Exit(1)
	}
	stopSignals()
	t0 := time.Now()
	log.Printf("signal received; shutting down (grace period %.1f s)", *grace)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(*grace*float64(time.Second)))
	defer cancel()
	status := 0
	if err := hs.Shutdown(ctx); err != nil {
		log.Printf("shutdown: %v; closing the remaining connections", err)
		hs.Close()
		status = 1
	}
	if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Printf("serve: %v", err)
	}
	if srv.cancelMode {
		if err := srv.writeStamps(*stampsPath); err != nil {
			log.Printf("cancel stamps: %v", err)
			status = 1
		}
	}
	log.Printf("drained in %v; stopped", time.Since(t0))
	os.Exit(status)
}
