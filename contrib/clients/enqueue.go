// Enqueue mail into relayq from Go (go-redis v9) and follow outcomes.
//
//	go mod init example && go get github.com/redis/go-redis/v9
//	RELAYQ_REDIS=redis://127.0.0.1:6379/0 go run enqueue.go user@example.net
//
// The contract is lua/redis/README.md: one FCALL relayq_enqueue per message.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

const queue = "default"

// Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
// them in one Redis Cluster slot. This prefix is the one key FCALL gets.
const (
	prefix = "relayq:{" + queue + "}"
	events = prefix + ":events"
)

// Envelope is encoding/json's input: never build the JSON by hand.
type Envelope struct {
	From  string         `json:"from"`
	To    []string       `json:"to"`
	Key   string         `json:"key,omitempty"`   // same key again (within 24 h): same id
	Meta  map[string]any `json:"meta,omitempty"`  // comes back in every event
	Delay float64        `json:"delay,omitempty"` // seconds before the first attempt
}

// Rejected: relayq refused the message (bad envelope or message); nothing
// was written.
type Rejected struct{ Reason string }

func (e *Rejected) Error() string { return e.Reason }

// enqueue queues one message (RFC 5322 text) and returns its id. The error
// is *Rejected, a redis.Error (OOM, the library not loaded yet: relayqd
// loads it), or a network error: then it is unknown whether the message
// was queued, and calling enqueue again with the same Key is safe.
func enqueue(ctx context.Context, rdb *redis.Client, env Envelope, message []byte) (string, error) {
	js, err := json.Marshal(env)
	if err != nil {
		return "", err
	}
	id, err := rdb.FCall(ctx, "relayq_enqueue", []string{prefix}, js, message).Text()
	var rerr redis.Error
	if errors.As(err, &rerr) && strings.HasPrefix(rerr.Error(), "ERR relayq: ") {
		return "", &Rejected{Reason: rerr.Error()} // go-redis keeps Redis' whole text
	}
	return id, err
}

// Event is one entry of the events stream.
type Event struct {
	StreamID string
	Fields   map[string]string // type, id, rcpt, code, enh, text, stage, attempt, next ("" = absent)
	Meta     map[string]any
}

// followEvents calls handle for each event after stream id start until it
// returns false. Keep the last id you handled and resume from it after a
// restart; the stream is capped (events_cap), so a reader away too long
// misses entries. Workers sharing the events would use XReadGroup + XAck.
func followEvents(ctx context.Context, rdb *redis.Client, start string, handle func(Event) bool) error {
	last := start
	for {
		streams, err := rdb.XRead(ctx, &redis.XReadArgs{
			Streams: []string{events, last}, Count: 100, Block: 5 * time.Second,
		}).Result()
		if errors.Is(err, redis.Nil) {
			continue // 5 s without events
		}
		if err != nil {
			return err
		}
		for _, s := range streams {
			for _, m := range s.Messages {
				last = m.ID
				ev := Event{StreamID: m.ID, Fields: map[string]string{}, Meta: map[string]any{}}
				for k, v := range m.Values {
					ev.Fields[k], _ = v.(string)
				}
				if ev.Fields["meta"] != "" {
					_ = json.Unmarshal([]byte(ev.Fields["meta"]), &ev.Meta)
				}
				if !handle(ev) {
					return nil
				}
			}
		}
	}
}

func main() {
	ctx := context.Background()
	url := os.Getenv("RELAYQ_REDIS")
	if url == "" {
		url = "redis://127.0.0.1:6379/0"
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		log.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()

	rcpt := "user@example.net"
	if len(os.Args) > 1 {
		rcpt = os.Args[1]
	}

	// Start at the stream's current end, taken before enqueueing, so that
	// no event of our message is missed.
	start := "0-0"
	newest, err := rdb.XRevRangeN(ctx, events, "+", "-", 1).Result()
	if err != nil {
		log.Fatal(err)
	}
	if len(newest) > 0 {
		start = newest[0].ID
	}

	body := []byte("From: app@example.com\r\nTo: " + rcpt + "\r\nSubject: hello from relayq\r\n\r\nIt works.\r\n")
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	key := "demo:" + hex.EncodeToString(b) // name what is sent, e.g. "welcome:user-42"
	env := Envelope{From: "app@example.com", To: []string{rcpt}, Key: key, Meta: map[string]any{"order": 42}}
	id, err := enqueue(ctx, rdb, env, body)
	if err != nil {
		log.Fatal(err)
	}
	again, err := enqueue(ctx, rdb, env, body)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("queued %s (same key again gives %s)\n", id, again)

	_, err = enqueue(ctx, rdb, Envelope{From: "app@example.com", To: []string{"no-at-sign"}}, body)
	var rej *Rejected
	if errors.As(err, &rej) {
		fmt.Println("rejected:", rej.Reason)
	} else if err != nil {
		log.Fatal(err)
	}

	pending := map[string]bool{rcpt: true}
	err = followEvents(ctx, rdb, start, func(ev Event) bool {
		f := ev.Fields
		if f["id"] != id {
			return true
		}
		fmt.Println(f["type"], f["rcpt"], f["code"], f["text"], "meta:", ev.Meta)
		switch f["type"] {
		case "delivered", "failed", "expired", "dropped":
			delete(pending, f["rcpt"]) // deferred means: it will be retried
		}
		return len(pending) > 0
	})
	if err != nil {
		log.Fatal(err)
	}
}
