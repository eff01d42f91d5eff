-- relayq.example.lua: settings and delivery policy of relayqd, in one file.
--
--   relayqd -c relayq.lua            run with it
--   relayqd --check -c relayq.lua    check it (every problem with its line)
--   relayq explain -c relayq.lua --code 550 --text "..."   see a decision
--
-- The file runs in a Lua 5.4 sandbox: no io, os (but os.time/clock/date),
-- require, debug, or loading of bytecode; no __gc finalizers; every handler
-- call has an instruction budget (C library work is charged too), a 1 s
-- time limit and the state a memory cap; once the file has run, the
-- libraries, `relayq` and the globals are read-only (keep state in locals). Unknown keys, wrong types and
-- out-of-range values are errors. Durations are seconds (a number) or
-- strings like "30s", "5m", "2h", "5d", "1h30m".
--
-- As shipped (and as scripts/run uses it) this file relays every message to
-- an SMTP server on 127.0.0.1:2525 (for example Postfix's
-- `smtp-sink -u $USER 127.0.0.1:2525 100`), so nothing leaves the machine.
-- Set RELAYQ_RELAY (or edit `relay`) to use a real smarthost, or remove
-- `relay` to deliver by MX.

relayq.config {
  -- Redis: "redis://[user:password@]host[:port][/db]" or
  -- "unix:/path/to/redis.sock[?db=N]". Default "redis://127.0.0.1:6379/0".
  -- scripts/run sets RELAYQ_REDIS. In a user or password, '@', '/', '?',
  -- '#', '%' (and ':' in a user) must be %-encoded (%40 %2F %3F %23 %25);
  -- a password in the URL works but --check warns: whoever reads this file
  -- reads it. Prefer one of the two keys below.
  redis = relayq.getenv("RELAYQ_REDIS", "redis://127.0.0.1:6379/0"),

  -- Redis password from a file (its first line; keep it mode 0600) or from
  -- an environment variable; at most one password source (URL or these).
  -- redis_user is the Redis ACL user (needs a password; not also in the URL).
  -- redis_password_file = "/etc/relayq/redis.pw",
  -- redis_password_env = "RELAYQ_REDIS_PASSWORD",
  -- redis_user = "relayq",

  -- Queue name, or a list of names: { "mail", "bulk" }. Default "default".
  queue = relayq.getenv("RELAYQ_QUEUE", "default"),

  -- Smarthost. "[host]:port" connects to host as is (no MX lookup);
  -- "host:port" or "host" looks up the MX of host first (like Postfix's
  -- relayhost). Port default 25. Leave out to deliver by MX.
  relay = relayq.getenv("RELAYQ_RELAY", "[127.0.0.1]:2525"),

  -- TLS: "opportunistic" (default: STARTTLS when offered, never fails on
  -- the certificate), "none", "required" (STARTTLS, certificate verified
  -- unless tls_verify = false), "implicit" (TLS from the first byte, 465).
  tls = "opportunistic",
  -- tls_ca_file = "/etc/ssl/certs/ca-certificates.crt",  -- default: system store
  -- tls_verify = true,

  -- SMTP AUTH to the smarthost: user plus exactly one of password_file (one
  -- line; keep it mode 0600), password_env (an environment variable) or
  -- password (discouraged: --check warns). AUTH is never sent over a
  -- connection without TLS unless allow_plaintext = true.
  -- auth = { user = "apikey", password_file = "/etc/relayq/relay.secret" },
  -- auth = { user = "apikey", password_env = "RELAYQ_RELAY_PASSWORD" },

  -- Name we give in EHLO. Default: the system host name.
  -- helo = "relay.example.org",

  connections = 100,               -- total SMTP connections (default 100)
  per_destination = 20,            -- per destination (default 20)
  messages_per_connection = 100,   -- then QUIT and reconnect (default 100)
  recipients_per_transaction = 100, -- RCPTs per MAIL (default 100)
  batch = 100,                     -- messages claimed per Redis round trip (default 100)
  lease = "5m",                    -- a claimed message returns after this if we die (default 5m)

  -- SMTP timeouts (defaults shown; RFC 5321 4.5.3.2). Each is the total
  -- time for the reply of its stage, however slowly its bytes come;
  -- data_block: each block of the message must leave within it. idle: how
  -- long an unused connection is kept for reuse (0 = close at once).
  timeouts = {
    connect = "30s", greeting = "5m", helo = "5m", mail = "5m", rcpt = "5m",
    data = "2m", data_block = "3m", dot = "10m", quit = "20s", idle = "10s",
  },

  log_format = "logfmt",           -- logfmt | json (default logfmt)
  log_level = "info",              -- debug | info | warn | error | off
  events_cap = 100000,             -- entries kept in the events stream (default 100000)
  bounce = false,                  -- send DSNs to the sender on failure (default false)
  chunking = true,                 -- BDAT (RFC 3030) to servers offering CHUNKING; false: DATA (default true)
  -- metrics = "127.0.0.1:9465",   -- Prometheus /metrics (default: off)
}

-- Retry delays: first * factor^(attempt-1), capped at max, then +/- jitter
-- (a fraction). Defaults: first 5m, factor 2, max 4h, jitter 0.15.
relayq.backoff { first = "5m", factor = 2, max = "4h", jitter = 0.15 }

-- A message still failing temporarily after max_age (default 5d) or after
-- max_attempts attempts (default: no limit) fails with its last reply.
relayq.expire { max_age = "5d" }

-- Policy overrides. relayq.on(selector, function(r, msg) ... end), most
-- specific first: enhanced code "5.7.26", reply code 550, class "4xx" /
-- "5xx", transport event "timeout" / "refused" / "lost" / "tls" / "dns" /
-- "protocol", and "*". 2xx replies and "too many recipients" never reach Lua.
--
-- r   = { code, enhanced, text, stage, event, recipient, host, domain,
--         attempt, age }
-- msg = { id, from, to = { ... }, attempts, created, meta = { ... } }
--
-- Return relayq.retry { after = "10m" }, relayq.fail { reason = "..." },
-- relayq.drop(), relayq.hold(), relayq.suspend { after = "30m" } (the whole
-- destination), or nil for the built-in decision. A handler that fails,
-- runs too long or uses too much memory gets the built-in decision (the
-- error is logged once and counted). `relayq explain` shows which rule
-- decides.

-- Some servers greylist with a 5xx: retry those instead of bouncing.
relayq.on(550, function(r, msg)
  local t = r.text:lower()
  if t:find("greylist", 1, true) or t:find("try again later", 1, true) then
    return relayq.retry { after = "10m" }
  end
  -- nil: the built-in decision (550 fails)
end)

-- Mailbox full (RFC 3463 5.2.2) is often temporary.
relayq.on("5.2.2", function(r, msg)
  if r.age < 86400 then return relayq.retry { after = "2h" } end
end)

-- relayq.on("timeout", function(r) return relayq.retry { after = "15m" } end)
-- relayq.on("5.7.26", function(r) return relayq.fail { reason = "DMARC: fix SPF/DKIM of the sender domain" } end)

-- Per-domain settings: per_destination, messages_per_connection,
-- recipients_per_transaction, backoff = {...}, expire = {...}, and rules
-- of their own in `on` (at each level a domain rule comes before the
-- global one).
relayq.on_domain("yahoo.com", {
  per_destination = 5,
  on = {
    [421] = function(r) return relayq.retry { after = "30m" } end,
  },
})

-- An SMTP listener: applications that speak SMTP hand mail to relayqd
-- (one relayq.listen call per address). A message is answered "250 ...
-- queued as <id>" only once Redis has stored it; anything else at the
-- final dot is a 451 and the application keeps the message.
--
-- relayq.listen {
--   "127.0.0.1:2525",                      -- "IPv4:port" or "[IPv6]:port"
--   trusted = { "127.0.0.0/8", "::1/128" }, -- may send without AUTH
--   queue = "default",                     -- default: the first queue above
--   tls_cert = "/etc/relayq/smtp.pem",     -- offers STARTTLS (reloaded on SIGHUP)
--   tls_key = "/etc/relayq/smtp.key",
--   implicit_tls = false,                  -- true: TLS from the first byte (465)
--   auth_file = "/etc/relayq/users",       -- AUTH PLAIN / LOGIN; `relayq passwd`
--   auth_allow_plaintext = false,          -- AUTH only after STARTTLS
--   max_size = "25M",                      -- bytes, or K / M / G
--   max_recipients = 1000,
--   max_connections = 1000,                -- in total
--   max_per_ip = 50,                       -- per client address
--   max_commands = 10000,                  -- per session
--   max_bad_commands = 20,                 -- errors before 421 and close
--   auth_threads = 2,                      -- threads checking AUTH passwords (off the loop)
--   auth_queue = 64,                       -- checks waiting or running; past it: 454 4.7.0
--   hostname = "relay.example.com",        -- default: helo
--   add_message_id = true,                 -- when the message has none
--   add_date = true,
--   meta = { source = "smtp-intake" },     -- added to every message's meta
--   timeout = "5m",                        -- per command
--   data_timeout = "3m",                   -- per DATA block
--   redis_timeout = "30s",                 -- final dot to Redis' answer
-- }
