"""Every Prometheus metric the gateway exports, defined in one place (specs/metrics.md).

Each application owns a :class:`Metrics` with its own registry, so tests that build several
apps in one process read exact values. Labels take bounded values only: never a session id,
viewer id, address or token.
"""

from __future__ import annotations

import platform

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__

NS = "avatargw"
UPSTREAMS = ("local", "heygen", "liveavatar")
START_RESULTS = ("ok", "quota", "auth", "unavailable", "error")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ENCODE_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.012, 0.016, 0.025, 0.033, 0.05, 0.1)
_SESSION_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)


class Metrics:
    def __init__(self, commit: str = "") -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Gauge(f"{NS}_build_info", "Build metadata (always 1).",
                                ["version", "commit", "python"], registry=r)
        self.build_info.labels(__version__, commit or "unknown", platform.python_version()).set(1)
        self.ready = Gauge(f"{NS}_ready", "1 when /readyz passes.", registry=r)

        # sessions and upstreams
        self.sessions = Gauge(f"{NS}_sessions", "Avatar sessions by state.",
                              ["upstream", "state"], registry=r)
        self.session_ends = Counter(f"{NS}_session_ends_total", "Why sessions ended.",
                                    ["upstream", "reason"], registry=r)
        self.session_duration = Histogram(f"{NS}_session_duration_seconds",
                                          "Session lifetime.", ["upstream"],
                                          buckets=_SESSION_BUCKETS, registry=r)
        self.speak_requests = Counter(f"{NS}_speak_requests_total", "Speak tasks submitted.",
                                      ["upstream", "task_type"], registry=r)
        self.speak_latency = Histogram(f"{NS}_speak_latency_seconds",
                                       "Speak request to the avatar starting to talk "
                                       "(avatar_start_talking), queueing behind earlier speech "
                                       "included.", ["upstream"],
                                       buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
                                       registry=r)
        self.upstream_frames = Counter(f"{NS}_upstream_frames_received_total",
                                       "Frames the upstream handed to the hub.",
                                       ["upstream", "kind"], registry=r)
        self.upstream_starts = Counter(f"{NS}_upstream_session_starts_total",
                                       "Attempts to open an upstream session, by outcome.",
                                       ["upstream", "result"], registry=r)
        self.upstream_start_duration = Histogram(
            f"{NS}_upstream_session_start_duration_seconds",
            "Create to live (room joined, media flowing).", ["upstream"],
            buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0), registry=r)
        self.upstream_reconnects = Counter(f"{NS}_upstream_reconnects_total",
                                           "Rejoins of a dropped upstream room, by outcome.",
                                           ["upstream", "result"], registry=r)
        self.upstream_last_frame = Gauge(f"{NS}_upstream_last_frame_timestamp_seconds",
                                         "Unix time of the newest frame from any upstream "
                                         "(alert on time() - x > 5: frozen video).",
                                         ["upstream", "kind"], registry=r)
        self.upstream_api_requests = Counter(f"{NS}_upstream_api_requests_total",
                                             "REST calls to avatar providers.",
                                             ["provider", "endpoint", "code"], registry=r)
        self.upstream_api_duration = Histogram(f"{NS}_upstream_api_request_duration_seconds",
                                               "Latency of REST calls to avatar providers.",
                                               ["provider", "endpoint"], buckets=_LATENCY_BUCKETS,
                                               registry=r)
        # billing guard (gateway/upstream/billing.py): nothing the provider bills goes unknown
        self.upstream_stops_pending = Gauge(
            f"{NS}_upstream_stops_pending",
            "Provider sessions whose stop failed and is being retried (they may still bill; "
            "alert when it stays above 0).", ["upstream"], registry=r)
        self.upstream_reconciled = Counter(
            f"{NS}_upstream_reconciled_sessions_total",
            "Provider sessions found open after a create call failed without a clear answer "
            "(e.g. timed out), and stopped.", ["upstream"], registry=r)
        for upstream in UPSTREAMS[1:]:
            self.upstream_stops_pending.labels(upstream)
            self.upstream_reconciled.labels(upstream)
        # Closed sets are exported at 0 from the start, so increase() sees a first failure.
        for upstream in UPSTREAMS:
            for result in START_RESULTS:
                self.upstream_starts.labels(upstream, result)
            for result in ("ok", "failed"):
                self.upstream_reconnects.labels(upstream, result)
        self.events_dropped = Counter(f"{NS}_events_dropped_total",
                                      "Session events not delivered to a slow consumer.",
                                      ["channel"], registry=r)

        # media hub
        self.frames_encoded = Counter(f"{NS}_frames_encoded_total",
                                      "Frames encoded by the shared (encode-once) encoders.",
                                      ["kind", "codec"], registry=r)
        self.frames_skipped = Counter(f"{NS}_frames_skipped_total",
                                      "Source frames not encoded: encoder busy or nobody watching.",
                                      ["kind", "reason"], registry=r)
        self.keyframes = Counter(f"{NS}_keyframes_encoded_total", "Video keyframes encoded.",
                                 ["reason"], registry=r)
        self.keyframe_requests = Counter(f"{NS}_keyframe_requests_total",
                                         "Keyframe requests before coalescing.",
                                         ["reason"], registry=r)
        self.fast_starts = Counter(f"{NS}_video_fast_starts_total",
                                   "Video viewers started on a replay of the frames since a "
                                   "recent keyframe, with no keyframe of their own.",
                                   registry=r)
        self.encode_duration = Histogram(f"{NS}_video_encode_duration_seconds",
                                         "Per-frame encode time of the shared encoder.",
                                         ["codec"], buckets=_ENCODE_BUCKETS, registry=r)
        self.packets_dropped = Counter(f"{NS}_viewer_packets_dropped_total",
                                       "Encoded packets a slow viewer skipped (queue full).",
                                       ["kind"], registry=r)
        self.sent_bytes = Counter(f"{NS}_sent_bytes_total",
                                  "Encoded media bytes handed to viewer senders.",
                                  ["kind"], registry=r)
        self.sent_packets = Counter(f"{NS}_sent_packets_total",
                                    "RTP packets sent to viewers (sampled from each sender).",
                                    ["kind"], registry=r)
        self.packets_lost = Counter(f"{NS}_packets_lost_total",
                                    "RTP packets viewers reported lost (RTCP receiver reports).",
                                    ["kind"], registry=r)
        self.viewer_rungs = Gauge(f"{NS}_viewers_per_rung",
                                  "Video viewers by rung of the quality ladder (0: the "
                                  "session's size, 1: half, 2: a quarter).",
                                  ["rung"], registry=r)
        self.rung_switches = Counter(f"{NS}_viewer_rung_switches_total",
                                     "Viewers moved to another rung of the quality ladder.",
                                     ["direction"], registry=r)
        self.bandwidth_estimate = Histogram(
            f"{NS}_viewer_bandwidth_estimate_bits_per_second",
            "Viewers' bandwidth estimates (REMB), one observation per report.",
            buckets=(100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6, 3e6, 5e6, 10e6),
            registry=r)
        self.viewer_rtt = Histogram(f"{NS}_viewer_rtt_seconds",
                                    "Round-trip time to viewers, from RTCP receiver reports "
                                    "(one observation per viewer per sample).",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6),
                                    registry=r)

        # viewers
        self.viewers = Gauge(f"{NS}_viewers", "Viewer peer connections by state.",
                             ["state"], registry=r)
        self.viewer_sessions = Counter(f"{NS}_viewer_sessions_total", "WHEP POST outcomes.",
                                       ["result"], registry=r)
        self.viewer_disconnects = Counter(f"{NS}_viewer_disconnects_total",
                                          "Why viewers went away.", ["reason"], registry=r)
        self.viewer_duration = Histogram(f"{NS}_viewer_session_duration_seconds",
                                         "Viewing time.", buckets=_SESSION_BUCKETS, registry=r)
        self.time_to_first_frame = Histogram(f"{NS}_viewer_time_to_first_frame_seconds",
                                             "WHEP POST to first video packet sent.",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.viewer_ice_transitions = Counter(f"{NS}_viewer_ice_state_transitions_total",
                                              "Viewer connection state changes.", ["state"],
                                              registry=r)
        self.rtcp_feedback = Counter(f"{NS}_rtcp_feedback_received_total",
                                     "RTCP feedback from viewers.", ["type"], registry=r)
        self.workers = Gauge(f"{NS}_fanout_workers", "Fan-out worker processes running.",
                             registry=r)
        self.worker_restarts = Counter(f"{NS}_fanout_worker_restarts_total",
                                       "Fan-out workers started again after they died.",
                                       registry=r)

        self.loop_lag = Histogram(f"{NS}_event_loop_lag_seconds",
                                  "How late the event loop runs a timer (starved loops fail "
                                  "ICE consent checks and stall media).",
                                  buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                                  registry=r)
        self.loop_busy = Gauge(f"{NS}_event_loop_busy_ratio",
                               "Share of recent time an event loop spent working (main: the "
                               "owner; worker-N: a fan-out worker); new viewers are refused "
                               "at max_viewer_load.", ["process"], registry=r)

        # chat
        self.chat_requests = Counter(f"{NS}_chat_requests_total", "Chat answers, by outcome.",
                                     ["mode", "result"], registry=r)
        self.llm_duration = Histogram(f"{NS}_llm_request_duration_seconds",
                                      "Question to the language model's full answer.", ["model"],
                                      buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
                                      registry=r)
        self.llm_first_token = Histogram(f"{NS}_llm_time_to_first_token_seconds",
                                         "Question to the first streamed token (when the avatar "
                                         "can start speaking soonest).", ["model"],
                                         buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
                                         registry=r)
        self.llm_tokens = Counter(f"{NS}_llm_tokens_total", "Tokens the provider billed.",
                                  ["model", "type"], registry=r)

        # HTTP
        self.http_requests = Counter(f"{NS}_http_requests_total", "HTTP requests.",
                                     ["route", "method", "code"], registry=r)
        self.http_duration = Histogram(f"{NS}_http_request_duration_seconds",
                                       "HTTP request latency.", ["route", "method"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        # connections (the listener's guard, gateway/connections.py)
        self.connections = Gauge(f"{NS}_http_connections", "HTTP connections open.",
                                 registry=r)
        self.connections_refused = Counter(
            f"{NS}_http_connections_refused_total",
            "Connections closed unread: over max_connections (total) or "
            "max_connections_per_client (client).", ["limit"], registry=r)
        self.connections_timed_out = Counter(
            f"{NS}_http_connections_timed_out_total",
            "Connections closed for sending a request too slowly.", ["phase"], registry=r)
        self.accept_errors = Counter(f"{NS}_http_accept_errors_total",
                                     "accept() failures for lack of file descriptors or "
                                     "memory (EMFILE, ENFILE, ENOBUFS, ENOMEM).", registry=r)
        for limit in ("total", "client"):
            self.connections_refused.labels(limit)
        for phase in ("header", "body"):
            self.connections_timed_out.labels(phase)
