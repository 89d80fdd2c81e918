"""A WHEP player built on GStreamer's ``webrtcbin`` (Debian's 1.22), as a third-party player
would be: it offers (video + audio, receive only, its own RSA DTLS certificate), POSTs the
offer, applies the answer, decodes what arrives and prints one JSON line of counts.

Run with Debian's python3 (``python3-gi``), not the project's venv:
``python3 tests/gst_whep.py <whep url> <seconds>``.
"""

from __future__ import annotations

import json
import sys
import urllib.request

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import GLib, Gst, GstSdp, GstWebRTC  # noqa: E402

Gst.init(None)
URL, SECONDS = sys.argv[1], float(sys.argv[2])
frames = {"video_frames": 0, "audio_buffers": 0}
counts: dict[str, object] = {"error": "", "answer_setup": ""}
loop = GLib.MainLoop()
pipe = Gst.Pipeline.new("player")
webrtc = Gst.ElementFactory.make("webrtcbin", "webrtc")
pipe.add(webrtc)
for kind in ("video", "audio"):
    caps = Gst.Caps.from_string(
        "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000"
        if kind == "video" else
        "application/x-rtp,media=audio,encoding-name=OPUS,payload=111,clock-rate=48000")
    webrtc.emit("add-transceiver", GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY, caps)


def count(kind: str) -> object:
    def probe(pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        frames["video_frames" if kind == "video" else "audio_buffers"] += 1
        return Gst.PadProbeReturn.OK
    return probe


def on_decoded(decodebin: Gst.Element, pad: Gst.Pad) -> None:
    name = pad.get_current_caps().get_structure(0).get_name()
    kind = "video" if name.startswith("video") else "audio"
    sink = Gst.ElementFactory.make("fakesink")
    sink.set_property("sync", False)
    pipe.add(sink)
    sink.sync_state_with_parent()
    pad.link(sink.get_static_pad("sink"))
    pad.add_probe(Gst.PadProbeType.BUFFER, count(kind))


def on_pad(element: Gst.Element, pad: Gst.Pad) -> None:
    if pad.get_direction() != Gst.PadDirection.SRC:
        return
    decodebin = Gst.ElementFactory.make("decodebin")
    decodebin.connect("pad-added", on_decoded)
    pipe.add(decodebin)
    decodebin.sync_state_with_parent()
    pad.link(decodebin.get_static_pad("sink"))


def on_offer(promise: Gst.Promise) -> None:
    # The reply owns the offer: keep it alive while the offer is used (a temporary reply
    # is freed at once, and webrtcbin then gets a dangling description).
    reply = promise.get_reply()
    offer = reply.get_value("offer")
    if offer is None:
        counts["error"] = "webrtcbin created no offer"
        loop.quit()
        return
    webrtc.emit("set-local-description", offer, Gst.Promise.new())
    GLib.timeout_add(100, post_offer)


waited = [0]


def post_offer() -> bool:
    """Once the offer is applied and gathering is done (or 2 s passed): no trickle."""
    local = webrtc.get_property("local-description")
    gathered = webrtc.get_property("ice-gathering-state") == \
        GstWebRTC.WebRTCICEGatheringState.COMPLETE
    waited[0] += 1
    if local is None or (not gathered and waited[0] < 20):
        return True  # check again in 100 ms
    sdp = local.sdp.as_text()
    request = urllib.request.Request(URL, data=sdp.encode(), method="POST",
                                     headers={"Content-Type": "application/sdp"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer_text = response.read().decode()
    except OSError as exc:
        counts["error"] = f"POST failed: {exc}"
        loop.quit()
        return False
    counts["answer_setup"] = next((line for line in answer_text.splitlines()
                                   if line.startswith("a=setup:")), "")
    _, message = GstSdp.SDPMessage.new_from_text(answer_text)
    answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
    webrtc.emit("set-remote-description", answer, Gst.Promise.new())
    return False


def on_message(bus: Gst.Bus, message: Gst.Message) -> None:
    if message.type == Gst.MessageType.ERROR:
        error, _ = message.parse_error()
        counts["error"] = error.message
        loop.quit()


def create_offer() -> bool:
    webrtc.emit("create-offer", None, Gst.Promise.new_with_change_func(on_offer))
    return False


webrtc.connect("pad-added", on_pad)
bus = pipe.get_bus()
bus.add_signal_watch()
bus.connect("message", on_message)
pipe.set_state(Gst.State.PLAYING)
pipe.get_state(5 * Gst.SECOND)  # an offer asked for before PLAYING comes back empty
GLib.timeout_add(200, create_offer)
GLib.timeout_add(int(SECONDS * 1000), loop.quit)
loop.run()
counts["connection"] = str(webrtc.get_property("connection-state").value_nick)
pipe.set_state(Gst.State.NULL)
print(json.dumps({**counts, **frames}))
