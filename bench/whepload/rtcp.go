package main

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/interceptor"
	"github.com/pion/rtcp"
)

// rtcpCounts is what one viewer has sent the gateway, by RTCP packet type.
type rtcpCounts struct {
	packets   atomic.Int64 // every RTCP packet (a compound counts each part)
	rr        atomic.Int64 // receiver reports
	nack      atomic.Int64 // generic NACK packets
	nackedSeq atomic.Int64 // sequence numbers asked for in them
	pli       atomic.Int64
	remb      atomic.Int64
	twcc      atomic.Int64 // transport-wide congestion control feedback
}

func (c *rtcpCounts) count(pkts []rtcp.Packet) {
	for _, p := range pkts {
		c.packets.Add(1)
		switch p := p.(type) {
		case *rtcp.ReceiverReport:
			c.rr.Add(1)
		case *rtcp.TransportLayerNack:
			c.nack.Add(1)
			for _, pair := range p.Nacks {
				c.nackedSeq.Add(int64(len(pair.PacketList())))
			}
		case *rtcp.PictureLossIndication:
			c.pli.Add(1)
		case *rtcp.ReceiverEstimatedMaximumBitrate:
			c.remb.Add(1)
		case *rtcp.TransportLayerCC:
			c.twcc.Add(1)
		}
	}
}

// countingFactory makes an interceptor that counts every RTCP packet on its way out. It must
// be the first one registered: the chain wraps writers in registration order, so the first
// interceptor's writer is the innermost one, which the NACK, report and TWCC interceptors'
// own writers all end in.
type countingFactory struct{ counts *rtcpCounts }

func (f countingFactory) NewInterceptor(string) (interceptor.Interceptor, error) {
	return &countingInterceptor{counts: f.counts}, nil
}

type countingInterceptor struct {
	interceptor.NoOp
	counts *rtcpCounts
}

func (c *countingInterceptor) BindRTCPWriter(w interceptor.RTCPWriter) interceptor.RTCPWriter {
	return interceptor.RTCPWriterFunc(func(pkts []rtcp.Packet, a interceptor.Attributes) (int, error) {
		c.counts.count(pkts)
		return w.Write(pkts, a)
	})
}

// rembFactory makes an interceptor that sends REMB (goog-remb) once a second for the video
// streams that negotiated it. Chromium falls back to receiver-side estimation with REMB when
// transport-cc is not negotiated, which is the case with an aiortc sender: aiortc implements
// neither the transport-cc header extension nor its feedback, so its answer drops both and
// Pion's TWCC interceptor stays idle. Chromium's estimate comes from packet delays (abs-send-
// time); on an uncongested link it settles above the incoming rate, so this one reports 1.5x
// the rate measured over the last second (at least 300 kbps). The gateway sends a fixed
// bitrate, so what matters for its cost is the packet, not the number in it.
type rembFactory struct{}

func (rembFactory) NewInterceptor(string) (interceptor.Interceptor, error) {
	return &rembInterceptor{streams: make(map[uint32]*atomic.Int64), done: make(chan struct{})}, nil
}

type rembInterceptor struct {
	interceptor.NoOp
	mu      sync.Mutex
	streams map[uint32]*atomic.Int64 // video SSRC -> bytes received
	done    chan struct{}
	once    sync.Once
}

const (
	rembInterval = time.Second
	rembFloorBps = 300_000
)

func negotiated(info *interceptor.StreamInfo, feedback string) bool {
	for _, fb := range info.RTCPFeedback {
		if fb.Type == feedback {
			return true
		}
	}
	return false
}

func (r *rembInterceptor) BindRemoteStream(info *interceptor.StreamInfo, reader interceptor.RTPReader) interceptor.RTPReader {
	if !negotiated(info, "goog-remb") {
		return reader
	}
	received := &atomic.Int64{}
	r.mu.Lock()
	r.streams[info.SSRC] = received
	r.mu.Unlock()
	return interceptor.RTPReaderFunc(func(b []byte, a interceptor.Attributes) (int, interceptor.Attributes, error) {
		n, a, err := reader.Read(b, a)
		received.Add(int64(n))
		return n, a, err
	})
}

func (r *rembInterceptor) UnbindRemoteStream(info *interceptor.StreamInfo) {
	r.mu.Lock()
	delete(r.streams, info.SSRC)
	r.mu.Unlock()
}

func (r *rembInterceptor) BindRTCPWriter(w interceptor.RTCPWriter) interceptor.RTCPWriter {
	go r.loop(w)
	return w
}

func (r *rembInterceptor) loop(w interceptor.RTCPWriter) {
	ticker := time.NewTicker(rembInterval)
	defer ticker.Stop()
	last := make(map[uint32]int64)
	for {
		select {
		case <-r.done:
			return
		case <-ticker.C:
		}
		r.mu.Lock()
		var ssrcs []uint32
		var delta int64
		for ssrc, received := range r.streams {
			total := received.Load()
			delta += total - last[ssrc]
			last[ssrc] = total
			ssrcs = append(ssrcs, ssrc)
		}
		r.mu.Unlock()
		if len(ssrcs) == 0 {
			continue
		}
		estimate := 1.5 * float64(delta*8) / rembInterval.Seconds()
		if estimate < rembFloorBps {
			estimate = rembFloorBps
		}
		// A write error means the connection is closing; the next tick or done ends the loop.
		_, _ = w.Write([]rtcp.Packet{&rtcp.ReceiverEstimatedMaximumBitrate{
			Bitrate: float32(estimate), SSRCs: ssrcs,
		}}, nil)
	}
}

func (r *rembInterceptor) Close() error {
	r.once.Do(func() { close(r.done) })
	return nil
}
