"""The PostgreSQL store's SQL: the schema and its upgrades, the PL/pgSQL functions (the
grouped write, the primary check that enters a new timeline, the revision's NOTIFY), and
the statements the store runs.
"""

from __future__ import annotations

from ..base import TOKEN_COLUMNS

SCHEMA_VERSION = 6
# pg_advisory_xact_lock keys ("KVSC", "KVSE"): one server at a time creates or upgrades the
# schema, and one applies a seed while the others wait for it.
SCHEMA_LOCK = 0x4B565343
SEED_LOCK = 0x4B565345
# ("KVTH"): one server at a time trims the history; the others skip their turn.
TRIM_LOCK = 0x4B565448
# The channel every write's commit notifies, with "<schema> <revision>" as the payload: servers
# of other stores in the same database ignore it.
CHANNEL = "kv_changes"

# Milliseconds since the epoch by the database's clock, unless the caller passes its own
# (the tests' clock): every statement below takes it as a parameter that may be NULL.
NOW = "coalesce({}::bigint, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)"

_WRITE_FUNCTION = """
CREATE OR REPLACE FUNCTION kv_write(
    p_kinds text[], p_keys text[], p_vals text[], p_ttls bigint[],
    p_conditions text[], p_versions bigint[], p_now bigint)
RETURNS TABLE (outcome text, new_version bigint, new_expires_at bigint)
LANGUAGE plpgsql AS $$
-- A group of single-key writes, in order, in the caller's transaction: each 'set' or
-- 'delete' whose condition holds takes the next revision and records its change.
DECLARE
    now_ms bigint := coalesce(p_now, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    current_revision bigint;
    first_revision bigint;
    live bigint;
    expiry bigint;
    inserted boolean;
    added bigint := 0;  -- keys inserted less keys deleted, for the count in kv_meta
BEGIN
    SELECT m.value::bigint INTO current_revision FROM kv_meta m
     WHERE m.name = 'revision' FOR UPDATE;
    first_revision := current_revision;
    FOR i IN 1 .. coalesce(array_length(p_keys, 1), 0) LOOP
        live := NULL;
        IF p_conditions[i] IS NOT NULL OR p_kinds[i] = 'delete' THEN
            SELECT k.version INTO live FROM kv k
             WHERE k.key = p_keys[i] AND (k.expires_at IS NULL OR k.expires_at > now_ms);
        END IF;
        IF (p_conditions[i] = 'version' AND live IS DISTINCT FROM p_versions[i])
           OR (p_conditions[i] = 'exists' AND live IS NULL)
           OR (p_conditions[i] = 'absent' AND live IS NOT NULL) THEN
            outcome := 'failed'; new_version := live; new_expires_at := NULL;
        ELSIF p_kinds[i] = 'set' THEN
            current_revision := current_revision + 1;
            expiry := CASE WHEN p_ttls[i] IS NULL THEN NULL ELSE now_ms + p_ttls[i] END;
            -- xmax is 0 on a row this statement inserted, not on one it updated.
            INSERT INTO kv (key, val, version, expires_at)
                 VALUES (p_keys[i], p_vals[i], current_revision, expiry)
            -- A set without a lease detaches the key from the one it had.
            ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,
                                            expires_at = excluded.expires_at, lease = NULL
            RETURNING (kv.xmax = 0) INTO inserted;
            IF inserted THEN added := added + 1; END IF;
            INSERT INTO kv_changes (revision, key, type, val, expires_at)
                 VALUES (current_revision, p_keys[i], 'set', p_vals[i], expiry);
            outcome := 'written'; new_version := current_revision; new_expires_at := expiry;
        ELSIF live IS NULL THEN  -- an expired row stays, for the purge to report
            outcome := 'absent'; new_version := NULL; new_expires_at := NULL;
        ELSE
            DELETE FROM kv k WHERE k.key = p_keys[i];
            added := added - 1;
            current_revision := current_revision + 1;
            INSERT INTO kv_changes (revision, key, type)
                 VALUES (current_revision, p_keys[i], 'delete');
            outcome := 'deleted'; new_version := current_revision; new_expires_at := NULL;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF current_revision <> first_revision THEN
        UPDATE kv_meta m SET value = current_revision::text WHERE m.name = 'revision';
    END IF;
    IF added <> 0 THEN
        UPDATE kv_meta m SET value = (m.value::bigint + added)::text WHERE m.name = 'keys';
    END IF;
END
$$
"""
# Every commit that moves the revision tells the listening servers (see listen).
_NOTIFY = (
    f"""CREATE OR REPLACE FUNCTION kv_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', current_schema() || ' ' || NEW.value);
    RETURN NULL;
END
$$""",
    "DROP TRIGGER IF EXISTS kv_revision_moved ON kv_meta",
    "CREATE TRIGGER kv_revision_moved AFTER UPDATE ON kv_meta FOR EACH ROW"
    " WHEN (NEW.name = 'revision') EXECUTE FUNCTION kv_notify()",
)
# How far the revision jumps at least when the store finds itself on a new timeline: past any
# revision the old timeline can have reached without this one, were the clocks wrong.
TIMELINE_GAP = 1_000_000_000
# Each new life of the store (base.py's life_start): a new PostgreSQL timeline (a standby
# promoted, or a point-in-time restore) or a server started anew (a restart, or a copy of its
# files put back), from the revision it had there (forked_at) to the one it went on from
# (resumed_at). With asynchronous replication the old timeline may have gone on past forked_at
# with writes that this one never got, and a restored copy lacks those made after it; watchers
# may have seen them: the revisions in between are never given to a write here, and a watcher
# holding one is told that it is not this store's (410 unknown_revision) rather than given
# other writes under it.
_CREATE_TIMELINES = (
    "CREATE TABLE IF NOT EXISTS kv_timelines (resumed_at bigint PRIMARY KEY,"
    " forked_at bigint NOT NULL, timeline text NOT NULL)"
)
# Whether the server can take writes (not a standby in recovery, not made read-only, as a
# failover manager fences an old primary); if so, the store is entered into its timeline
# first, under the revision's lock, before anything is written on it.
_CHECK_PRIMARY_FUNCTION = f"""
CREATE OR REPLACE FUNCTION kv_check_primary() RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    here text;
    -- When the server started, as a number: text of a time would follow the session's zone.
    started text := extract(epoch FROM pg_postmaster_start_time())::text;
    recorded text;
    forked bigint;
    resumed bigint;
BEGIN
    IF pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on' THEN
        RETURN false;
    END IF;
    BEGIN
        -- A WAL file's name begins with its timeline: here, that of the WAL written now.
        here := substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);
    EXCEPTION WHEN feature_not_supported OR insufficient_privilege THEN
        here := '';  -- a service that keeps its WAL functions from us: no timeline to follow
    END;
    IF (SELECT count(*) FROM kv_meta WHERE (name, value) IN
            (('timeline', here), ('server_started', started))) = 2 THEN
        RETURN true;
    END IF;
    SELECT value::bigint INTO forked FROM kv_meta WHERE name = 'revision' FOR UPDATE;
    IF (SELECT count(*) FROM kv_meta WHERE (name, value) IN
            (('timeline', here), ('server_started', started))) = 2 THEN
        RETURN true;  -- entered meanwhile, by another connection
    END IF;
    SELECT value INTO recorded FROM kv_meta WHERE name = 'timeline';
    resumed := greatest(forked, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    IF recorded IS DISTINCT FROM here AND recorded IS NOT NULL THEN
        resumed := greatest(resumed, forked + {TIMELINE_GAP});
    END IF;
    IF resumed > forked THEN
        INSERT INTO kv_timelines (resumed_at, forked_at, timeline) VALUES (resumed, forked, here);
        UPDATE kv_meta SET value = resumed::text WHERE name = 'revision';
    END IF;
    INSERT INTO kv_meta (name, value) VALUES ('timeline', here), ('server_started', started)
        ON CONFLICT (name) DO UPDATE SET value = excluded.value;
    RETURN true;
END
$$
"""
# One row per key and revision; the primary key's index is the feed's order.
_CREATE_CHANGES = (
    "CREATE TABLE IF NOT EXISTS kv_changes (revision bigint NOT NULL,"
    ' key text COLLATE "C" NOT NULL, type text NOT NULL, val text, expires_at bigint,'
    " PRIMARY KEY (revision, key))"
)
# The trimming's marks: at this time (ms), the store was at this revision (see base.py).
_CREATE_MARKS = (
    "CREATE TABLE IF NOT EXISTS kv_history_marks (at bigint PRIMARY KEY, revision bigint NOT NULL)"
)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv_meta (name text PRIMARY KEY, value text NOT NULL)",
    # COLLATE "C": keys compare by their UTF-8 bytes, the order listings promise (and the
    # sqlite store's), whatever the database's own collation is.
    "CREATE TABLE IF NOT EXISTS kv (key text COLLATE \"C\" PRIMARY KEY CHECK (key <> ''),"
    " val text NOT NULL, version bigint NOT NULL, expires_at bigint)",
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL",
    _CREATE_CHANGES,
    _CREATE_MARKS,
    _CREATE_TIMELINES,
    _WRITE_FUNCTION,
    _CHECK_PRIMARY_FUNCTION,
    *_NOTIFY,
    "INSERT INTO kv_meta (name, value) VALUES ('revision', '0'), ('keys', '0'),"
    " ('compact_revision', '0'), ('history_rows', '0'), ('history_counted', '0')"
    " ON CONFLICT (name) DO NOTHING",
)
# The leases (see base.py): a leased key names its lease in kv.lease and carries its expiry.
# The index finds a lease's keys without a scan (keepalive, revoke, expiry); keys without a
# lease pay nothing for it.
_LEASES = (
    "ALTER TABLE kv ADD COLUMN IF NOT EXISTS lease text",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease IS NOT NULL",
    "CREATE TABLE IF NOT EXISTS kv_leases (id text PRIMARY KEY, ttl double precision NOT NULL,"
    " expires_at bigint NOT NULL)",
    "CREATE INDEX IF NOT EXISTS kv_leases_expiry ON kv_leases (expires_at)",
)
# The access tokens (see base.py), which every replica shares: no keys, so no revision, no
# change, no export. A secret's hash is found in secret_hash's unique index, or in
# previous_hash's (only rotated tokens in their grace period have one). Names sort in "C"
# order, as the other stores sort them. The generation is kv_meta's tokens_generation, moved
# by every create, rotation and delete (no NOTIFY: the trigger is the revision's alone).
_TOKENS = (
    'CREATE TABLE IF NOT EXISTS kv_tokens (name text COLLATE "C" PRIMARY KEY,'
    " secret_hash text NOT NULL UNIQUE, previous_hash text, previous_until bigint,"
    " rules text NOT NULL, admin boolean NOT NULL, created_at bigint NOT NULL,"
    " expires_at bigint, last_used_at bigint)",
    "CREATE INDEX IF NOT EXISTS kv_tokens_previous ON kv_tokens (previous_hash)"
    " WHERE previous_hash IS NOT NULL",
    "INSERT INTO kv_meta (name, value) VALUES ('tokens_generation', '0')"
    " ON CONFLICT (name) DO NOTHING",
)
# From each schema version to the next, in place (a new store is schema 1, then upgraded).
# Schema 1 had no history: it starts empty, whole above the revision the database was at.
# Schema 2 had no timelines: the server's is recorded, as on a new store, by the first check
# of a connection. Schema 3 did not notice a server started anew: its first check here begins
# a life. Schema 4 had no leases: its keys have none, and its write function kept no lease.
# Schema 5 had no access tokens: it has none, at generation 0.
UPGRADES: dict[int, tuple[str, ...]] = {
    1: (
        _CREATE_CHANGES,
        _CREATE_MARKS,
        _WRITE_FUNCTION,
        *_NOTIFY,
        "INSERT INTO kv_meta (name, value) SELECT unnest(ARRAY['compact_revision',"
        " 'history_counted']), value FROM kv_meta WHERE name = 'revision'"
        " ON CONFLICT (name) DO NOTHING",
        "INSERT INTO kv_meta (name, value) VALUES ('history_rows', '0')"
        " ON CONFLICT (name) DO NOTHING",
    ),
    2: (_CREATE_TIMELINES, _CHECK_PRIMARY_FUNCTION),
    3: (_CHECK_PRIMARY_FUNCTION,),
    4: (*_LEASES, _WRITE_FUNCTION),
    5: _TOKENS,
}

LIVE = f"(expires_at IS NULL OR expires_at > {NOW.format('$2')})"
GET_MANY = f"SELECT key, val, version, expires_at FROM kv WHERE key = ANY($1::text[]) AND {LIVE}"
WRITE = "SELECT outcome, new_version, new_expires_at FROM kv_write($1, $2, $3, $4, $5, $6, $7)"
TAKE_REVISION = (
    "UPDATE kv_meta SET value = (value::bigint + 1)::text WHERE name = 'revision'"
    " RETURNING value::bigint"
)
# Each statement that adds or removes rows moves the key count in kv_meta by as many.
COUNT_KEYS = "UPDATE kv_meta SET value = (value::bigint + ({}))::text WHERE name = 'keys'"
SET_MANY = f"""
WITH clock AS (SELECT {NOW.format("$5")} AS now_ms),
items AS (
    SELECT k, v, CASE WHEN t IS NULL THEN NULL ELSE clock.now_ms + t END AS e
      FROM unnest($1::text[], $2::text[], $3::bigint[]) AS item(k, v, t), clock),
written AS (
    INSERT INTO kv (key, val, version, expires_at) SELECT k, v, $4, e FROM items
    ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,
                                    expires_at = excluded.expires_at, lease = NULL
    RETURNING (kv.xmax = 0) AS inserted),
recorded AS (
    INSERT INTO kv_changes (revision, key, type, val, expires_at)
    SELECT $4, k, 'set', v, e FROM items)
{COUNT_KEYS.format("SELECT count(*) FILTER (WHERE inserted) FROM written")}
"""


def _remove(where: str, kind: str) -> str:
    """A statement deleting the rows ``where`` selects ($2 is the time, for expiry), recording
    each as a change of ``kind`` in revision $3, and answering how many went."""
    return f"""
WITH gone AS (DELETE FROM kv WHERE {where} RETURNING key),
recorded AS (INSERT INTO kv_changes (revision, key, type) SELECT $3, key, '{kind}' FROM gone),
counted AS ({COUNT_KEYS.format("-(SELECT count(*) FROM gone)")})
SELECT count(*) FROM gone
"""


# Expired rows stay, for the purge to report.
DELETE_MANY = _remove(f"key = ANY($1::text[]) AND {LIVE}", "delete")
# A leased key expires with its lease, all its keys at once (EXPIRE_LEASE), never alone.
PURGE = _remove(
    f"""key IN (SELECT key FROM kv WHERE expires_at <= {NOW.format("$2")} AND lease IS NULL
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)""",
    "expire",
)
# A transaction (Store.txn): the revision's lock first, as every write takes it, and the
# time by the database's clock (unless the tests pass theirs), once for the whole of it.
TXN_BEGIN = (
    f"SELECT value::bigint, {NOW.format('$1')} FROM kv_meta WHERE name = 'revision' FOR UPDATE"
)
TXN_GET = f"SELECT val, version, expires_at FROM kv WHERE key = $1 AND {LIVE}"
# A set of the transaction's: the key at revision $3 with lease $5 (or none), its change,
# and the key count.
TXN_SET = f"""
WITH written AS (
    INSERT INTO kv (key, val, version, expires_at, lease)
    VALUES ($1::text, $2::text, $3, $4::bigint, $5::text)
    ON CONFLICT (key) DO UPDATE SET val = excluded.val, version = excluded.version,
                                    expires_at = excluded.expires_at, lease = excluded.lease
    RETURNING (kv.xmax = 0) AS inserted),
recorded AS (
    INSERT INTO kv_changes (revision, key, type, val, expires_at)
    VALUES ($3, $1::text, 'set', $2::text, $4::bigint))
{COUNT_KEYS.format("SELECT count(*) FILTER (WHERE inserted) FROM written")}
"""
# A prefix delete of the transaction's: the live keys in [$1, $4), in revision $3.
DELETE_PREFIX = _remove(f"key >= $1::text AND ($4::text IS NULL OR key < $4) AND {LIVE}", "delete")
ANY_EXPIRED = (
    f"SELECT EXISTS (SELECT 1 FROM kv WHERE expires_at <= {NOW.format('$1')} AND lease IS NULL)"
)
# --- leases (see base.py); the time $2 (or $1) is the database's unless the tests pass theirs.
GRANT_LEASE = f"""
INSERT INTO kv_leases (id, ttl, expires_at)
VALUES ($1::text, $2::float8, {NOW.format("$3")} + round($2::float8 * 1000)::bigint)
RETURNING expires_at
"""
# A set with a lease reads it FOR SHARE: a keepalive (which updates the lease's row first,
# then its keys) waits for the set to commit, so that it moves the new key's expiry too; a
# revoke or an expiry waits likewise, then finds the key.
LOCK_LEASE = (
    f"SELECT expires_at FROM kv_leases WHERE id = $1 AND expires_at > {NOW.format('$2')} FOR SHARE"
)
# A keepalive: the lease's row, then (a statement of its own, so that it sees a set that
# committed while this one waited for the row) its keys' expiry. No revision, no change.
# A keepalive of leases ($1): those that are live, then their keys, a statement each.
RENEW_LEASES = f"""
UPDATE kv_leases SET expires_at = {NOW.format("$2")} + round(ttl * 1000)::bigint
 WHERE id = ANY($1::text[]) AND expires_at > {NOW.format("$2")} RETURNING id, ttl, expires_at
"""
RENEW_LEASES_KEYS = """
UPDATE kv SET expires_at = renewed.expires_at
  FROM unnest($1::text[], $2::bigint[]) AS renewed(id, expires_at)
 WHERE kv.lease = renewed.id
"""
LEASE_KEYS = f"""
SELECT l.ttl, l.expires_at, ARRAY(SELECT k.key FROM kv k WHERE k.lease = l.id ORDER BY k.key)
  FROM kv_leases l WHERE l.id = $1 AND l.expires_at > {NOW.format("$2")}
"""
KEYS_OF_LEASES = 'SELECT key FROM kv WHERE lease = ANY($1::text[]) ORDER BY key COLLATE "C"'
# A revoke takes the lease only while it is live; an expiry only once it has expired (and
# skips one that another server is expiring).
REVOKE_LEASE = (
    f"DELETE FROM kv_leases WHERE id = $1 AND expires_at > {NOW.format('$2')} RETURNING id"
)
EXPIRED_LEASES = f"""
SELECT id FROM kv_leases WHERE expires_at <= {NOW.format("$1")}
 ORDER BY expires_at, id COLLATE "C" LIMIT $2 FOR UPDATE SKIP LOCKED
"""
ANY_EXPIRED_LEASE = (
    f"SELECT EXISTS (SELECT 1 FROM kv_leases WHERE expires_at <= {NOW.format('$1')})"
)
LIVE_LEASES = f"SELECT count(*) FROM kv_leases WHERE expires_at > {NOW.format('$1')}"
# A lease's keys ($1), removed in revision $2 as changes of type $3; how many.
REMOVE_LEASE_KEYS = f"""
WITH dropped AS (DELETE FROM kv_leases WHERE id = $1),
gone AS (DELETE FROM kv WHERE lease = $1 RETURNING key),
recorded AS (INSERT INTO kv_changes (revision, key, type) SELECT $2, key, $3 FROM gone),
counted AS ({COUNT_KEYS.format("-(SELECT count(*) FROM gone)")})
SELECT count(*) FROM gone
"""
# --- access tokens: every write but a touch moves the generation in its transaction.
# A create that finds the name taken (or one committed meanwhile by another replica: ON
# CONFLICT waits for it) inserts nothing and answers no row.
CREATE_TOKEN = f"""
INSERT INTO kv_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (name) DO NOTHING RETURNING name
"""
TOKENS = f'SELECT {TOKEN_COLUMNS} FROM kv_tokens ORDER BY name COLLATE "C"'
# Either hash's index (a BitmapOr of the two), never a scan.
TOKEN_BY_HASH = (
    f"SELECT {TOKEN_COLUMNS} FROM kv_tokens WHERE secret_hash = $1 OR previous_hash = $1 LIMIT 1"
)
# The right-hand sides read the row as it was: the secret replaced becomes the previous one.
ROTATE_TOKEN = f"""
UPDATE kv_tokens SET previous_hash = CASE WHEN $3::bigint IS NULL THEN NULL ELSE secret_hash END,
       previous_until = $3::bigint, secret_hash = $2
 WHERE name = $1 RETURNING {TOKEN_COLUMNS}
"""
DELETE_TOKEN = "DELETE FROM kv_tokens WHERE name = $1 RETURNING name"
# Names no longer there match no row. GREATEST skips a NULL: a first use is recorded.
TOUCH_TOKENS = """
UPDATE kv_tokens t SET last_used_at = GREATEST(t.last_used_at, used.at)
  FROM unnest($1::text[], $2::bigint[]) AS used(name, at) WHERE t.name = used.name
"""
NEXT_TOKENS_GENERATION = (
    "UPDATE kv_meta SET value = (value::bigint + 1)::text WHERE name = 'tokens_generation'"
)
READ_REVISION = "SELECT value::bigint FROM kv_meta WHERE name = 'revision'"
# The changes above $1 under the prefix [$2, $3), as take_changes cuts them ($4 of them, fewer
# once their values pass $5 characters, then the rest of the last one's revision), whether any
# follow, the revision and compact revision they were read at, and the gaps that new lives
# skipped above $1 (see _CREATE_TIMELINES): one statement, so one snapshot, in which they are
# every change up to that revision.
_UNDER_PREFIX = "c.key >= $2 AND ($3::text IS NULL OR c.key < $3)"
CHANGES = f"""
WITH meta AS (
    SELECT max(value::bigint) FILTER (WHERE name = 'revision') AS revision,
           max(value::bigint) FILTER (WHERE name = 'compact_revision') AS compact_revision
      FROM kv_meta),
first AS (
    SELECT c.revision, c.key, c.type, c.val, c.expires_at FROM kv_changes c
     WHERE c.revision > $1 AND {_UNDER_PREFIX} ORDER BY c.revision, c.key LIMIT $4),
head AS (
    SELECT revision, key, type, val, expires_at FROM (
        SELECT *, sum(coalesce(length(val), 0)) OVER (ORDER BY revision
                  RANGE BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS earlier_chars
          FROM first) sized
     WHERE coalesce(earlier_chars, 0) <= $5),
cut AS (SELECT revision, key FROM head ORDER BY revision DESC, key DESC LIMIT 1),
tail AS (
    SELECT c.revision, c.key, c.type, c.val, c.expires_at FROM kv_changes c, cut
     WHERE c.revision = cut.revision AND c.key > cut.key AND {_UNDER_PREFIX}),
more AS (
    SELECT EXISTS (SELECT 1 FROM kv_changes c, cut
                    WHERE c.revision > cut.revision AND {_UNDER_PREFIX}) AS more),
gaps AS (
    SELECT array_agg(t.forked_at ORDER BY t.resumed_at) AS forked,
           array_agg(t.resumed_at ORDER BY t.resumed_at) AS resumed
      FROM kv_timelines t WHERE t.resumed_at > $1)
SELECT meta.revision, meta.compact_revision, more.more, gaps.forked, gaps.resumed,
       events.revision, events.type, events.key, events.val, events.expires_at
  FROM meta CROSS JOIN more CROSS JOIN gaps
  LEFT JOIN (SELECT * FROM head UNION ALL SELECT * FROM tail) events ON true
 ORDER BY events.revision, events.key
"""
LOCK_REVISION = "SELECT value FROM kv_meta WHERE name = 'revision' FOR UPDATE"
READ_META = "SELECT value FROM kv_meta WHERE name = $1"
WRITE_META = (
    "INSERT INTO kv_meta (name, value) VALUES ($1, $2)"
    " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
)
SEED_FINGERPRINT = "seed_fingerprint"
BULK_TABLE = "kv_bulk"
# The last row for each key: keys already stored are updated, the others inserted. Not one
# INSERT ... ON CONFLICT, whose speculative insertion costs more for a large load (see
# bench/results.md); no other write can come between, since the load holds the revision's
# lock (taken just before it).
APPLY_BULK = f"""
WITH latest AS (
    SELECT DISTINCT ON (key) key, val, expires_at FROM {BULK_TABLE} ORDER BY key, ordinal DESC),
updated AS (
    UPDATE kv SET val = latest.val, version = $1, expires_at = latest.expires_at, lease = NULL
      FROM latest WHERE kv.key = latest.key RETURNING kv.key)
INSERT INTO kv (key, val, version, expires_at)
SELECT key, val, $1, expires_at FROM latest WHERE key NOT IN (SELECT key FROM updated)
"""
# A replace: every key the load wrote has its revision ($1); the others under the prefix go.
REMOVE_OTHERS = (
    "DELETE FROM kv WHERE version <> $1 AND key >= $2 AND ($3::text IS NULL OR key < $3)"
)
# An export's rows: values up to this many characters come with their row; longer ones are
# read one at a time in the same snapshot, so that a page of EXPORT_FETCH rows holds at most
# about 16 MiB whatever the values are. A page is the live keys after the last one read ($2,
# with $5 false for the first page, which starts at the prefix itself), in the export's
# REPEATABLE READ snapshot: pages rather than a cursor, whose named statement a pooler in
# transaction mode could leave on a server connection that another client then uses.
_EXPORT_INLINE_CHARS = 16_384
EXPORT_PAGE = f"""
SELECT key, CASE WHEN length(val) <= {_EXPORT_INLINE_CHARS} THEN val END, expires_at FROM kv
 WHERE (expires_at IS NULL OR expires_at > $1) AND (key > $2 OR (NOT $5 AND key = $2))
   AND ($3::text IS NULL OR key < $3)
 ORDER BY key LIMIT $4
"""
EXPORT_VALUE = "SELECT val FROM kv WHERE key = $1"
# Rows per page of an export: several batches' worth.
EXPORT_FETCH = 1024
