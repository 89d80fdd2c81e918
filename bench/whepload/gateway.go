package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/<pid>/stat. Go has no sysconf; it
// is 100 on every Linux architecture this runs on.
const clockTicks = 100

// processTree is pid and its descendants: the gateway's fan-out worker processes are its
// children, and their CPU is the gateway's too.
func processTree(pid int) []int {
	pids := []int{pid}
	for i := 0; i < len(pids); i++ {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pids[i]))
		for _, task := range tasks {
			data, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/children", pids[i], task.Name()))
			if err != nil {
				continue
			}
			for _, child := range strings.Fields(string(data)) {
				if n, err := strconv.Atoi(child); err == nil {
					pids = append(pids, n)
				}
			}
		}
	}
	return pids
}

// procCPUSeconds is utime+stime of a process and its live descendants (100 % = one core when
// divided by wall time).
func procCPUSeconds(pid int) (float64, error) {
	total := 0.0
	for i, p := range processTree(pid) {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			if i == 0 {
				return 0, err
			}
			continue // a worker that just exited
		}
		text := string(data)
		fields := strings.Fields(text[strings.LastIndexByte(text, ')')+1:])
		if len(fields) < 13 {
			return 0, fmt.Errorf("short /proc/%d/stat", p)
		}
		utime, err1 := strconv.ParseFloat(fields[11], 64)
		stime, err2 := strconv.ParseFloat(fields[12], 64)
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("bad /proc/%d/stat", p)
		}
		total += utime + stime
	}
	return total / clockTicks, nil
}

// procRSSMB is VmRSS of a process and its live descendants (shared pages count once each).
func procRSSMB(pid int) (float64, error) {
	total := 0.0
	for i, p := range processTree(pid) {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			if i == 0 {
				return 0, err
			}
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
				kb, err := strconv.ParseFloat(f[1], 64)
				if err != nil {
					return 0, err
				}
				total += kb
				break
			}
		}
	}
	return total / 1024, nil
}

func ownCPUSeconds() float64 {
	var u syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &u); err != nil {
		return 0
	}
	return float64(u.Utime.Nano()+u.Stime.Nano()) / 1e9
}

// scrape reads the gateway's Prometheus text: series (name plus label set) -> value.
func scrape(ctx context.Context, client *http.Client, url string) (map[string]float64, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	samples := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			samples[line[:i]] = v
		}
	}
	return samples, nil
}

// counterDeltas are the window's increments of every avatargw_*_total series.
func counterDeltas(start, end map[string]float64) map[string]float64 {
	out := map[string]float64{}
	for series, v := range end {
		if strings.HasPrefix(series, "avatargw_") && strings.Contains(series, "_total") {
			out[series] = round(v-start[series], 3)
		}
	}
	return out
}

const encodeHistogram = "avatargw_video_encode_duration_seconds"

var codecLabel = regexp.MustCompile(`codec="([^"]*)"`)

// encodeStats: per video codec, the frames the shared encoder made in the window and its mean
// encode time per frame (fanout_viewers.encode_stats).
func encodeStats(start, end map[string]float64, window float64) map[string]map[string]any {
	out := map[string]map[string]any{}
	for series, v := range end {
		if !strings.HasPrefix(series, encodeHistogram+"_count{") {
			continue
		}
		codec := "?"
		if m := codecLabel.FindStringSubmatch(series); m != nil {
			codec = m[1]
		}
		frames := v - start[series]
		sum := strings.Replace(series, "_count{", "_sum{", 1)
		seconds := end[sum] - start[sum]
		e := map[string]any{"frames": math.Round(frames), "fps": nil, "mean_ms": nil, "busy_pct": nil}
		if window > 0 {
			e["fps"] = round(frames/window, 1)
			e["busy_pct"] = round(seconds/window*100, 1)
		}
		if frames > 0 {
			e["mean_ms"] = round(seconds/frames*1000, 3)
		}
		out[codec] = e
	}
	return out
}
