// The demo page: every control of the SDK on one screen, for the gateway that serves it.
import StreamingAvatar, { GatewayEvents, StreamingEvents, TaskType } from "/web/sdk/index.js";
import {
  $, EventLog, Transcript, badge, describeError, showEvents, showProblem, takeToken, watchStats,
} from "/web/ui.js";

const token = takeToken(); // a gateway token (`/#token=…`), when the gateway requires one
const log = new EventLog($("events"));
const transcript = new Transcript($("transcript"));
let catalog = null;
let avatar = null;
let stopStats = () => {};

// For tests and for poking at it from the console.
window.avatarDemo = { get avatar() { return avatar; }, lastFailure: null };

function fill(select, items, selected) {
  select.replaceChildren(...items.map((item) => new Option(item.name || item.id, item.id)));
  if (selected && items.some((item) => item.id === selected)) select.value = selected;
}

function upstreamInfo() {
  return catalog.upstreams.find((u) => u.kind === $("upstream").value);
}

const languageNames = new Intl.DisplayNames(["en"], { type: "language" });

/** "English (United States)" for "en-us"; the id itself when Intl does not know it. */
function languageOf(id) {
  try {
    return languageNames.of(id) || id;
  } catch {
    return id; // not a BCP 47 tag (e.g. an OpenAI voice name)
  }
}

/** The voice list, grouped by language (eSpeak has 151 voices) and filtered by the search box. */
function fillVoices(voices, selected) {
  const select = $("voice");
  const query = $("voice-search").value.trim().toLowerCase();
  const keep = selected ?? select.value;
  if (!voices.length) {
    select.replaceChildren(new Option("provider default", ""));
    return;
  }
  const groups = new Map();
  for (const voice of voices) {
    const label = voice.name && voice.name !== voice.id ? voice.name : languageOf(voice.id);
    const text = label === voice.id ? voice.id : `${label} (${voice.id})`;
    if (query && !text.toLowerCase().includes(query)) continue;
    const family = languageOf(voice.id.split(/[-_]/)[0]);
    if (!groups.has(family)) groups.set(family, []);
    groups.get(family).push(new Option(text, voice.id));
  }
  const sorted = [...groups].sort(([a], [b]) => a.localeCompare(b));
  select.replaceChildren(...sorted.map(([family, options]) => {
    if (options.length === 1 && sorted.length > 1) return options[0];
    const group = document.createElement("optgroup");
    group.label = family;
    group.append(...options);
    return group;
  }));
  if (!select.options.length) select.append(new Option(`no voice matches “${query}”`, "", true, true));
  else if ([...select.options].some((o) => o.value === keep)) select.value = keep;
}

function onUpstreamChange() {
  const info = upstreamInfo();
  fill($("avatar-id"), info.avatars, info.default_avatar);
  $("voice-search").value = "";
  $("voice-search").hidden = info.voices.length < 10;
  fillVoices(info.voices, info.default_voice);
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
  $("chat-badge").hidden = catalog.chat !== "offline";
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
    setStatus(`${what} failed`);
    showProblem($("problem"), describeError(what, err));
  };
}

/** The video box's words when there is no picture: what to do next, or what happened. */
function setPlaceholder(text) {
  $("placeholder").hidden = !text;
  if (text) $("placeholder").textContent = text;
}

function wire(instance) {
  showEvents(instance, log, transcript, $("avatar"));
  instance.on(GatewayEvents.CONNECTION_FAILED, (e) => {
    window.avatarDemo.lastFailure = e.detail;
    if (avatar !== instance) return;
    setStatus(`session ${instance.sessionId.slice(0, 8)} · connection failed (${e.detail.reason})`);
    showProblem($("problem"), { title: "No video: the media connection failed", text: e.detail.message });
  });
  instance.on(StreamingEvents.STREAM_DISCONNECTED, () => {
    $("unmute").hidden = true;
    if (avatar === instance) {
      if ($("problem").hidden) setStatus(`disconnected · session ${instance.sessionId || ""}`.trim());
      setPlaceholder("The stream ended. Press Start to connect again, or Close.");
      stopStats();
      setPhase("created");
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

$("voice-search").addEventListener("input", () => fillVoices(upstreamInfo().voices));

$("new").addEventListener("click", async () => {
  const instance = new StreamingAvatar({ token, preferCodec: $("codec").value || undefined });
  wire(instance);
  setPhase("busy");
  showProblem($("problem"), null);
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
    setPlaceholder("Session created. Press Start to connect the video.");
    setPhase("created");
  } catch (err) {
    report("New")(err);
    setPhase("idle");
  }
});

$("start").addEventListener("click", async () => {
  setPhase("busy");
  showProblem($("problem"), null);
  setPlaceholder("Connecting…");
  setStatus("connecting…");
  try {
    await avatar.startSession();
    setPhase("streaming");
    const id = avatar.sessionId.slice(0, 8);
    // Streaming once frames are decoded (the tracks, and even a black picture, exist before
    // any media flows); until then CONNECTION_FAILED may still come.
    setStatus(`session ${id} · connecting the video…`);
    let playing = false;
    stopStats = watchStats(() => avatar && avatar.peerConnection, (s) => {
      $("stats").textContent = s ? `${s.codec} ${s.width}x${s.height} · ${Math.round(s.fps)} fps` : "";
      if (!playing && s && s.framesDecoded > 0) {
        playing = true;
        setPlaceholder("");
        $("unmute").hidden = false;
        setStatus(`session ${id} · streaming`);
      }
    });
  } catch (err) {
    report("Start")(err);
    setPlaceholder("Session created. Press Start to connect the video.");
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
    if (taskType === TaskType.TALK && result.text) {
      const line = log.add(`answer: ${result.text}`);
      if (result.offline) {
        const why = "Written by the gateway's offline responder (no OpenAI key configured)";
        line.append(" ", badge("offline", why));
        transcript.badge(result.task_ids || [], "offline", why);
      }
    }
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
  $("unmute").hidden = true;
  setPlaceholder("No stream yet. Press New, then Start.");
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
