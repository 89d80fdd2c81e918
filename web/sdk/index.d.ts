/**
 * Type declarations for `/web/sdk/index.js`: HeyGen's `@heygen/streaming-avatar` public surface,
 * served by avatar-gateway. Names and shapes follow the reference SDK; what only this gateway
 * has is marked `@remarks gateway extension`.
 */

export interface StreamingAvatarApiConfig {
  /**
   * A gateway API token, sent as `Authorization: Bearer <token>` on every request.
   * Never a HeyGen/LiveAvatar key. Empty or absent when the gateway runs without auth.
   */
  token?: string;
  /** The gateway's base URL. Default: the page's origin (`location.origin`). */
  basePath?: string;
  /**
   * ICE servers for the WHEP peer connection. Default: the ones the gateway advertises in the
   * session (`ice_servers`, from `AVATAR_GATEWAY_ICE_SERVERS`); none when it has none.
   * @remarks gateway extension
   */
  iceServers?: RTCIceServer[];
  /**
   * Video codec to list first in the offer (the gateway takes the first it supports).
   * Default: the browser's own order.
   * @remarks gateway extension
   */
  preferCodec?: "h264" | "vp8";
  /**
   * Join this existing session as a viewer: `startSession()` then watches it (as `watch()`).
   * @remarks gateway extension
   */
  sessionId?: string;
  /**
   * `"whep"` (default): the gateway's own peer connection. `"livekit"`: watch through the
   * operator's LiveKit room of a session created with `distribution: "livekit"` (newSession()
   * asks for it). Voice chat works on both (a controller's token may publish a microphone).
   */
  transport?: "whep" | "livekit";
  /** With `transport: "livekit"`: the livekit-client module the page loaded (not bundled). */
  livekit?: unknown;
  /**
   * WHEP: a stream whose media has not connected this long after the gateway's answer has
   * failed (`GatewayEvents.CONNECTION_FAILED`, then `STREAM_DISCONNECTED`). Default 15000.
   * @remarks gateway extension
   */
  connectTimeoutMs?: number;
}

export enum AvatarQuality {
  Low = "low",
  Medium = "medium",
  High = "high",
}

/** Accepted for compatibility; the gateway ignores it. */
export enum VoiceEmotion {
  EXCITED = "excited",
  SERIOUS = "serious",
  FRIENDLY = "friendly",
  SOOTHING = "soothing",
  BROADCASTER = "broadcaster",
}

/** Accepted for compatibility; the gateway ignores it. */
export enum ElevenLabsModel {
  eleven_flash_v2_5 = "eleven_flash_v2_5",
  eleven_multilingual_v2 = "eleven_multilingual_v2",
}

export interface ElevenLabsSettings {
  stability?: number;
  similarity_boost?: number;
  style?: number;
  use_speaker_boost?: boolean;
}

/** Accepted for compatibility; the gateway ignores it. */
export enum STTProvider {
  DEEPGRAM = "deepgram",
  GLADIA = "gladia",
}

export interface STTSettings {
  provider?: STTProvider;
  confidence?: number;
}

/**
 * Accepted for compatibility and ignored: the microphone always travels on the WHEP peer
 * connection's audio m-line.
 */
export enum VoiceChatTransport {
  LIVEKIT = "livekit",
  WEBSOCKET = "websocket",
}

export enum ConnectionQuality {
  UNKNOWN = "UNKNOWN",
  GOOD = "GOOD",
  BAD = "BAD",
}

export interface StartAvatarRequest {
  quality?: AvatarQuality | "low" | "medium" | "high";
  /** Sent as the gateway's `avatar_id`. Optional here: the gateway has a default avatar. */
  avatarName?: string;
  voice?: {
    /** Sent as the gateway's `voice`. */
    voiceId?: string;
    /** Ignored by the gateway. */
    rate?: number;
    /** Ignored by the gateway. */
    emotion?: VoiceEmotion;
    /** Ignored by the gateway. */
    elevenlabsSettings?: ElevenLabsSettings;
    /** Ignored by the gateway. */
    model?: ElevenLabsModel;
  };
  /** Ignored by the gateway (its persona and LLM are configured server-side). */
  knowledgeId?: string;
  /** Ignored by the gateway. */
  language?: string;
  /** Ignored by the gateway. */
  knowledgeBase?: string;
  /** @deprecated in the reference too; ignored by the gateway. */
  disableIdleTimeout?: boolean;
  /** Ignored by the gateway. */
  sttSettings?: STTSettings;
  /** Ignored by the gateway. */
  useSilencePrompt?: boolean;
  /** Ignored: see {@link VoiceChatTransport}. */
  voiceChatTransport?: VoiceChatTransport;
  /** Ignored by the gateway (its idle timeout is server configuration; use keepAlive()). */
  activityIdleTimeout?: number;
  /**
   * With push to talk, `startVoiceChat()` opens the microphone but does not start listening;
   * `pushToTalkStart()`/`pushToTalkStop()` switch listening on and off.
   */
  enablePushToTalk?: boolean;
  /**
   * Which avatar upstream the gateway runs. Default: the gateway's configured default.
   * @remarks gateway extension
   */
  upstream?: "local" | "heygen" | "liveavatar";
}

/**
 * A gateway session object (`GET /v1/sessions/<id>`).
 * @remarks gateway extension
 */
export interface GatewaySession {
  id: string;
  upstream: "local" | "heygen" | "liveavatar" | string;
  state: "new" | "starting" | "live" | "closing" | "closed" | string;
  quality: "low" | "medium" | "high" | string;
  width: number;
  height: number;
  /** Viewers connected right now. */
  viewers: number;
  /** Seconds since the Unix epoch. */
  created_at: number;
  /** Relative URL of the session's WHEP endpoint. */
  whep_url: string;
  /** Relative URL of the session's server-sent event stream. */
  events_url: string;
  /** STUN/TURN servers the gateway advertises; the SDK uses them unless `iceServers` is given. */
  ice_servers: RTCIceServer[];
  [key: string]: unknown;
}

export interface StartAvatarResponse {
  session_id: string;
  /** Always "" (there is no LiveKit room to join). */
  access_token: string;
  /** Absolute URL of the session's WHEP endpoint. */
  url: string;
  /** `upstream !== "local"`: a cloud avatar provider bills this session. */
  is_paid: boolean;
  /** Seconds, when the gateway reports a limit; 0 otherwise. */
  session_duration_limit: number;
  /**
   * The gateway's session object.
   * @remarks gateway extension
   */
  session: GatewaySession;
}

export enum TaskType {
  /** The gateway's LLM answers the text and the avatar speaks the answer. */
  TALK = "talk",
  /** The avatar speaks the text as given. */
  REPEAT = "repeat",
}

export enum TaskMode {
  /** Resolve once the avatar has finished speaking. */
  SYNC = "sync",
  /** Resolve once the task is scheduled. */
  ASYNC = "async",
}

export interface SpeakRequest {
  text: string;
  /** Same as `taskType` (kept for the reference's snake_case spelling). */
  task_type?: TaskType;
  /** Default: TALK, as in the reference. */
  taskType?: TaskType;
  /** Default: ASYNC. */
  taskMode?: TaskMode;
}

/** What `speak()` resolves to: the gateway's JSON, passed through whole. */
export interface SpeakResponse {
  /** The (first) speech task; null when a TALK answer was empty. */
  task_id: string | null;
  duration_ms: number;
  /** With TALK answered by the gateway's chat: one task per spoken sentence. */
  task_ids?: string[];
  /** With TALK answered by the gateway's chat: the answer it spoke. */
  text?: string;
  /** With TALK answered by the gateway's chat: true when its offline responder wrote the
   * answer (no OpenAI key). Show it as a badge; the avatar does not say it. */
  offline?: boolean;
  [key: string]: unknown;
}

export interface CommonRequest {
  [key: string]: any;
}

export enum StreamingEvents {
  AVATAR_START_TALKING = "avatar_start_talking",
  AVATAR_STOP_TALKING = "avatar_stop_talking",
  AVATAR_TALKING_MESSAGE = "avatar_talking_message",
  AVATAR_END_MESSAGE = "avatar_end_message",
  USER_TALKING_MESSAGE = "user_talking_message",
  USER_END_MESSAGE = "user_end_message",
  USER_START = "user_start",
  USER_STOP = "user_stop",
  /** Declared for compatibility; the gateway does not send it. */
  USER_SILENCE = "user_silence",
  STREAM_READY = "stream_ready",
  STREAM_DISCONNECTED = "stream_disconnected",
  CONNECTION_QUALITY_CHANGED = "connection_quality_changed",
}

/**
 * Events only this gateway sends.
 * @remarks gateway extension
 */
export enum GatewayEvents {
  SESSION_STATE = "session_state",
  /** The stream's media never connected (ICE or DTLS failed, or timed out). */
  CONNECTION_FAILED = "connection_failed",
}

/** Listeners receive a `CustomEvent`; the payload is `event.detail`. */
export type EventHandler = (...args: any[]) => void;

export interface EventData {
  [key: string]: unknown;
  task_id: string;
}

export interface StreamingStartTalkingEvent extends EventData {
  type: StreamingEvents.AVATAR_START_TALKING;
}

export interface StreamingStopTalkingEvent extends EventData {
  type: StreamingEvents.AVATAR_STOP_TALKING;
  duration_ms?: number;
}

export interface StreamingTalkingMessageEvent extends EventData {
  type: StreamingEvents.AVATAR_TALKING_MESSAGE;
  message: string;
}

export interface StreamingTalkingEndEvent extends EventData {
  type: StreamingEvents.AVATAR_END_MESSAGE;
}

export interface UserTalkingMessageEvent extends EventData {
  type: StreamingEvents.USER_TALKING_MESSAGE;
  message: string;
}

export interface UserTalkingEndEvent extends EventData {
  type: StreamingEvents.USER_END_MESSAGE;
}

/**
 * The reference reads these from a WebSocket with an `event_type` field; the gateway sends
 * them on the data channel with `type`, like the other events.
 */
export interface UserStartTalkingEvent {
  [key: string]: unknown;
  type: StreamingEvents.USER_START;
  task_id?: string;
}

export interface UserStopTalkingEvent {
  [key: string]: unknown;
  type: StreamingEvents.USER_STOP;
  task_id?: string;
}

/**
 * `detail` of STREAM_DISCONNECTED: the gateway's own `stream_disconnected` event, or one the SDK
 * makes (reason "stopped", "peer connection failed", "peer connection closed",
 * "events channel closed", "session closing", "session closed").
 */
export interface StreamDisconnectedEvent {
  [key: string]: unknown;
  type: StreamingEvents.STREAM_DISCONNECTED;
  reason: string;
}

/** @remarks gateway extension */
export interface SessionStateEvent {
  [key: string]: unknown;
  type: GatewayEvents.SESSION_STATE;
  state: "new" | "starting" | "live" | "closing" | "closed" | string;
}

/** @remarks gateway extension */
export interface ConnectionFailedEvent {
  type: GatewayEvents.CONNECTION_FAILED;
  reason: "ice_failed" | "dtls_failed" | "timeout";
  /** What happened, why it may have, and what to check: fit to show to the user. */
  message: string;
  /** From the gateway's answer, e.g. "udp 192.0.2.7:50000 host". */
  gateway_candidates: string[];
  browser_candidates: string[];
  /** The gateway's own reason (the session's `last_viewer_failure`), if it had one yet. */
  gateway: string | null;
}

/** `event.detail` for each event type. */
export interface StreamingEventMap {
  [StreamingEvents.AVATAR_START_TALKING]: StreamingStartTalkingEvent;
  [StreamingEvents.AVATAR_STOP_TALKING]: StreamingStopTalkingEvent;
  [StreamingEvents.AVATAR_TALKING_MESSAGE]: StreamingTalkingMessageEvent;
  [StreamingEvents.AVATAR_END_MESSAGE]: StreamingTalkingEndEvent;
  [StreamingEvents.USER_TALKING_MESSAGE]: UserTalkingMessageEvent;
  [StreamingEvents.USER_END_MESSAGE]: UserTalkingEndEvent;
  [StreamingEvents.USER_START]: UserStartTalkingEvent;
  [StreamingEvents.USER_STOP]: UserStopTalkingEvent;
  [StreamingEvents.USER_SILENCE]: { [key: string]: unknown };
  [StreamingEvents.STREAM_READY]: MediaStream;
  [StreamingEvents.STREAM_DISCONNECTED]: StreamDisconnectedEvent;
  [StreamingEvents.CONNECTION_QUALITY_CHANGED]: ConnectionQuality;
  [GatewayEvents.SESSION_STATE]: SessionStateEvent;
  [GatewayEvents.CONNECTION_FAILED]: ConnectionFailedEvent;
}

/** A non-2xx answer from the gateway. */
export class APIError extends Error {
  constructor(message: string, status: number, responseText: string, code?: string);
  name: "APIError";
  /** HTTP status. */
  status: number;
  /** The raw response body. */
  responseText: string;
  /**
   * `error.code` from the gateway's `{"error": {"code", "message"}}` body, when present
   * (e.g. "not_found", "unauthorized", "unprocessable").
   * @remarks gateway extension
   */
  code?: string;
}

/**
 * One avatar session seen from a browser: create it (controller) or join it (watcher), play its
 * video and audio from `mediaStream`, make it speak, talk to it with the microphone.
 *
 * Methods that need a session throw an `Error` when there is none; requests the gateway refuses
 * reject with {@link APIError}.
 */
export class StreamingAvatar {
  constructor(config?: StreamingAvatarApiConfig);

  /**
   * Always `null`: the gateway relays the avatar over its own WebRTC peer connection
   * (see {@link peerConnection}), not a LiveKit room.
   */
  room: null;
  /** The avatar's video and audio; set when STREAM_READY is emitted, null after stopAvatar(). */
  mediaStream: MediaStream | null;
  /**
   * The WHEP peer connection while streaming, else null.
   * @remarks gateway extension
   */
  peerConnection: RTCPeerConnection | null;
  /**
   * The session this object controls or watches, else null.
   * @remarks gateway extension (the reference keeps it private)
   */
  get sessionId(): string | null;
  /** From inbound video stats every 2 s; UNKNOWN when not streaming. */
  get connectionQuality(): ConnectionQuality;
  /** True when voice chat is off or the microphone is muted. */
  get isInputAudioMuted(): boolean;

  /** Mute the microphone (voice chat keeps running). No-op without voice chat. */
  muteInputAudio(): void;
  unmuteInputAudio(): void;

  /** newSession() then startSession(); ends the new session again if the stream cannot start. */
  createStartAvatar(requestData?: StartAvatarRequest): Promise<StartAvatarResponse>;
  /** Stream a session that newSession() created (possibly on another StreamingAvatar). */
  startAvatar(requestData: StartAvatarRequest, sessionInfo: StartAvatarResponse): Promise<StartAvatarResponse>;
  /** Create a session on the gateway (the avatar is live when this resolves). */
  newSession(requestData?: StartAvatarRequest): Promise<StartAvatarResponse>;
  /**
   * Open the WHEP peer connection to the current session (video recvonly; audio sendrecv for a
   * controller, recvonly for a watcher) and resolve with the gateway's session object.
   * STREAM_READY fires once both a video and an audio track have arrived.
   */
  startSession(): Promise<GatewaySession>;
  /**
   * Join an existing session as a viewer (no microphone). `stopAvatar()` then only leaves.
   * @remarks gateway extension
   */
  watch(sessionId: string): Promise<GatewaySession>;
  /** Default task: TALK (the gateway's LLM answers). Use TaskType.REPEAT to speak the text as is. */
  speak(requestData: SpeakRequest): Promise<SpeakResponse>;
  /**
   * Open the microphone (echo cancellation, noise suppression, auto gain) and send it to the
   * avatar, then start listening (an upstream without a listening mode is not an error).
   * `useSilencePrompt` is accepted and ignored. Needs a controller session.
   */
  startVoiceChat(options?: { useSilencePrompt?: boolean; isInputAudioMuted?: boolean }): Promise<void>;
  /** Stop sending and release the microphone, then stop listening. No-op without voice chat. */
  closeVoiceChat(): Promise<void>;
  startListening(): Promise<any>;
  stopListening(): Promise<any>;
  /** Stop the avatar's current speech. */
  interrupt(): Promise<any>;
  /** Postpone the session's idle timeout. */
  keepAlive(): Promise<any>;
  /** Push to talk (needs `enablePushToTalk` and voice chat): start listening. */
  pushToTalkStart(): Promise<any>;
  /** Push to talk: stop listening. */
  pushToTalkStop(): Promise<any>;
  /**
   * Controller: release the microphone, leave (WHEP DELETE) and end the session for every
   * viewer (DELETE /v1/sessions/<id>); resolves with the closed session object.
   * Watcher: only leave; resolves with null. Idempotent; emits STREAM_DISCONNECTED
   * (reason "stopped") if a stream was open.
   */
  stopAvatar(): Promise<GatewaySession | null>;

  on<K extends keyof StreamingEventMap>(eventType: K, listener: (event: CustomEvent<StreamingEventMap[K]>) => void): this;
  on(eventType: string, listener: EventHandler): this;
  off<K extends keyof StreamingEventMap>(eventType: K, listener: (event: CustomEvent<StreamingEventMap[K]>) => void): this;
  off(eventType: string, listener: EventHandler): this;
}

export default StreamingAvatar;
