// A small WHEP player (RFC 9725 / draft-ietf-wish-whep) for the gateway's viewer endpoint.
// No build step: import it as an ES module.

export class WhepPlayer extends EventTarget {
  /**
   * @param {string} endpoint  WHEP endpoint URL, e.g. /v1/sessions/<id>/whep
   * @param {{token?: string, iceServers?: RTCIceServer[]}} [options]
   */
  constructor(endpoint, options = {}) {
    super();
    this.endpoint = endpoint;
    this.token = options.token || "";
    this.iceServers = options.iceServers || [];
    this.pc = null;
    this.resource = null;
    this.stream = new MediaStream();
  }

  _headers(contentType) {
    const headers = { "Content-Type": contentType };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    return headers;
  }

  /** Negotiate, and resolve with the MediaStream once the answer is applied. */
  async start() {
    const pc = (this.pc = new RTCPeerConnection({ iceServers: this.iceServers }));
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.addTransceiver("audio", { direction: "recvonly" });
    const channel = pc.createDataChannel("events");
    channel.onmessage = (msg) => {
      try {
        this.dispatchEvent(new CustomEvent("avatar-event", { detail: JSON.parse(msg.data) }));
      } catch (err) {
        console.warn("ignoring a non-JSON event", err);
      }
    };
    pc.ontrack = (ev) => {
      this.stream.addTrack(ev.track);
      this.dispatchEvent(new CustomEvent("track", { detail: ev.track }));
    };
    pc.onconnectionstatechange = () =>
      this.dispatchEvent(new CustomEvent("state", { detail: pc.connectionState }));

    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc, 2000);
    const response = await fetch(this.endpoint, {
      method: "POST",
      headers: this._headers("application/sdp"),
      body: pc.localDescription.sdp,
    });
    if (response.status !== 201) {
      const detail = await response.text();
      pc.close();
      throw new Error(`WHEP POST failed (${response.status}): ${detail}`);
    }
    this.resource = new URL(response.headers.get("Location"), new URL(this.endpoint, location.href)).href;
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    return this.stream;
  }

  /** Tear down locally and on the server (DELETE on the WHEP resource). */
  async stop() {
    if (this.pc) this.pc.close();
    this.pc = null;
    if (this.resource) {
      const url = this.resource;
      this.resource = null;
      await fetch(url, { method: "DELETE", headers: this._headers("text/plain"), keepalive: true }).catch(() => {});
    }
  }
}

function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      resolve();
    };
    const check = () => pc.iceGatheringState === "complete" && done();
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);
  });
}
