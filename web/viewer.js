// The viewer page: watch one session (the demo's "share viewer link"); no controls, no microphone.
import StreamingAvatar, { StreamingEvents } from "/web/sdk/index.js";
import { $, EventLog, Transcript, showEvents, takeToken, watchStats } from "/web/ui.js";

const params = new URLSearchParams(location.search);
const sessionId = params.get("session");
const log = new EventLog($("events"));
const transcript = new Transcript($("transcript"));
const avatar = new StreamingAvatar({ token: takeToken() });
window.avatarViewer = { avatar };

showEvents(avatar, log, transcript, $("avatar"));
avatar.on(StreamingEvents.STREAM_DISCONNECTED, () => ($("status").textContent = "the stream ended"));

$("unmute").addEventListener("click", () => {
  const video = $("avatar");
  video.muted = !video.muted;
  $("unmute").textContent = video.muted ? "Unmute" : "Mute";
});
addEventListener("pagehide", () => avatar.stopAvatar()); // leaves; never ends the session

if (!sessionId) {
  $("status").textContent = "no session: open this page from the demo's “Share viewer link”";
} else {
  try {
    const session = await avatar.watch(sessionId);
    $("status").textContent = `watching session ${sessionId.slice(0, 8)} · ${session.width}x${session.height}`;
    watchStats(() => avatar.peerConnection, (s) => {
      $("stats").textContent = s ? `${s.codec} ${s.width}x${s.height} · ${Math.round(s.fps)} fps` : "";
    });
  } catch (err) {
    $("status").textContent = `cannot watch: ${err.message}`;
    log.add(`cannot watch: ${err.message}`, "error");
  }
}
