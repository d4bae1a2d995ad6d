package main

import (
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/golang/protobuf/ptypes/any"
	spb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"vaccelpeer/interop"
	"vaccelpeer/vaccel"
)

const (
	noopTag     = "This is a dummy classification tag!"
	noopImgname = "This is a dummy imgname!"
)

// agent is a vAccel agent with a noop backend: session ids count from 1,
// classification answers the noop plugin's dummy tag.
type agent struct {
	mu           sync.Mutex
	nextSession  int64
	sessions     map[int64]bool
	nextResource int64
	resources    map[int64][]*vaccel.Blob
}

func newAgent() *agent {
	return &agent{nextSession: 1, nextResource: 1, sessions: map[int64]bool{}, resources: map[int64][]*vaccel.Blob{}}
}

func (a *agent) check(id int64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.sessions[id] {
		return status.Errorf(codes.NotFound, "Unknown session %d", id)
	}
	return nil
}

func (a *agent) CreateSession(ctx context.Context, req *vaccel.CreateSessionRequest) (*vaccel.CreateSessionResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id := a.nextSession
	a.nextSession++
	a.sessions[id] = true
	return &vaccel.CreateSessionResponse{SessionId: id}, nil
}

func (a *agent) UpdateSession(ctx context.Context, req *vaccel.UpdateSessionRequest) (*vaccel.EmptyResponse, error) {
	if err := a.check(req.SessionId); err != nil {
		return nil, err
	}
	return &vaccel.EmptyResponse{}, nil
}

func (a *agent) DestroySession(ctx context.Context, req *vaccel.DestroySessionRequest) (*vaccel.EmptyResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.sessions[req.SessionId] {
		return nil, status.Errorf(codes.NotFound, "Unknown session %d", req.SessionId)
	}
	delete(a.sessions, req.SessionId)
	return &vaccel.EmptyResponse{}, nil
}

func (a *agent) ImageClassification(ctx context.Context, req *vaccel.ImageClassificationRequest) (*vaccel.ImageClassificationResponse, error) {
	if err := a.check(req.SessionId); err != nil {
		return nil, err
	}
	return &vaccel.ImageClassificationResponse{Tags: []byte(noopTag)}, nil
}

func (a *agent) Genop(ctx context.Context, req *vaccel.GenopRequest) (*vaccel.GenopResponse, error) {
	if err := a.check(req.SessionId); err != nil {
		return nil, err
	}
	if len(req.ReadArgs) == 0 || len(req.ReadArgs[0].Buf) != 4 {
		return nil, status.Errorf(codes.InvalidArgument, "genop operation type must be a 4-byte integer")
	}
	switch binary.LittleEndian.Uint32(req.ReadArgs[0].Buf) {
	case 2: // image classification: tag and image name, NUL-padded to the client's sizes
		out := &vaccel.GenopResponse{}
		for i, text := range []string{noopTag, noopImgname} {
			if i < len(req.WriteArgs) {
				buf := make([]byte, len(req.WriteArgs[i].Buf))
				copy(buf, text)
				out.WriteArgs = append(out.WriteArgs, &vaccel.Arg{Buf: buf, Size_: uint32(len(buf))})
			}
		}
		return out, nil
	case 7: // exec: like noop, the write arguments come back unchanged
		return &vaccel.GenopResponse{WriteArgs: req.WriteArgs}, nil
	}
	return nil, status.Errorf(codes.Unimplemented, "genop operation not supported by the noop peer")
}

func (a *agent) RegisterResource(ctx context.Context, req *vaccel.RegisterResourceRequest) (*vaccel.RegisterResourceResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	id := a.nextResource
	a.nextResource++
	a.resources[id] = req.Blobs
	return &vaccel.RegisterResourceResponse{ResourceId: id}, nil
}

func (a *agent) UnregisterResource(ctx context.Context, req *vaccel.UnregisterResourceRequest) (*vaccel.EmptyResponse, error) {
	return &vaccel.EmptyResponse{}, nil
}

// The model methods answer like vAccel's noop plugin: loads and unloads
// succeed (TensorFlow's with the plugin's status), a run echoes input i as
// output i for each output asked for, a PyTorch model with no blob is EINVAL,
// and sync returns the blobs as registered. A model id must name a resource.

const noopStatus = "Operation handled by noop plugin"

func (a *agent) model(session, id int64, noun string) ([]*vaccel.Blob, error) {
	if err := a.check(session); err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	blobs, ok := a.resources[id]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "Unknown %s %d", noun, id)
	}
	return blobs, nil
}

func echoCount(asked uint64, have int) (int, error) {
	if asked > uint64(have) {
		return 0, status.Errorf(codes.InvalidArgument, "%d outputs asked of %d inputs", asked, have)
	}
	return int(asked), nil
}

func (a *agent) SyncResource(ctx context.Context, req *vaccel.SyncResourceRequest) (*vaccel.SyncResourceResponse, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	blobs, ok := a.resources[req.ResourceId]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "Unknown resource %d", req.ResourceId)
	}
	return &vaccel.SyncResourceResponse{Blobs: blobs}, nil
}

func (a *agent) TensorflowModelLoad(ctx context.Context, req *vaccel.TensorflowModelLoadRequest) (*vaccel.TensorflowModelLoadResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow model"); err != nil {
		return nil, err
	}
	return &vaccel.TensorflowModelLoadResponse{Status: &vaccel.OpStatus{Message: noopStatus}}, nil
}

func (a *agent) TensorflowModelUnload(ctx context.Context, req *vaccel.TensorflowModelUnloadRequest) (*vaccel.TensorflowModelUnloadResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow model"); err != nil {
		return nil, err
	}
	return &vaccel.TensorflowModelUnloadResponse{Status: &vaccel.OpStatus{Message: noopStatus}}, nil
}

func (a *agent) TensorflowModelRun(ctx context.Context, req *vaccel.TensorflowModelRunRequest) (*vaccel.TensorflowModelRunResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow model"); err != nil {
		return nil, err
	}
	n, err := echoCount(uint64(len(req.OutNodes)), len(req.InTensors))
	if err != nil {
		return nil, err
	}
	return &vaccel.TensorflowModelRunResponse{OutTensors: req.InTensors[:n], Status: &vaccel.OpStatus{Message: noopStatus}}, nil
}

func (a *agent) TensorflowLiteModelLoad(ctx context.Context, req *vaccel.TensorflowLiteModelLoadRequest) (*vaccel.EmptyResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow Lite model"); err != nil {
		return nil, err
	}
	return &vaccel.EmptyResponse{}, nil
}

func (a *agent) TensorflowLiteModelUnload(ctx context.Context, req *vaccel.TensorflowLiteModelUnloadRequest) (*vaccel.EmptyResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow Lite model"); err != nil {
		return nil, err
	}
	return &vaccel.EmptyResponse{}, nil
}

func (a *agent) TensorflowLiteModelRun(ctx context.Context, req *vaccel.TensorflowLiteModelRunRequest) (*vaccel.TensorflowLiteModelRunResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "TensorFlow Lite model"); err != nil {
		return nil, err
	}
	n, err := echoCount(req.NrOutTensors, len(req.InTensors))
	if err != nil {
		return nil, err
	}
	return &vaccel.TensorflowLiteModelRunResponse{OutTensors: req.InTensors[:n]}, nil
}

func (a *agent) TorchModelLoad(ctx context.Context, req *vaccel.TorchModelLoadRequest) (*vaccel.EmptyResponse, error) {
	blobs, err := a.model(req.SessionId, req.ModelId, "PyTorch model")
	if err != nil {
		return nil, err
	}
	if len(blobs) == 0 {
		return nil, status.Errorf(codes.InvalidArgument, "PyTorch model %d has no file to load", req.ModelId)
	}
	return &vaccel.EmptyResponse{}, nil
}

func (a *agent) TorchModelRun(ctx context.Context, req *vaccel.TorchModelRunRequest) (*vaccel.TorchModelRunResponse, error) {
	if _, err := a.model(req.SessionId, req.ModelId, "PyTorch model"); err != nil {
		return nil, err
	}
	n, err := echoCount(req.NrOutTensors, len(req.InTensors))
	if err != nil {
		return nil, err
	}
	return &vaccel.TorchModelRunResponse{OutTensors: req.InTensors[:n]}, nil
}

// GetProfiler: the session's profiling regions; the noop peer records none.
func (a *agent) GetProfiler(ctx context.Context, req *vaccel.ProfilerRequest) (*vaccel.ProfilerResponse, error) {
	if err := a.check(req.SessionId); err != nil {
		return nil, err
	}
	return &vaccel.ProfilerResponse{Profiler: &vaccel.Profiler{}}, nil
}

// registerAgent serves one agent under all four vAccel service names (the
// generated RegisterVaccelAgentService knows only vaccel.VaccelAgent).
func registerAgent(srv *ttrpc.Server, a *agent) {
	methods := map[string]ttrpc.Method{
		"CreateSession": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.CreateSessionRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.CreateSession(ctx, &req)
		},
		"UpdateSession": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.UpdateSessionRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.UpdateSession(ctx, &req)
		},
		"DestroySession": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.DestroySessionRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.DestroySession(ctx, &req)
		},
		"ImageClassification": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.ImageClassificationRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.ImageClassification(ctx, &req)
		},
		"Genop": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.GenopRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.Genop(ctx, &req)
		},
		"RegisterResource": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.RegisterResourceRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.RegisterResource(ctx, &req)
		},
		"UnregisterResource": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.UnregisterResourceRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.UnregisterResource(ctx, &req)
		},
		"GetProfiler": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.ProfilerRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.GetProfiler(ctx, &req)
		},
		"SyncResource": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.SyncResourceRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.SyncResource(ctx, &req)
		},
		"TensorflowModelLoad": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowModelLoadRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowModelLoad(ctx, &req)
		},
		"TensorflowModelUnload": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowModelUnloadRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowModelUnload(ctx, &req)
		},
		"TensorflowModelRun": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowModelRunRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowModelRun(ctx, &req)
		},
		"TensorflowLiteModelLoad": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowLiteModelLoadRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowLiteModelLoad(ctx, &req)
		},
		"TensorflowLiteModelUnload": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowLiteModelUnloadRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowLiteModelUnload(ctx, &req)
		},
		"TensorflowLiteModelRun": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TensorflowLiteModelRunRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TensorflowLiteModelRun(ctx, &req)
		},
		"TorchModelLoad": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TorchModelLoadRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TorchModelLoad(ctx, &req)
		},
		"TorchModelRun": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req vaccel.TorchModelRunRequest
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return a.TorchModelRun(ctx, &req)
		},
	}
	for _, name := range agentServices {
		srv.Register(name, methods)
	}
}

// echo implements interop.Echo.
type echo struct {
	mu       sync.Mutex
	meetings map[string]*meeting
}

// meeting is one rendezvous of Meet calls of the same name.
type meeting struct {
	arrived int32
	full    chan struct{} // closed once the last party has arrived
}

func newEcho() *echo {
	return &echo{meetings: map[string]*meeting{}}
}

// logf writes one line on stderr, where the tests wait for it.
func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func (*echo) Echo(ctx context.Context, req *interop.EchoRequest) (*interop.EchoResponse, error) {
	resp := &interop.EchoResponse{Payload: req.Payload}
	if md, ok := ttrpc.GetMetadata(ctx); ok {
		keys := make([]string, 0, len(md))
		for k := range md {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			for _, v := range md[k] {
				resp.Metadata = append(resp.Metadata, &interop.KeyValue{Key: k, Value: v})
			}
		}
	}
	if dl, ok := ctx.Deadline(); ok {
		resp.HasDeadline = true
		resp.DeadlineRemainingNano = int64(time.Until(dl))
	}
	return resp, nil
}

func (*echo) Sleep(ctx context.Context, req *interop.SleepRequest) (*interop.SleepResponse, error) {
	start := time.Now()
	timer := time.NewTimer(time.Duration(req.DurationNano))
	defer timer.Stop()
	logf("SLEEP started %v", time.Duration(req.DurationNano))
	select {
	case <-timer.C:
		logf("SLEEP ended: slept")
		return &interop.SleepResponse{SleptNano: int64(time.Since(start))}, nil
	case <-ctx.Done():
		if ctx.Err() == context.DeadlineExceeded {
			logf("SLEEP ended: deadline exceeded")
			return nil, status.Errorf(codes.DeadlineExceeded, "deadline exceeded after %v", time.Since(start).Round(time.Millisecond))
		}
		logf("SLEEP ended: cancelled")
		return nil, status.Errorf(codes.Canceled, "cancelled")
	}
}

func (e *echo) Meet(ctx context.Context, req *interop.MeetRequest) (*interop.MeetResponse, error) {
	e.mu.Lock()
	m := e.meetings[req.Name]
	if m == nil {
		m = &meeting{full: make(chan struct{})}
		e.meetings[req.Name] = m
	}
	m.arrived++
	arrived := m.arrived
	if arrived >= req.Parties {
		delete(e.meetings, req.Name)
		close(m.full)
	}
	e.mu.Unlock()
	logf("MEET %s arrived %d/%d", req.Name, arrived, req.Parties)
	select {
	case <-m.full:
		return &interop.MeetResponse{Arrived: arrived}, nil
	case <-ctx.Done():
		e.mu.Lock()
		if e.meetings[req.Name] == m {
			m.arrived-- // this party leaves a meeting still waiting for others
		}
		e.mu.Unlock()
		if ctx.Err() == context.DeadlineExceeded {
			return nil, status.Errorf(codes.DeadlineExceeded, "meeting %s: %d of %d arrived", req.Name, arrived, req.Parties)
		}
		return nil, status.Errorf(codes.Canceled, "cancelled")
	}
}

func (*echo) Fail(ctx context.Context, req *interop.FailRequest) (*interop.EchoResponse, error) {
	st := &spb.Status{Code: req.Code, Message: req.Message}
	if req.DetailTypeUrl != "" {
		st.Details = []*any.Any{{TypeUrl: req.DetailTypeUrl, Value: req.DetailValue}}
	}
	return nil, status.ErrorProto(st)
}

func runServer(args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	addr := fs.String("addr", "tcp://127.0.0.1:0", "address to listen on")
	fs.Parse(args)

	network, address, err := splitAddress(*addr)
	if err != nil {
		return err
	}
	if network == "unix" && address[0] != '@' {
		_ = os.Remove(address)
	}
	l, err := net.Listen(network, address)
	if err != nil {
		return err
	}
	srv, err := ttrpc.NewServer()
	if err != nil {
		return err
	}
	registerAgent(srv, newAgent())
	interop.RegisterEchoService(srv, newEcho())

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(shut)
		_ = srv.Close()
	}()

	fmt.Printf("LISTENING %s\n", formatAddress(l.Addr()))
	os.Stdout.Sync()
	err = srv.Serve(ctx, l)
	if err == ttrpc.ErrServerClosed {
		return nil
	}
	return err
}

// The generated interfaces keep the handlers' signatures honest.
var (
	_ vaccel.VaccelAgentService = (*agent)(nil)
	_ interop.EchoService       = (*echo)(nil)
)
