package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand"
	"sort"
	"sync"
	"time"

	"github.com/containerd/ttrpc"

	"vaccelpeer/vaccel"
)

// runBench: CreateSession once, then ImageClassification in a loop from N
// goroutines sharing ONE ttrpc client connection, for a fixed duration.
// With -mix, each goroutine repeats a session's life instead: CreateSession,
// three ImageClassification, DestroySession (every call counted).
func runBench(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	addr := fs.String("addr", "", "address of the server")
	concurrency := fs.Int("concurrency", 1, "calls in flight")
	duration := fs.Duration("duration", 3*time.Second, "measured duration")
	warmup := fs.Duration("warmup", 300*time.Millisecond, "unmeasured warm-up")
	imageSize := fs.Int("image-size", 64, "image bytes per call")
	service := fs.String("service", mainService, "vAccel service name")
	mix := fs.Bool("mix", false, "create, classify three times, destroy, in a loop")
	fs.Parse(args)
	if *addr == "" {
		return fmt.Errorf("-addr is required")
	}

	conn, err := dial(*addr)
	if err != nil {
		return err
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	var cs vaccel.CreateSessionResponse
	err = client.Call(ctx, *service, "CreateSession", &vaccel.CreateSessionRequest{}, &cs)
	cancel()
	if err != nil {
		return fmt.Errorf("CreateSession: %w", err)
	}

	image := make([]byte, *imageSize)
	rand.New(rand.NewSource(1)).Read(image)
	req := &vaccel.ImageClassificationRequest{SessionId: cs.SessionId, Image: image}

	type worker struct {
		lat    []time.Duration
		errors int
		first  string
	}
	workers := make([]worker, *concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	measureFrom := start.Add(*warmup)
	end := measureFrom.Add(*duration)
	for i := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			w.lat = make([]time.Duration, 0, 1<<16)
			for {
				t0 := time.Now()
				if t0.After(end) {
					return
				}
				var err error
				if *mix {
					err = sessionLife(client, *service, image, func(t0, t1 time.Time) {
						if !t0.Before(measureFrom) && !t1.After(end) {
							w.lat = append(w.lat, t1.Sub(t0))
						}
					})
				} else {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					var resp vaccel.ImageClassificationResponse
					err = client.Call(ctx, *service, "ImageClassification", req, &resp)
					cancel()
				}
				t1 := time.Now()
				if t0.Before(measureFrom) || t1.After(end) {
					continue
				}
				if err != nil {
					w.errors++
					if w.first == "" {
						w.first = err.Error()
					}
					continue
				}
				if !*mix {
					w.lat = append(w.lat, t1.Sub(t0))
				}
			}
		}(&workers[i])
	}
	wg.Wait()

	var all []time.Duration
	errs := 0
	firstErr := ""
	for _, w := range workers {
		all = append(all, w.lat...)
		errs += w.errors
		if firstErr == "" {
			firstErr = w.first
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		i := int(p * float64(len(all)-1))
		return float64(all[i].Nanoseconds()) / 1e3
	}
	out := result{
		"calls":       len(all),
		"errors":      errs,
		"calls_per_s": float64(len(all)) / duration.Seconds(),
		"p50_us":      pct(0.50),
		"p99_us":      pct(0.99),
		"concurrency": *concurrency,
		"image_size":  *imageSize,
		"duration_s":  duration.Seconds(),
		"service":     *service,
		"mix":         *mix,
	}
	if firstErr != "" {
		out["first_error"] = firstErr
	}
	emit(out)
	return nil
}

// sessionLife: one session's calls, each timed through done(start, end).
func sessionLife(client *ttrpc.Client, service string, image []byte, done func(t0, t1 time.Time)) error {
	call := func(method string, req, resp interface{}) error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		t0 := time.Now()
		err := client.Call(ctx, service, method, req, resp)
		if err == nil {
			done(t0, time.Now())
		}
		return err
	}
	var cs vaccel.CreateSessionResponse
	if err := call("CreateSession", &vaccel.CreateSessionRequest{}, &cs); err != nil {
		return fmt.Errorf("CreateSession: %w", err)
	}
	req := &vaccel.ImageClassificationRequest{SessionId: cs.SessionId, Image: image}
	for i := 0; i < 3; i++ {
		var resp vaccel.ImageClassificationResponse
		if err := call("ImageClassification", req, &resp); err != nil {
			return fmt.Errorf("ImageClassification: %w", err)
		}
	}
	var empty vaccel.EmptyResponse
	if err := call("DestroySession", &vaccel.DestroySessionRequest{SessionId: cs.SessionId}, &empty); err != nil {
		return fmt.Errorf("DestroySession: %w", err)
	}
	return nil
}
