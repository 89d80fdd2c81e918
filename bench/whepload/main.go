// Command whepload is a browser-like WHEP load client: N viewers of one gateway session in one
// process, each a real Pion PeerConnection that sends the RTCP feedback Chromium sends.
//
// bench/fanout_viewers.py's aiortc viewers are not browsers: their RTCP is aiortc's own (REMB
// whenever its estimate moves, so its rate follows the client's own load), and the Python
// process saturates its core at about 50 viewers. DESIGN.md §8 asks for load clients that
// behave like browsers. Here every viewer runs Pion's default interceptors (receiver reports
// every second, a NACK generator, TWCC feedback where negotiated), plus REMB once a second
// (Chromium's fallback when, as with an aiortc sender, transport-cc is not negotiated) and a
// PLI while it has frames but no keyframe. It offers what Chromium offers that matters here: VP8, H.264
// constrained baseline (42e01f, packetization mode 1) and Opus, the sdes:mid, abs-send-time,
// ssrc-audio-level and transport-cc header extensions; it does not offer RTX (see newAPI).
//
// Nothing is decoded: Chromium decodes, but 150 decoders of a 720p stream would saturate the
// client's core long before the gateway's. Instead every track is read continuously (a
// ReadRTP loop, as a browser's receive pipeline reads it) and video packets are assembled
// into complete frames the way a jitter buffer does (see frameCounter): frames per second
// count complete frames, and time to first frame is the WHEP POST to the first complete
// keyframe (VP8 keyframe or H.264 IDR), which a decoder turns into a picture within a few ms.
//
// Timeline, as in fanout_viewers.py: connect the viewers (in batches of -batch, -batch-interval
// apart, or with -all-at-once every POST at the same moment), wait -warmup, snapshot, wait
// -measure, snapshot, DELETE every WHEP resource. One JSON object goes to stdout (or -out) with
// the field names fanout_viewers.py uses where they mean the same, so bench/fanout.py reads
// both; with -server-pid and -metrics it also samples the gateway's CPU, RSS and counters at
// the two snapshots.
//
// Build offline against Debian's packages (golang-github-pion-webrtc.v3-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o bench/out/whepload ./bench/whepload
//
// Run it only inside the private network namespace (tests/netns.sh), normally through
// bench/fanout.py --client pion.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

type config struct {
	gateway, whepURL, token string
	n, batch                int
	batchInterval           time.Duration
	allAtOnce               bool
	codec                   string
	warmup, measure         time.Duration
	connectTimeout          time.Duration
	answerDelay             time.Duration
	serverPID               int
	metrics                 bool
	expectSize              string
	heights                 []int
	dataChannel             bool
	deleteAtEnd             bool
	iceAddresses            []net.IP
	out                     string
	http                    *http.Client
}

type addressList []net.IP

func (a *addressList) String() string { return fmt.Sprint(*a) }
func (a *addressList) Set(s string) error {
	ip := net.ParseIP(s)
	if ip == nil {
		return fmt.Errorf("not an IP address: %q", s)
	}
	*a = append(*a, ip)
	return nil
}

func parseFlags() *config {
	c := &config{}
	var ice addressList
	var noDataChannel, noDelete bool
	seconds := func(name string, def float64, usage string) *float64 {
		return flag.Float64(name, def, usage+" (seconds)")
	}
	flag.StringVar(&c.gateway, "gateway", "", "gateway base URL, http://host:port (required)")
	flag.StringVar(&c.whepURL, "whep", "", "the session's whep_url, absolute or a path (required)")
	flag.StringVar(&c.token, "token", "", "send Authorization: Bearer <token> with the WHEP requests")
	flag.IntVar(&c.n, "n", 1, "number of viewers")
	flag.IntVar(&c.batch, "batch", 8, "viewers connecting concurrently")
	interval := seconds("batch-interval", 0, "pause between batches")
	flag.BoolVar(&c.allAtOnce, "all-at-once", false, "every viewer POSTs at the same moment (overrides -batch)")
	flag.StringVar(&c.codec, "codec", "vp8", "video codec the viewers ask for: vp8, h264 or mixed (even viewers VP8, odd H.264)")
	warmup := seconds("warmup", 5, "after connecting, before the window")
	measure := seconds("measure", 10, "the measurement window")
	connectTimeout := seconds("connect-timeout", 30, "for one viewer, from its POST to 'connected'")
	answerDelay := seconds("answer-delay", 0, "wait between the WHEP answer and applying it (emulates slow ICE/DTLS)")
	flag.IntVar(&c.serverPID, "server-pid", 0, "sample this process's CPU time and RSS")
	flag.BoolVar(&c.metrics, "metrics", false, "also read the gateway's /metrics at both snapshots")
	flag.StringVar(&c.expectSize, "expect-size", "", "WIDTHxHEIGHT every keyframe header must carry")
	heights := flag.String("heights", "", "comma-separated max_height per viewer, in turn (0: none): viewers spread over rungs of the quality ladder")
	flag.BoolVar(&noDataChannel, "no-data-channel", false, "offer no events data channel")
	flag.BoolVar(&noDelete, "no-delete", false, "don't DELETE the WHEP resources at the end")
	flag.Var(&ice, "ice-address", "gather ICE candidates on this address only (repeatable)")
	flag.StringVar(&c.out, "out", "", "write the JSON result here instead of stdout")
	flag.Parse()
	for _, field := range strings.Split(*heights, ",") {
		if field = strings.TrimSpace(field); field == "" {
			continue
		}
		height, err := strconv.Atoi(field)
		if err != nil || height < 0 {
			fail("-heights: %q is not a height in pixels", field)
		}
		c.heights = append(c.heights, height)
	}
	if c.gateway == "" || c.whepURL == "" {
		fail("-gateway and -whep are required")
	}
	if c.n < 1 || c.batch < 1 {
		fail("-n and -batch must be at least 1")
	}
	if c.codec != "vp8" && c.codec != "h264" && c.codec != "mixed" {
		fail("-codec is vp8, h264 or mixed")
	}
	if !strings.HasPrefix(c.whepURL, "http") {
		c.whepURL = strings.TrimRight(c.gateway, "/") + c.whepURL
	}
	d := func(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }
	c.batchInterval, c.warmup, c.measure = d(*interval), d(*warmup), d(*measure)
	c.connectTimeout, c.answerDelay = d(*connectTimeout), d(*answerDelay)
	c.dataChannel, c.deleteAtEnd, c.iceAddresses = !noDataChannel, !noDelete, ice
	// One connection per request: 100 simultaneous POSTs must not queue behind a small pool.
	c.http = &http.Client{Transport: &http.Transport{MaxConnsPerHost: 0, MaxIdleConnsPerHost: 256}}
	return c
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "whepload: "+format+"\n", args...)
	os.Exit(2)
}

// codecMismatchExit matches fanout_viewers.py: a viewer measuring another codec than it asked
// for would measure the wrong thing.
const codecMismatchExit = 3

func viewerCodec(mode string, i int) string {
	if mode == "mixed" {
		return []string{"vp8", "h264"}[i%2]
	}
	return mode
}

// -- snapshots ------------------------------------------------------------------------------

type viewerCounts struct {
	videoPackets, videoBytes, audioPackets, audioBytes int64
	frames, keyframes, incomplete                      int64
	rr, nack, nackedSeq, pli, remb, twcc, rtcpPackets  int64
}

func countsOf(v *viewer) viewerCounts {
	c := viewerCounts{
		videoPackets: v.video.packets.Load(), videoBytes: v.video.bytes.Load(),
		audioPackets: v.audio.packets.Load(), audioBytes: v.audio.bytes.Load(),
		rr: v.rtcp.rr.Load(), nack: v.rtcp.nack.Load(), nackedSeq: v.rtcp.nackedSeq.Load(),
		pli: v.rtcp.pli.Load(), remb: v.rtcp.remb.Load(), twcc: v.rtcp.twcc.Load(),
		rtcpPackets: v.rtcp.packets.Load(),
	}
	if v.frames != nil {
		c.frames, c.keyframes, c.incomplete = v.frames.frames.Load(), v.frames.keyframes.Load(), v.frames.incomplete.Load()
	}
	return c
}

type snapshot struct {
	at                   time.Time
	viewers              []viewerCounts
	ownCPU               float64
	serverCPU, serverRSS *float64
	metrics              map[string]float64
}

func takeSnapshot(ctx context.Context, cfg *config, viewers []*viewer) snapshot {
	s := snapshot{}
	if cfg.metrics {
		if m, err := scrape(ctx, cfg.http, strings.TrimRight(cfg.gateway, "/")+"/metrics"); err == nil {
			s.metrics = m
		}
	}
	s.at = time.Now()
	for _, v := range viewers {
		s.viewers = append(s.viewers, countsOf(v))
	}
	s.ownCPU = ownCPUSeconds()
	if cfg.serverPID > 0 {
		if cpu, err := procCPUSeconds(cfg.serverPID); err == nil {
			s.serverCPU = &cpu
		}
		if rss, err := procRSSMB(cfg.serverPID); err == nil {
			s.serverRSS = &rss
		}
	}
	return s
}

// -- summary --------------------------------------------------------------------------------

func round(x float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(x*p) / p
}

func median(sorted []float64) float64 {
	n := len(sorted)
	if n%2 == 1 {
		return sorted[n/2]
	}
	return (sorted[n/2-1] + sorted[n/2]) / 2
}

// percentile by nearest rank: the smallest value with at least p % of the values at or below.
func percentile(sorted []float64, p float64) float64 {
	i := int(math.Ceil(p/100*float64(len(sorted)))) - 1
	if i < 0 {
		i = 0
	}
	return sorted[i]
}

// spread is {"min", "median", "max"} like fanout_viewers.spread (nulls when empty).
func spread(values []float64, digits int) map[string]any {
	if len(values) == 0 {
		return map[string]any{"min": nil, "median": nil, "max": nil}
	}
	s := append([]float64(nil), values...)
	sort.Float64s(s)
	return map[string]any{"min": round(s[0], digits), "median": round(median(s), digits),
		"max": round(s[len(s)-1], digits)}
}

func quantiles(values []float64, digits int) map[string]any {
	out := map[string]any{"median": nil, "max": nil, "p50": nil, "p95": nil, "count": len(values)}
	if len(values) > 0 {
		s := append([]float64(nil), values...)
		sort.Float64s(s)
		out["median"], out["max"] = round(median(s), digits), round(s[len(s)-1], digits)
		out["p50"], out["p95"] = round(percentile(s, 50), digits), round(percentile(s, 95), digits)
	}
	return out
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func summarize(cfg *config, viewers []*viewer, connect time.Duration, a, b snapshot) map[string]any {
	window := b.at.Sub(a.at).Seconds()
	rate := func(x, y int64) float64 { return float64(y-x) / window }
	var fps, pps, kbps, ttff, firstPacket, answered, connected, backlog []float64
	keyframes := []float64{}
	type group struct{ fps, kbps, ttff []float64 }
	byCodec := map[string]*group{}
	sizes := map[string]bool{}
	errs := map[string]bool{}
	var perViewer []map[string]any
	var codecErrors []string
	rtcpTotals := map[string]int64{}
	for i, v := range viewers {
		pv := map[string]any{"index": v.index, "codec": v.codec}
		perViewer = append(perViewer, pv)
		if e := v.failed(); e != "" {
			errs[e] = true
			pv["error"] = e
			continue
		}
		x, y := a.viewers[i], b.viewers[i]
		f := rate(x.frames, y.frames)
		k := rate(x.videoBytes, y.videoBytes) * 8 / 1000
		fps, pps, kbps = append(fps, f), append(pps, rate(x.audioPackets, y.audioPackets)), append(kbps, k)
		keyframes = append(keyframes, float64(y.keyframes-x.keyframes))
		g := byCodec[v.codec]
		if g == nil {
			g = &group{}
			byCodec[v.codec] = g
		}
		g.fps, g.kbps = append(g.fps, f), append(g.kbps, k)
		res := v.frames.result()
		pv["fps"], pv["video_pps"], pv["audio_pps"] = round(f, 1), round(rate(x.videoPackets, y.videoPackets), 1), round(pps[len(pps)-1], 1)
		pv["video_kbps"], pv["audio_kbps"] = round(k, 0), round(rate(x.audioBytes, y.audioBytes)*8/1000, 1)
		pv["frames_incomplete"] = y.incomplete - x.incomplete
		pv["keyframes"] = y.keyframes - x.keyframes
		pv["rtcp_sent"] = map[string]int64{"rr": y.rr - x.rr, "nack": y.nack - x.nack,
			"nacked_packets": y.nackedSeq - x.nackedSeq, "pli": y.pli - x.pli, "remb": y.remb - x.remb,
			"twcc": y.twcc - x.twcc, "packets": y.rtcpPackets - x.rtcpPackets}
		for key, n := range pv["rtcp_sent"].(map[string]int64) {
			rtcpTotals[key] += n
		}
		pv["first_packet_ms"], pv["first_keyframe_ms"], pv["connected_ms"] = nil, nil, nil
		pv["answered_ms"] = nil
		if in := v.answeredIn.Load(); in > 0 {
			answered = append(answered, ms(time.Duration(in)))
			pv["answered_ms"] = round(ms(time.Duration(in)), 1)
		}
		if in := v.connectedIn.Load(); in > 0 {
			connected = append(connected, ms(time.Duration(in)))
			pv["connected_ms"] = round(ms(time.Duration(in)), 1)
		}
		if first := v.video.first.Load(); first > 0 {
			firstPacket = append(firstPacket, ms(time.Duration(first)))
			pv["first_packet_ms"] = round(ms(time.Duration(first)), 1)
		}
		if !res.firstKeyAt.IsZero() {
			t := ms(res.firstKeyAt.Sub(v.postedAt))
			ttff, g.ttff = append(ttff, t), append(g.ttff, t)
			pv["first_keyframe_ms"] = round(t, 1)
		}
		if y.frames > 0 {
			backlog = append(backlog, ms(res.joinBacklog))
		}
		for _, s := range res.sizes {
			sizes[fmt.Sprintf("%dx%d", s[0], s[1])] = true
		}
		v.mu.Lock()
		received := v.received
		v.mu.Unlock()
		if received != "" && received != v.codec {
			codecErrors = append(codecErrors, fmt.Sprintf("viewer %d asked for %s, received %s frames", v.index, v.codec, received))
		}
	}
	for _, v := range viewers {
		if v.answeredCodec != "" && !codecOK(v.codec, v.answeredCodec) {
			codecErrors = append(codecErrors, fmt.Sprintf("viewer %d asked for %s, the answer sends %s", v.index, v.codec, v.answeredCodec))
		}
	}
	live := len(fps)
	keyframeMedian := any(nil)
	total := 0.0
	if len(keyframes) > 0 {
		s := append([]float64(nil), keyframes...)
		sort.Float64s(s)
		keyframeMedian = median(s)
		for _, k := range s {
			total += k
		}
	}
	sizeList := sortedKeys(sizes)
	var perViewerFPS []float64
	for _, f := range fps {
		perViewerFPS = append(perViewerFPS, round(f, 1))
	}
	codecs := map[string]any{}
	for c, g := range byCodec {
		codecs[c] = map[string]any{"viewers": len(g.fps), "video_fps": spread(g.fps, 1),
			"video_kbps": spread(g.kbps, 0), "ttff_ms": spread(g.ttff, 0)}
	}
	ttffQ := quantiles(ttff, 1)
	fpsSpread := spread(fps, 1)
	result := map[string]any{
		"client":             "pion",
		"n":                  len(viewers),
		"codec":              cfg.codec,
		"connected":          live,
		"errors":             sortedKeys(errs),
		"connect_s":          round(connect.Seconds(), 2),
		"window_s":           round(window, 2),
		"all_at_once":        cfg.allAtOnce,
		"video_fps":          fpsSpread,
		"audio_pps":          spread(pps, 1),
		"video_kbps":         spread(kbps, 0),
		"keyframes_received": map[string]any{"total": total, "median": keyframeMedian},
		"ttff_ms":            ttffQ,
		"first_packet_ms":    quantiles(firstPacket, 1),
		"answered_ms":        quantiles(answered, 1),
		"connected_ms":       quantiles(connected, 1),
		"join_backlog_ms":    spread(backlog, 0),
		"keyframe_sizes":     sizeList,
		// No viewer decodes (see the package comment): the keyframe headers stand in for the
		// aiortc client's decoding probes.
		"probes":         []any{},
		"size_ok":        sizeOK(cfg.expectSize, sizeList),
		"viewer_cpu_pct": round((b.ownCPU-a.ownCPU)/window*100, 1),
		"per_viewer_fps": perViewerFPS,
		"per_viewer":     perViewer,
		"rtcp_sent":      rtcpTotals,
		"by_codec":       codecs,
		"codec_errors":   nonNil(codecErrors),
		"summary": map[string]any{
			"fps_min": fpsSpread["min"], "fps_median": fpsSpread["median"],
			"ttff_p50_ms": ttffQ["p50"], "ttff_p95_ms": ttffQ["p95"],
			"failures": len(viewers) - live,
		},
	}
	if a.serverCPU != nil && b.serverCPU != nil {
		result["server_cpu_pct"] = round((*b.serverCPU-*a.serverCPU)/window*100, 1)
		result["server_rss_start_mb"], result["server_rss_mb"] = nil, nil
		if a.serverRSS != nil {
			result["server_rss_start_mb"] = round(*a.serverRSS, 1)
		}
		if b.serverRSS != nil {
			result["server_rss_mb"] = round(*b.serverRSS, 1)
		}
	}
	if a.metrics != nil && b.metrics != nil {
		result["server_counters"] = counterDeltas(a.metrics, b.metrics)
		result["encode"] = encodeStats(a.metrics, b.metrics, window)
		prefix := "avatargw_viewer_time_to_first_frame_seconds"
		result["server_ttff"] = map[string]any{"count": b.metrics[prefix+"_count"], "sum_s": b.metrics[prefix+"_sum"]}
	}
	return result
}

func sizeOK(expected string, sizes []string) any {
	if expected == "" {
		return nil
	}
	return len(sizes) > 0 && len(sizes) == 1 && sizes[0] == expected
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// -- main -----------------------------------------------------------------------------------

// connectAll starts the viewers' WHEP exchanges in batches (or all at once) and returns when
// every one is connected or has failed.
func connectAll(ctx context.Context, cfg *config, viewers []*viewer) {
	batch := cfg.batch
	if cfg.allAtOnce {
		batch = len(viewers)
	}
	for first := 0; first < len(viewers); first += batch {
		if first > 0 && cfg.batchInterval > 0 {
			time.Sleep(cfg.batchInterval)
		}
		last := first + batch
		if last > len(viewers) {
			last = len(viewers)
		}
		var wg sync.WaitGroup
		for _, v := range viewers[first:last] {
			wg.Add(1)
			go func(v *viewer) {
				defer wg.Done()
				v.connect(ctx, cfg)
			}(v)
		}
		wg.Wait()
	}
}

func deleteAll(cfg *config, viewers []*viewer) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	deleted := 0
	for _, v := range viewers {
		if v.location == "" {
			continue
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodDelete, v.location, nil)
		if err != nil {
			continue
		}
		if cfg.token != "" {
			req.Header.Set("Authorization", "Bearer "+cfg.token)
		}
		resp, err := cfg.http.Do(req)
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			deleted++
		}
	}
	return deleted
}

func main() {
	cfg := parseFlags()
	if os.Getenv("AVATAR_GATEWAY_TEST_NETNS") != "1" {
		fail("run inside the private network namespace (tests/netns.sh), normally via bench/fanout.py")
	}
	ctx := context.Background()
	viewers := make([]*viewer, cfg.n)
	for i := range viewers {
		viewers[i] = &viewer{index: i, codec: viewerCodec(cfg.codec, i), connected: make(chan struct{})}
	}
	began := time.Now()
	connectAll(ctx, cfg, viewers)
	connect := time.Since(began)
	ok := 0
	for _, v := range viewers {
		if v.failed() == "" {
			ok++
		}
	}
	fmt.Fprintf(os.Stderr, "whepload: %d/%d connected in %.1f s\n", ok, cfg.n, connect.Seconds())
	time.Sleep(cfg.warmup)
	start := takeSnapshot(ctx, cfg, viewers)
	time.Sleep(cfg.measure)
	end := takeSnapshot(ctx, cfg, viewers)
	result := summarize(cfg, viewers, connect, start, end)
	if cfg.deleteAtEnd {
		result["deleted"] = deleteAll(cfg, viewers)
	}
	text, err := json.Marshal(result)
	if err != nil {
		fail("%v", err)
	}
	if cfg.out != "" {
		err = os.WriteFile(cfg.out, append(text, '\n'), 0o644)
	} else {
		_, err = os.Stdout.Write(append(text, '\n'))
	}
	if err != nil {
		fail("%v", err)
	}
	if errs := result["codec_errors"].([]string); len(errs) > 0 {
		fmt.Fprintf(os.Stderr, "whepload: CODEC MISMATCH in %d viewers: %s\n", len(errs), strings.Join(errs, "; "))
		os.Exit(codecMismatchExit)
	}
	// The peer connections are not closed: the resources are deleted and the gateway is
	// stopped right after this, and closing 150 connections one by one takes seconds.
}
