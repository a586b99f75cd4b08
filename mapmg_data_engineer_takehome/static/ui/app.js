// The key browser: a page over the public JSON API (GET /keys, GET /get, POST /set with
// If-Match or If-None-Match, DELETE /delete, and GET /changes for the Live switch). Nothing
// that comes from a key or a value is ever parsed as HTML: every such text goes through
// textContent.

const PAGE = 50;
const SHOWN_CHARS = 10000; // a longer value is cut, with "Show all"
const TOKEN_KEY = "kv-token";

const $ = (id) => document.getElementById(id);
const state = {
  prefix: "",
  cursor: null,
  key: null, // the key open in the panel
  version: null, // its version when it was read: the If-Match of a save
  val: "",
  raw: false,
  showAll: false,
  listing: 0, // which listing is current: answers of older ones are dropped
  revision: 0, // the store's revision the listing's first page was read at (KV-Revision)
};
// What the token may do (GET /tokens/self): its rules, {prefix, access}, and whether it is admin.
let grant = { name: null, rules: [], admin: false };
// The Live switch's stream of changes (fetched, so that it carries the token's header).
const live = { controller: null, lastId: null, retry: null };
const RECONNECT_MS = 1000;

// --- talking to the API ---------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, headers) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(method, path, { body, extra } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body === undefined ? extra : { "Content-Type": "application/json", ...extra }),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new ApiError(0, "network", "The server did not answer; is it running?");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    data = null;
  }
  if (!response.ok) {
    const code = data && data.error ? data.error : "error";
    const message = data && data.message ? data.message : `The server answered ${response.status}.`;
    throw new ApiError(response.status, code, message, response.headers);
  }
  return { data, headers: response.headers };
}

const keyPath = (route, key) => route + encodeURIComponent(key).replaceAll(".", "%2E");

// --- messages ---------------------------------------------------------------------------------

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

// An error is said in the status line and, when given, next to the control that was used
// (where: the id of that place's error paragraph): a refusal (403) shows where it happened.
function fail(error, where = null) {
  if (error instanceof ApiError && error.status === 401) {
    askForToken(sessionStorage.getItem(TOKEN_KEY) ? "That token was refused. Try again." : "");
    return;
  }
  const message = error.message || String(error);
  say(message, true);
  if (where) {
    $(where).textContent = message;
    $(where).hidden = false;
  }
}

function clearError(where) {
  $(where).textContent = "";
  $(where).hidden = true;
}

// --- the token ------------------------------------------------------------------------------

function askForToken(problem) {
  $("app").hidden = true;
  $("token-dialog").hidden = false;
  $("token-error").textContent = problem;
  $("token-input").focus();
}

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token-input").value);
  $("token-input").value = "";
  await start();
});

// --- what the token may do -------------------------------------------------------------------
// As the server judges (access.py): a rule covers every key, and every prefix, that starts with
// its prefix; readwrite allows reading too. Rules only allow, never deny.

function may(key, access) {
  return grant.rules.some(
    (rule) => key.startsWith(rule.prefix) && (rule.access === "readwrite" || access === "read"),
  );
}

function ruleText(rule) {
  const where = rule.prefix === "" ? "every key" : `under ${rule.prefix}`;
  return `${rule.access === "readwrite" ? "read and write" : "read-only"} ${where}`;
}

function accessText() {
  const who = grant.name === null ? "No token is needed here" : `Token ${grant.name}`;
  const rules = grant.rules.map(ruleText);
  const admin = grant.admin && grant.name !== null ? ["admin"] : []; // open: no tokens to manage
  const allowed = [...rules, ...admin].join("; ") || "nothing: it has no rules";
  const rest = may("", "readwrite") ? "" : " Anything else is refused.";
  return `${who}: ${allowed}.${rest}`;
}

async function whoAmI() {
  const { data } = await api("GET", "/tokens/self");
  grant = data;
  $("access").textContent = accessText();
}

// Where the listing starts: the whole store when the token may read it, else its first rule's
// prefix (a listing of all keys would be refused).
function startingPrefix() {
  const typed = $("prefix").value;
  if (typed !== "" || may("", "read") || grant.rules.length === 0) return typed;
  return grant.rules[0].prefix;
}

// --- browsing -------------------------------------------------------------------------------

function expiryText(expiresAt) {
  return expiresAt ? `expires ${new Date(expiresAt).toLocaleString()}` : "never expires";
}

// A key's segments up to and including each "/" or ":", for narrowing by a click.
function segments(key) {
  const parts = [];
  let start = 0;
  for (let index = 0; index < key.length; index += 1) {
    if (key[index] === "/" || key[index] === ":") {
      parts.push(key.slice(start, index + 1));
      start = index + 1;
    }
  }
  parts.push(key.slice(start));
  return parts.filter((part) => part !== "");
}

function setPrefix(prefix) {
  $("prefix").value = prefix;
  state.prefix = prefix;
  list(true);
}

// A button that lists the keys under prefix; label is the segment it adds to the one before.
function prefixButton(label, prefix, className, title) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = className;
  button.textContent = label;
  button.title = title;
  button.addEventListener("click", () => setPrefix(prefix));
  return button;
}

function renderCrumbs() {
  const crumbs = $("crumbs");
  crumbs.replaceChildren();
  const all = document.createElement("button");
  all.type = "button";
  all.textContent = "All keys";
  all.addEventListener("click", () => setPrefix(""));
  crumbs.append(all);
  let sofar = "";
  for (const part of segments(state.prefix)) {
    sofar += part;
    crumbs.append(prefixButton(part, sofar, "crumb", `Keys starting with ${sofar}`));
  }
}

function renderItem(item) {
  const row = document.createElement("li");
  row.dataset.key = item.key;
  row.dataset.version = String(item.version);
  const open = document.createElement("button");
  open.type = "button";
  open.className = "key";
  open.textContent = item.key;
  open.title = `Open ${item.key}`;
  open.addEventListener("click", () => openKey(item.key));
  if (item.key === state.key) open.setAttribute("aria-current", "true");
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = `version ${item.version} · ${expiryText(item.expires_at)}`;
  const narrow = document.createElement("span");
  narrow.className = "narrow";
  let sofar = "";
  for (const part of segments(item.key).slice(0, -1)) {
    sofar += part;
    narrow.append(prefixButton(part, sofar, "segment", `Only keys starting with ${sofar}`));
  }
  row.append(open, meta, narrow);
  return row;
}

async function list(fresh) {
  const listing = ++state.listing;
  if (fresh) {
    state.cursor = null;
    renderCrumbs();
  }
  const query = new URLSearchParams({ prefix: state.prefix, limit: String(PAGE) });
  if (!fresh && state.cursor) query.set("cursor", state.cursor);
  try {
    const { data, headers: answer } = await api("GET", `/keys?${query}`);
    if (listing !== state.listing) return; // the prefix changed meanwhile
    clearError("list-error");
    const keys = $("keys");
    if (fresh) {
      keys.replaceChildren();
      state.revision = Number(answer.get("KV-Revision"));
      if ($("live").checked) follow(); // from this listing's revision
    }
    for (const item of data.items) keys.append(renderItem(item));
    state.cursor = data.cursor;
    $("more").hidden = data.cursor === null;
    $("empty").hidden = keys.children.length > 0;
    say(`${keys.children.length} key${keys.children.length === 1 ? "" : "s"} shown${data.cursor ? ", more to load" : ""}.`);
  } catch (error) {
    if (listing !== state.listing) return;
    if (fresh) {
      // No keys of another prefix stay shown, and a refusal is not an empty list.
      $("keys").replaceChildren();
      $("more").hidden = true;
      $("empty").hidden = true;
    }
    fail(error, "list-error");
  }
}

let typing = null;
$("prefix").addEventListener("input", () => {
  clearTimeout(typing);
  typing = setTimeout(() => setPrefix($("prefix").value), 250);
});
$("more").addEventListener("click", () => list(false));

// The open key's row is marked, for the eye and for screen readers.
function markOpen() {
  for (const button of document.querySelectorAll("#keys button.key")) {
    if (button.textContent === state.key) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

// --- reading --------------------------------------------------------------------------------

function pretty(val) {
  try {
    const parsed = JSON.parse(val);
    if (parsed !== null && typeof parsed === "object") return JSON.stringify(parsed, null, 2);
  } catch (error) {
    // not JSON: shown as it is
  }
  return null;
}

function renderValue() {
  const formatted = state.raw ? null : pretty(state.val);
  const text = formatted === null ? state.val : formatted;
  const cut = !state.showAll && text.length > SHOWN_CHARS;
  $("value").textContent = cut ? `${text.slice(0, SHOWN_CHARS)}…` : text;
  $("show-all").hidden = !cut;
  $("show-all").textContent = `Show all (${text.length.toLocaleString()} characters)`;
  $("raw-toggle").setAttribute("aria-pressed", String(state.raw));
  $("raw-toggle").textContent = state.raw ? "Pretty" : "Raw";
  $("raw-toggle").hidden = pretty(state.val) === null;
}

async function openKey(key, message = null) {
  try {
    const { data, headers: answer } = await api("GET", keyPath("/get/", key));
    state.key = key;
    state.val = data.val;
    state.version = answer.get("ETag");
    state.showAll = false;
    $("detail").hidden = false;
    $("create").hidden = true;
    $("conflict").hidden = true;
    $("confirm-delete").hidden = true;
    clearError("edit-error");
    $("read-only").hidden = may(key, "readwrite");
    $("detail-key").textContent = key;
    const expires = answer.get("KV-Expires-At");
    $("detail-meta").textContent = `version ${state.version.replaceAll('"', "")} · ${expiryText(expires)}`;
    $("edit-value").value = data.val;
    // A save sends the expiry this field holds: a set without one would drop it.
    $("edit-ttl").value = expires ? String(Math.max(1, Math.ceil((Date.parse(expires) - Date.now()) / 1000))) : "";
    markOpen();
    renderValue();
    say(message || `Opened ${key}.`);
  } catch (error) {
    if (error.status === 404) {
      $("detail").hidden = true;
      await list(true);
      say(`${key} has no value any more (deleted or expired).`, true);
      return;
    }
    fail(error);
  }
}

$("raw-toggle").addEventListener("click", () => {
  state.raw = !state.raw;
  renderValue();
});
$("show-all").addEventListener("click", () => {
  state.showAll = true;
  renderValue();
});

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) {
    // Without clipboard permission (plain http, some browsers): a selected textarea.
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  say(`Copied ${what}.`);
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

$("copy-key").addEventListener("click", () => copy(state.key, "the key"));
$("copy-value").addEventListener("click", () => copy(state.val, "the value"));
$("copy-curl").addEventListener("click", () => {
  const url = new URL(keyPath("/get/", state.key), location.href).href;
  const auth = sessionStorage.getItem(TOKEN_KEY) ? ` -H ${shellQuote("Authorization: Bearer $KV_TOKEN")}` : "";
  copy(`curl${auth} ${shellQuote(url)}`, "a curl command");
});

// --- editing --------------------------------------------------------------------------------

async function save(condition) {
  const val = $("edit-value").value;
  const body = { key: state.key, val };
  const ttl = $("edit-ttl").value;
  if (ttl !== "") body.ttl = Number(ttl);
  try {
    const { headers: answer } = await api("POST", "/set", { body, extra: condition });
    state.val = val;
    state.version = answer.get("ETag");
    $("conflict").hidden = true;
    await list(true);
    await openKey(state.key, `Saved ${state.key}: now version ${state.version.replaceAll('"', "")}.`);
  } catch (error) {
    if (error.status === 412) {
      await showConflict();
      return;
    }
    fail(error, "edit-error");
  }
}

async function showConflict() {
  try {
    const { data, headers: answer } = await api("GET", keyPath("/get/", state.key));
    $("conflict-value").textContent = data.val;
    state.theirs = answer.get("ETag");
  } catch (error) {
    $("conflict-value").textContent = "(it has been deleted)";
    state.theirs = null;
  }
  $("conflict").hidden = false;
  say("Not saved: someone else changed this key. Overwrite it, or reload theirs.", true);
}

$("edit-form").addEventListener("submit", (event) => {
  event.preventDefault();
  save({ "If-Match": state.version });
});
$("overwrite").addEventListener("click", () =>
  save(state.theirs ? { "If-Match": state.theirs } : { "If-None-Match": "*" }),
);
$("reload").addEventListener("click", () => openKey(state.key));

$("delete").addEventListener("click", () => {
  $("confirm-delete").hidden = false;
  $("confirm-no").focus();
});
$("confirm-no").addEventListener("click", () => {
  $("confirm-delete").hidden = true;
});
$("confirm-yes").addEventListener("click", async () => {
  try {
    await api("DELETE", keyPath("/delete/", state.key), { extra: { "If-Match": state.version } });
    $("detail").hidden = true;
    await list(true);
    say(`Deleted ${state.key}.`);
  } catch (error) {
    if (error.status === 412) {
      $("confirm-delete").hidden = true;
      await showConflict();
      return;
    }
    $("confirm-delete").hidden = true;
    fail(error, "edit-error");
  }
});

// --- creating -------------------------------------------------------------------------------

$("new-key").addEventListener("click", () => {
  $("create").hidden = false;
  $("detail").hidden = true;
  clearError("create-error");
  $("create-key").value = state.prefix;
  $("create-key").focus();
});
$("create-cancel").addEventListener("click", () => {
  $("create").hidden = true;
});
$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("create-key").value;
  const body = { key, val: $("create-value").value };
  const ttl = $("create-ttl").value;
  if (ttl !== "") body.ttl = Number(ttl);
  try {
    await api("POST", "/set", { body, extra: { "If-None-Match": "*" } });
    $("create").hidden = true;
    $("create-form").reset();
    await list(true);
    await openKey(key, `Created ${key}.`);
  } catch (error) {
    if (error.status === 412) {
      say(`${key} exists already: open it to change it.`, true);
      return;
    }
    fail(error, "create-error");
  }
});

// --- live -----------------------------------------------------------------------------------
// List, then watch from the listing's revision: an event changes a shown key only when it is
// newer than the version the listing gave; a new key appears in its place among the loaded
// ones (keys beyond them come with "Load more"). Every event's id names its place (17.2 after
// the second of revision 17's events, 17 after its last), so a dropped stream resumes right
// after the last event applied, even inside a revision; one the server no longer has history
// for (410) lists again.

const encoder = new TextEncoder();

// Keys in the order listings give them: their UTF-8 bytes.
function compareKeys(a, b) {
  const left = encoder.encode(a);
  const right = encoder.encode(b);
  for (let index = 0; index < Math.min(left.length, right.length); index += 1) {
    if (left[index] !== right[index]) return left[index] - right[index];
  }
  return left.length - right.length;
}

function applyChange(change) {
  const keys = $("keys");
  const rows = [...keys.children];
  const shown = rows.find((row) => row.dataset.key === change.key);
  if (shown && change.revision <= Number(shown.dataset.version)) return;
  if (change.type === "set") {
    const row = renderItem({ key: change.key, version: change.revision, expires_at: change.expires_at });
    row.classList.add("changed");
    if (shown) {
      shown.replaceWith(row);
    } else {
      const next = rows.find((other) => compareKeys(other.dataset.key, change.key) > 0);
      if (next) next.before(row);
      else if (state.cursor === null) keys.append(row);
      else return; // beyond the loaded pages
    }
    say(`${change.key} ${shown ? "changed" : "appeared"}: version ${change.revision}.`);
  } else if (shown) {
    shown.remove();
    say(`${change.key} ${change.type === "expire" ? "expired" : "was deleted"}.`);
  }
  $("empty").hidden = keys.children.length > 0;
}

// One block of a text/event-stream: its event, data and id fields.
function readBlock(block) {
  const fields = { event: "message", data: [], id: null };
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "event") fields.event = value;
    else if (name === "data") fields.data.push(value);
    else if (name === "id") fields.id = value;
  }
  return fields;
}

function stopFollowing() {
  clearTimeout(live.retry);
  if (live.controller) live.controller.abort();
  live.controller = null;
}

async function follow(resume = false) {
  stopFollowing();
  if (!resume) live.lastId = null;
  const controller = new AbortController();
  live.controller = controller;
  const query = new URLSearchParams({ prefix: state.prefix });
  const extra = { Accept: "text/event-stream" };
  if (live.lastId !== null) extra["Last-Event-ID"] = live.lastId;
  else query.set("since", String(state.revision));
  try {
    const response = await fetch(`/changes?${query}`, { headers: headers(extra), signal: controller.signal });
    if (response.status === 410) {
      say("Live: changes were missed while away; listing again.");
      await list(true); // which follows again, from the new listing
      return;
    }
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      $("live").checked = false;
      fail(new ApiError(response.status, data?.error, data?.message || `The server answered ${response.status}.`));
      return;
    }
    say(`Live: following changes${state.prefix ? ` to keys starting with ${state.prefix}` : ""}.`);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replaceAll("\r\n", "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = readBlock(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (["set", "delete", "expire"].includes(block.event)) applyChange(JSON.parse(block.data.join("\n")));
        if (block.id !== null) live.lastId = block.id;
      }
    }
  } catch (error) {
    if (controller.signal.aborted) return; // switched off, or a new listing follows
  }
  // The stream ended (the server stopped, or moved past it): resume where it was.
  if (live.controller === controller && $("live").checked) {
    live.retry = setTimeout(() => follow(true), RECONNECT_MS);
  }
}

$("live").addEventListener("change", () => {
  if ($("live").checked) follow();
  else {
    stopFollowing();
    say("Live: off.");
  }
});

// --- start ----------------------------------------------------------------------------------

async function start() {
  try {
    await whoAmI(); // a wrong token is refused here (401), and the dialog asks again
  } catch (error) {
    fail(error);
    return;
  }
  $("token-dialog").hidden = true;
  $("app").hidden = false;
  setPrefix(startingPrefix());
}

start();
