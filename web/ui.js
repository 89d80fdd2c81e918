// What the demo page and the viewer page share: the event log, the transcript and the stream's
// live numbers. Plain DOM, no framework, no build step.
import { APIError, GatewayEvents, StreamingEvents } from "/web/sdk/index.js";

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

/** Oldest first, like the transcript, kept scrolled to the newest line while the reader is
 * at the bottom; bounded so a long session does not grow the page without end. An utterance's
 * word events (avatar_talking_message, one per word) fold into one growing line. */
export class EventLog {
  constructor(element, limit = 200) {
    this.element = element;
    this.limit = limit;
    this.words = new Map(); // task id -> the folded line's text and count
  }

  add(text, kind = "event") {
    const line = document.createElement("li");
    line.className = kind;
    line.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
    this.#append(line);
    return line;
  }

  /** One avatar or user event, as the gateway sends it ({type, task_id?, message?, ...}). */
  event(ev) {
    const task = ev.task_id ? ` · task ${String(ev.task_id).slice(0, 8)}` : "";
    if (ev.type === StreamingEvents.AVATAR_TALKING_MESSAGE && ev.task_id) {
      this.#word(ev.task_id, task, ev.message || "");
      return;
    }
    if (ev.type === StreamingEvents.AVATAR_STOP_TALKING) this.words.delete(ev.task_id);
    const text = ev.message ? ` · “${ev.message}”` : "";
    const state = ev.state ? ` · ${ev.state}` : ev.reason ? ` · ${ev.reason}` : "";
    this.add(`${ev.type}${task}${state}${text}`);
  }

  #word(taskId, task, word) {
    let folded = this.words.get(taskId);
    if (!folded || !folded.line.isConnected) {
      const line = this.add("");
      folded = { line, stamp: line.textContent, words: [] };
      this.words.set(taskId, folded);
    }
    const atBottom = this.#atBottom();
    folded.words.push(word);
    const n = folded.words.length;
    folded.line.textContent = `${folded.stamp}avatar_talking_message × ${n}${task} · ` +
      `“${folded.words.join(" ").replace(/\s+/g, " ").trim()}”`;
    if (atBottom) this.element.scrollTop = this.element.scrollHeight;
  }

  #append(line) {
    const atBottom = this.#atBottom();
    this.element.append(line);
    while (this.element.childElementCount > this.limit) this.element.firstElementChild.remove();
    if (atBottom) this.element.scrollTop = this.element.scrollHeight;
  }

  #atBottom() {
    const e = this.element;
    return e.scrollHeight - e.scrollTop - e.clientHeight < 24;
  }
}

/** Who said what: avatar lines grow word by word (avatar_talking_message), user lines appear
 * when the gateway has recognised them (user_end_message). */
export class Transcript {
  constructor(element) {
    this.element = element;
    this.lines = new Map(); // task id -> its line's text, while the avatar says it
    this.badges = new Map(); // task id -> badge, for lines that may not have started yet
  }

  event(ev) {
    if (ev.type === "avatar_start_talking") this.#line(ev.task_id);
    else if (ev.type === "avatar_talking_message") this.#line(ev.task_id).append(ev.message || "");
    else if (ev.type === "avatar_stop_talking") {
      this.lines.delete(ev.task_id);
      this.badges.delete(ev.task_id);
    } else if (ev.type === "user_end_message" && ev.message) this.#add("user").append(ev.message);
  }

  /** A small badge (e.g. "offline") on the lines of these tasks, now or when they start. */
  badge(taskIds, text, title) {
    for (const id of taskIds) {
      const line = this.lines.get(id)?.parentElement;
      if (line) line.append(" ", badge(text, title));
      else this.badges.set(id, { text, title });
    }
    while (this.badges.size > 64) this.badges.delete(this.badges.keys().next().value);
  }

  #line(taskId) {
    let text = this.lines.get(taskId);
    if (!text) {
      text = this.#add("avatar");
      this.lines.set(taskId, text);
      const pending = this.badges.get(taskId);
      if (pending) text.parentElement.append(" ", badge(pending.text, pending.title));
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

/** A small labelled badge, e.g. "offline" on answers the offline responder wrote. */
export function badge(text, title = "") {
  const b = document.createElement("span");
  b.className = "badge";
  b.textContent = text;
  if (title) b.title = title;
  return b;
}

/** Something the user should read (an error, a failed connection): shown in `element`, a
 * styled box, until cleared with `showProblem(element, null)`. */
export function showProblem(element, problem) {
  element.hidden = !problem;
  element.replaceChildren();
  if (!problem) return;
  const title = document.createElement("strong");
  title.textContent = problem.title;
  const text = document.createElement("p");
  text.textContent = problem.text;
  element.append(title, text);
}

/** A readable title and text for what went wrong in an API call (APIError: its status). */
export function describeError(what, err) {
  if (err instanceof APIError) {
    if (err.status === 401) {
      return { title: `${what}: not authorised (401)`, text: "The gateway needs a token, or " +
        "this one is wrong, expired or revoked. Ask for a new link, or open the page with " +
        `#token=… in its address. The gateway said: ${err.message}` };
    }
    if (err.status === 403) {
      return { title: `${what}: not allowed (403)`, text: `This token may not do that. ${err.message}` };
    }
    if (err.status === 404) {
      return { title: `${what}: not found (404)`, text: "This session does not exist, or has " +
        `ended. Start a new one from the demo page. The gateway said: ${err.message}` };
    }
    return { title: `${what} failed (HTTP ${err.status})`, text: err.message };
  }
  return { title: `${what} failed`, text: err?.message || String(err) };
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
  avatar.on(GatewayEvents.SESSION_STATE, (e) => log.event(e.detail));
  avatar.on(GatewayEvents.CONNECTION_FAILED, (e) => log.add(`connection failed · ${e.detail.reason}`, "error"));
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
