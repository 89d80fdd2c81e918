// The viewer page: watch one session (the demo's "share viewer link"); no controls, no microphone.
import StreamingAvatar, { GatewayEvents, StreamingEvents } from "/web/sdk/index.js";
import {
  $, EventLog, Transcript, describeError, showEvents, showProblem, takeToken, watchStats,
} from "/web/ui.js";

const params = new URLSearchParams(location.search);
const sessionId = params.get("session");
const log = new EventLog($("events"));
const transcript = new Transcript($("transcript"));
const avatar = new StreamingAvatar({ token: takeToken() });
window.avatarViewer = { avatar };

function setPlaceholder(text) {
  $("placeholder").hidden = !text;
  if (text) $("placeholder").textContent = text;
}

showEvents(avatar, log, transcript, $("avatar"));
avatar.on(GatewayEvents.CONNECTION_FAILED, (e) => {
  $("status").textContent = `connection failed (${e.detail.reason})`;
  showProblem($("problem"), { title: "No video: the media connection failed", text: e.detail.message });
});
avatar.on(StreamingEvents.STREAM_DISCONNECTED, () => {
  $("unmute").hidden = true;
  if ($("problem").hidden) $("status").textContent = "the stream ended";
  setPlaceholder("The stream ended. Reload the page to watch again.");
});

$("unmute").addEventListener("click", () => {
  const video = $("avatar");
  video.muted = !video.muted;
  $("unmute").textContent = video.muted ? "Unmute" : "Mute";
});
addEventListener("pagehide", () => avatar.stopAvatar()); // leaves; never ends the session

if (!sessionId) {
  $("status").textContent = "no session";
  setPlaceholder("");
  showProblem($("problem"), { title: "No session to watch", text: "Open this page from the " +
    "demo's “Share viewer link”: its address names the session (?session=…)." });
} else {
  try {
    const session = await avatar.watch(sessionId);
    $("status").textContent = `watching session ${sessionId.slice(0, 8)} · ${session.width}x${session.height}`;
    let playing = false;
    watchStats(() => avatar.peerConnection, (s) => {
      $("stats").textContent = s ? `${s.codec} ${s.width}x${s.height} · ${Math.round(s.fps)} fps` : "";
      if (!playing && s && s.framesDecoded > 0) {  // decoded frames: tracks exist before media
        playing = true;
        setPlaceholder("");
        $("unmute").hidden = false;
      }
    });
  } catch (err) {
    const problem = describeError("Watching this session", err);
    $("status").textContent = "cannot watch";
    setPlaceholder("");
    showProblem($("problem"), problem);
    log.add(`cannot watch: ${err.message}`, "error");
  }
}
