package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/proto"
	"google.golang.org/grpc/status"

	"vaccelpeer/vaccel"
)

// The four names the vAccel agent service has had on the wire.
var agentServices = []string{
	"vaccel.VaccelAgent",
	"vaccel.AgentService",
	"vaccel.sync.agent.AgentService",
	"vaccel.asynchronous.agent.AgentService",
}

const (
	mainService   = "vaccel.VaccelAgent"
	maxMessage    = 4 << 20
	callTimeout   = 10 * time.Second
	frameRequest  = 1
	frameResponse = 2
)

// result is one line of output; encoding/json sorts the keys.
type result map[string]interface{}

// outcome describes how a call ended: code is the ttrpc status code (0 for
// success) or -1 when the call failed without a status (transport error,
// local deadline), with the Go error text in "error".
func outcome(r result, prefix string, err error) {
	if err == nil {
		r[prefix+"code"] = 0
		return
	}
	if st, ok := status.FromError(err); ok {
		r[prefix+"code"] = int(st.Code())
		r[prefix+"message"] = st.Message()
		return
	}
	r[prefix+"code"] = -1
	r[prefix+"error"] = err.Error()
	r[prefix+"local_deadline"] = errors.Is(err, context.DeadlineExceeded)
}

type checker struct {
	addr   string
	client *ttrpc.Client
}

func (c *checker) call(service, method string, req, resp interface{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	return c.client.Call(ctx, service, method, req, resp)
}

func (c *checker) createSession(service string) (int64, error) {
	var resp vaccel.CreateSessionResponse
	err := c.call(service, "CreateSession", &vaccel.CreateSessionRequest{}, &resp)
	return resp.SessionId, err
}

func (c *checker) classify(service string, id int64, image []byte) (string, error) {
	var resp vaccel.ImageClassificationResponse
	err := c.call(service, "ImageClassification",
		&vaccel.ImageClassificationRequest{SessionId: id, Image: image}, &resp)
	return strings.TrimRight(string(resp.Tags), "\x00"), err
}

// checkSessions: create, update, classify, destroy under every service name,
// then the destroyed session is unknown (NOT_FOUND).
func (c *checker) checkSessions() []result {
	var out []result
	for _, svc := range agentServices {
		r := result{"check": "session", "service": svc}
		id, err := c.createSession(svc)
		outcome(r, "create_", err)
		r["session_id"] = id
		err = c.call(svc, "UpdateSession", &vaccel.UpdateSessionRequest{SessionId: id, Flags: 1}, &vaccel.EmptyResponse{})
		outcome(r, "update_", err)
		tags, err := c.classify(svc, id, []byte("not really a jpeg"))
		outcome(r, "classify_", err)
		r["tags"] = tags
		err = c.call(svc, "DestroySession", &vaccel.DestroySessionRequest{SessionId: id}, &vaccel.EmptyResponse{})
		outcome(r, "destroy_", err)
		_, err = c.classify(svc, id, []byte("x"))
		outcome(r, "after_destroy_", err)
		err = c.call(svc, "DestroySession", &vaccel.DestroySessionRequest{SessionId: id}, &vaccel.EmptyResponse{})
		outcome(r, "destroy_again_", err)
		out = append(out, r)
	}
	return out
}

// checkGenop: an image classification as a vAccel client sends it through
// genop (op number 2 as a native uint32, then the image), with two 64-byte
// write arguments for the tag and the image name; then an operation number
// that is not 4 bytes long.
func (c *checker) checkGenop() []result {
	r := result{"check": "genop_classify"}
	id, err := c.createSession(mainService)
	outcome(r, "create_", err)
	op := make([]byte, 4)
	binary.LittleEndian.PutUint32(op, 2)
	var resp vaccel.GenopResponse
	req := &vaccel.GenopRequest{
		SessionId: id,
		ReadArgs: []*vaccel.Arg{
			{Buf: op, Size_: 4},
			{Buf: []byte("not really a jpeg"), Size_: 17},
		},
		WriteArgs: []*vaccel.Arg{
			{Buf: make([]byte, 64), Size_: 64},
			{Buf: make([]byte, 64), Size_: 64},
		},
	}
	err = c.call(mainService, "Genop", req, &resp)
	outcome(r, "", err)
	var bufs []string
	var sizes []int
	for _, a := range resp.WriteArgs {
		bufs = append(bufs, strings.TrimRight(string(a.Buf), "\x00"))
		sizes = append(sizes, len(a.Buf))
	}
	r["write_args"] = bufs
	r["write_sizes"] = sizes

	bad := result{"check": "genop_bad_op"}
	req = &vaccel.GenopRequest{SessionId: id, ReadArgs: []*vaccel.Arg{{Buf: []byte{2, 0}, Size_: 2}}}
	outcome(bad, "", c.call(mainService, "Genop", req, &vaccel.GenopResponse{}))
	_ = c.call(mainService, "DestroySession", &vaccel.DestroySessionRequest{SessionId: id}, &vaccel.EmptyResponse{})
	return []result{r, bad}
}

func (c *checker) checkUnknown() []result {
	sess := result{"check": "unknown_session", "session_id": 987654}
	_, err := c.classify(mainService, 987654, []byte("x"))
	outcome(sess, "", err)

	meth := result{"check": "unknown_method", "service": mainService, "method": "NoSuchMethod"}
	outcome(meth, "", c.call(mainService, "NoSuchMethod", &vaccel.EmptyResponse{}, &vaccel.EmptyResponse{}))

	svc := result{"check": "unknown_service", "service": "vaccel.NoSuchService", "method": "CreateSession"}
	outcome(svc, "", c.call("vaccel.NoSuchService", "CreateSession", &vaccel.CreateSessionRequest{}, &vaccel.CreateSessionResponse{}))
	return []result{sess, meth, svc}
}

// requestSize is the size of the ttrpc Request body carrying a classification
// of an image of n bytes.
func requestSize(id int64, n int) int {
	payload, _ := proto.Marshal(&vaccel.ImageClassificationRequest{SessionId: id, Image: make([]byte, n)})
	// checker.call always sends a deadline: count its timeout_nano field too.
	req := &ttrpc.Request{Service: mainService, Method: "ImageClassification", Payload: payload,
		TimeoutNano: int64(callTimeout)}
	return proto.Size(req)
}

// checkLimits: a request body of exactly 4 MiB is served; one byte more is
// answered RESOURCE_EXHAUSTED (8) on its stream and the connection stays usable.
func (c *checker) checkLimits() []result {
	id, err := c.createSession(mainService)
	if err != nil {
		r := result{"check": "limits"}
		outcome(r, "create_", err)
		return []result{r}
	}
	// Find the image size whose Request body is exactly maxMessage bytes.
	n := maxMessage - 64
	for requestSize(id, n) < maxMessage {
		n++
	}
	at := result{"check": "at_limit", "body_size": requestSize(id, n)}
	tags, err := c.classify(mainService, id, make([]byte, n))
	outcome(at, "", err)
	at["tags"] = tags

	over := result{"check": "oversized", "body_size": requestSize(id, n+1)}
	_, err = c.classify(mainService, id, make([]byte, n+1))
	outcome(over, "", err)
	tags, err = c.classify(mainService, id, []byte("small"))
	outcome(over, "after_", err)
	over["after_tags"] = tags

	big := result{"check": "oversized_big", "body_size": requestSize(id, 6<<20)}
	_, err = c.classify(mainService, id, make([]byte, 6<<20))
	outcome(big, "", err)
	tags, err = c.classify(mainService, id, []byte("small"))
	outcome(big, "after_", err)
	big["after_tags"] = tags
	return []result{at, over, big}
}

// checkDeadlines: a call with a generous deadline (sent as timeout_nano)
// succeeds; a call whose Go context expires first fails locally, and the
// connection still serves the next call (the late answer is dropped).
func (c *checker) checkDeadlines() []result {
	id, _ := c.createSession(mainService)

	// A generous deadline, and metadata the agent may ignore but must accept.
	ok := result{"check": "deadline_generous", "timeout": "5s", "metadata": "x-trace=a,b"}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	ctx = ttrpc.WithMetadata(ctx, ttrpc.MD{"x-trace": {"a", "b"}})
	var resp vaccel.ImageClassificationResponse
	err := c.client.Call(ctx, mainService, "ImageClassification",
		&vaccel.ImageClassificationRequest{SessionId: id, Image: []byte("x")}, &resp)
	cancel()
	outcome(ok, "", err)
	ok["tags"] = strings.TrimRight(string(resp.Tags), "\x00")

	short := result{"check": "deadline_local"}
	expired := 0
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Microsecond)
		// A 1 MiB image makes the call outlast the context.
		err := c.client.Call(ctx, mainService, "ImageClassification",
			&vaccel.ImageClassificationRequest{SessionId: id, Image: make([]byte, 1<<20)}, &vaccel.ImageClassificationResponse{})
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			expired++
		}
	}
	short["expired"] = expired
	short["attempts"] = 20
	tags, err := c.classify(mainService, id, []byte("after"))
	outcome(short, "after_", err)
	short["after_tags"] = tags
	return []result{ok, short}
}

// checkConcurrent: many calls in flight on one connection all succeed.
func (c *checker) checkConcurrent() []result {
	r := result{"check": "concurrent", "calls": 64}
	id, err := c.createSession(mainService)
	outcome(r, "create_", err)
	var wg sync.WaitGroup
	var mu sync.Mutex
	codesSeen := map[string]int{}
	wrong := 0
	for i := 0; i < 64; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			tags, err := c.classify(mainService, id, make([]byte, 1+100*i))
			st := result{}
			outcome(st, "", err)
			mu.Lock()
			codesSeen[fmt.Sprint(st["code"])]++
			if err == nil && tags != noopTag {
				wrong++
			}
			mu.Unlock()
		}(i)
	}
	wg.Wait()
	r["codes"] = codesSeen
	r["wrong_tags"] = wrong
	return []result{r}
}

// --- raw frames -----------------------------------------------------------

type rawConn struct {
	conn net.Conn
}

func (rc *rawConn) writeFrame(stream uint32, ftype byte, body []byte) error {
	frame := make([]byte, 10+len(body))
	binary.BigEndian.PutUint32(frame[0:4], uint32(len(body)))
	binary.BigEndian.PutUint32(frame[4:8], stream)
	frame[8] = ftype
	copy(frame[10:], body)
	_, err := rc.conn.Write(frame)
	return err
}

type rawFrame struct {
	stream uint32
	ftype  byte
	flags  byte
	resp   ttrpc.Response
}

func (rc *rawConn) readFrame() (*rawFrame, error) {
	_ = rc.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [10]byte
	if _, err := io.ReadFull(rc.conn, hdr[:]); err != nil {
		return nil, err
	}
	f := &rawFrame{
		stream: binary.BigEndian.Uint32(hdr[4:8]),
		ftype:  hdr[8],
		flags:  hdr[9],
	}
	body := make([]byte, binary.BigEndian.Uint32(hdr[0:4]))
	if _, err := io.ReadFull(rc.conn, body); err != nil {
		return nil, err
	}
	if err := proto.Unmarshal(body, &f.resp); err != nil {
		return nil, err
	}
	return f, nil
}

func describeFrame(r result, prefix string, f *rawFrame, err error) {
	if err != nil {
		r[prefix+"error"] = err.Error()
		return
	}
	r[prefix+"stream"] = f.stream
	r[prefix+"type"] = f.ftype
	r[prefix+"flags"] = f.flags
	r[prefix+"status_present"] = f.resp.Status != nil
	code := int32(0)
	if f.resp.Status != nil {
		code = f.resp.Status.Code
		r[prefix+"message"] = f.resp.Status.Message
	}
	r[prefix+"code"] = code
	r[prefix+"payload_len"] = len(f.resp.Payload)
}

func marshalRequest(service, method string, msg proto.Message, timeout int64) []byte {
	payload, _ := proto.Marshal(msg)
	body, _ := proto.Marshal(&ttrpc.Request{Service: service, Method: method, Payload: payload, TimeoutNano: timeout})
	return body
}

// checkRaw talks ttrpc frame by frame on its own connection.
func (c *checker) checkRaw() []result {
	conn, err := dial(c.addr)
	if err != nil {
		return []result{{"check": "raw", "error": err.Error()}}
	}
	defer conn.Close()
	rc := &rawConn{conn: conn}
	var out []result

	// An OK answer: the status is omitted (Go) or code 0 (Rust); both are valid.
	ok := result{"check": "raw_ok"}
	_ = rc.writeFrame(1, frameRequest, marshalRequest(mainService, "CreateSession", &vaccel.CreateSessionRequest{}, 0))
	f, err := rc.readFrame()
	describeFrame(ok, "", f, err)
	var id int64
	if err == nil {
		var cs vaccel.CreateSessionResponse
		_ = proto.Unmarshal(f.resp.Payload, &cs)
		id = cs.SessionId
	}
	out = append(out, ok)

	// A body that is not a Request: INVALID_ARGUMENT (3), connection kept.
	bad := result{"check": "raw_bad_body"}
	_ = rc.writeFrame(3, frameRequest, []byte{0xff, 0xff, 0xff, 0xff, 0xff})
	f, err = rc.readFrame()
	describeFrame(bad, "", f, err)
	_ = rc.writeFrame(5, frameRequest, marshalRequest(mainService, "ImageClassification",
		&vaccel.ImageClassificationRequest{SessionId: id, Image: []byte("x")}, 0))
	f, err = rc.readFrame()
	describeFrame(bad, "after_", f, err)
	out = append(out, bad)

	// Two requests in one write, then a request split in pieces across writes.
	pipe := result{"check": "raw_pipelined"}
	a := marshalRequest(mainService, "ImageClassification", &vaccel.ImageClassificationRequest{SessionId: id, Image: []byte("a")}, 0)
	b := marshalRequest(mainService, "NoSuchMethod", &vaccel.EmptyResponse{}, 0)
	buf := make([]byte, 0, 20+len(a)+len(b))
	for _, fr := range []struct {
		id   uint32
		body []byte
	}{{7, a}, {9, b}} {
		var hdr [10]byte
		binary.BigEndian.PutUint32(hdr[0:4], uint32(len(fr.body)))
		binary.BigEndian.PutUint32(hdr[4:8], fr.id)
		hdr[8] = frameRequest
		buf = append(buf, hdr[:]...)
		buf = append(buf, fr.body...)
	}
	_, _ = conn.Write(buf)
	got := map[string]int{}
	for i := 0; i < 2; i++ {
		f, err := rc.readFrame()
		if err != nil {
			pipe["error"] = err.Error()
			break
		}
		code := int32(0)
		if f.resp.Status != nil {
			code = f.resp.Status.Code
		}
		got[fmt.Sprint(f.stream)] = int(code)
	}
	pipe["codes_by_stream"] = got
	out = append(out, pipe)

	split := result{"check": "raw_split"}
	body := marshalRequest(mainService, "ImageClassification", &vaccel.ImageClassificationRequest{SessionId: id, Image: []byte("split")}, 0)
	var hdr [10]byte
	binary.BigEndian.PutUint32(hdr[0:4], uint32(len(body)))
	binary.BigEndian.PutUint32(hdr[4:8], 11)
	hdr[8] = frameRequest
	whole := append(hdr[:], body...)
	for _, piece := range [][]byte{whole[:3], whole[3:10], whole[10:15], whole[15:]} {
		_, _ = conn.Write(piece)
		time.Sleep(20 * time.Millisecond)
	}
	f, err = rc.readFrame()
	describeFrame(split, "", f, err)
	out = append(out, split)

	// timeout_nano travels; a request with a generous one is served.
	tmo := result{"check": "raw_timeout_nano", "timeout_nano": int64(2e9)}
	_ = rc.writeFrame(13, frameRequest, marshalRequest(mainService, "ImageClassification",
		&vaccel.ImageClassificationRequest{SessionId: id, Image: []byte("t")}, 2e9))
	f, err = rc.readFrame()
	describeFrame(tmo, "", f, err)
	out = append(out, tmo)
	return out
}

// tfTensors renders output tensors as [data, dims, type] triples for JSON.
func tfTensors(ts []*vaccel.TFTensor) [][]interface{} {
	out := [][]interface{}{}
	for _, t := range ts {
		out = append(out, []interface{}{string(t.Data), t.Dims, t.Type})
	}
	return out
}

// checkModels: every model method of the newest vAccel agent on one session,
// as a vAccel client using TensorFlow, TFLite and PyTorch through the RPC
// plugin calls them: register a model (a resource), load, run, unload; sync
// the resource; the profiler; and a model id nobody registered. Each record
// carries the code (and message) and what came back.
func (c *checker) checkModels() []result {
	var out []result
	id, err := c.createSession(mainService)
	reg := result{"check": "model_register"}
	outcome(reg, "create_", err)
	var regResp vaccel.RegisterResourceResponse
	err = c.call(mainService, "RegisterResource", &vaccel.RegisterResourceRequest{
		SessionId:    id,
		ResourceType: vaccel.ResourceType_MODEL,
		Blobs:        []*vaccel.Blob{{Type: vaccel.BlobType_BUFFER, Name: "model.bin", Data: []byte("weights"), Size_: 7}},
	}, &regResp)
	outcome(reg, "", err)
	model := regResp.ResourceId
	reg["model_id"] = model
	out = append(out, reg)

	// Each tensor carries the bytes its dims and type need (4 floats; 1 uint8):
	// a worker on libvaccel refuses fewer, which a plugin would read past.
	in := []*vaccel.TFTensor{
		{Data: []byte("abcdefghijklmnop"), Dims: []int64{2, 2}, Type: 1},
		{Data: []byte("z"), Dims: []int64{1}, Type: 4},
	}
	tfLoad := result{"check": "tf_load"}
	var loadResp vaccel.TensorflowModelLoadResponse
	outcome(tfLoad, "", c.call(mainService, "TensorflowModelLoad", &vaccel.TensorflowModelLoadRequest{SessionId: id, ModelId: model}, &loadResp))
	if loadResp.Status != nil {
		tfLoad["status_code"] = loadResp.Status.Code
		tfLoad["status_message"] = loadResp.Status.Message
	}
	out = append(out, tfLoad)
	tfRun := result{"check": "tf_run"}
	var runResp vaccel.TensorflowModelRunResponse
	outcome(tfRun, "", c.call(mainService, "TensorflowModelRun", &vaccel.TensorflowModelRunRequest{
		SessionId: id, ModelId: model,
		InNodes:   []*vaccel.TFNode{{Name: "in", Id: 0}, {Name: "in", Id: 1}}, // one per tensor
		OutNodes:  []*vaccel.TFNode{{Name: "out", Id: 0}, {Name: "out", Id: 1}},
		InTensors: in,
	}, &runResp))
	tfRun["out"] = tfTensors(runResp.OutTensors)
	out = append(out, tfRun)
	tfUnload := result{"check": "tf_unload"}
	var unloadResp vaccel.TensorflowModelUnloadResponse
	outcome(tfUnload, "", c.call(mainService, "TensorflowModelUnload", &vaccel.TensorflowModelUnloadRequest{SessionId: id, ModelId: model}, &unloadResp))
	if unloadResp.Status != nil {
		tfUnload["status_code"] = unloadResp.Status.Code
		tfUnload["status_message"] = unloadResp.Status.Message
	}
	out = append(out, tfUnload)

	lite := result{"check": "tflite"}
	outcome(lite, "load_", c.call(mainService, "TensorflowLiteModelLoad", &vaccel.TensorflowLiteModelLoadRequest{SessionId: id, ModelId: model}, &vaccel.EmptyResponse{}))
	var liteResp vaccel.TensorflowLiteModelRunResponse
	outcome(lite, "run_", c.call(mainService, "TensorflowLiteModelRun", &vaccel.TensorflowLiteModelRunRequest{
		SessionId: id, ModelId: model, NrOutTensors: 1,
		InTensors: []*vaccel.TFLiteTensor{{Data: []byte("lite"), Dims: []int32{4}, Type: 3}},
	}, &liteResp))
	liteOut := [][]interface{}{}
	for _, t := range liteResp.OutTensors {
		liteOut = append(liteOut, []interface{}{string(t.Data), t.Dims, t.Type})
	}
	lite["out"] = liteOut
	outcome(lite, "unload_", c.call(mainService, "TensorflowLiteModelUnload", &vaccel.TensorflowLiteModelUnloadRequest{SessionId: id, ModelId: model}, &vaccel.EmptyResponse{}))
	out = append(out, lite)

	torch := result{"check": "torch"}
	outcome(torch, "load_", c.call(mainService, "TorchModelLoad", &vaccel.TorchModelLoadRequest{SessionId: id, ModelId: model}, &vaccel.EmptyResponse{}))
	var torchResp vaccel.TorchModelRunResponse
	outcome(torch, "run_", c.call(mainService, "TorchModelRun", &vaccel.TorchModelRunRequest{
		SessionId: id, ModelId: model, RunOptions: []byte("opts"), NrOutTensors: 2,
		InTensors: []*vaccel.TorchTensor{{Data: []byte("t0"), Dims: []int64{2}, Type: 1}, {Data: []byte("t1t1t1t1"), Dims: []int64{1, 2}, Type: 7}},
	}, &torchResp))
	torchOut := [][]interface{}{}
	for _, t := range torchResp.OutTensors {
		torchOut = append(torchOut, []interface{}{string(t.Data), t.Dims, t.Type})
	}
	torch["out"] = torchOut
	out = append(out, torch)

	sync := result{"check": "sync_resource"}
	var syncResp vaccel.SyncResourceResponse
	outcome(sync, "", c.call(mainService, "SyncResource", &vaccel.SyncResourceRequest{ResourceId: model}, &syncResp))
	blobs := [][]interface{}{}
	for _, b := range syncResp.Blobs {
		blobs = append(blobs, []interface{}{int(b.Type), b.Name, string(b.Data), b.Size_})
	}
	sync["blobs"] = blobs
	out = append(out, sync)

	prof := result{"check": "profiler"}
	var profResp vaccel.ProfilerResponse
	outcome(prof, "", c.call(mainService, "GetProfiler", &vaccel.ProfilerRequest{SessionId: id}, &profResp))
	if profResp.Profiler != nil {
		prof["component_name"] = profResp.Profiler.ComponentName
	}
	out = append(out, prof)

	unknown := result{"check": "unknown_model", "model_id": 424242}
	outcome(unknown, "torch_", c.call(mainService, "TorchModelRun", &vaccel.TorchModelRunRequest{SessionId: id, ModelId: 424242}, &vaccel.TorchModelRunResponse{}))
	outcome(unknown, "tf_", c.call(mainService, "TensorflowModelLoad", &vaccel.TensorflowModelLoadRequest{SessionId: id, ModelId: 424242}, &vaccel.TensorflowModelLoadResponse{}))
	outcome(unknown, "sync_", c.call(mainService, "SyncResource", &vaccel.SyncResourceRequest{ResourceId: 424242}, &vaccel.SyncResourceResponse{}))
	out = append(out, unknown)
	_ = c.call(mainService, "DestroySession", &vaccel.DestroySessionRequest{SessionId: id}, &vaccel.EmptyResponse{})
	return out
}

var checks = map[string]func(*checker) []result{
	"sessions":   (*checker).checkSessions,
	"genop":      (*checker).checkGenop,
	"unknown":    (*checker).checkUnknown,
	"limits":     (*checker).checkLimits,
	"deadlines":  (*checker).checkDeadlines,
	"concurrent": (*checker).checkConcurrent,
	"raw":        (*checker).checkRaw,
	"models":     (*checker).checkModels,
}

func runClient(args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	addr := fs.String("addr", "", "address of the server")
	which := fs.String("check", "all", "comma-separated checks, or all")
	fs.Parse(args)
	if *addr == "" {
		return fmt.Errorf("-addr is required")
	}

	var names []string
	if *which == "all" {
		for name := range checks {
			names = append(names, name)
		}
		sort.Strings(names)
	} else {
		names = strings.Split(*which, ",")
	}
	for _, name := range names {
		if checks[name] == nil {
			return fmt.Errorf("unknown check %q", name)
		}
	}

	conn, err := dial(*addr)
	if err != nil {
		return err
	}
	client := ttrpc.NewClient(conn)
	defer client.Close()
	c := &checker{addr: *addr, client: client}
	for _, name := range names {
		for _, r := range checks[name](c) {
			r["group"] = name
			emit(r)
		}
	}
	return nil
}
