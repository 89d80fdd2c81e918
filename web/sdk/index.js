// StreamingAvatar for avatar-gateway: the public surface of HeyGen's @heygen/streaming-avatar
// SDK, talking to this gateway's REST API and WHEP endpoint instead of HeyGen and LiveKit.
// No build step: import it as an ES module. Types: ./index.d.ts. Guide: ./README.md.

import { LiveKitPlayer } from "./livekit.js";
import { APIError, WhepPlayer } from "./whep.js";

export { APIError };

export const AvatarQuality = Object.freeze({ Low: "low", Medium: "medium", High: "high" });

export const VoiceEmotion = Object.freeze({
  EXCITED: "excited",
  SERIOUS: "serious",
  FRIENDLY: "friendly",
  SOOTHING: "soothing",
  BROADCASTER: "broadcaster",
});

export const ElevenLabsModel = Object.freeze({
  eleven_flash_v2_5: "eleven_flash_v2_5",
  eleven_multilingual_v2: "eleven_multilingual_v2",
});

export const STTProvider = Object.freeze({ DEEPGRAM: "deepgram", GLADIA: "gladia" });

export const VoiceChatTransport = Object.freeze({ LIVEKIT: "livekit", WEBSOCKET: "websocket" });

export const ConnectionQuality = Object.freeze({ UNKNOWN: "UNKNOWN", GOOD: "GOOD", BAD: "BAD" });

export const TaskType = Object.freeze({ TALK: "talk", REPEAT: "repeat" });

export const TaskMode = Object.freeze({ SYNC: "sync", ASYNC: "async" });

export const StreamingEvents = Object.freeze({
  AVATAR_START_TALKING: "avatar_start_talking",
  AVATAR_STOP_TALKING: "avatar_stop_talking",
  AVATAR_TALKING_MESSAGE: "avatar_talking_message",
  AVATAR_END_MESSAGE: "avatar_end_message",
  USER_TALKING_MESSAGE: "user_talking_message",
  USER_END_MESSAGE: "user_end_message",
  USER_START: "user_start",
  USER_STOP: "user_stop",
  USER_SILENCE: "user_silence",
  STREAM_READY: "stream_ready",
  STREAM_DISCONNECTED: "stream_disconnected",
  CONNECTION_QUALITY_CHANGED: "connection_quality_changed",
});

/** Events only this gateway sends (not in HeyGen's StreamingEvents). CONNECTION_FAILED is the
 * SDK's own: the stream's media never connected (its detail says why and what to check);
 * STREAM_DISCONNECTED follows it. */
export const GatewayEvents = Object.freeze({
  SESSION_STATE: "session_state",
  CONNECTION_FAILED: "connection_failed",
});

/** A stream that has not connected this long after the gateway answered has failed. */
const DEFAULT_CONNECT_TIMEOUT_MS = 15000;

/** "udp 192.0.2.7:50000 host" for each candidate line of an SDP. */
function candidatesOf(sdp) {
  const out = [];
  for (const line of (sdp || "").split(/\r?\n/)) {
    const m = /^a=candidate:\S+ \d+ (\S+) \d+ (\S+) (\d+) typ (\S+)/.exec(line);
    if (m) out.push(`${m[1].toLowerCase()} ${m[2]}:${m[3]} ${m[4]}`);
  }
  return [...new Set(out)];
}

const QUALITY_INTERVAL_MS = 2000;
const QUALITY_MAX_LOSS = 0.05;
const QUALITY_MAX_JITTER_S = 0.1;
const QUALITY_MAX_FROZEN_MS = 3000;

/** Gateway answer to /listen when the upstream has no listening mode: not an error for us. */
const isNoListeningMode = (err) => err instanceof APIError && err.status === 422;

class StreamingAvatar {
  /** Always null: with either transport the room (if any) belongs to the player. */
  room = null;
  /** @type {MediaStream | null} set when STREAM_READY is emitted */
  mediaStream = null;
  /** @type {RTCPeerConnection | null} the WHEP peer connection while connected */
  peerConnection = null;

  #token;
  #basePath;
  #iceServers;
  #preferCodec;
  #transport;
  #livekit;
  #events = new EventTarget();
  #sessionId = null;
  #session = null;
  /** "control": we created the session (stopAvatar ends it); "watch": we only view it. */
  #mode = null;
  #player = null;
  #connecting = null;
  /** Bumped by every stop: a connect that started under an older value gives up. */
  #generation = 0;
  #disconnected = false;
  #stopping = null;
  #pushToTalk = false;
  #voiceChat = null;
  #quality = ConnectionQuality.UNKNOWN;
  #qualityTimer = null;
  #connectTimeoutMs;

  /**
   * @param {{token?: string, basePath?: string, iceServers?: RTCIceServer[],
   *          preferCodec?: "h264" | "vp8", sessionId?: string,
   *          transport?: "whep" | "livekit", livekit?: any, connectTimeoutMs?: number}} [config]
   *   `transport: "livekit"` watches through the operator's LiveKit (sessions created with
   *   `distribution: "livekit"`); `livekit` is then the livekit-client module the page loaded.
   *   `connectTimeoutMs`: a WHEP stream not connected this long after the answer has failed
   *   (CONNECTION_FAILED), rather than a black video forever.
   */
  constructor({ token = "", basePath, iceServers = [], preferCodec, sessionId,
                transport = "whep", livekit, connectTimeoutMs = DEFAULT_CONNECT_TIMEOUT_MS } = {}) {
    if (transport !== "whep" && transport !== "livekit") {
      throw new TypeError(`transport must be "whep" or "livekit", not ${JSON.stringify(transport)}`);
    }
    if (transport === "livekit" && (!livekit || typeof livekit.Room !== "function")) {
      throw new TypeError('transport "livekit" needs the livekit-client module as `livekit`');
    }
    this.#transport = transport;
    this.#livekit = livekit;
    this.#token = token || "";
    this.#basePath = (basePath ?? globalThis.location?.origin ?? "").replace(/\/+$/, "");
    this.#iceServers = iceServers;
    this.#preferCodec = preferCodec;
    this.#connectTimeoutMs = connectTimeoutMs;
    if (sessionId) {
      this.#sessionId = String(sessionId);
      this.#mode = "watch";
    }
  }

  get sessionId() {
    return this.#sessionId;
  }

  get connectionQuality() {
    return this.#quality;
  }

  get isInputAudioMuted() {
    return !this.#voiceChat || !this.#voiceChat.track.enabled;
  }

  muteInputAudio() {
    if (this.#voiceChat) this.#voiceChat.track.enabled = false;
  }

  unmuteInputAudio() {
    if (this.#voiceChat) this.#voiceChat.track.enabled = true;
  }

  // -- sessions -------------------------------------------------------------------------------

  async createStartAvatar(requestData = {}) {
    const sessionInfo = await this.newSession(requestData);
    try {
      await this.startSession();
    } catch (err) {
      // The session was ours alone: do not leave it running without a viewer.
      await this.#endSession(sessionInfo.session_id).catch(() => {});
      if (this.#sessionId === sessionInfo.session_id && !this.#player) this.#resetSession();
      throw err;
    }
    return sessionInfo;
  }

  async startAvatar(requestData = {}, sessionInfo) {
    if (!sessionInfo || !sessionInfo.session_id) {
      throw new TypeError("startAvatar() needs the sessionInfo that newSession() resolved to");
    }
    this.#requireIdle();
    this.#sessionId = sessionInfo.session_id;
    this.#session = sessionInfo.session ?? null;
    this.#mode = "control";
    this.#pushToTalk = Boolean(requestData.enablePushToTalk);
    await this.startSession();
    return sessionInfo;
  }

  async newSession(requestData = {}) {
    this.#requireIdle();
    const body = {};
    if (requestData.upstream) body.upstream = requestData.upstream;
    if (requestData.quality) body.quality = requestData.quality;
    if (requestData.voice?.voiceId) body.voice = requestData.voice.voiceId;
    if (requestData.avatarName) body.avatar_id = requestData.avatarName;
    if (this.#transport === "livekit") body.distribution = "livekit";
    const session = await this.#request("POST", "/v1/sessions", body);
    this.#sessionId = session.id;
    this.#session = session;
    this.#mode = "control";
    this.#pushToTalk = Boolean(requestData.enablePushToTalk);
    return {
      session_id: session.id,
      access_token: "",
      url: this.#url(session.whep_url || `/v1/sessions/${session.id}/whep`),
      is_paid: session.upstream !== "local",
      session_duration_limit: Number(session.session_duration_limit ?? session.duration_limit ?? 0) || 0,
      session,
    };
  }

  async startSession() {
    const sessionId = this.#requireSession();
    if (this.#player || this.#connecting) throw new Error("startSession(): already started; call stopAvatar() first");
    this.#connecting = this.#connect(sessionId);
    try {
      return await this.#connecting;
    } finally {
      this.#connecting = null;
    }
  }

  async watch(sessionId) {
    if (!sessionId) throw new TypeError("watch() needs a session id");
    this.#requireIdle();
    this.#sessionId = String(sessionId);
    this.#session = null;
    this.#mode = "watch";
    this.#pushToTalk = false;
    return this.startSession();
  }

  async #connect(sessionId) {
    const generation = this.#generation;
    const cancelled = () => generation !== this.#generation;
    const watching = this.#mode === "watch";
    if (watching || !this.#session) {
      this.#session = await this.#request("GET", `/v1/sessions/${encodeURIComponent(sessionId)}`);
      if (cancelled()) throw new Error("stopAvatar() was called while connecting");
    }
    let player;
    if (this.#transport === "livekit") {
      if (!this.#session.livekit) {
        throw new Error(`session ${sessionId} is not published to LiveKit (distribution ` +
          `${JSON.stringify(this.#session.distribution)}): use the WHEP transport`);
      }
      player = new LiveKitPlayer(this.#url(this.#session.livekit.token_url),
        { token: this.#token, livekit: this.#livekit });
    } else {
      player = new WhepPlayer(this.#url(this.#session.whep_url || `/v1/sessions/${sessionId}/whep`), {
        token: this.#token,
        // The gateway's STUN/TURN servers, unless the page chose its own.
        iceServers: this.#iceServers.length ? this.#iceServers : (this.#session.ice_servers || []),
        preferCodec: this.#preferCodec,
        sendAudio: !watching,
      });
    }
    this.#player = player;
    this.#disconnected = false;
    this.mediaStream = null;
    // A player that was stopped or replaced has nothing more to say.
    const current = (handler) => (e) => this.#player === player && handler(e);
    player.addEventListener("track", current(() => this.#onTrack(player)));
    player.addEventListener("avatar-event", current((e) => this.#onAvatarEvent(e.detail)));
    let connected = false;
    player.addEventListener("state", current((e) => {
      if (e.detail === "connected") connected = true;
      if (e.detail === "failed" && !connected) {
        void this.#connectionFailed(player, sessionId,
          player.pc.iceConnectionState === "failed" ? "ice_failed" : "dtls_failed");
      } else if (e.detail === "failed" || e.detail === "closed") {
        // The gateway may not have noticed a failed network yet: leave explicitly (DELETE).
        this.#onDisconnected(`peer connection ${e.detail}`, undefined, true);
      }
    }));
    player.addEventListener("channelclose", current(() => this.#onDisconnected("events channel closed")));
    const starting = player.start();
    this.peerConnection = player.pc; // set before STREAM_READY, which fires while starting
    try {
      await starting;
    } catch (err) {
      if (this.#player === player) {
        this.#player = null;
        this.peerConnection = null;
      }
      throw err;
    }
    if (this.#player !== player) {
      await player.stop();
      throw new Error(cancelled() ? "stopAvatar() was called while connecting"
        : "the stream disconnected while connecting");
    }
    if (player.pc) {
      this.#startQualityMonitor(player.pc);
      setTimeout(() => {
        if (!connected && this.#player === player) void this.#connectionFailed(player, sessionId, "timeout");
      }, this.#connectTimeoutMs);
    }
    return this.#session;
  }

  /** The media never connected: say why it may not have, then disconnect (and DELETE). */
  async #connectionFailed(player, sessionId, reason) {
    const pc = player.pc;
    const gatewayOffered = candidatesOf(pc.remoteDescription?.sdp);
    const browserOffered = candidatesOf(pc.localDescription?.sdp);
    let gateway = null;  // the gateway's own view, once it has given up on this viewer too
    try {
      const session = await this.#request("GET", `/v1/sessions/${encodeURIComponent(sessionId)}`);
      gateway = session.last_viewer_failure?.message ?? null;
    } catch {
      // the session may be gone; the browser's side of the story is still worth telling
    }
    if (this.#player !== player) return;
    const what = reason === "timeout" ? `not connected after ${Math.round(this.#connectTimeoutMs / 1000)} s`
      : reason === "ice_failed" ? "ICE failed" : "DTLS failed";
    const message = `The video could not connect (${what}). This browser reached the gateway ` +
      "over HTTP but not its media, which travels over UDP to an address in the gateway's " +
      `answer: ${gatewayOffered.length ? gatewayOffered.join(", ") : "it offered none"}. ` +
      "Browsers never use 127.0.0.1 for WebRTC. Check that this browser can reach one of " +
      "those addresses (open the page through that address, or give the gateway a TURN " +
      "server: AVATAR_GATEWAY_ICE_SERVERS); the gateway's log says \"ICE failed\" or " +
      "\"not connected\" with the candidates it saw, and GET /v1/sessions/" +
      `${sessionId} shows last_viewer_failure.`;
    this.#emit(GatewayEvents.CONNECTION_FAILED, {
      type: GatewayEvents.CONNECTION_FAILED, reason, message,
      gateway_candidates: gatewayOffered, browser_candidates: browserOffered, gateway,
    });
    this.#onDisconnected(`connection failed (${reason})`, undefined, true);
  }

  async stopAvatar() {
    if (!this.#stopping) {
      this.#stopping = this.#stop().finally(() => (this.#stopping = null));
    }
    return this.#stopping;
  }

  async #stop() {
    const mode = this.#mode;
    const player = this.#player;
    const connecting = this.#connecting;
    const hadStream = player !== null || connecting !== null;
    this.#generation += 1;
    this.#stopQualityMonitor();
    this.#releaseMicrophone();
    this.#player = null;
    this.peerConnection = null;
    if (player) await player.stop();
    if (connecting) await connecting.catch(() => {});
    let result = null;
    try {
      if (mode === "control" && this.#sessionId) result = await this.#endSession(this.#sessionId);
    } finally {
      if (hadStream) this.#onDisconnected("stopped");
      this.mediaStream = null;
      this.#quality = ConnectionQuality.UNKNOWN;
      if (mode === "control") this.#resetSession();
    }
    return result;
  }

  async #endSession(sessionId) {
    try {
      return await this.#request("DELETE", `/v1/sessions/${encodeURIComponent(sessionId)}`);
    } catch (err) {
      if (err instanceof APIError && err.status === 404) return null;
      throw err;
    }
  }

  #resetSession() {
    this.#sessionId = null;
    this.#session = null;
    this.#mode = null;
    this.#pushToTalk = false;
  }

  async keepAlive() {
    return this.#request("POST", this.#sessionPath("keep-alive"));
  }

  // -- speaking and listening -----------------------------------------------------------------

  async speak(requestData) {
    if (!requestData || typeof requestData.text !== "string") {
      throw new TypeError("speak() needs {text: string}");
    }
    const path = this.#sessionPath("speak");
    return this.#request("POST", path, {
      text: requestData.text,
      task_type: requestData.taskType || requestData.task_type || TaskType.TALK,
      task_mode: requestData.taskMode || TaskMode.ASYNC,
    });
  }

  async interrupt() {
    return this.#request("POST", this.#sessionPath("interrupt"));
  }

  async startListening() {
    return this.#request("POST", this.#sessionPath("listen"), { listening: true });
  }

  async stopListening() {
    return this.#request("POST", this.#sessionPath("listen"), { listening: false });
  }

  async startVoiceChat({ useSilencePrompt = false, isInputAudioMuted = false } = {}) {
    void useSilencePrompt; // accepted for compatibility; the gateway has no silence prompt
    this.#requireSession();
    const player = this.#player;
    if (!player || !player.canSendMicrophone) {
      throw new Error(this.#mode === "watch"
        ? "startVoiceChat(): a watcher has no microphone; create the session to talk to it"
        : "startVoiceChat(): the stream is not started; call createStartAvatar() or startSession() first");
    }
    if (!globalThis.navigator?.mediaDevices?.getUserMedia) {
      throw new Error("startVoiceChat(): this page cannot use a microphone (no mediaDevices; is it served over https?)");
    }
    if (this.#voiceChat) await this.closeVoiceChat();
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    const [track] = stream.getAudioTracks();
    if (this.#player !== player || !track) {
      stream.getTracks().forEach((t) => t.stop());
      throw new Error("startVoiceChat(): the stream ended while the microphone was opening");
    }
    track.enabled = !isInputAudioMuted;
    this.#voiceChat = { stream, track };
    try {
      await player.setMicrophone(track);
      if (!this.#pushToTalk) await this.startListening().catch((err) => {
        if (!isNoListeningMode(err)) throw err;
      });
    } catch (err) {
      this.#releaseMicrophone();
      throw err;
    }
  }

  async closeVoiceChat() {
    if (!this.#voiceChat) return;
    this.#releaseMicrophone();
    if (this.#disconnected || !this.#sessionId) return;
    await this.stopListening().catch((err) => {
      if (!isNoListeningMode(err)) throw err;
    });
  }

  async pushToTalkStart() {
    this.#requirePushToTalk();
    return this.startListening();
  }

  async pushToTalkStop() {
    this.#requirePushToTalk();
    return this.stopListening();
  }

  #requirePushToTalk() {
    this.#requireSession();
    if (!this.#pushToTalk) throw new Error("push to talk is not enabled (StartAvatarRequest.enablePushToTalk)");
    if (!this.#voiceChat) throw new Error("push to talk needs voice chat: call startVoiceChat() first");
  }

  #releaseMicrophone() {
    const voiceChat = this.#voiceChat;
    if (!voiceChat) return;
    this.#voiceChat = null;
    this.#player?.setMicrophone(null).catch(() => {});
    voiceChat.stream.getTracks().forEach((t) => t.stop());
  }

  // -- events ---------------------------------------------------------------------------------

  on(eventType, listener) {
    this.#events.addEventListener(eventType, listener);
    return this;
  }

  off(eventType, listener) {
    this.#events.removeEventListener(eventType, listener);
    return this;
  }

  #emit(eventType, detail) {
    this.#events.dispatchEvent(new CustomEvent(eventType, { detail }));
  }

  #onTrack(player) {
    if (this.#player !== player || this.mediaStream) return;
    const stream = player.stream;
    if (stream.getVideoTracks().length > 0 && stream.getAudioTracks().length > 0) {
      this.mediaStream = stream;
      this.#emit(StreamingEvents.STREAM_READY, stream);
    }
  }

  #onAvatarEvent(event) {
    if (typeof event.type !== "string") return;
    if (event.type === StreamingEvents.STREAM_DISCONNECTED) {
      this.#onDisconnected(typeof event.reason === "string" ? event.reason : "stream disconnected", event);
      return;
    }
    this.#emit(event.type, event);
    if (event.type === GatewayEvents.SESSION_STATE && (event.state === "closing" || event.state === "closed")) {
      this.#onDisconnected(`session ${event.state}`);
    }
  }

  /** Emit STREAM_DISCONNECTED once per connection, and free the microphone and the viewer. */
  /** @param {boolean} [leave] DELETE the viewer resource; not when the gateway ended the stream
   * (session closed, events channel closed by it): the resource is gone already. */
  #onDisconnected(reason, event, leave = false) {
    if (this.#disconnected) return;
    this.#disconnected = true;
    this.#stopQualityMonitor();
    this.#releaseMicrophone();
    const player = this.#player;
    if (player) {
      this.#player = null;
      this.peerConnection = null;
      void player.stop({ leave });
    }
    this.#emit(StreamingEvents.STREAM_DISCONNECTED, event ?? { type: StreamingEvents.STREAM_DISCONNECTED, reason });
  }

  // -- connection quality ---------------------------------------------------------------------

  #startQualityMonitor(pc) {
    this.#stopQualityMonitor();
    const now = Date.now();
    const stats = { started: now, lost: 0, received: 0, frames: 0, framesAt: now };
    let busy = false;
    const timer = setInterval(() => {
      if (busy) return;
      busy = true;
      this.#measureQuality(pc, stats)
        .then((quality) => {
          if (this.#qualityTimer === timer && quality !== this.#quality) {
            this.#quality = quality;
            this.#emit(StreamingEvents.CONNECTION_QUALITY_CHANGED, quality);
          }
        })
        .catch(() => {})
        .finally(() => (busy = false));
    }, QUALITY_INTERVAL_MS);
    this.#qualityTimer = timer;
  }

  #stopQualityMonitor() {
    if (this.#qualityTimer !== null) clearInterval(this.#qualityTimer);
    this.#qualityTimer = null;
  }

  /**
   * BAD when, over the last interval, inbound video lost more than 5% of its packets, its
   * jitter is over 100 ms, or no frame was decoded for 3 s (or the connection is
   * disconnected); UNKNOWN until the first frame (for up to 3 s); GOOD otherwise.
   */
  async #measureQuality(pc, previous) {
    if (pc.connectionState === "disconnected" || pc.connectionState === "failed") return ConnectionQuality.BAD;
    const report = await pc.getStats();
    let inbound = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
    });
    const now = Date.now();
    if (!inbound) return now - previous.started < QUALITY_MAX_FROZEN_MS ? ConnectionQuality.UNKNOWN : ConnectionQuality.BAD;
    const lost = Math.max(0, inbound.packetsLost ?? 0);
    const received = inbound.packetsReceived ?? 0;
    const frames = inbound.framesDecoded ?? 0;
    const lostDelta = lost - previous.lost;
    const receivedDelta = received - previous.received;
    if (frames !== previous.frames) previous.framesAt = now;
    Object.assign(previous, { lost, received, frames });
    if (frames === 0 && now - previous.started < QUALITY_MAX_FROZEN_MS) return ConnectionQuality.UNKNOWN;
    const loss = lostDelta + receivedDelta > 0 ? lostDelta / (lostDelta + receivedDelta) : 0;
    const bad = loss > QUALITY_MAX_LOSS
      || (inbound.jitter ?? 0) > QUALITY_MAX_JITTER_S
      || now - previous.framesAt >= QUALITY_MAX_FROZEN_MS;
    return bad ? ConnectionQuality.BAD : ConnectionQuality.GOOD;
  }

  // -- HTTP -----------------------------------------------------------------------------------

  /** basePath + path, like the reference (so a basePath with a path prefix keeps it). */
  #url(path) {
    if (/^[a-z][a-z0-9+.-]*:/i.test(path)) return path;
    return new URL(`${this.#basePath}${path}`, globalThis.location?.href).href;
  }

  #requireSession() {
    if (!this.#sessionId) {
      throw new Error("no session: call createStartAvatar() or newSession() first "
        + "(or watch(sessionId) to join an existing one)");
    }
    return this.#sessionId;
  }

  #requireIdle() {
    if (this.#player || this.#connecting || this.#stopping) {
      throw new Error("a session is already streaming here; call stopAvatar() first");
    }
  }

  #sessionPath(action) {
    return `/v1/sessions/${encodeURIComponent(this.#requireSession())}/${action}`;
  }

  async #request(method, path, body) {
    const headers = {};
    if (this.#token) headers.Authorization = `Bearer ${this.#token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(this.#url(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      // A DELETE from a pagehide handler still reaches the gateway.
      keepalive: method === "DELETE",
    });
    if (!response.ok) throw await APIError.fromResponse(response, `API request ${method} ${path}`);
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }
}

export { StreamingAvatar };
export default StreamingAvatar;
