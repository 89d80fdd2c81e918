// A LiveKit player: watches a session the gateway publishes into the operator's LiveKit room
// (the "livekit" distribution). Same events as WhepPlayer, so StreamingAvatar treats both
// alike. livekit-client is not bundled: the page passes the module it loaded (the UMD build's
// `LivekitClient` global, or `import * as LivekitClient from "livekit-client"`), so the
// default WHEP path keeps needing no build step and no dependency.

import { APIError } from "./whep.js";

export class LiveKitPlayer extends EventTarget {
  /**
   * Events: "track" (detail: MediaStreamTrack), "state" ("connected" | "closed"),
   * "avatar-event" (detail: the parsed JSON object).
   *
   * @param {string} tokenEndpoint  the session's `livekit.token_url`
   * @param {{ token?: string, livekit: any }} options  `livekit`: the livekit-client module
   */
  constructor(tokenEndpoint, { token = "", livekit } = {}) {
    super();
    if (!livekit || typeof livekit.Room !== "function") {
      throw new TypeError('transport "livekit" needs the livekit-client module: ' +
        "new StreamingAvatar({transport: \"livekit\", livekit: LivekitClient, ...})");
    }
    this.endpoint = new URL(tokenEndpoint, globalThis.location?.href).href;
    this.token = token;
    this.lk = livekit;
    /** No peer connection of ours: LiveKit's are inside its Room. */
    this.pc = null;
    this.room = null;
    this.stream = new MediaStream();
    this._microphone = null;
    this._stopped = false;
  }

  async start() {
    if (this.room) throw new Error("LiveKitPlayer.start() was already called");
    const response = await fetch(this.endpoint, {
      method: "POST",
      headers: this.token ? { Authorization: `Bearer ${this.token}` } : {},
    });
    if (!response.ok) throw await APIError.fromResponse(response, "POST livekit-token");
    const grant = await response.json();
    if (this._stopped) throw new Error("this LiveKitPlayer was stopped");
    const { Room, RoomEvent } = this.lk;
    const room = (this.room = new Room({ adaptiveStream: false, dynacast: false }));
    room.on(RoomEvent.TrackSubscribed, (track) => {
      const media = track.mediaStreamTrack;
      if (!media || this.stream.getTracks().includes(media)) return;
      this.stream.addTrack(media);
      this.dispatchEvent(new CustomEvent("track", { detail: media }));
    });
    room.on(RoomEvent.DataReceived, (payload, participant, kind, topic) => {
      if (topic !== grant.events_topic) return;
      let event;
      try {
        event = JSON.parse(new TextDecoder().decode(payload));
      } catch {
        return;
      }
      if (event && typeof event === "object") {
        this.dispatchEvent(new CustomEvent("avatar-event", { detail: event }));
      }
    });
    room.on(RoomEvent.ParticipantDisconnected, (participant) => {
      // The gateway left: the session ended.
      if (participant.identity === grant.publisher && !this._stopped) {
        this.dispatchEvent(new CustomEvent("state", { detail: "closed" }));
      }
    });
    room.on(RoomEvent.Disconnected, () => {
      if (!this._stopped) this.dispatchEvent(new CustomEvent("state", { detail: "closed" }));
    });
    await room.connect(grant.url, grant.token, { autoSubscribe: true });
    this.dispatchEvent(new CustomEvent("state", { detail: "connected" }));
    return this.stream;
  }

  /** Leave the room (the session goes on: other viewers watch it). */
  async stop() {
    this._stopped = true;
    const room = this.room;
    this.room = null;
    if (room) await room.disconnect();
    for (const track of this.stream.getTracks()) track.stop();
  }

  /** In the room: setMicrophone() may try (the token decides). */
  get canSendMicrophone() {
    return this.room !== null;
  }

  /** Publish `track` as this participant's microphone (or stop, with null). The gateway
   * grants that to a controller of a session that listens; a viewer's token is refused. */
  async setMicrophone(track) {
    const room = this.room;
    if (!room) throw new Error("LiveKitPlayer.setMicrophone(): not started");
    if (this._microphone) {
      await room.localParticipant.unpublishTrack(this._microphone, false);
      this._microphone = null;
    }
    if (track) {
      await room.localParticipant.publishTrack(track, { source: this.lk.Track.Source.Microphone });
      this._microphone = track;
    }
  }
}
