"""Every place the gateway reaches into aiortc's or aioice's private state, in one module.

aiortc and aioice are pinned exactly (pyproject) and checked here at import: a different
version fails loudly at start-up instead of silently ignoring a hook. Each hook has a
wire-level test that would notice aiortc no longer calling it (``tests/test_aiortc_hooks.py``:
real peers, real packets).

1. :func:`take_over_sender` — a viewer's ``RTCRtpSender`` keeps doing negotiation (SSRCs,
   payload types, ``mid``, extension ids) and RTCP routing, but its per-packet machinery is
   replaced by a :class:`~gateway.media.rtp.RtpStream` fed by the hub. aiortc calls
   ``sender.send(parameters)`` once DTLS is up, ``sender._handle_rtcp_packet(packet)`` for
   every RTCP packet routed to the sender's SSRC, and ``sender.stop()`` on close: those three
   are replaced on the instance. The stream writes through :class:`DtlsOutput`: the DTLS
   transport's SRTP session and the nominated ICE pair's datagram transport.
2. :meth:`DtlsOutput.backlog` — bytes asyncio holds for the nominated pair's socket (what the
   kernel refused); aioice ignores ``pause_writing``, so this is the only sign of a full uplink.
3. :func:`configure_ice_host_addresses` — aioice gathers on a module function, not a setting.
   Unpinned, the interface list is read once per ``HOST_ADDRESSES_TTL`` instead of per join
   (``ifaddr`` walks every interface: ~0.5 ms of each join, more on hosts with many).
4. The non-STUN datagram queue of ``aioice.ice.Connection`` is bounded (a flood of a pending
   viewer's port would otherwise grow without limit).
5. aioice's per-check INFO logging is lowered to WARNING.
6. :func:`new_peer_connection` — one DTLS certificate (its fingerprints computed once) and SSL
   context per process for every viewer, instead of a new key pair, certificate and context
   per peer connection (~2 ms of each join).
7. Every video ``RTCRtpReceiver`` builds a receive-side bandwidth estimator (~1.2 ms of
   allocations) even when it never receives: a viewer's transceivers only send. It is now
   built on the first packet that needs it.
8. :func:`answer_as_dtls_server` — to an ``actpass`` offer aiortc always answers
   ``setup:active`` (DTLS client). A WHEP answer travels over HTTP before ICE starts, so the
   parallelism RFC 5763 recommends ``active`` for does not exist here, while the client role
   costs round trips: the viewer's server may ask for a cookie (Pion does: HelloVerifyRequest),
   and the gateway may only send media after the viewer's last flight reaches it. As DTLS
   server the gateway finishes on the viewer's Finished and sends its own with the first frame
   right behind it: one inbound flight fewer (two with a cookie) per join on a busy loop.
9. aiortc's DTLS handshake failures (and their reason) are logged at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import aioice.ice
import aiortc.rtcdtlstransport
import aiortc.rtcrtpreceiver
from aiortc import (
    RTCCertificate,
    RTCConfiguration,
    RTCDtlsTransport,
    RTCPeerConnection,
    RTCRtpSender,
)
from aiortc.codecs import is_rtx
from aiortc.rate import RemoteBitrateEstimator as _RemoteBitrateEstimator
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import AnyRtcpPacket

from ..media.rtp import RtpStream, StreamParameters

PINNED = {"aiortc": "1.16.0", "aioice": "0.13.0"}
for _package, _version in PINNED.items():
    if metadata.version(_package) != _version:
        raise RuntimeError(f"gateway.viewers.aiortc_hooks is written against {_package} "
                           f"{_version}, found {metadata.version(_package)}: re-check every "
                           f"hook in this module and its tests before changing the pin")

logger = logging.getLogger(__name__)

# aioice logs every connectivity check at INFO: a viewer with many candidates (or a hostile
# PATCH) would turn the log into a flood. Its checks stay available at DEBUG.
if logging.getLogger("aioice.ice").level == logging.NOTSET:
    logging.getLogger("aioice.ice").setLevel(logging.WARNING)


# -- 9. DTLS failures at INFO, with the reason ------------------------------------------------


def _dtls_failures_at_info(record: logging.LogRecord) -> bool:
    """aiortc says why a DTLS handshake failed (no shared cipher, fingerprint mismatch, ...)
    only at DEBUG, where nobody sees it, and its connection then just reads "failed". Its
    DTLS logger's few DEBUG lines (none per packet) are let through to this filter; the
    failures go on at INFO, the rest are dropped."""
    if record.levelno >= logging.INFO:
        return True
    if "handshake failed" in str(record.msg):
        record.levelno, record.levelname = logging.INFO, "INFO"
        return True
    return False


_DTLS_LOGGER = logging.getLogger("aiortc.rtcdtlstransport")
if _DTLS_LOGGER.level == logging.NOTSET:
    _DTLS_LOGGER.setLevel(logging.DEBUG)
    _DTLS_LOGGER.addFilter(_dtls_failures_at_info)


# -- 1. the sender takeover -----------------------------------------------------------------


UDP_SEGMENT = 103  # linux/udp.h: the segment size for UDP GSO (Linux >= 4.18)
GSO_MAX_BYTES = 65_000
GSO_MAX_SEGMENTS = 64
_gso = sys.platform == "linux"
"""Cleared for the whole process the first time the kernel refuses a segmented send."""


class DtlsOutput:
    """A stream's way out: SRTP with the DTLS transport's keys, then the nominated pair's
    socket, synchronously (aiortc awaits three coroutines per datagram for the same).

    A frame's datagrams are equal in size but the last (fixed payload chunks, one header
    size per stream), which is exactly what UDP GSO sends in one system call: the kernel cuts
    the buffer into datagrams. Measured here (veth, loopback): ~3x less CPU per packet than
    one ``sendto`` each. Anything else (one datagram, odd sizes, data already waiting in
    asyncio's buffer, a kernel without GSO) goes through the transport one by one.
    """

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self._dtls = dtls
        self._connection: aioice.ice.Connection = dtls.transport._connection
        self._nominated: dict[int, Any] = self._connection._nominated
        self._transport: Any = None
        self._address: tuple[str, int] = ("", 0)
        # Per frame and viewer, so no property that formats the state enum as a string.
        self._connected = dtls.state == "connected"
        dtls.on("statechange", self._on_state)

    def _on_state(self) -> None:
        self._connected = self._dtls.state == "connected"

    def writer(self) -> tuple[Callable[[bytes], bytes], Callable[[list[bytes]], None]] | None:
        pair = self._nominated.get(1)
        if not self._connected or pair is None or pair.protocol.transport is None:
            return None
        self._transport, self._address = pair.protocol.transport, pair.remote_addr
        return self._dtls._tx_srtp.protect, self._send

    def _send(self, datagrams: list[bytes]) -> None:
        global _gso
        transport, address = self._transport, self._address
        sent = 0
        if _gso and len(datagrams) > 1 and not transport.get_write_buffer_size():
            size = len(datagrams[0])
            if all(len(d) == size for d in datagrams[1:-1]) and len(datagrams[-1]) <= size:
                sock = transport._sock  # asyncio's own socket: the transport has no sendmsg
                step = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size)
                segment = [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
                try:
                    while sent < len(datagrams):
                        sock.sendmsg([b"".join(datagrams[sent:sent + step])], segment, 0,
                                     address)
                        sent += step
                    return
                except (BlockingIOError, InterruptedError):
                    pass  # a full socket: the transport buffers the rest, as for sendto
                except OSError as exc:
                    _gso = False
                    logger.info("UDP GSO unavailable (%s): one send per packet", exc)
        for datagram in datagrams[sent:]:
            transport.sendto(datagram, address)

    def protect_rtcp(self, data: bytes) -> bytes:
        protected: bytes = self._dtls._tx_srtp.protect_rtcp(data)
        return protected

    def send(self, data: bytes) -> None:
        """One already-protected datagram (RTCP), if still connected."""
        writer = self.writer()
        if writer is not None:
            writer[1]([data])

    def backlog(self) -> int:
        """The nominated pair's socket only: the one media goes out on (called per frame)."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0


def take_over_sender(sender: RTCRtpSender, codec: str,
                     start: Callable[[StreamParameters, DtlsOutput], RtpStream | None],
                     stop: Callable[[RtpStream], None]) -> None:
    """Let ``start`` build the sender's :class:`RtpStream` once DTLS is up; ``stop`` ends it.

    ``start`` returns None when the stream is not wanted any more (the viewer closed).
    """
    takeover = _Takeover(sender, codec, start, stop)
    sender.send = takeover.send  # type: ignore[method-assign]
    sender._handle_rtcp_packet = takeover.handle_rtcp  # type: ignore[method-assign]
    sender.stop = takeover.stop  # type: ignore[method-assign]


class _Takeover:
    """What replaces one sender's ``send``, ``_handle_rtcp_packet`` and ``stop``."""

    def __init__(self, sender: RTCRtpSender, codec: str,
                 start: Callable[[StreamParameters, DtlsOutput], RtpStream | None],
                 stop: Callable[[RtpStream], None]) -> None:
        self._sender, self._codec, self._start, self._stop = sender, codec, start, stop
        self._started = self._stopped = False
        self._stream: RtpStream | None = None
        self._rtcp: asyncio.Task[None] | None = None

    async def send(self, parameters: RTCRtpSendParameters) -> None:
        if self._started:
            return
        self._started = True
        sender = self._sender
        dtls = sender.transport
        dtls._register_rtp_sender(sender, parameters)
        primary = parameters.codecs[0]
        assert primary.payloadType is not None  # aiortc numbers every negotiated codec
        rtx = next((c.payloadType for c in parameters.codecs
                    if is_rtx(c) and c.parameters.get("apt") == primary.payloadType), None)
        params = StreamParameters(
            kind=sender.kind, codec=self._codec, payload_type=primary.payloadType,
            ssrc=sender._ssrc, cname=parameters.rtcp.cname or "", mid=parameters.muxId,
            extensions=tuple((e.id, e.uri) for e in parameters.headerExtensions),
            rtx_payload_type=rtx, rtx_ssrc=sender._rtx_ssrc)
        output = DtlsOutput(dtls)
        self._stream = self._start(params, output)
        if self._stream is not None:
            self._rtcp = asyncio.get_running_loop().create_task(
                _report(self._stream, output), name=f"rtcp-{sender.kind}")

    async def handle_rtcp(self, packet: AnyRtcpPacket) -> None:
        if self._stream is not None:
            self._stream.handle_rtcp(packet)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._started:
            self._sender.transport._unregister_rtp_sender(self._sender)
        stream, self._stream = self._stream, None
        if self._rtcp is not None:
            self._rtcp.cancel()
            await asyncio.wait([self._rtcp])
        if stream is not None:
            self._stop(stream)


async def _report(stream: RtpStream, output: DtlsOutput) -> None:
    """Sender reports every ~1 s, and a BYE at the end (while the transport is still up)."""
    try:
        while True:
            await asyncio.sleep(stream.report_interval())
            output.send(stream.sender_report())
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # the transport may be closing already
            output.send(stream.goodbye())
        raise


# -- 6. one certificate -----------------------------------------------------------------------

CERTIFICATE_ROTATION = 24 * 3600.0
"""Seconds one certificate serves new viewers (aiortc makes them valid for 30 days)."""
_certificate: tuple[float, RTCCertificate] | None = None
_generate_certificate = RTCCertificate.generateCertificate


def _shared_certificate() -> RTCCertificate:
    global _certificate
    now = time.monotonic()
    if _certificate is None or now - _certificate[0] > CERTIFICATE_ROTATION:
        certificate = _generate_certificate()
        contexts: dict[tuple[bytes, ...], Any] = {}
        create = certificate._create_ssl_context

        def cached_context(srtp_profiles: list[Any]) -> Any:
            # A context is only read by the connections made from it: one serves them all.
            key = tuple(p.openssl_profile for p in srtp_profiles)
            if key not in contexts:
                contexts[key] = create(srtp_profiles=srtp_profiles)
            return contexts[key]

        certificate._create_ssl_context = cached_context  # type: ignore[method-assign]
        fingerprints = certificate.getFingerprints()  # a digest each; aiortc asks ~18 times a join
        certificate.getFingerprints = lambda: list(fingerprints)  # type: ignore[method-assign]
        _certificate = (now, certificate)
    return _certificate[1]


def new_peer_connection(configuration: RTCConfiguration) -> RTCPeerConnection:
    """A peer connection with the process's certificate. aiortc's constructor makes a key pair
    and signs a certificate of its own (~1 ms, a fifth of a negotiation) that would be replaced
    at once: during construction (synchronous, on this thread) it is handed the shared one."""
    original = RTCCertificate.__dict__["generateCertificate"]  # the classmethod itself
    RTCCertificate.generateCertificate = staticmethod(_shared_certificate)  # type: ignore[method-assign]
    try:
        return RTCPeerConnection(configuration)
    finally:
        RTCCertificate.generateCertificate = original  # type: ignore[method-assign]


async def prepare_peer_connections() -> None:
    """At start, what the first viewers would otherwise wait for: aiortc's lazy imports, the
    process's certificate (a key pair and a signature) and its DTLS context (~30 ms in a
    profile of 100 viewers joining at once)."""
    pc = new_peer_connection(RTCConfiguration(iceServers=[]))
    await pc.close()
    _shared_certificate()._create_ssl_context(srtp_profiles=aiortc.rtcdtlstransport.SRTP_PROFILES)


# -- 8. DTLS server for actpass offers -------------------------------------------------------


def answer_as_dtls_server(pc: RTCPeerConnection) -> None:
    """Between applying an ``actpass`` offer and creating the answer: the peer connection's
    transports take the server role, so the answer says ``setup:passive``. Only for such
    offers: to one that names its own role aiortc already answers the opposite."""
    transports = {t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports.add(pc.sctp.transport)
    for transport in transports:
        transport._set_role("server")


# -- 7. estimators built when needed ---------------------------------------------------------


class _EstimatorOnFirstUse:
    """Stands in for aiortc's ``RemoteBitrateEstimator``, which ``RTCRtpReceiver`` only
    calls ``add`` on, for received video carrying abs-send-time."""

    def __init__(self) -> None:
        self._estimator: Any = None

    def add(self, *args: Any, **kwargs: Any) -> Any:
        if self._estimator is None:
            self._estimator = _RemoteBitrateEstimator()
        return self._estimator.add(*args, **kwargs)


aiortc.rtcrtpreceiver.RemoteBitrateEstimator = _EstimatorOnFirstUse  # type: ignore[attr-defined,assignment]


# -- 3. host addresses ----------------------------------------------------------------------

_every_interface = aioice.ice.get_host_addresses

HOST_ADDRESSES_TTL = 5.0
"""Seconds an unpinned host's interface list is reused: an address that appears is gathered
on by joins after that, one that goes away is dropped as quickly (ICE restarts re-gather)."""


class _RecentHostAddresses:
    """aioice's own interface walk, remembered for ``HOST_ADDRESSES_TTL``."""

    def __init__(self) -> None:
        self._seen: dict[tuple[bool, bool], tuple[float, list[str]]] = {}

    def __call__(self, use_ipv4: bool, use_ipv6: bool) -> list[str]:
        now = time.monotonic()
        seen = self._seen.get((use_ipv4, use_ipv6))
        if seen is None or now - seen[0] >= HOST_ADDRESSES_TTL:
            seen = self._seen[use_ipv4, use_ipv6] = (now, _every_interface(use_ipv4, use_ipv6))
        return list(seen[1])


def configure_ice_host_addresses(addresses: Sequence[str]) -> None:
    """Pin the host addresses aiortc gathers ICE candidates on, process-wide.

    Pinning is what containers, 1:1 NAT hosts and loopback-only rigs need. Empty restores
    aioice's default (every interface except loopback), read at most every few seconds.
    """
    if addresses:
        pinned = list(addresses)

        def pinned_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
            return [a for a in pinned if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

        aioice.ice.get_host_addresses = pinned_addresses
    else:
        aioice.ice.get_host_addresses = _RecentHostAddresses()


# -- 4. bounded datagram queue --------------------------------------------------------------

MAX_QUEUED_DATAGRAMS = 256
MAX_DATAGRAM = 4096
"""Non-STUN datagrams an ICE connection holds for DTLS/SRTP before they are read, and the
largest it takes. aioice queues every one, from any source, of any size, without bound, and
nothing reads them until DTLS starts: a pending viewer's port (it is in the WHEP answer)
could be flooded into gigabytes of RSS. Peers send datagrams under the path MTU, and a
reading consumer keeps the queue near empty, so the bounds (1 MiB per viewer) only ever drop
floods."""


def _bounded_data_received(self: aioice.ice.Connection, data: bytes, component: int) -> None:
    if len(data) <= MAX_DATAGRAM and self._queue.qsize() < MAX_QUEUED_DATAGRAMS:
        self._queue.put_nowait((data, component))


aioice.ice.Connection.data_received = _bounded_data_received  # type: ignore[method-assign]
