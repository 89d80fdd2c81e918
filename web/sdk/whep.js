// A WHEP player (draft-ietf-wish-whep; RFC 9725 is WHIP, whose HTTP rules it shares): one RTCPeerConnection that receives a session's video and audio,
// optionally sends a microphone on the same audio m-line, and reads JSON events from an
// "events" data channel. Generic: it knows nothing about avatars beyond the channel's label.
// No build step: import it as an ES module.

/** An HTTP request the gateway answered with a non-2xx status. */
export class APIError extends Error {
  /**
   * @param {string} message
   * @param {number} status
   * @param {string} responseText  the raw response body
   * @param {string} [code]  `error.code` from the gateway's `{"error": {"code", "message"}}` body
   */
  constructor(message, status, responseText, code) {
    super(message);
    this.name = "APIError";
    this.status = status;
    this.responseText = responseText;
    this.code = code;
  }

  /** Build one from a failed fetch() response (reads its body). */
  static async fromResponse(response, what) {
    const text = await response.text().catch(() => "");
    let code;
    let detail = "";
    try {
      const error = JSON.parse(text).error;
      if (error && typeof error === "object") {
        code = typeof error.code === "string" ? error.code : undefined;
        detail = typeof error.message === "string" ? error.message : "";
      }
    } catch {
      detail = text.slice(0, 200);
    }
    const message = `${what} failed with status ${response.status}${detail ? `: ${detail}` : ""}`;
    return new APIError(message, response.status, text, code);
  }
}

const ICE_GATHERING_TIMEOUT_MS = 2000;

export class WhepPlayer extends EventTarget {
  /**
   * Events: "track" (detail: MediaStreamTrack), "state" (detail: RTCPeerConnectionState),
   * "avatar-event" (detail: the parsed JSON object), "channelclose" (the events channel closed
   * after it had opened, i.e. the server ended this viewer).
   *
   * @param {string} endpoint  WHEP endpoint URL, e.g. /v1/sessions/<id>/whep
   * @param {{
   *   token?: string,
   *   iceServers?: RTCIceServer[],
   *   preferCodec?: "h264" | "vp8",
   *   sendAudio?: boolean,
   *   microphone?: MediaStreamTrack | null,
   *   events?: boolean,
   *   iceGatheringTimeout?: number,
   * }} [options]
   *   `sendAudio` offers audio as sendrecv (no track until setMicrophone()), so a microphone
   *   can be added later without renegotiation; `microphone` implies it. `events` (default
   *   true) opens the "events" data channel.
   */
  constructor(endpoint, options = {}) {
    super();
    this.endpoint = new URL(endpoint, globalThis.location?.href).href;
    this.token = options.token || "";
    this.iceServers = options.iceServers || [];
    this.preferCodec = options.preferCodec;
    this.sendAudio = Boolean(options.sendAudio || options.microphone);
    this.microphone = options.microphone || null;
    this.events = options.events !== false;
    this.iceGatheringTimeout = options.iceGatheringTimeout ?? ICE_GATHERING_TIMEOUT_MS;
    /** @type {RTCPeerConnection | null} */
    this.pc = null;
    /** @type {string | null} absolute URL of the WHEP resource (the Location header) */
    this.resource = null;
    this.stream = new MediaStream();
    this._audio = null;
    this._channel = null;
    this._stopped = false;
    this._onPageHide = () => void this.stop();
  }

  _headers(contentType) {
    const headers = {};
    if (contentType) headers["Content-Type"] = contentType;
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** The audio transceiver's sender (null before start(), or when audio is receive-only). */
  get audioSender() {
    return this.sendAudio && this._audio ? this._audio.sender : null;
  }

  /** Started, with an audio m-line that sends: setMicrophone() works. */
  get canSendMicrophone() {
    return this.audioSender !== null;
  }

  /** Send `track` (or nothing, with null) on the audio m-line; needs `sendAudio`. */
  async setMicrophone(track) {
    if (!this.sendAudio) throw new Error("this player was created without sendAudio");
    this.microphone = track || null;
    if (this._audio) await this._audio.sender.replaceTrack(this.microphone);
  }

  /** Negotiate (non-trickle), and resolve with the MediaStream once the answer is applied. */
  async start() {
    if (this.pc) throw new Error("WhepPlayer.start() was already called");
    if (this._stopped) throw new Error("this WhepPlayer was stopped");
    const pc = (this.pc = new RTCPeerConnection({ iceServers: this.iceServers }));
    const video = pc.addTransceiver("video", { direction: "recvonly" });
    preferVideoCodec(video, this.preferCodec);
    this._audio = pc.addTransceiver("audio", { direction: this.sendAudio ? "sendrecv" : "recvonly" });
    if (this.microphone) await this._audio.sender.replaceTrack(this.microphone);
    if (this.events) this._openChannel(pc);
    pc.ontrack = (ev) => {
      if (this.stream.getTracks().includes(ev.track)) return;
      this.stream.addTrack(ev.track);
      this.dispatchEvent(new CustomEvent("track", { detail: ev.track }));
    };
    pc.onconnectionstatechange = () =>
      this.dispatchEvent(new CustomEvent("state", { detail: pc.connectionState }));
    globalThis.addEventListener?.("pagehide", this._onPageHide);

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await waitForIceGathering(pc, this.iceGatheringTimeout);
      const response = await fetch(this.endpoint, {
        method: "POST",
        headers: this._headers("application/sdp"),
        body: pc.localDescription.sdp,
      });
      if (!response.ok) throw await APIError.fromResponse(response, "WHEP offer");
      const location = response.headers.get("Location");
      if (location) this.resource = new URL(location, this.endpoint).href;
      const answer = await response.text();
      if (this._stopped) throw new Error("the player was stopped while connecting");
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
    } catch (err) {
      await this.stop();
      throw err;
    }
    return this.stream;
  }

  _openChannel(pc) {
    const channel = (this._channel = pc.createDataChannel("events"));
    let opened = false;
    channel.onopen = () => (opened = true);
    channel.onclose = () => {
      if (opened && !this._stopped) this.dispatchEvent(new Event("channelclose"));
    };
    channel.onmessage = (msg) => {
      let event;
      try {
        const text = typeof msg.data === "string" ? msg.data : new TextDecoder().decode(msg.data);
        event = JSON.parse(text);
      } catch (err) {
        console.warn("WhepPlayer: ignoring a message that is not JSON", err);
        return;
      }
      if (event && typeof event === "object") {
        this.dispatchEvent(new CustomEvent("avatar-event", { detail: event }));
      }
    };
  }

  /** Tear down locally and on the server (DELETE on the WHEP resource). Idempotent. */
  /** @param {{leave?: boolean}} [options] leave: false when the server already ended the viewer. */
  async stop({ leave = true } = {}) {
    this._stopped = true;
    globalThis.removeEventListener?.("pagehide", this._onPageHide);
    // DELETE before closing: a closed peer connection makes the gateway drop the viewer by
    // itself, and a DELETE that loses that race gets a 404. keepalive: the request still goes
    // out when this runs from pagehide.
    const url = this.resource;
    this.resource = null;
    if (url && leave) {
      await fetch(url, { method: "DELETE", headers: this._headers(), keepalive: true }).catch(() => {});
    }
    if (this.pc) {
      this.pc.ontrack = null;
      this.pc.close();
      // close() fires no connectionstatechange; tell listeners once.
      if (this.pc.onconnectionstatechange) {
        this.pc.onconnectionstatechange = null;
        this.dispatchEvent(new CustomEvent("state", { detail: "closed" }));
      }
    }
  }
}

/** Put the wanted codec first on a video transceiver (the gateway takes the first it supports). */
export function preferVideoCodec(transceiver, codec) {
  if (!codec) return;
  const wanted = `video/${codec}`.toLowerCase();
  const capabilities = globalThis.RTCRtpReceiver?.getCapabilities?.("video");
  if (!capabilities || typeof transceiver.setCodecPreferences !== "function") return;
  const rank = (c) => {
    if (c.mimeType.toLowerCase() !== wanted) return 2;
    // Of the H.264 variants, packetization-mode=1 is what every decoder and packetizer takes.
    return /packetization-mode=1/.test(c.sdpFmtpLine || "") || wanted !== "video/h264" ? 0 : 1;
  };
  const codecs = capabilities.codecs
    .map((c, i) => ({ c, i }))
    .sort((a, b) => rank(a.c) - rank(b.c) || a.i - b.i)
    .map(({ c }) => c);
  if (rank(codecs[0]) === 2) return;
  try {
    transceiver.setCodecPreferences(codecs);
  } catch (err) {
    console.warn("WhepPlayer: cannot set codec preferences", err);
  }
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    let timer = null;
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    pc.addEventListener("icegatheringstatechange", check);
    timer = setTimeout(done, timeoutMs);
  });
}
