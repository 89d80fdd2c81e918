// The demo page: every control of the SDK on one screen, for the gateway that serves it.
import StreamingAvatar, { StreamingEvents, TaskType } from "/web/sdk/index.js";
import { $, EventLog, Transcript, showEvents, takeToken, watchStats } from "/web/ui.js";

const token = takeToken(); // a gateway token (`/#token=…`), when the gateway requires one
const log = new EventLog($("events"));
const transcript = new Transcript($("transcript"));
let catalog = null;
let avatar = null;
let stopStats = () => {};

// For tests and for poking at it from the console.
window.avatarDemo = { get avatar() { return avatar; } };

function fill(select, items, selected) {
  select.replaceChildren(...items.map((item) => new Option(item.name || item.id, item.id)));
  if (selected && items.some((item) => item.id === selected)) select.value = selected;
}

function upstreamInfo() {
  return catalog.upstreams.find((u) => u.kind === $("upstream").value);
}

function onUpstreamChange() {
  const info = upstreamInfo();
  fill($("avatar-id"), info.avatars, info.default_avatar);
  fill($("voice"), info.voices.length ? info.voices : [{ id: "", name: "provider default" }],
       info.default_voice);
}

async function loadCatalog() {
  const response = await fetch("/v1/catalog", { headers: token ? { Authorization: `Bearer ${token}` } : {} });
  if (!response.ok) throw new Error(`catalog: HTTP ${response.status}`);
  catalog = await response.json();
  fill($("upstream"), catalog.upstreams.filter((u) => u.available)
    .map((u) => ({ id: u.kind, name: u.paid ? `${u.kind} (paid)` : u.kind })), catalog.default_upstream);
  fill($("quality"), catalog.qualities.map((q) => ({ id: q.id, name: `${q.id} · ${q.width}x${q.height}` })),
       catalog.default_quality);
  onUpstreamChange();
}

function setStatus(text) {
  $("status").textContent = text;
}

/** Which buttons make sense: idle → New; created → Start/Close; streaming → everything. */
function setPhase(phase) {
  const created = phase === "created" || phase === "streaming";
  const streaming = phase === "streaming";
  $("new").disabled = phase !== "idle";
  $("setup").disabled = phase !== "idle";
  $("start").disabled = phase !== "created";
  $("close").disabled = !created;
  for (const id of ["repeat", "talk", "interrupt"]) $(id).disabled = !streaming;
  // LiveAvatar LITE only lip-syncs the gateway's voice: no microphone reaches anyone there.
  $("voice-chat").disabled = !streaming || !upstreamInfo()?.listens;
  $("share").hidden = $("copy").hidden = !created;
  if (!streaming) setVoiceChat(false);
}

function setVoiceChat(on) {
  $("voice-chat").setAttribute("aria-pressed", String(on));
  $("voice-chat").textContent = on ? "Voice chat: on" : "Voice chat";
}

function report(what) {
  return (err) => {
    log.add(`${what} failed: ${err.message}`, "error");
    setStatus(`${what} failed: ${err.message}`);
  };
}

function wire(instance) {
  showEvents(instance, log, transcript, $("avatar"));
  instance.on(StreamingEvents.STREAM_DISCONNECTED, () => {
    if (avatar === instance) {
      setStatus(`disconnected · session ${instance.sessionId || ""}`.trim());
      stopStats();
    }
  });
}

/** The viewer page for a session. With auth on, it carries a viewer token minted for that one
 * session (watch only, expiring), never this page's own token. */
async function viewerLink(sessionId) {
  const link = new URL("/web/viewer.html", location.href);
  link.searchParams.set("session", sessionId);
  if (!token) return link.href;
  const response = await fetch("/v1/tokens", {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ role: "viewer", session_id: sessionId }),
  });
  if (!response.ok) throw new Error(`minting a viewer token: HTTP ${response.status}`);
  return new URL((await response.json()).watch_url, location.href).href;
}

$("upstream").addEventListener("change", onUpstreamChange);

$("new").addEventListener("click", async () => {
  const instance = new StreamingAvatar({ token, preferCodec: $("codec").value || undefined });
  wire(instance);
  setPhase("busy");
  setStatus("creating a session…");
  try {
    const info = await instance.newSession({
      upstream: $("upstream").value,
      avatarName: $("avatar-id").value || undefined,
      quality: $("quality").value,
      voice: $("voice").value ? { voiceId: $("voice").value } : undefined,
    });
    avatar = instance;
    $("share").href = await viewerLink(info.session_id);
    log.add(`session ${info.session_id} created (${info.session.upstream}, ${info.session.width}x${info.session.height})`);
    setStatus(`session ${info.session_id.slice(0, 8)} · created`);
    setPhase("created");
  } catch (err) {
    report("New")(err);
    setPhase("idle");
  }
});

$("start").addEventListener("click", async () => {
  setPhase("busy");
  setStatus("connecting…");
  try {
    await avatar.startSession();
    setPhase("streaming");
    const id = avatar.sessionId.slice(0, 8);
    stopStats = watchStats(() => avatar && avatar.peerConnection, (s) => {
      $("stats").textContent = s ? `${s.codec} ${s.width}x${s.height} · ${Math.round(s.fps)} fps` : "";
    });
    setStatus(`session ${id} · streaming`);
  } catch (err) {
    report("Start")(err);
    setPhase("created");
  }
});

$("say").addEventListener("submit", (e) => {
  e.preventDefault();
  speak(TaskType.REPEAT);
});
$("talk").addEventListener("click", () => speak(TaskType.TALK));

async function speak(taskType) {
  const text = $("text").value.trim();
  if (!text) return;
  try {
    const result = await avatar.speak({ text, taskType });
    if (taskType === TaskType.TALK && result.text) log.add(`answer: ${result.text}`);
  } catch (err) {
    report(taskType === TaskType.TALK ? "Talk" : "Repeat")(err);
  }
}

$("interrupt").addEventListener("click", () => avatar.interrupt().catch(report("Interrupt")));

$("voice-chat").addEventListener("click", async () => {
  const on = $("voice-chat").getAttribute("aria-pressed") !== "true";
  try {
    if (on) await avatar.startVoiceChat({ useSilencePrompt: false });
    else await avatar.closeVoiceChat();
    setVoiceChat(on);
    log.add(on ? "voice chat on: speak, then pause" : "voice chat off");
  } catch (err) {
    report("Voice chat")(err);
  }
});

$("close").addEventListener("click", async () => {
  const instance = avatar;
  const id = instance.sessionId;
  setPhase("busy");
  try {
    await instance.stopAvatar();
    log.add(`session ${id} closed`);
  } catch (err) {
    report("Close")(err);
  }
  stopStats();
  avatar = null;
  $("avatar").srcObject = null;
  $("stats").textContent = "";
  setStatus("idle");
  setPhase("idle");
});

$("copy").addEventListener("click", () =>
  navigator.clipboard.writeText($("share").href).then(() => log.add("viewer link copied"), report("Copy")));

$("unmute").addEventListener("click", () => {
  const video = $("avatar");
  video.muted = !video.muted;
  $("unmute").textContent = video.muted ? "Unmute" : "Mute";
});

addEventListener("pagehide", () => avatar && avatar.stopAvatar());

setPhase("idle");
loadCatalog().then(() => setStatus("idle · press New"), report("Loading the catalog"));
