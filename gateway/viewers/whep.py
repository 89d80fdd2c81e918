"""WHEP mechanics (draft-ietf-wish-whep, which takes its HTTP rules from WHIP, RFC 9725) that
are independent of HTTP handling:
offer validation, trickle-ICE SDP fragments (RFC 8840), ETags and ICE-server ``Link`` headers.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCIceCandidate, RTCRtpCodecParameters
from aiortc.codecs import CODECS
from aiortc.rtcpeerconnection import is_codec_compatible
from aiortc.sdp import SessionDescription, candidate_from_sdp, parameters_from_sdp

from ..errors import BadSDP, UnsupportedCodec

SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"

_SDP_LINE = re.compile(r"^[a-z]=.*$")

MAX_REMOTE_CANDIDATES = 32
"""Per viewer, in its offer and PATCHes together. A browser sends a handful; aioice pairs and
re-sorts its whole check list per candidate and sends checks to every address it is given, so
an unbounded list is both a CPU and a reflection attack."""

# aiortc's parser fails on some malformed SDP in ways other than ValueError: an a=fmtp for a
# payload type with no a=rtpmap raises StopIteration, a section cut short AttributeError. All
# of them are the client's mistake, so all of them are a 400.
_PARSE_ERRORS = (ValueError, KeyError, IndexError, AssertionError, TypeError, AttributeError,
                 StopIteration)


def _parse(sdp: str, what: str) -> SessionDescription:
    if not sdp.startswith("v=0"):
        raise BadSDP(f"the body is not an SDP {what}: it must start with 'v=0'")
    if any(not _SDP_LINE.match(line) for line in sdp.split("\n") if line):
        raise BadSDP("malformed SDP: every line must look like 'x=value'")
    try:
        return SessionDescription.parse(sdp.replace("\n", "\r\n") + "\r\n")
    except _PARSE_ERRORS as exc:
        raise BadSDP(f"malformed SDP {what}: {str(exc) or type(exc).__name__}") from None


def _require_transport(parsed: SessionDescription, what: str) -> None:
    for media in parsed.media:
        if media.dtls is None or not media.dtls.fingerprints:
            raise BadSDP(f"the {what}'s {media.kind} section has no a=fingerprint "
                         "(DTLS is mandatory)")
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise BadSDP(f"the {what}'s {media.kind} section has no a=ice-ufrag / a=ice-pwd")


def _require_mids(parsed: SessionDescription) -> None:
    # aiortc pairs transceivers with m-lines by mid; an m-line without one (or a mid used
    # twice) fails half-way through setRemoteDescription and leaves a peer connection that
    # cannot even be closed. Unified Plan requires unique mids anyway (RFC 8843, RFC 9429).
    seen: set[str] = set()
    for index, media in enumerate(parsed.media):
        mid = media.rtp.muxId
        if not mid:
            raise BadSDP(f"the offer's {media.kind} m-line (#{index}) has no a=mid")
        if mid in seen:
            raise BadSDP(f"the offer uses a=mid:{mid} for more than one m-line")
        seen.add(mid)


# What the hub can encode, as aiortc describes it (VP8; H.264 constrained baseline and baseline).
_VIDEO_CODECS = [c for c in CODECS["video"] if c.mimeType.lower() in ("video/vp8", "video/h264")]


_SENDABLE = {"video": _VIDEO_CODECS,
             "audio": [c for c in CODECS["audio"] if c.mimeType.lower() == "audio/opus"]}
"""By kind, what the hub sends, as aiortc describes it: what an offer's codecs are matched to."""


def preferred_video_codec(offered: Iterable[RTCRtpCodecParameters]) -> RTCRtpCodecParameters | None:
    """The first codec in the player's own order that the hub can encode, as our codec.

    Browsers list codecs by preference: Chromium and Firefox put VP8 first, Safari H.264. A
    player can reorder with ``RTCRtpTransceiver.setCodecPreferences``.
    """
    for remote in offered:
        for local in _VIDEO_CODECS:
            if is_codec_compatible(local, remote):
                return local
    return None


@dataclass(frozen=True, slots=True)
class Offer:
    sdp: str
    video_codec: RTCRtpCodecParameters | None
    """Ours, compatible with the player's favourite: what its video m-line will carry. None:
    the player offered audio only (a listener)."""
    has_audio: bool
    has_data_channel: bool
    ice_ufrag: str
    sends_audio: bool = False
    """The player offers its microphone (audio ``sendrecv``): a controller doing voice chat."""
    dtls_actpass: bool = True
    """Every m-line says ``a=setup:actpass`` (JSEP's offer): the DTLS role is ours to pick."""
    mdns_candidates: tuple[RTCIceCandidate, ...] = ()
    """Candidates named by an mDNS host name, left out of :attr:`sdp`: resolving one takes
    aioice up to a second (always, when the browser is not on the gateway's own network),
    and the answer must not wait for it."""
    end_of_candidates: bool = False
    """The offer said ``a=end-of-candidates`` but :attr:`mdns_candidates` are still to come."""
    rung: int = 0
    """The best rung of the quality ladder the viewer may have (its request's ``max_height``,
    :mod:`gateway.media.ladder`): its video starts there."""




def _trim(lines: list[str]) -> tuple[list[str], list[tuple[int, str, str]], bool]:
    """The offer without what aiortc would parse, match and answer for nothing.

    Browsers offer ~40 payload types (VP9, AV1, H.265, H.264 in profiles and modes we do
    not encode, red, ulpfec, G.711, comfort noise, DTMF, each with its retransmission type),
    200-odd lines: parsing and matching them was half the CPU of a WHEP POST, and the hub
    sends one of VP8 or H.264 (constrained) baseline, and Opus. What is left for video is the
    player's favourite of those (see :func:`preferred_video_codec`) and its retransmission
    type. Payload types this cannot tell (no ``a=rtpmap``) stay, so aiortc still judges
    malformed offers.

    Also takes out the candidates with an mDNS host name, as (m-line index, mid, line), and
    with them ``a=end-of-candidates`` (returned as the flag), which must follow them.
    """
    starts = [i for i, line in enumerate(lines) if line.startswith("m=")] + [len(lines)]
    kept = lines[:starts[0]]
    mdns: list[tuple[int, str, str]] = []
    for index, (start, end) in enumerate(itertools.pairwise(starts)):
        section = lines[start:end]
        named = [line for line in section
                 if line.startswith("a=candidate:") and _names_mdns_host(line)]
        if named:
            mid = next((line[6:] for line in section if line.startswith("a=mid:")), "")
            mdns += [(index, mid, line) for line in named]
            section = [line for line in section if line not in named]
        kept.extend(_trim_codecs(section))
    ended = False
    if mdns:
        ended = "a=end-of-candidates" in kept
        kept = [line for line in kept if line != "a=end-of-candidates"]
    return kept, mdns, ended


def _names_mdns_host(candidate_line: str) -> bool:
    fields = candidate_line.split(" ", 5)  # foundation component transport priority host ...
    return len(fields) > 4 and fields[4].endswith(".local")


def _trim_codecs(section: list[str]) -> list[str]:
    fields = section[0].split(" ")
    kind = fields[0][2:]
    if kind not in ("video", "audio") or len(fields) < 4:
        return section
    encodings: dict[str, str] = {}
    formats: dict[str, str] = {}
    # Per line, the payload type an a=rtpmap, a=fmtp or a=rtcp-fb line is about: one pass,
    # as this runs for every WHEP POST, on ~200 lines of a browser's offer.
    about: list[str | None] = []
    for line in section:
        attribute, _, value = line.partition(":")
        if attribute in _PAYLOAD_ATTRIBUTES:
            pt, _, value = value.partition(" ")
            about.append(pt)
            if attribute == "a=rtpmap":
                encodings[pt] = value
            elif attribute == "a=fmtp":
                formats[pt] = value
        else:
            about.append(None)
    listed = fields[3:]
    try:
        usable = _usable_payload_types(kind, listed, encodings, formats)
    except ValueError:  # e.g. apt=x: aiortc's parser reports it
        return section
    dropped = {pt for pt, use in usable.items() if not use}
    if not dropped or dropped == set(listed):
        return section  # nothing to trim, or nothing usable: aiortc and the checks say why
    head = " ".join(fields[:3] + [pt for pt in listed if pt not in dropped])
    return [head] + [line for line, pt in zip(section[1:], about[1:], strict=True)
                     if pt not in dropped]


_PAYLOAD_ATTRIBUTES = frozenset(("a=rtpmap", "a=fmtp", "a=rtcp-fb"))


def _usable_payload_types(kind: str, listed: list[str], encodings: dict[str, str],
                          formats: dict[str, str]) -> dict[str, bool]:
    """Whether the hub would send each payload type (absent: cannot tell). For video, only
    the player's favourite of those it could send (one video codec is sent)."""
    ours = _SENDABLE[kind]
    names = {codec.name.lower() for codec in ours}
    usable: dict[str, bool] = {}
    found = False
    for pt in listed:
        name, _, clock = encodings.get(pt, "").partition("/")
        rate = clock.partition("/")[0]
        if name.lower() == "rtx" or not rate.isdigit():
            continue
        use = False
        if name.lower() in names and not (kind == "video" and found):
            remote = RTCRtpCodecParameters(mimeType=f"{kind}/{name}", clockRate=int(rate),
                                           parameters=parameters_from_sdp(formats.get(pt, "")))
            use = found = any(is_codec_compatible(codec, remote) for codec in ours)
        usable[pt] = use
    for pt in listed:
        if encodings.get(pt, "").lower().startswith("rtx/"):
            repaired = parameters_from_sdp(formats.get(pt, "")).get("apt")
            if str(repaired) in usable:
                usable[pt] = usable[str(repaired)]
    return usable


def parse_offer(text: str) -> Offer:
    """Check a viewer's offer before aiortc sees it, with errors a person can act on, and
    trim it to what the gateway can use (see :func:`_trim`)."""
    full = text.replace("\r\n", "\n").strip()
    lines, mdns, ended = _trim(full.split("\n"))
    sdp = "\n".join(lines)
    parsed = _parse(sdp, "offer")
    videos = [m for m in parsed.media if m.kind == "video"]
    audios = [m for m in parsed.media if m.kind == "audio"]
    if not videos and not audios:
        raise BadSDP("the offer has neither a video nor an audio m-line; a WHEP player must "
                     "offer to receive one or both")
    if len(videos) > 1 or len(audios) > 1:
        raise BadSDP("the offer must have at most one video and one audio m-line")
    video_codec = preferred_video_codec(videos[0].rtp.codecs) if videos else None
    if videos and video_codec is None:
        untrimmed = next(m for m in _parse(full, "offer").media if m.kind == "video")
        offered = sorted({c.mimeType for c in untrimmed.rtp.codecs}) or ["none"]
        raise UnsupportedCodec("the offer accepts neither VP8 nor H.264 (constrained baseline, "
                               f"packetization-mode 1) video (offered: {', '.join(offered)})")
    if audios and not any(c.mimeType.lower() == "audio/opus" for c in audios[0].rtp.codecs):
        raise UnsupportedCodec("the offer's audio m-line does not accept Opus")
    for media in (*videos, *audios):
        if media.direction not in (None, "recvonly", "sendrecv"):
            raise BadSDP(f"the {media.kind} m-line is {media.direction}: a viewer must receive")
    _require_transport(parsed, "offer")
    _require_mids(parsed)
    candidates = [c for m in parsed.media for c in m.ice_candidates]
    if len(candidates) + len(mdns) > MAX_REMOTE_CANDIDATES:
        raise BadSDP(f"too many candidates: at most {MAX_REMOTE_CANDIDATES} per viewer")
    for candidate in candidates:
        _check_address(candidate.ip)
    deferred = tuple(_mdns_candidate(line, index, mid) for index, mid, line in mdns)
    ufrag = next((m.ice.usernameFragment for m in parsed.media if m.ice), None) or ""
    return Offer(
        sdp=sdp.replace("\n", "\r\n") + "\r\n",
        video_codec=video_codec,
        has_audio=bool(audios),
        has_data_channel=any(m.kind == "application" for m in parsed.media),
        ice_ufrag=ufrag,
        sends_audio=bool(audios) and audios[0].direction == "sendrecv",
        dtls_actpass=all(m.dtls is not None and m.dtls.role == "auto" for m in parsed.media),
        mdns_candidates=deferred,
        end_of_candidates=ended,
    )


def _mdns_candidate(line: str, index: int, mid: str) -> RTCIceCandidate:
    try:
        candidate = candidate_from_sdp(line[12:])
    except (ValueError, IndexError, AssertionError) as exc:
        raise BadSDP(f"malformed candidate line {line!r}: {exc}") from None
    candidate.sdpMid = mid or None
    candidate.sdpMLineIndex = index
    return candidate


def parse_answer(text: str) -> str:
    """Check a browser's answer to a gateway offer (seed API); returns it CRLF-normalised."""
    sdp = text.replace("\r\n", "\n").strip()
    _require_transport(_parse(sdp, "answer"), "answer")
    return sdp.replace("\n", "\r\n") + "\r\n"


@dataclass(frozen=True, slots=True)
class SdpFragment:
    ice_ufrag: str | None
    ice_pwd: str | None
    candidates: tuple[RTCIceCandidate, ...]
    end_of_candidates: bool


def parse_sdpfrag(text: str) -> SdpFragment:
    """Parse a trickle-ICE fragment (RFC 8840 section 9)."""
    ufrag = pwd = None
    mid: str | None = None
    mline = -1
    candidates: list[RTCIceCandidate] = []
    end = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("m="):
            mline += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[6:]
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[12:]
        elif line.startswith("a=ice-pwd:"):
            pwd = line[10:]
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[12:])
            except (ValueError, IndexError, AssertionError) as exc:
                raise BadSDP(f"malformed candidate line {line!r}: {exc}") from None
            _check_address(candidate.ip)
            candidate.sdpMid = mid
            candidate.sdpMLineIndex = max(mline, 0)
            candidates.append(candidate)
            if len(candidates) > MAX_REMOTE_CANDIDATES:
                raise BadSDP(f"too many candidates: at most {MAX_REMOTE_CANDIDATES} per viewer")
        elif line == "a=end-of-candidates":
            end = True
        elif not _SDP_LINE.match(line):
            raise BadSDP(f"malformed SDP fragment line {line!r}")
    return SdpFragment(ufrag, pwd, tuple(candidates), end)


def _check_address(address: str) -> None:
    """Addresses no peer can be reached at: the gateway sends no connectivity checks there."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if address.endswith(".local"):
            return  # an mDNS name (browsers hide local addresses so); aioice resolves it
        raise BadSDP(f"candidate address {address!r} is neither an IP address nor an mDNS name") \
            from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise BadSDP(f"candidate address {address} is multicast, broadcast or unspecified")


def count_candidates(sdp: str) -> int:
    """Candidates a whole offer carries (non-trickle players put them all in it)."""
    return sum(1 for line in sdp.split("\n") if line.startswith("a=candidate:"))


def browser_ice_servers(urls: Iterable[str], username: str = "",
                        credential: str = "") -> list[dict[str, Any]]:
    """The same servers as :func:`link_headers`, as ``RTCIceServer`` dictionaries for a page's
    ``RTCPeerConnection`` (a player gathers before it POSTs, so it needs them beforehand)."""
    servers: list[dict[str, Any]] = []
    for url in urls:
        server: dict[str, Any] = {"urls": [url]}
        if url.startswith(("turn:", "turns:")) and username:
            server["username"] = username
            server["credential"] = credential
            server["credentialType"] = "password"
        servers.append(server)
    return servers


def link_headers(urls: Iterable[str], username: str = "", credential: str = "") -> list[str]:
    """``Link: <url>; rel="ice-server"`` values (WHIP, RFC 9725 4.6, as in WHEP); TURN gets credentials."""
    out = []
    for url in urls:
        value = f'<{url}>; rel="ice-server"'
        if url.startswith(("turn:", "turns:")) and username:
            user = username.replace('"', '\\"')
            cred = credential.replace('"', '\\"')
            value += f'; username="{user}"; credential="{cred}"; credential-type="password"'
        out.append(value)
    return out
