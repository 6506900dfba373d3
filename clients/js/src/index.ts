// bimip-client: a WebSocket client for the bimip presence and message-delivery server.

export { BimipClient } from "./client.js";
export { BimipError } from "./errors.js";
export { MemoryOutbox } from "./outbox.js";
export { backoffDelay } from "./backoff.js";
export { classifyClose, type CloseAction } from "./close-codes.js";
export { tokenExpiry } from "./token.js";
export type {
  AckEvent,
  AckInfo,
  AnyClientEvent,
  ClientEvents,
  ClientOptions,
  ConnState,
  ErrorCode,
  ErrorEvent,
  Format,
  InboundMessage,
  Intent,
  LogLevel,
  Offset,
  OutboxRecord,
  OutboxStore,
  Outgoing,
  OutgoingEvent,
  OutgoingStatus,
  PresenceEvent,
  ReceiptEvent,
  ReconnectOptions,
  SenderSummary,
  StateEvent,
  SummaryEvent,
  TokenReason,
  TypingEvent,
  WebSocketConstructor,
  WebSocketLike,
  WelcomeEvent,
} from "./types.js";
