package main

import (
	"sync"
	"sync/atomic"
	"time"
)

// seqWindow is how many recent sequence numbers a frameCounter remembers. A 720p keyframe is
// well under 200 packets; 4096 leaves room for a second or two of reordering and
// retransmissions without ever confusing a new packet with an old one.
const seqWindow = 4096

// staleFrame is how long a frame may stay incomplete before it is given up on. A browser's
// jitter buffer would have NACKed a lost packet a few times by then (the RTT here is below a
// millisecond) and asked for a keyframe.
const staleFrame = time.Second

// backlogWindow: seconds after the first frame in which the join backlog is looked for (the
// same window as fanout_viewers.py).
const backlogWindow = 5 * time.Second

// pendingFrame is one video frame (one RTP timestamp) whose packets are still arriving.
type pendingFrame struct {
	first        int64 // lowest extended sequence number seen
	firstIsStart bool  // the packet at first begins a frame (codec payload header)
	end          int64 // the marker packet's extended sequence number, -1 until seen
	keyframe     bool
	width        int
	height       int
	bytes        int
	arrived      time.Time
}

// frameCounter turns one video track's RTP packets into complete frames the way a jitter
// buffer does, without decoding: a frame is complete once every sequence number from the one
// after the previous frame's marker packet up to its own marker packet has arrived, in any
// order (a retransmission after a NACK fills its hole). That is what a browser hands to its
// decoder, and what fanout_viewers.py counts from aiortc's jitter buffer.
type frameCounter struct {
	codec string // "vp8" or "h264": how keyframes and frame starts are recognised

	mu      sync.Mutex
	seen    [seqWindow]int64 // extended sequence number + 1 at index ext % seqWindow
	highest int64            // highest extended sequence number so far, -1 before any
	pending map[uint32]*pendingFrame
	markers []int64 // recent marker packets' extended sequence numbers, ascending

	firstAt     time.Time // first complete frame: arrival time and RTP timestamp
	firstTS     uint32
	joinBacklog time.Duration
	firstKeyAt  time.Time
	width       int
	height      int
	sizesSeen   map[[2]int]bool
	clockRateHz float64

	// Read by snapshots while the track's goroutine writes them.
	frames     atomic.Int64
	keyframes  atomic.Int64
	incomplete atomic.Int64
}

func newFrameCounter(codec string) *frameCounter {
	return &frameCounter{
		codec:       codec,
		highest:     -1,
		pending:     make(map[uint32]*pendingFrame),
		sizesSeen:   make(map[[2]int]bool),
		clockRateHz: 90000,
	}
}

// extend unwraps a 16-bit sequence number next to the highest one seen. The first one is
// offset by 1<<16 so that packets reordered before it stay positive.
func (f *frameCounter) extend(seq uint16) int64 {
	if f.highest < 0 {
		return int64(seq) + 1<<16
	}
	return f.highest + int64(int16(seq-uint16(f.highest)))
}

// add records one RTP packet (header fields and payload) that arrived at now.
func (f *frameCounter) add(seq uint16, ts uint32, marker bool, payload []byte, now time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	ext := f.extend(seq)
	if ext < 0 || f.seen[ext%seqWindow] == ext+1 {
		return // a duplicate, or hopelessly old
	}
	f.seen[ext%seqWindow] = ext + 1
	if ext > f.highest {
		f.highest = ext
	}
	fr := f.pending[ts]
	if fr == nil {
		fr = &pendingFrame{first: ext, end: -1, arrived: now}
		fr.firstIsStart = frameStart(f.codec, payload)
		f.pending[ts] = fr
	} else if ext < fr.first {
		fr.first, fr.firstIsStart = ext, frameStart(f.codec, payload)
	}
	fr.bytes += len(payload)
	if key, w, h := keyframeInfo(f.codec, payload); key {
		fr.keyframe = true
		if w > 0 {
			fr.width, fr.height = w, h
		}
	}
	if marker {
		fr.end = ext
		f.noteMarker(ext)
	}
	f.complete(now)
}

func (f *frameCounter) noteMarker(ext int64) {
	i := len(f.markers)
	for i > 0 && f.markers[i-1] > ext {
		i--
	}
	f.markers = append(f.markers, 0)
	copy(f.markers[i+1:], f.markers[i:])
	f.markers[i] = ext
	if len(f.markers) > 64 {
		f.markers = f.markers[len(f.markers)-64:]
	}
}

// startOf is the first sequence number of the frame that ends at end: the one after the
// previous marker, or the frame's own first packet if that begins a frame and no earlier
// marker is known (the very first frame). ok is false while that is undecidable.
func (f *frameCounter) startOf(fr *pendingFrame) (start int64, ok bool) {
	for i := len(f.markers) - 1; i >= 0; i-- {
		if f.markers[i] < fr.end {
			return f.markers[i] + 1, true
		}
	}
	return fr.first, fr.firstIsStart
}

func (f *frameCounter) complete(now time.Time) {
	for ts, fr := range f.pending {
		if fr.end < 0 {
			if now.Sub(fr.arrived) > staleFrame {
				delete(f.pending, ts)
				f.incomplete.Add(1)
			}
			continue
		}
		start, ok := f.startOf(fr)
		whole := ok && fr.end-start < seqWindow
		for s := start; whole && s <= fr.end; s++ {
			whole = f.seen[s%seqWindow] == s+1
		}
		switch {
		case whole:
			delete(f.pending, ts)
			f.emit(ts, fr, now)
		case now.Sub(fr.arrived) > staleFrame:
			delete(f.pending, ts)
			f.incomplete.Add(1)
		}
	}
}

func (f *frameCounter) emit(ts uint32, fr *pendingFrame, now time.Time) {
	if f.firstAt.IsZero() {
		f.firstAt, f.firstTS = now, ts
	} else if since := now.Sub(f.firstAt); since < backlogWindow {
		// Media time ahead of arrival time: frames queued before the viewer was connected
		// arrive as a burst (see fanout_viewers.TrackStats.join_backlog).
		media := time.Duration(float64(int32(ts-f.firstTS)) / f.clockRateHz * float64(time.Second))
		if media-since > f.joinBacklog {
			f.joinBacklog = media - since
		}
	}
	f.frames.Add(1)
	if fr.keyframe {
		f.keyframes.Add(1)
		if f.firstKeyAt.IsZero() {
			f.firstKeyAt = now
		}
		if fr.width > 0 {
			f.width, f.height = fr.width, fr.height
			f.sizesSeen[[2]int{fr.width, fr.height}] = true
		}
	}
}

// result is a consistent copy of what the summary needs after the window.
type frameResult struct {
	firstKeyAt  time.Time
	joinBacklog time.Duration
	sizes       [][2]int
}

func (f *frameCounter) result() frameResult {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := frameResult{firstKeyAt: f.firstKeyAt, joinBacklog: f.joinBacklog}
	for s := range f.sizesSeen {
		r.sizes = append(r.sizes, s)
	}
	return r
}

// -- codec payloads -------------------------------------------------------------------------

// vp8Descriptor returns the length of a VP8 payload descriptor (RFC 7741 4.2) and whether the
// packet starts partition 0 (S=1, PID=0): only there is the VP8 payload header.
func vp8Descriptor(p []byte) (n int, partitionStart bool, ok bool) {
	if len(p) < 1 {
		return 0, false, false
	}
	n = 1
	if p[0]&0x80 != 0 { // X: extension byte follows
		if len(p) < 2 {
			return 0, false, false
		}
		ext := p[1]
		n = 2
		if ext&0x80 != 0 { // I: picture ID, 7 or 15 bits
			if len(p) < n+1 {
				return 0, false, false
			}
			if p[n]&0x80 != 0 {
				n += 2
			} else {
				n++
			}
		}
		if ext&0x40 != 0 { // L: TL0PICIDX
			n++
		}
		if ext&0x30 != 0 { // T or K: TID/Y/KEYIDX
			n++
		}
	}
	if len(p) < n {
		return 0, false, false
	}
	return n, p[0]&0x10 != 0 && p[0]&0x07 == 0, true
}

func frameStart(codec string, p []byte) bool {
	switch codec {
	case "vp8":
		_, start, ok := vp8Descriptor(p)
		return ok && start
	case "h264":
		if len(p) < 2 {
			return false
		}
		switch t := p[0] & 0x1f; {
		case t == 28: // FU-A: its start bit
			return p[1]&0x80 != 0
		default: // a single NAL unit or STAP-A begins with a whole NAL unit
			return t >= 1 && t <= 24
		}
	}
	return false
}

// keyframeInfo says whether the packet shows its frame is a keyframe (VP8: the payload
// header's P bit is 0, RFC 6386 9.1; H.264: it carries or starts an IDR slice), with the
// picture size where the packet has it (the VP8 keyframe header; an H.264 SPS).
func keyframeInfo(codec string, p []byte) (key bool, width, height int) {
	switch codec {
	case "vp8":
		n, start, ok := vp8Descriptor(p)
		if !ok || !start || len(p) < n+1 || p[n]&0x01 != 0 {
			return false, 0, 0
		}
		h := p[n:]
		if len(h) >= 10 && h[3] == 0x9d && h[4] == 0x01 && h[5] == 0x2a {
			width = int(uint16(h[6])|uint16(h[7])<<8) & 0x3fff
			height = int(uint16(h[8])|uint16(h[9])<<8) & 0x3fff
		}
		return true, width, height
	case "h264":
		return h264Keyframe(p)
	}
	return false, 0, 0
}

func h264Keyframe(p []byte) (key bool, width, height int) {
	if len(p) < 2 {
		return false, 0, 0
	}
	nal := func(n []byte) {
		switch n[0] & 0x1f {
		case 5:
			key = true
		case 7:
			if w, h, ok := h264SPSSize(n); ok {
				width, height = w, h
			}
		}
	}
	switch t := p[0] & 0x1f; {
	case t >= 1 && t <= 23:
		nal(p)
	case t == 24: // STAP-A: 16-bit size, NAL unit, ...
		for rest := p[1:]; len(rest) > 2; {
			size := int(rest[0])<<8 | int(rest[1])
			if size == 0 || len(rest) < 2+size {
				break
			}
			nal(rest[2 : 2+size])
			rest = rest[2+size:]
		}
	case t == 28: // FU-A: the fragmented NAL unit's type is in the FU header
		key = p[1]&0x1f == 5
	}
	return key, width, height
}
