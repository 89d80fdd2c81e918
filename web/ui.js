// What the demo page and the viewer page share: the event log, the transcript and the stream's
// live numbers. Plain DOM, no framework, no build step.
import { StreamingEvents } from "/web/sdk/index.js";

export const $ = (id) => document.getElementById(id);

/** The gateway token from the page's fragment (`#token=…`), then dropped from the address bar.
 * A fragment never reaches a server: no access log, proxy log or Referer carries it. */
export function takeToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const token = fragment.get("token") || "";
  if (token) {
    fragment.delete("token");
    const rest = fragment.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? `#${rest}` : ""));
  }
  return token;
}

/** The newest line on top; bounded so a long session does not grow the page without end. */
export class EventLog {
  constructor(element, limit = 200) {
    this.element = element;
    this.limit = limit;
  }

  add(text, kind = "event") {
    const line = document.createElement("li");
    line.className = kind;
    line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    this.element.prepend(line);
    while (this.element.childElementCount > this.limit) this.element.lastElementChild.remove();
  }

  /** One avatar or user event, as the gateway sends it ({type, task_id?, message?, ...}). */
  event(ev) {
    const task = ev.task_id ? ` · task ${String(ev.task_id).slice(0, 8)}` : "";
    const text = ev.message ? ` · “${ev.message}”` : "";
    const state = ev.state ? ` · ${ev.state}` : ev.reason ? ` · ${ev.reason}` : "";
    this.add(`${ev.type}${task}${state}${text}`);
  }
}

/** Who said what: avatar lines grow word by word (avatar_talking_message), user lines appear
 * when the gateway has recognised them (user_end_message). */
export class Transcript {
  constructor(element) {
    this.element = element;
    this.lines = new Map();
  }

  event(ev) {
    if (ev.type === "avatar_start_talking") this.#line(ev.task_id, "avatar");
    else if (ev.type === "avatar_talking_message") this.#line(ev.task_id, "avatar").append(ev.message || "");
    else if (ev.type === "avatar_stop_talking") this.lines.delete(ev.task_id);
    else if (ev.type === "user_end_message" && ev.message) this.#add("user").append(ev.message);
  }

  #line(taskId, who) {
    let text = this.lines.get(taskId);
    if (!text) {
      text = this.#add(who);
      this.lines.set(taskId, text);
    }
    return text;
  }

  #add(who) {
    const line = document.createElement("p");
    line.className = who;
    const name = document.createElement("b");
    name.textContent = who === "avatar" ? "Avatar: " : "You: ";
    const text = document.createElement("span");
    line.append(name, text);
    this.element.append(line);
    this.element.scrollTop = this.element.scrollHeight;
    return text;
  }
}

/** Show an SDK instance's avatar and user events in the log and the transcript, and its
 * stream in the video element. */
export function showEvents(avatar, log, transcript, video) {
  const quiet = [StreamingEvents.STREAM_READY, StreamingEvents.CONNECTION_QUALITY_CHANGED];
  for (const type of Object.values(StreamingEvents)) {
    if (quiet.includes(type)) continue;
    avatar.on(type, (e) => {
      log.event(e.detail || { type });
      transcript.event(e.detail || { type });
    });
  }
  avatar.on("session_state", (e) => log.event(e.detail));
  avatar.on(StreamingEvents.STREAM_READY, (e) => {
    video.srcObject = e.detail;
    log.add("stream_ready");
  });
  avatar.on(StreamingEvents.CONNECTION_QUALITY_CHANGED, (e) => log.add(`connection quality ${e.detail}`));
}

/** Resolution, codec and decoded frame rate of the video, from the peer connection's stats. */
export async function videoStats(pc) {
  if (!pc) return null;
  const report = await pc.getStats();
  let inbound = null;
  const codecs = new Map();
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
    if (s.type === "codec") codecs.set(s.id, s.mimeType);
  });
  if (!inbound) return null;
  return {
    framesDecoded: inbound.framesDecoded || 0,
    width: inbound.frameWidth || 0,
    height: inbound.frameHeight || 0,
    fps: inbound.framesPerSecond || 0,
    codec: (codecs.get(inbound.codecId) || "").replace("video/", ""),
  };
}

/** Keep a status element up to date with {state} · {codec} {w}x{h} {fps} fps, once a second. */
export function watchStats(getPc, render) {
  const timer = setInterval(async () => {
    try {
      render(await videoStats(getPc()));
    } catch {
      render(null);
    }
  }, 1000);
  return () => clearInterval(timer);
}
