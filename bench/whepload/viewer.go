package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/ice/v2"
	"github.com/pion/interceptor"
	"github.com/pion/logging"
	"github.com/pion/rtcp"
	"github.com/pion/rtp"
	// Debian ships sdp v3 and webrtc v3 in GOPATH without a /v3 directory: in GOPATH mode the
	// import path is the directory (their own /v3 imports resolve through Go's minimal module
	// compatibility).
	"github.com/pion/sdp"
	"github.com/pion/webrtc"
)

// h264Profile is constrained baseline level 3.1, packetization mode 1: what the gateway's
// encoder makes and what fanout_viewers.py asks for.
const (
	h264Profile = "42e01f"
	h264Fmtp    = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=" + h264Profile
	// keyframeRetry is how often a viewer that has frames but no keyframe asks again with a
	// PLI (Chromium: a delta frame before any keyframe asks at once, then every 200 ms).
	keyframeRetry = 200 * time.Millisecond
)

// trackCounts are one track's RTP totals, read by snapshots while its reader writes them.
type trackCounts struct {
	packets atomic.Int64
	bytes   atomic.Int64 // RTP payload bytes
	first   atomic.Int64 // first packet, ns since the viewer's POST; 0 before it
}

type viewer struct {
	index int
	codec string // the video codec asked for: "vp8" or "h264"

	pc            *webrtc.PeerConnection
	postedAt      time.Time
	location      string
	answeredCodec string

	video, audio trackCounts
	frames       *frameCounter
	answeredIn   atomic.Int64 // ns from the POST to the gateway's answer; 0 before
	connectedIn  atomic.Int64 // ns from the POST to "connected" (ICE and DTLS done); 0 before
	rtcp         rtcpCounts

	connected chan struct{} // closed when connected, failed or closed
	once      sync.Once
	mu        sync.Mutex
	err       string
	received  string // the video codec the packets carry, by their payload type
}

func (v *viewer) fail(format string, args ...any) {
	v.mu.Lock()
	if v.err == "" {
		v.err = fmt.Sprintf(format, args...)
	}
	v.mu.Unlock()
	v.once.Do(func() { close(v.connected) })
}

func (v *viewer) failed() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.err
}

// newAPI builds a viewer's own Pion API: codecs in the order a browser that prefers
// v.codec offers them, Chromium's header extensions, and the default interceptors (RTCP
// receiver reports, NACK generator, TWCC feedback) behind a counter of everything sent.
func (v *viewer) newAPI(iceAddresses []net.IP) (*webrtc.API, error) {
	m := &webrtc.MediaEngine{}
	// No RTX: Pion 3.1 neither hands repaired packets to the application nor tells its NACK
	// generator they arrived, so it would NACK every lost packet again every 100 ms for as
	// long as it stays in its 512-packet log. Without RTX aiortc retransmits on the media
	// SSRC, which both see, and which a browser's jitter buffer treats the same way.
	vp8 := webrtc.RTPCodecParameters{
		RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeVP8, ClockRate: 90000,
			RTCPFeedback: []webrtc.RTCPFeedback{{Type: "goog-remb"}},
		},
		PayloadType: 96,
	}
	h264 := webrtc.RTPCodecParameters{
		RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeH264, ClockRate: 90000, SDPFmtpLine: h264Fmtp,
			RTCPFeedback: []webrtc.RTCPFeedback{{Type: "goog-remb"}},
		},
		PayloadType: 102,
	}
	video := []webrtc.RTPCodecParameters{vp8, h264}
	if v.codec == "h264" {
		video = []webrtc.RTPCodecParameters{h264, vp8}
	}
	for _, c := range append(video, chromiumVideoDecoys()...) {
		if err := m.RegisterCodec(c, webrtc.RTPCodecTypeVideo); err != nil {
			return nil, err
		}
	}
	opus := webrtc.RTPCodecParameters{
		RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: webrtc.MimeTypeOpus, ClockRate: 48000, Channels: 2,
			SDPFmtpLine: "minptime=10;useinbandfec=1",
		},
		PayloadType: 111,
	}
	for _, c := range append([]webrtc.RTPCodecParameters{opus}, chromiumAudioDecoys()...) {
		if err := m.RegisterCodec(c, webrtc.RTPCodecTypeAudio); err != nil {
			return nil, err
		}
	}
	// Chromium offers these (and more that aiortc ignores); transport-cc is registered again by
	// RegisterDefaultInterceptors below, which is harmless.
	both := []webrtc.RTPCodecType{webrtc.RTPCodecTypeAudio, webrtc.RTPCodecTypeVideo}
	extensions := []struct {
		uri   string
		kinds []webrtc.RTPCodecType
	}{
		{sdp.SDESMidURI, both},
		{sdp.ABSSendTimeURI, both},
		{sdp.AudioLevelURI, both[:1]},
		{sdp.TransportCCURI, both},
	}
	for _, e := range extensions {
		for _, kind := range e.kinds {
			if err := m.RegisterHeaderExtension(webrtc.RTPHeaderExtensionCapability{URI: e.uri}, kind); err != nil {
				return nil, err
			}
		}
	}
	registry := &interceptor.Registry{}
	registry.Add(countingFactory{&v.rtcp}) // first: see countingFactory
	registry.Add(rembFactory{})
	// NACK generator and responder, sender and receiver reports, TWCC sender (feedback).
	if err := webrtc.RegisterDefaultInterceptors(m, registry); err != nil {
		return nil, err
	}
	s := webrtc.SettingEngine{}
	// Pion logs to stdout by default, where our JSON result goes: its messages go to stderr.
	logs := logging.NewDefaultLoggerFactory()
	logs.Writer = os.Stderr
	s.LoggerFactory = logs
	s.SetNetworkTypes([]webrtc.NetworkType{webrtc.NetworkTypeUDP4})
	s.SetICEMulticastDNSMode(ice.MulticastDNSModeDisabled) // no multicast out of the namespace
	if len(iceAddresses) > 0 {
		s.SetIPFilter(func(ip net.IP) bool {
			for _, a := range iceAddresses {
				if a.Equal(ip) {
					return true
				}
			}
			return false
		})
	}
	return webrtc.NewAPI(webrtc.WithMediaEngine(m), webrtc.WithInterceptorRegistry(registry),
		webrtc.WithSettingEngine(s)), nil
}

// connect does the WHEP exchange (RFC 9725: POST a complete offer, get the answer and the
// resource's Location) and waits until the connection is up or the deadline passes.
func (v *viewer) connect(ctx context.Context, cfg *config) {
	api, err := v.newAPI(cfg.iceAddresses)
	if err != nil {
		v.fail("pion setup: %v", err)
		return
	}
	// No ICE servers: nothing may leave the namespace, and Pion has no default STUN server.
	pc, err := api.NewPeerConnection(webrtc.Configuration{})
	if err != nil {
		v.fail("pion setup: %v", err)
		return
	}
	v.pc = pc
	pc.OnConnectionStateChange(func(s webrtc.PeerConnectionState) {
		switch s {
		case webrtc.PeerConnectionStateConnected:
			v.connectedIn.CompareAndSwap(0, int64(time.Since(v.postedAt)))
			v.once.Do(func() { close(v.connected) })
		case webrtc.PeerConnectionStateFailed, webrtc.PeerConnectionStateClosed:
			v.fail("connection %s", s)
		}
	})
	pc.OnTrack(func(t *webrtc.TrackRemote, r *webrtc.RTPReceiver) {
		go drainRTCP(r)
		go v.read(t)
	})
	recvonly := webrtc.RTPTransceiverInit{Direction: webrtc.RTPTransceiverDirectionRecvonly}
	for _, kind := range []webrtc.RTPCodecType{webrtc.RTPCodecTypeVideo, webrtc.RTPCodecTypeAudio} {
		if _, err := pc.AddTransceiverFromKind(kind, recvonly); err != nil {
			v.fail("add transceiver: %v", err)
			return
		}
	}
	if cfg.dataChannel {
		// The web page opens an "events" channel; SCTP over DTLS is part of a viewer's cost.
		if _, err := pc.CreateDataChannel("events", nil); err != nil {
			v.fail("data channel: %v", err)
			return
		}
	}
	offer, err := pc.CreateOffer(nil)
	if err != nil {
		v.fail("create offer: %v", err)
		return
	}
	gathered := webrtc.GatheringCompletePromise(pc)
	if err := pc.SetLocalDescription(offer); err != nil {
		v.fail("set local description: %v", err)
		return
	}
	<-gathered // host candidates only: a few milliseconds, so no trickle PATCHes needed
	v.postedAt = time.Now()
	answer, err := v.post(ctx, cfg, chromiumSDP(pc.LocalDescription().SDP))
	if err != nil {
		v.fail("%v", err)
		return
	}
	v.answeredIn.Store(int64(time.Since(v.postedAt)))
	v.answeredCodec = answeredVideoCodec(answer)
	if !codecOK(v.codec, v.answeredCodec) {
		v.fail("asked for %s, the answer sends %s", v.codec, v.answeredCodec)
		return
	}
	v.frames = newFrameCounter(strings.SplitN(v.answeredCodec, ";", 2)[0])
	if cfg.answerDelay > 0 {
		time.Sleep(cfg.answerDelay)
	}
	if err := pc.SetRemoteDescription(webrtc.SessionDescription{Type: webrtc.SDPTypeAnswer, SDP: answer}); err != nil {
		v.fail("set remote description: %v", err)
		return
	}
	select {
	case <-v.connected:
	case <-time.After(time.Until(v.postedAt.Add(cfg.connectTimeout))):
		v.fail("not connected after %s", cfg.connectTimeout)
	}
}

func (v *viewer) post(ctx context.Context, cfg *config, offer string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	endpoint := cfg.whepURL
	if len(cfg.heights) > 0 {
		if height := cfg.heights[v.index%len(cfg.heights)]; height > 0 {
			endpoint += fmt.Sprintf("?max_height=%d", height)
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(offer))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/sdp")
	if cfg.token != "" {
		req.Header.Set("Authorization", "Bearer "+cfg.token)
	}
	resp, err := cfg.http.Do(req)
	if err != nil {
		return "", fmt.Errorf("WHEP POST: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("WHEP POST: %w", err)
	}
	if resp.StatusCode != http.StatusCreated {
		text := string(body)
		if len(text) > 200 {
			text = text[:200]
		}
		return "", fmt.Errorf("WHEP POST -> %d: %s", resp.StatusCode, text)
	}
	if loc := resp.Header.Get("Location"); loc != "" {
		base, _ := url.Parse(cfg.whepURL)
		if ref, err := url.Parse(loc); err == nil && base != nil {
			v.location = base.ResolveReference(ref).String()
		}
	}
	return string(body), nil
}

// read consumes one track for as long as the connection lives, like a browser's receive
// pipeline, counting packets and (video) complete frames.
func (v *viewer) read(t *webrtc.TrackRemote) {
	counts := &v.audio
	video := t.Kind() == webrtc.RTPCodecTypeVideo
	if video {
		counts = &v.video
		v.mu.Lock()
		v.received = strings.ToLower(strings.TrimPrefix(t.Codec().MimeType, "video/"))
		v.mu.Unlock()
	}
	buf := make([]byte, 1500)
	var p rtp.Packet
	var lastPLI time.Time
	for {
		n, _, err := t.Read(buf)
		if err != nil {
			if !errors.Is(err, io.EOF) && v.failed() == "" && v.pc.ConnectionState() == webrtc.PeerConnectionStateConnected {
				v.fail("%s track: %v", t.Kind(), err)
			}
			return
		}
		now := time.Now()
		if err := p.Unmarshal(buf[:n]); err != nil {
			continue
		}
		counts.packets.Add(1)
		counts.bytes.Add(int64(len(p.Payload)))
		counts.first.CompareAndSwap(0, int64(now.Sub(v.postedAt)))
		if !video || v.frames == nil {
			continue
		}
		v.frames.add(p.SequenceNumber, p.Timestamp, p.Marker, p.Payload, now)
		if v.frames.keyframes.Load() == 0 && v.frames.frames.Load() > 0 && now.Sub(lastPLI) >= keyframeRetry {
			// Frames but nothing decodable yet: ask for a keyframe, as Chromium does.
			lastPLI = now
			_ = v.pc.WriteRTCP([]rtcp.Packet{&rtcp.PictureLossIndication{MediaSSRC: uint32(t.SSRC())}})
		}
	}
}

// drainRTCP reads the gateway's sender reports: the receiver-report interceptor needs them
// for the LSR/DLSR fields from which the sender computes the round-trip time.
func drainRTCP(r *webrtc.RTPReceiver) {
	buf := make([]byte, 1500)
	for {
		if _, _, err := r.Read(buf); err != nil {
			return
		}
	}
}

// chromiumSDP removes the space Pion 3.1 writes after a parameterless rtcp-fb ("a=rtcp-fb:96
// nack \r\n"). aiortc reads that as feedback with an empty parameter, which matches none of
// its own, so its answer would keep only "nack pli": no NACK, no REMB. Chromium writes no
// such space.
func chromiumSDP(offer string) string {
	return strings.ReplaceAll(offer, " \r\n", "\r\n")
}

// answeredVideoCodec is "name" or "name;fmtp" of the first payload type of the answer's video
// m-line, spelled like fanout_viewers.answered_video_codec: the codec the gateway will send.
func answeredVideoCodec(answer string) string {
	var desc sdp.SessionDescription
	if err := desc.Unmarshal([]byte(answer)); err != nil {
		return "unparsable answer"
	}
	for _, m := range desc.MediaDescriptions {
		if m.MediaName.Media != "video" || len(m.MediaName.Formats) == 0 {
			continue
		}
		var pt uint8
		if _, err := fmt.Sscan(m.MediaName.Formats[0], &pt); err != nil {
			return "none"
		}
		codec, err := desc.GetCodecForPayloadType(pt)
		if err != nil {
			return "none"
		}
		name := strings.ToLower(codec.Name)
		if name == "h264" {
			params := map[string]string{}
			for _, kv := range strings.Split(codec.Fmtp, ";") {
				if k, val, ok := strings.Cut(strings.TrimSpace(kv), "="); ok {
					params[k] = val
				}
			}
			mode := params["packetization-mode"]
			if mode == "" {
				mode = "0"
			}
			name += ";packetization-mode=" + mode + ";profile-level-id=" + strings.ToLower(params["profile-level-id"])
		}
		return name
	}
	return "none"
}

func codecOK(wanted, answered string) bool {
	if wanted == "h264" {
		return answered == "h264;packetization-mode=1;profile-level-id="+h264Profile
	}
	return answered == wanted
}

// chromiumVideoDecoys are the rest of what Chromium 156 offers for video: codecs the gateway
// never sends (VP9, AV1, H.264 profiles and modes it does not encode, red, FEC), each
// retransmittable, with Chromium's feedback lines. The gateway answers none of them, but it
// parses and matches them on every join, and a browser's offer is ~200 lines because of them.
func chromiumVideoDecoys() []webrtc.RTPCodecParameters {
	feedback := []webrtc.RTCPFeedback{{Type: "goog-remb"}, {Type: "transport-cc"},
		{Type: "ccm", Parameter: "fir"}, {Type: "nack"}, {Type: "nack", Parameter: "pli"}}
	type decoy struct {
		pt, rtx webrtc.PayloadType
		mime    string
		fmtp    string
	}
	decoys := []decoy{
		{98, 99, webrtc.MimeTypeVP9, "profile-id=0"},
		{100, 101, webrtc.MimeTypeVP9, "profile-id=2"},
		{35, 36, webrtc.MimeTypeVP9, "profile-id=1"},
		{37, 38, webrtc.MimeTypeVP9, "profile-id=3"},
		{104, 107, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f"},
		{114, 115, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f"},
		{116, 117, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f"},
		{39, 40, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=4d001f"},
		{41, 42, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=f4001f"},
		{43, 44, webrtc.MimeTypeH264, "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=f4001f"},
		{45, 46, webrtc.MimeTypeAV1, "level-idx=5;profile=0;tier=0"},
		{47, 48, webrtc.MimeTypeAV1, "level-idx=5;profile=1;tier=0"},
		{118, 119, "video/red", ""},
	}
	var codecs []webrtc.RTPCodecParameters
	for _, d := range decoys {
		codecs = append(codecs,
			webrtc.RTPCodecParameters{RTPCodecCapability: webrtc.RTPCodecCapability{
				MimeType: d.mime, ClockRate: 90000, SDPFmtpLine: d.fmtp, RTCPFeedback: feedback,
			}, PayloadType: d.pt},
			webrtc.RTPCodecParameters{RTPCodecCapability: webrtc.RTPCodecCapability{
				MimeType: "video/rtx", ClockRate: 90000, SDPFmtpLine: fmt.Sprintf("apt=%d", d.pt),
			}, PayloadType: d.rtx})
	}
	return append(codecs,
		webrtc.RTPCodecParameters{RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: "video/ulpfec", ClockRate: 90000}, PayloadType: 120},
		webrtc.RTPCodecParameters{RTPCodecCapability: webrtc.RTPCodecCapability{
			MimeType: "video/flexfec-03", ClockRate: 90000, SDPFmtpLine: "repair-window=10000000"},
			PayloadType: 49})
}

// chromiumAudioDecoys: the same for audio.
func chromiumAudioDecoys() []webrtc.RTPCodecParameters {
	decoys := []webrtc.RTPCodecCapability{
		{MimeType: "audio/red", ClockRate: 48000, Channels: 2, SDPFmtpLine: "111/111"},
		{MimeType: webrtc.MimeTypeG722, ClockRate: 8000},
		{MimeType: webrtc.MimeTypePCMU, ClockRate: 8000},
		{MimeType: webrtc.MimeTypePCMA, ClockRate: 8000},
		{MimeType: "audio/CN", ClockRate: 8000},
		{MimeType: "audio/telephone-event", ClockRate: 48000},
		{MimeType: "audio/telephone-event", ClockRate: 8000},
	}
	types := []webrtc.PayloadType{63, 9, 0, 8, 13, 110, 126}
	codecs := make([]webrtc.RTPCodecParameters, len(decoys))
	for i, d := range decoys {
		codecs[i] = webrtc.RTPCodecParameters{RTPCodecCapability: d, PayloadType: types[i]}
	}
	return codecs
}
