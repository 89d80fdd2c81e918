package main

import (
	"testing"
	"time"
)

// vp8Packet is a payload with a one-byte descriptor; start marks the first packet of a frame,
// key makes that packet carry a 1280x720 keyframe header.
func vp8Packet(start, key bool) []byte {
	if !start {
		return []byte{0x00, 0xaa, 0xbb}
	}
	if !key {
		return []byte{0x10, 0x01, 0x00, 0x00}
	}
	// Frame tag (P=0), start code, 14-bit width and height, little-endian.
	return []byte{0x10, 0x00, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x00, 0x05, 0xd0, 0x02}
}

type pkt struct {
	seq    uint16
	ts     uint32
	marker bool
	start  bool
	key    bool
}

func feed(f *frameCounter, now time.Time, pkts ...pkt) {
	for _, p := range pkts {
		f.add(p.seq, p.ts, p.marker, vp8Packet(p.start, p.key), now)
	}
}

func TestFramesCompleteInAnyOrder(t *testing.T) {
	f := newFrameCounter("vp8")
	now := time.Now()
	// A keyframe in three packets, the middle one late (a retransmission), then a delta frame.
	feed(f, now, pkt{65534, 3000, false, true, true}, pkt{0, 3000, true, false, false})
	if got := f.frames.Load(); got != 0 {
		t.Fatalf("frame with a hole counted: %d", got)
	}
	feed(f, now, pkt{65535, 3000, false, false, false})
	if f.frames.Load() != 1 || f.keyframes.Load() != 1 {
		t.Fatalf("frames %d keyframes %d, want 1 and 1", f.frames.Load(), f.keyframes.Load())
	}
	if r := f.result(); len(r.sizes) != 1 || r.sizes[0] != [2]int{1280, 720} {
		t.Fatalf("sizes %v", r.sizes)
	}
	feed(f, now, pkt{1, 6000, false, true, false}, pkt{2, 6000, true, false, false},
		pkt{2, 6000, true, false, false}) // a duplicate changes nothing
	if f.frames.Load() != 2 || f.keyframes.Load() != 1 {
		t.Fatalf("frames %d keyframes %d, want 2 and 1", f.frames.Load(), f.keyframes.Load())
	}
}

func TestLostPacketMakesFrameIncomplete(t *testing.T) {
	f := newFrameCounter("vp8")
	now := time.Now()
	feed(f, now, pkt{10, 3000, true, true, true})
	feed(f, now, pkt{11, 6000, false, true, false} /* 12 lost */, pkt{13, 6000, true, false, false})
	feed(f, now.Add(2*staleFrame), pkt{14, 9000, true, true, false})
	if f.frames.Load() != 2 || f.incomplete.Load() != 1 {
		t.Fatalf("frames %d incomplete %d, want 2 and 1", f.frames.Load(), f.incomplete.Load())
	}
}

func TestH264Keyframe(t *testing.T) {
	// STAP-A with an SPS for 1280x720 (as x264 writes it) and a PPS, then an IDR in FU-A.
	sps := []byte{0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x16, 0xe8, 0x06, 0xd0, 0xa1, 0x35}
	stap := append([]byte{0x18, 0x00, byte(len(sps))}, sps...)
	stap = append(stap, 0x00, 0x02, 0x68, 0xce)
	key, w, h := keyframeInfo("h264", stap)
	if key || w != 1280 || h != 720 {
		t.Fatalf("STAP-A: key %v size %dx%d", key, w, h)
	}
	if key, _, _ := keyframeInfo("h264", []byte{0x7c, 0x85, 0x88}); !key {
		t.Fatal("FU-A start of an IDR not recognised")
	}
	if !frameStart("h264", stap) || frameStart("h264", []byte{0x7c, 0x05, 0x88}) {
		t.Fatal("frame starts")
	}
}
