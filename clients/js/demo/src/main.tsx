// The bimip demo chat: sign in, contacts with presence and unread counts, one chat at a time.
import { render } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import type { Format } from "../../src/index.ts";
import { forget, loadSaved, Session, signIn, type ChatMessage, type Contact, type SavedSession } from "./session.ts";
import "./style.css";

function App() {
  const [saved, setSaved] = useState<SavedSession | undefined>(loadSaved);
  if (!saved) return <SignIn onDone={setSaved} />;
  return (
    <Chat
      key={saved.user}
      saved={saved}
      onSignOut={() => {
        forget();
        setSaved(undefined);
      }}
    />
  );
}

function SignIn({ onDone }: { onDone: (s: SavedSession) => void }) {
  const [name, setName] = useState("");
  const [json, setJson] = useState(false);
  const [error, setError] = useState<string>();
  const go = async (user: string) => {
    setError(undefined);
    try {
      onDone(await signIn(user.trim(), (json ? "json" : "binary") as Format));
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    }
  };
  return (
    <main class="signin">
      <h1>bimip demo</h1>
      <p>Sign in as anyone. Open a second window to be someone else.</p>
      <div class="quick">
        {["alice", "bob", "carol"].map((u) => (
          <button type="button" onClick={() => go(u)}>
            {u}
          </button>
        ))}
      </div>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          if (name.trim()) go(name);
        }}
      >
        <input
          data-testid="signin-name"
          placeholder="user name"
          value={name}
          onInput={(e) => setName(e.currentTarget.value)}
          autofocus
        />
        <button data-testid="signin-submit">Sign in</button>
      </form>
      <label class="small">
        <input type="checkbox" data-testid="signin-json" checked={json} onChange={(e) => setJson(e.currentTarget.checked)} /> JSON frames
        (bimip.v1.json) instead of binary
      </label>
      {error && <p class="error">{error}</p>}
    </main>
  );
}

/** Re-renders whenever the session changes. */
function useSession(saved: SavedSession): Session {
  const session = useMemo(() => new Session(saved), [saved]);
  const [, setTick] = useState(0);
  useEffect(() => {
    const off = session.onChange(() => setTick((t) => t + 1));
    const vis = () => session.pageVisible();
    document.addEventListener("visibilitychange", vis);
    session.start();
    return () => {
      off();
      document.removeEventListener("visibilitychange", vis);
      session.stop();
    };
  }, [session]);
  return session;
}

function Chat({ saved, onSignOut }: { saved: SavedSession; onSignOut: () => void }) {
  const s = useSession(saved);
  const list = [...s.contacts.values()].sort((a, b) => a.user.localeCompare(b.user));
  return (
    <div class="app">
      <header>
        <strong data-testid="me">{s.me}</strong>
        <StatusPicker s={s} />
        <button type="button" class="link" onClick={onSignOut}>
          Sign out
        </button>
      </header>
      <ConnBanner s={s} />
      {s.error && (
        <p class="error" data-testid="error" onClick={() => s.dismissError()}>
          {s.error} ✕
        </p>
      )}
      <div class={`panes ${s.conn.state === "connected" ? "" : "stale"}`}>
        <aside>
          <ul class="contacts" data-testid="contacts">
            {list.map((k) => (
              <ContactRow k={k} active={k.user === s.open} onOpen={() => s.openChat(k.user)} />
            ))}
          </ul>
          <AddContact s={s} />
        </aside>
        {s.open ? <Conversation s={s} peer={s.open} /> : <section class="empty">Pick a contact.</section>}
      </div>
    </div>
  );
}

const STATUS_LABEL = { online: "Online", away: "Away", busy: "Busy", dnd: "Do not disturb" };

function StatusPicker({ s }: { s: Session }) {
  return (
    <span class="status">
      <span class={`dot ${s.invisible ? "offline" : s.intent}`} />
      <select
        data-testid="status-select"
        value={s.intent}
        onChange={(e) => s.setStatus(e.currentTarget.value as keyof typeof STATUS_LABEL, s.invisible)}
      >
        {Object.entries(STATUS_LABEL).map(([v, label]) => (
          <option value={v}>{label}</option>
        ))}
      </select>
      <label>
        <input
          type="checkbox"
          data-testid="invisible-toggle"
          checked={s.invisible}
          onChange={(e) => s.setStatus(s.intent, e.currentTarget.checked)}
        />{" "}
        invisible
      </label>
    </span>
  );
}

function ConnBanner({ s }: { s: Session }) {
  const [, setNow] = useState(0);
  const { state, retryAt, reason } = s.conn;
  useEffect(() => {
    if (state !== "reconnecting") return;
    const t = setInterval(() => setNow(Date.now()), 500);
    return () => clearInterval(t);
  }, [state]);
  let text = "Connected";
  if (state === "idle" || state === "connecting") text = "Connecting…";
  if (state === "reconnecting") {
    const secs = retryAt ? Math.max(0, Math.ceil((retryAt - Date.now()) / 1000)) : 0;
    text = secs > 0 ? `Connection lost. Reconnecting in ${secs} s…` : "Connection lost. Reconnecting…";
  }
  if (state === "closed") text = `Disconnected${reason ? `: ${reason}` : ""}. Sign out and in again.`;
  return (
    <div class={`banner ${state}`} data-testid="conn-state" data-state={state} role="status">
      {text}
      {state === "reconnecting" && (
        <button type="button" class="link" onClick={() => s.retryNow()}>
          Retry now
        </button>
      )}
    </div>
  );
}

function ago(ms: number): string {
  const m = Math.round((Date.now() - ms) / 60000);
  if (m < 1) return "just now";
  if (m < 60) return `${m} min ago`;
  const h = Math.round(m / 60);
  return h < 48 ? `${h} h ago` : `${Math.round(h / 24)} days ago`;
}

function ContactRow({ k, active, onOpen }: { k: Contact; active: boolean; onOpen: () => void }) {
  const typing = k.typingUntil > Date.now();
  let sub = k.preview ?? STATUS_LABEL.online;
  if (k.presence === "offline") sub = k.lastSeen ? `last seen ${ago(k.lastSeen)}` : "offline";
  else if (k.presence !== "online") sub = k.details || STATUS_LABEL[k.presence];
  if (typing) sub = "typing…";
  return (
    <li
      class={active ? "active" : ""}
      data-testid={`contact-${k.user}`}
      data-presence={k.presence}
      data-unread={k.unread}
      data-typing={String(typing)}
      onClick={onOpen}
    >
      <span class={`dot ${k.presence}`} title={k.presence} />
      <span class="who">
        <span class="name">{k.user}</span>
        <span class="sub">{sub}</span>
      </span>
      {k.unread > 0 && <span class="badge">{k.unread}</span>}
    </li>
  );
}

function AddContact({ s }: { s: Session }) {
  const [name, setName] = useState("");
  return (
    <form
      class="add"
      onSubmit={(e) => {
        e.preventDefault();
        const n = name.trim();
        if (n && n !== s.me) s.addContact(n).then(() => setName(""));
      }}
    >
      <input
        data-testid="add-contact-name"
        placeholder="add a contact"
        value={name}
        onInput={(e) => setName(e.currentTarget.value)}
      />
      <button data-testid="add-contact-submit">Add</button>
    </form>
  );
}

const TICK: Record<string, string> = { queued: "◷", sent: "◷", acked: "✓", delivered: "✓✓", read: "✓✓", failed: "!" };

function Bubble({ m, mine }: { m: ChatMessage; mine: boolean }) {
  const time = new Date(m.timestamp).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return (
    <li class={mine ? "mine" : "theirs"} data-testid={`msg-${m.id}`} data-status={m.status ?? ""}>
      <span class="text">{m.text}</span>
      <span class="meta">
        {time}
        {mine && (
          <span class={`tick ${m.status}`} title={m.status}>
            {" "}
            {TICK[m.status ?? "acked"]}
          </span>
        )}
      </span>
    </li>
  );
}

function Conversation({ s, peer }: { s: Session; peer: string }) {
  const [draft, setDraft] = useState("");
  const end = useRef<HTMLLIElement>(null);
  const msgs = s.messages(peer);
  const k = s.contact(peer);
  const last = msgs[msgs.length - 1];
  // Follow the newest message (not older pages loaded at the top).
  useEffect(() => end.current?.scrollIntoView({ block: "end" }), [last?.from, last?.id, peer]);
  return (
    <section class="chat">
      <h2>
        <span class={`dot ${k.presence}`} /> {peer}
      </h2>
      <ol class="messages" aria-live="polite" data-testid="messages">
        {s.hasOlder(peer) && (
          <li class="older">
            <button type="button" class="link" data-testid="load-older" onClick={() => s.loadHistory(peer, true)}>
              Earlier messages
            </button>
          </li>
        )}
        {msgs.map((m) => (
          <Bubble m={m} mine={m.from === s.me} />
        ))}
        <li ref={end} class="end" />
      </ol>
      <p class="typing" data-testid="typing-indicator" hidden={k.typingUntil <= Date.now()}>
        {peer} is typing…
      </p>
      <form
        class="compose"
        onSubmit={(e) => {
          e.preventDefault();
          if (draft.trim()) s.send(peer, draft);
          setDraft("");
        }}
      >
        <input
          data-testid="compose"
          placeholder={`Message ${peer}`}
          value={draft}
          onInput={(e) => {
            setDraft(e.currentTarget.value);
            if (e.currentTarget.value.trim()) s.typing(peer);
          }}
        />
        <button data-testid="send">Send</button>
      </form>
    </section>
  );
}

render(<App />, document.getElementById("app")!);
