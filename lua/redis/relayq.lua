#!lua name=relayq
-- relayq: the Redis Functions library of the relayq mail queue.
--
-- The contract (keys, functions, arguments, replies, errors) is
-- lua/redis/README.md; keep the two in step and bump VERSION on any change.
--
-- Every function checks all of its input (and reads what it needs) before
-- its first write, so an error reply means nothing was written. Errors are
-- raised with fail() and turned into "ERR relayq: <sentence>" by wrap().

local VERSION = 4

-- redis.call is not reachable while the library loads, only when a function runs.
local function call(...)
	return redis.call(...)
end

local DEFAULTS = {
	max_recipients = 1000,
	max_message_size = 26214400,
	idempotency_window = 86400,
	events_cap = 100000,
}
local CONFIG_FIELDS = {'max_recipients', 'max_message_size', 'idempotency_window', 'events_cap'}
local COUNTERS = {'enqueued', 'delivered', 'deferred', 'failed', 'expired', 'dropped',
	'holds', 'requeued', 'deleted', 'recovered'}

local MAX_BATCH = 10000        -- claim count, settle outcomes, renew pairs
local MAX_LEASE_MS = 604800000 -- 7 days
local MAX_DELAY_S = 315360000  -- 10 years
local MAX_META = 65536         -- octets of meta JSON
local MAX_META_DEPTH = 32      -- levels of meta (RQ_JSON_META_MAX_DEPTH, json.h)
local MAX_KEY = 256            -- octets of an idempotency key
local MAX_TEXT = 4096          -- reply text kept per recipient (longer is cut)
local MAX_LIST = 1000          -- relayq_list count
local PROMOTE_MIN = 100        -- claim moves up to max(count, this) due / expired ids
local RECOVER_MAX = 10000      -- relayq_recover moves at most this many per call
local CHUNK = 1000             -- arguments per variadic command (Lua stack limit)
local SEQ_MOD = 60466176       -- 36^5: the sequence part of an id

-- Errors -------------------------------------------------------------------

local function fail(msg)
	error({relayq = msg}, 0)
end

-- Makes untrusted text safe and short for an error sentence.
local function clean(s)
	s = tostring(s)
	if #s > 80 then
		s = s:sub(1, 80) .. '...'
	end
	return (s:gsub('[%z\1-\31\127]', '?'))
end

local function wrap(fn)
	return function(keys, args)
		local ok, res = pcall(fn, keys, args)
		if ok then
			return res
		end
		if type(res) == 'table' and res.relayq then
			return redis.error_reply('ERR relayq: ' .. res.relayq)
		end
		error(res, 0)
	end
end

-- Helpers ------------------------------------------------------------------

local function istr(n)
	return string.format('%d', n)
end

local function now_ms()
	local t = call('TIME')
	return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local B36 = '0123456789abcdefghijklmnopqrstuvwxyz'

local function b36(n, width)
	local out = {}
	for i = width, 1, -1 do
		local d = n % 36
		out[i] = B36:sub(d + 1, d + 1)
		n = math.floor(n / 36)
	end
	return table.concat(out)
end

-- Queue names: the rule of rq_keys_queue_valid (include/relayq/keys.h),
-- which the CLI, the config and the daemon apply: 1 to QUEUE_MAX bytes of
-- A-Z a-z 0-9 _ . : - (tests/component/test_functions.c checks that both
-- agree on one table of names). A name nothing else can serve is refused
-- here too, by every function, before anything is read or written.
local QUEUE_MAX = 64
local QUEUE_RULE = '1-64 of A-Z a-z 0-9 _ . : -'

local function prefix(keys)
	if #keys ~= 1 then
		fail('expected exactly one key, the queue prefix relayq:{<queue>}')
	end
	local p = keys[1]
	local q = p:match('^relayq:{(.*)}$')
	if not q then
		fail('invalid queue key ' .. clean(p) .. ': expected relayq:{<queue>}')
	end
	if #q == 0 or #q > QUEUE_MAX or q:find('[^A-Za-z0-9_.:%-]') then
		fail("invalid queue name '" .. clean(q) .. "': expected " .. QUEUE_RULE)
	end
	return p
end

local function int_arg(s, name, min, max)
	if type(s) ~= 'string' or #s > 16 or not s:find('^%-?%d+$') then
		fail(name .. ' must be an integer')
	end
	local n = tonumber(s)
	if n < min or n > max then
		fail(string.format('%s must be between %d and %d', name, min, max))
	end
	return n
end

-- A table from cjson is an array when its keys are exactly 1..n (an empty
-- table is both an empty array and an empty object).
local function is_array(t)
	local n = 0
	for k in pairs(t) do
		if type(k) ~= 'number' then
			return false
		end
		n = n + 1
	end
	for i = 1, n do
		if t[i] == nil then
			return false
		end
	end
	return true
end

local function is_object(t)
	return type(t) == 'table' and (next(t) == nil or not is_array(t))
end

local function is_int(v)
	return type(v) == 'number' and v == math.floor(v) and v > -1e15 and v < 1e15
end

-- True when table t, itself level 1, holds tables nested deeper than max
-- levels in all. Stops at the first branch past max.
local function deeper_than(t, max)
	if max < 1 then return true end
	for _, v in pairs(t) do
		if type(v) == 'table' and deeper_than(v, max - 1) then return true end
	end
	return false
end

-- JSON array of strings (cjson would encode an empty one as {}).
local function json_strs(list)
	local parts = {}
	for i, s in ipairs(list) do
		parts[i] = cjson.encode(s)
	end
	return '[' .. table.concat(parts, ',') .. ']'
end

-- Decodes stored JSON; nil when it is not a JSON array / object.
local function try_json(v)
	if not v then return nil end
	local ok, t = pcall(cjson.decode, v)
	if ok and type(t) == 'table' then return t end
	return nil
end

-- Stored JSON text as is when it parses, else as a JSON string.
local function raw_json(v)
	if try_json(v) then return v end
	return cjson.encode(v)
end

-- Runs cmd key a1 a2 ... in chunks of CHUNK arguments (Lua's unpack has a
-- stack limit). list holds whole elements: CHUNK is even, so score/member
-- or field/value pairs are never split.
local function chunked(cmd, key, list)
	local n = #list
	local i = 1
	while i <= n do
		local j = math.min(i + CHUNK - 1, n)
		call(cmd, key, unpack(list, i, j))
		i = j + 1
	end
end

local function zadd_pairs(key, pairs_list)
	chunked('ZADD', key, pairs_list)
end

local function config(P)
	local v = call('HMGET', P .. ':config', unpack(CONFIG_FIELDS))
	local c = {}
	for i, f in ipairs(CONFIG_FIELDS) do
		c[f] = tonumber(v[i]) or DEFAULTS[f]
	end
	return c
end

local function events_cap(P)
	return tonumber(call('HGET', P .. ':config', 'events_cap')) or DEFAULTS.events_cap
end

local function event(P, cap, typ, id, rcpt, code, enh, text, stage, attempt, nxt, meta)
	call('XADD', P .. ':events', 'MAXLEN', '~', cap, '*',
		'type', typ, 'id', id, 'rcpt', rcpt, 'code', code, 'enh', enh,
		'text', text, 'stage', stage, 'attempt', attempt, 'next', nxt, 'meta', meta)
end

local function wake(P)
	call('PUBLISH', P .. ':wake', '1')
end

-- A hash as a Lua table; second result: whether it exists.
local function read_hash(key)
	local flat = call('HGETALL', key)
	local h = {}
	for i = 1, #flat, 2 do
		h[flat[i]] = flat[i + 1]
	end
	return h, #flat > 0
end

-- Removes id from the structure of its state.
local function unlink(P, id, state)
	if state == 'ready' then
		call('LREM', P .. ':ready', 0, id)
	elseif state == 'scheduled' or state == 'inflight' or state == 'dead' or state == 'held' then
		call('ZREM', P .. ':' .. state, id)
	end
end

-- Addresses -----------------------------------------------------------------

-- The rules are those of rq_addr_valid (engine/message.c), which the daemon
-- applies before it sends an address: whatever passes here passes there and
-- the other way round (tests/integration/test_functions.c checks both on one
-- table of addresses). Only the error texts differ.

-- Unquoted local part: RFC 5322 atext (and bytes >= 0x80 for SMTPUTF8)
-- with single dots between atoms.
local ATEXT_BAD = "[^A-Za-z0-9!#$%%&'*+/=?^_`{|}~%-.\128-\255]"
-- Domain: labels of letters, digits, '-', '_' and bytes >= 0x80, and dots.
local DOMAIN_BAD = '[^A-Za-z0-9_.%-\128-\255]'
-- Address literal content: printable ASCII except [ ] \ (RFC 5321 dcontent).
local LITERAL_BAD = '[^!-Z^-~]'

local function check_local(lp)
	if lp:sub(1, 1) == '"' then
		return nil -- checked while splitting
	end
	if lp:find('@', 1, true) then return 'more than one @' end
	if lp:find(' ', 1, true) then return 'space outside quotes' end
	if lp:find('[<>]') then return 'angle bracket outside quotes' end
	local c = lp:match(ATEXT_BAD)
	if c then
		return "character '" .. c .. "' not allowed in an unquoted local part"
	end
	if lp:sub(1, 1) == '.' then return 'local part starts with a dot' end
	if lp:sub(-1) == '.' then return 'local part ends with a dot' end
	if lp:find('..', 1, true) then return 'two dots in a row in the local part' end
	return nil
end

local function check_domain(dom)
	if dom:sub(1, 1) == '[' then
		if #dom < 3 or dom:sub(-1) ~= ']' then return 'malformed address literal' end
		if dom:sub(2, -2):find(LITERAL_BAD) then
			return 'character not allowed in an address literal'
		end
		return nil
	end
	if dom:find(' ', 1, true) then return 'space outside quotes' end
	if dom:find('[<>]') then return 'angle bracket outside quotes' end
	local c = dom:match(DOMAIN_BAD)
	if c then
		return "character '" .. c .. "' not allowed in the domain"
	end
	if dom:sub(-1) == '.' then return 'domain ends with a dot' end
	for label in (dom .. '.'):gmatch('([^.]*)%.') do
		if label == '' then return 'empty label in the domain' end
		if #label > 63 then return 'domain label over 63 octets' end
	end
	return nil
end

-- Returns nil and the local part and domain when the address is acceptable,
-- else the reason.
local function check_addr(a)
	if a:find('[%z\1-\31\127]') then
		if a:find('\r', 1, true) then return 'contains CR' end
		if a:find('\n', 1, true) then return 'contains LF' end
		if a:find('%z') then return 'contains NUL' end
		return 'contains a control character'
	end
	local n = #a
	local lp, dom
	if a:sub(1, 1) == '"' then
		local i = 2
		while true do
			if i > n then return 'unterminated quoted local part' end
			local c = a:sub(i, i)
			if c == '\\' then
				i = i + 2
			elseif c == '"' then
				break
			else
				i = i + 1
			end
		end
		if a:sub(i + 1, i + 1) ~= '@' then
			if i >= n then return 'missing @' end
			return 'quoted local part not followed by @'
		end
		lp = a:sub(1, i)
		dom = a:sub(i + 2)
		if dom:find('@', 1, true) then return 'more than one @' end
	else
		local at = a:match('^.*()@')
		if not at then
			if a:find(' ', 1, true) then return 'space outside quotes' end
			return 'missing @'
		end
		lp = a:sub(1, at - 1)
		dom = a:sub(at + 1)
	end
	if lp == '' then return 'empty local part' end
	if dom == '' then return 'empty domain' end
	if #lp > 64 then return 'local part over 64 octets' end
	if #dom > 255 then return 'domain over 255 octets' end
	if n > 254 then return 'address over 254 octets' end
	local why = check_local(lp) or check_domain(dom)
	if why then return why end
	return nil, lp, dom
end

-- relayq_enqueue -------------------------------------------------------------

local ENV_FIELDS = {from = true, to = true, delay = true, key = true, meta = true}

local function enqueue(keys, args)
	local P = prefix(keys)
	if #args ~= 2 then
		fail('relayq_enqueue takes 2 arguments: the envelope JSON and the message')
	end
	local envtext, body = args[1], args[2]
	local ok, env = pcall(cjson.decode, envtext)
	if not ok then
		fail('envelope is not valid JSON')
	end
	if type(env) ~= 'table' or not envtext:find('^%s*{') then
		fail('envelope is not a JSON object')
	end
	for k in pairs(env) do
		if not ENV_FIELDS[k] then
			fail('unknown field in envelope: ' .. clean(k))
		end
	end
	local from, to = env.from, env.to
	if from == nil then fail('from is required') end
	if type(from) ~= 'string' then fail('from must be a string') end
	if to == nil then fail('to is required') end
	if type(to) ~= 'table' or not is_array(to) then fail('to must be an array of strings') end
	if #to == 0 then fail('to is empty') end
	local delay = env.delay
	if delay ~= nil and (type(delay) ~= 'number' or not (delay >= 0 and delay <= MAX_DELAY_S)) then
		fail('delay must be a number of seconds from 0 to ' .. MAX_DELAY_S)
	end
	local key = env.key
	if key ~= nil and (type(key) ~= 'string' or #key == 0 or #key > MAX_KEY) then
		fail('key must be a string of 1 to ' .. MAX_KEY .. ' octets')
	end
	local metatext
	if env.meta ~= nil then
		if not is_object(env.meta) then fail('meta must be a JSON object') end
		if deeper_than(env.meta, MAX_META_DEPTH) then
			fail('meta is nested deeper than ' .. MAX_META_DEPTH .. ' levels')
		end
		local eok, enc = pcall(cjson.encode, env.meta)
		if not eok then
			-- e.g. 1e400 decodes to inf, which JSON cannot hold.
			fail('meta cannot be encoded: ' .. clean((tostring(enc):gsub('^[^:]*:%d+: ', ''))))
		end
		metatext = enc
		if #metatext > MAX_META then fail('meta is over ' .. MAX_META .. ' octets') end
	end
	local cfg = config(P)
	if #to > cfg.max_recipients then
		fail(string.format('too many recipients: %d, max_recipients is %d', #to, cfg.max_recipients))
	end
	if from ~= '' then
		local why = check_addr(from)
		if why then fail('invalid address in from: ' .. why) end
	end
	local seen = {}
	for i = 1, #to do
		local a = to[i]
		if type(a) ~= 'string' then
			fail(string.format('to[%d] must be a string', i - 1))
		end
		local why, lp, dom = check_addr(a)
		if why then
			fail(string.format('invalid address in to[%d]: %s', i - 1, why))
		end
		-- Domains are case-insensitive, local parts are not (RFC 5321 2.4).
		local norm = lp .. '@' .. dom:lower()
		if seen[norm] then
			fail(string.format('duplicate recipient in to[%d]', i - 1))
		end
		seen[norm] = true
	end
	if #body == 0 then fail('message is empty') end
	if #body > cfg.max_message_size then
		fail(string.format('message is %d octets, over max_message_size %d', #body, cfg.max_message_size))
	end

	local idem
	if key then
		idem = P .. ':idem:' .. key
		local existing = call('GET', idem)
		if existing then
			return existing
		end
	end

	-- Writes from here on.
	local now = now_ms()
	local seq = call('INCR', P .. ':seq')
	local id = b36(now, 9) .. b36(seq % SEQ_MOD, 5)
	local state, nxt = 'ready', now
	if delay and delay > 0 then
		state = 'scheduled'
		nxt = now + math.floor(delay * 1000 + 0.5)
	end
	local f = {'HSET', P .. ':msg:' .. id, 'from', from, 'to', json_strs(to), 'body', body,
		'created', istr(now), 'attempts', '0', 'state', state, 'next', istr(nxt), 'lease', '0'}
	if metatext then
		f[#f + 1] = 'meta'
		f[#f + 1] = metatext
	end
	if key then
		f[#f + 1] = 'key'
		f[#f + 1] = key
	end
	call(unpack(f))
	if state == 'ready' then
		if call('LPUSH', P .. ':ready', id) == 1 then
			wake(P)
		end
	else
		call('ZADD', P .. ':scheduled', nxt, id)
		local first = call('ZRANGE', P .. ':scheduled', 0, 0)
		if first[1] == id then
			wake(P)
		end
	end
	call('HINCRBY', P .. ':stats', 'enqueued', 1)
	if idem then
		call('SET', idem, id, 'EX', cfg.idempotency_window)
	end
	return id
end

-- relayq_claim / relayq_recover ---------------------------------------------

-- Moves up to limit expired leases back to the front of ready.
local function move_expired(P, now, limit)
	local ids = call('ZRANGEBYSCORE', P .. ':inflight', '-inf', now, 'LIMIT', 0, limit)
	local n = #ids
	if n == 0 then
		return 0
	end
	chunked('ZREM', P .. ':inflight', ids)
	for _, id in ipairs(ids) do
		call('HSET', P .. ':msg:' .. id, 'state', 'ready')
	end
	-- RPUSH puts them where RPOP takes first; reversed so the earliest
	-- expired is claimed first.
	local rev = {}
	for i = n, 1, -1 do
		rev[#rev + 1] = ids[i]
	end
	chunked('RPUSH', P .. ':ready', rev)
	call('HINCRBY', P .. ':stats', 'recovered', n)
	return n
end

-- Moves up to limit due ids from scheduled to the back of ready.
local function promote(P, now, limit)
	local ids = call('ZRANGEBYSCORE', P .. ':scheduled', '-inf', now, 'LIMIT', 0, limit)
	if #ids == 0 then
		return 0
	end
	chunked('ZREM', P .. ':scheduled', ids)
	for _, id in ipairs(ids) do
		call('HSET', P .. ':msg:' .. id, 'state', 'ready')
	end
	chunked('LPUSH', P .. ':ready', ids)
	return #ids
end

local function claim(keys, args)
	local P = prefix(keys)
	if #args ~= 2 then
		fail('relayq_claim takes 2 arguments: count and lease-ms')
	end
	local count = int_arg(args[1], 'count', 1, MAX_BATCH)
	local lease_ms = int_arg(args[2], 'lease-ms', 1, MAX_LEASE_MS)
	local now = now_ms()
	local limit = math.max(count, PROMOTE_MIN)
	move_expired(P, now, limit)
	promote(P, now, limit)
	local first = call('ZRANGE', P .. ':scheduled', 0, 0, 'WITHSCORES')
	local next_due = -1
	if first[1] then
		next_due = tonumber(first[2])
	end
	local ids = call('RPOP', P .. ':ready', count)
	if not ids then
		ids = {}
	end
	local msgs, zadd = {}, {}
	local expiry = now + lease_ms
	for _, id in ipairs(ids) do
		local mk = P .. ':msg:' .. id
		local m = call('HMGET', mk, 'state', 'from', 'to', 'pending', 'body', 'attempts',
			'created', 'meta', 'lease')
		-- An id whose hash is gone or in another state is stale: dropped
		-- (a hash without `to` was made by a stray write: removed).
		if m[1] == 'ready' and not m[3] then
			call('DEL', mk)
		elseif m[1] == 'ready' then
			local ok, rcpts = pcall(cjson.decode, m[4] or m[3])
			if ok and type(rcpts) == 'table' then
				local lease = (tonumber(m[9]) or 0) + 1
				call('HSET', mk, 'state', 'inflight', 'lease', istr(lease))
				zadd[#zadd + 1] = expiry
				zadd[#zadd + 1] = id
				msgs[#msgs + 1] = {id, m[2] or '', rcpts, m[5] or '',
					tonumber(m[6]) or 0, tonumber(m[7]) or 0, m[8] or '{}', lease}
			else
				-- Unreadable recipients (a stray write): parked for an operator.
				call('HSET', mk, 'state', 'held', 'last_text', 'relayq: unreadable recipients')
				call('ZADD', P .. ':held', now, id)
			end
		end
	end
	zadd_pairs(P .. ':inflight', zadd)
	return {now, next_due, msgs}
end

local function recover(keys, args)
	local P = prefix(keys)
	if #args ~= 0 then
		fail('relayq_recover takes no arguments')
	end
	local n = move_expired(P, now_ms(), RECOVER_MAX)
	if n > 0 then
		wake(P)
	end
	return n
end

-- relayq_settle --------------------------------------------------------------

local STATUSES = {delivered = true, deferred = true, failed = true, dropped = true, expired = true}
local OUT_FIELDS = {id = true, lease = true, attempt = true, next = true, hold = true, rcpts = true}
local RCPT_FIELDS = {to = true, s = true, code = true, enh = true, text = true, stage = true, hint = true}

local RCPT_STR_FIELDS = {'enh', 'text', 'stage', 'hint'}

local function check_rcpt(r, where)
	if not is_object(r) then fail(where .. ' must be an object') end
	for k in pairs(r) do
		if not RCPT_FIELDS[k] then fail(where .. ' has an unknown field: ' .. clean(k)) end
	end
	if type(r.to) ~= 'string' then fail(where .. '.to must be a string') end
	if type(r.s) ~= 'string' or not STATUSES[r.s] then
		fail(where .. '.s must be delivered, deferred, failed, dropped or expired')
	end
	if r.code ~= nil and not (is_int(r.code) and r.code >= 0 and r.code <= 999) then
		fail(where .. '.code must be an integer from 0 to 999')
	end
	for _, f in ipairs(RCPT_STR_FIELDS) do
		if r[f] ~= nil and type(r[f]) ~= 'string' then
			fail(where .. '.' .. f .. ' must be a string')
		end
	end
	if r.text and #r.text > MAX_TEXT then
		r.text = r.text:sub(1, MAX_TEXT)
	end
end

-- Checks one outcome (raising fail() when it is invalid) and reads its
-- message. Returns false when the lease is not held (lost), else the plan
-- for the message. ids_seen: ids named by the earlier outcomes of the batch.
local function check_outcome(P, o, where, ids_seen)
	if not is_object(o) then fail(where .. ' must be an object') end
	if type(o.id) == 'string' and o.id ~= '' then
		if ids_seen[o.id] then fail(where .. ': id ' .. clean(o.id) .. ' appears twice') end
		ids_seen[o.id] = true
	end
	for k in pairs(o) do
		if not OUT_FIELDS[k] then fail(where .. ' has an unknown field: ' .. clean(k)) end
	end
	if type(o.id) ~= 'string' or o.id == '' then fail(where .. '.id must be a non-empty string') end
	if not is_int(o.lease) then fail(where .. '.lease must be an integer') end
	local attempt = o.attempt
	if attempt == nil then attempt = true end
	if type(attempt) ~= 'boolean' then fail(where .. '.attempt must be true or false') end
	local hold = o.hold
	if hold == nil then hold = false end
	if type(hold) ~= 'boolean' then fail(where .. '.hold must be true or false') end
	if o.next ~= nil and not (is_int(o.next) and o.next >= 0) then
		fail(where .. '.next must be a time in ms')
	end
	local rcpts = o.rcpts
	if rcpts == nil then rcpts = {} end
	if type(rcpts) ~= 'table' or not is_array(rcpts) then fail(where .. '.rcpts must be an array') end
	for j, r in ipairs(rcpts) do
		check_rcpt(r, string.format('%s.rcpts[%d]', where, j - 1))
	end
	local m = call('HMGET', P .. ':msg:' .. o.id, 'state', 'lease', 'to', 'pending',
		'attempts', 'failed', 'meta')
	local pok, pending = false, nil
	if m[1] == 'inflight' and tonumber(m[2]) == o.lease then
		pok, pending = pcall(cjson.decode, m[4] or m[3])
		pok = pok and type(pending) == 'table'
	end
	if not pok then
		-- Not held with this lease (or unreadable: its lease will
		-- expire and claim parks it).
		return false
	end
	local pset = {}
	for _, r in ipairs(pending) do pset[r] = true end
	local final, listed = {}, {}
	for j, r in ipairs(rcpts) do
		if not pset[r.to] then
			fail(string.format('%s.rcpts[%d]: %s is not a pending recipient of %s',
				where, j - 1, clean(r.to), clean(o.id)))
		end
		if listed[r.to] then
			fail(string.format('%s.rcpts[%d]: %s is listed twice', where, j - 1, clean(r.to)))
		end
		listed[r.to] = true
		if r.s ~= 'deferred' then final[r.to] = true end
	end
	local remaining = {}
	for _, r in ipairs(pending) do
		if not final[r] then remaining[#remaining + 1] = r end
	end
	if #remaining > 0 and not hold and o.next == nil then
		fail(where .. '.next is required while recipients remain')
	end
	return {o = o, m = m, rcpts = rcpts, remaining = remaining, attempt = attempt, hold = hold}
end

local function settle(keys, args)
	local P = prefix(keys)
	if #args ~= 1 then
		fail('relayq_settle takes 1 argument: the outcomes JSON array')
	end
	local ok, outs = pcall(cjson.decode, args[1])
	if not ok then fail('outcomes are not valid JSON') end
	if type(outs) ~= 'table' or not is_array(outs) or not args[1]:find('^%s*%[') then
		fail('outcomes must be a JSON array')
	end
	if #outs > MAX_BATCH then fail('more than ' .. MAX_BATCH .. ' outcomes') end

	-- Check every outcome and read every message before the first write.
	-- An invalid outcome only costs its own message: nothing is written
	-- for it (its lease expires and it is delivered again), the others
	-- are applied.
	local plan, ids_seen = {}, {}
	local ninvalid, first_invalid = 0, nil
	for i, o in ipairs(outs) do
		local where = string.format('outcomes[%d]', i - 1)
		local cok, p = pcall(check_outcome, P, o, where, ids_seen)
		if cok then
			plan[i] = p
		elseif type(p) == 'table' and p.relayq then
			plan[i] = 'invalid'
			ninvalid = ninvalid + 1
			first_invalid = first_invalid or p.relayq
		else
			error(p, 0)
		end
	end
	if ninvalid > 0 then
		-- One line per call, however many: the reason of the first.
		redis.log(redis.LOG_WARNING, string.format('relayq: settle on %s: %d invalid outcome(s), first: %s',
			clean(P), ninvalid, first_invalid))
	end

	-- Apply.
	local now = now_ms()
	local cap = events_cap(P)
	local counts, res, unlease = {}, {}, {}
	for i, p in ipairs(plan) do
		if p == 'invalid' then
			res[i] = 'invalid'
		elseif not p then
			res[i] = 'lost'
		else
			local id, m = p.o.id, p.m
			local mk, rk = P .. ':msg:' .. id, P .. ':rcpt:' .. id
			local attempts = (tonumber(m[5]) or 0) + (p.attempt and 1 or 0)
			local nfailed = tonumber(m[6]) or 0
			local meta = m[7] or '{}'
			local outcome
			for _, r in ipairs(p.rcpts) do
				if r.s == 'failed' or r.s == 'expired' then nfailed = nfailed + 1 end
			end
			if #p.remaining > 0 then
				outcome = p.hold and 'held' or 'scheduled'
			else
				outcome = nfailed > 0 and 'dead' or 'gone'
			end
			local nxt = outcome == 'scheduled' and istr(p.o.next) or ''
			local sattempts = istr(attempts)
			local last
			local rset = {}
			local keep = outcome ~= 'gone'  -- P:rcpt is written only for messages that stay
			for _, r in ipairs(p.rcpts) do
				counts[r.s] = (counts[r.s] or 0) + 1
				local code = r.code and istr(r.code) or ''
				event(P, cap, r.s, id, r.to, code, r.enh or '', r.text or '', r.stage or '',
					sattempts, r.s == 'deferred' and nxt or '', meta)
				if r.s ~= 'delivered' then last = r end
				if keep then
					rset[#rset + 1] = r.to
					rset[#rset + 1] = cjson.encode({s = r.s, code = r.code, enh = r.enh,
						text = r.text, stage = r.stage, hint = r.hint, at = now})
				end
			end
			unlease[#unlease + 1] = id
			if outcome == 'gone' then
				call('DEL', mk, rk)
				res[i] = 'done'
			else
				if #rset > 0 then
					chunked('HSET', rk, rset)
				end
				local f = {'HSET', mk, 'state', outcome, 'attempts', sattempts,
					'failed', istr(nfailed), 'pending', json_strs(p.remaining)}
				if outcome == 'scheduled' then
					f[#f + 1] = 'next'
					f[#f + 1] = nxt
				end
				if last then
					f[#f + 1] = 'last_code'
					f[#f + 1] = last.code and istr(last.code) or ''
					f[#f + 1] = 'last_enhanced'
					f[#f + 1] = last.enh or ''
					f[#f + 1] = 'last_text'
					f[#f + 1] = last.text or ''
					f[#f + 1] = 'last_stage'
					f[#f + 1] = last.stage or ''
				end
				call(unpack(f))
				if outcome == 'scheduled' then
					call('ZADD', P .. ':scheduled', p.o.next, id)
					res[i] = 'scheduled'
				elseif outcome == 'held' then
					call('ZADD', P .. ':held', now, id)
					counts.holds = (counts.holds or 0) + 1
					event(P, cap, 'held', id, '', '', '', '', '', sattempts, '', meta)
					res[i] = 'held'
				else
					call('ZADD', P .. ':dead', now, id)
					res[i] = 'done'
				end
			end
		end
	end
	if #unlease > 0 then
		chunked('ZREM', P .. ':inflight', unlease)
	end
	for name, n in pairs(counts) do
		call('HINCRBY', P .. ':stats', name, n)
	end
	return res
end

-- relayq_renew ---------------------------------------------------------------

local function renew(keys, args)
	local P = prefix(keys)
	if #args < 1 or #args % 2 ~= 1 then
		fail('relayq_renew takes lease-ms then pairs of id and lease')
	end
	local lease_ms = int_arg(args[1], 'lease-ms', 1, MAX_LEASE_MS)
	if (#args - 1) / 2 > MAX_BATCH then fail('more than ' .. MAX_BATCH .. ' leases') end
	local leases = {}
	for i = 2, #args, 2 do
		leases[#leases + 1] = {args[i], int_arg(args[i + 1], 'lease', 0, 1e15)}
	end
	local expiry = now_ms() + lease_ms
	local zadd = {}
	for _, l in ipairs(leases) do
		local m = call('HMGET', P .. ':msg:' .. l[1], 'state', 'lease')
		if m[1] == 'inflight' and tonumber(m[2]) == l[2] then
			zadd[#zadd + 1] = expiry
			zadd[#zadd + 1] = l[1]
		end
	end
	zadd_pairs(P .. ':inflight', zadd)
	return #zadd / 2
end

-- Operator functions ------------------------------------------------------------

local function need_ids(args, name)
	if #args < 1 then
		fail(name .. ' needs at least one id')
	end
end

local function hold(keys, args)
	local P = prefix(keys)
	need_ids(args, 'relayq_hold')
	local states = {}
	for i, id in ipairs(args) do
		local st = call('HMGET', P .. ':msg:' .. id, 'state', 'attempts', 'meta')
		if not st[1] then
			fail('unknown id: ' .. clean(id))
		end
		states[i] = st
	end
	local now = now_ms()
	local cap = events_cap(P)
	local n, done = 0, {}
	for i, id in ipairs(args) do
		local st = states[i]
		local state = st[1]
		if not done[id] and (state == 'ready' or state == 'scheduled' or state == 'inflight') then
			done[id] = true
			unlink(P, id, state)
			local mk = P .. ':msg:' .. id
			call('HSET', mk, 'state', 'held')
			if state == 'inflight' then
				call('HINCRBY', mk, 'lease', 1)
			end
			call('ZADD', P .. ':held', now, id)
			event(P, cap, 'held', id, '', '', '', '', '', st[2] or '0', '', st[3] or '{}')
			n = n + 1
		end
	end
	if n > 0 then
		call('HINCRBY', P .. ':stats', 'holds', n)
	end
	return n
end

-- Moves the ids whose state is `from` to the back of ready (next = now).
local function to_ready(P, ids, from, extra)
	local now = now_ms()
	local before = call('LLEN', P .. ':ready')
	local n, done = 0, {}
	for _, id in ipairs(ids) do
		local mk = P .. ':msg:' .. id
		if not done[id] and call('HGET', mk, 'state') == from then
			done[id] = true
			call('ZREM', P .. ':' .. from, id)
			if extra then
				extra(id, mk)
			end
			call('HSET', mk, 'state', 'ready', 'next', istr(now))
			call('LPUSH', P .. ':ready', id)
			n = n + 1
		end
	end
	if n > 0 and before == 0 then
		wake(P)
	end
	return n
end

local function release(keys, args)
	local P = prefix(keys)
	need_ids(args, 'relayq_release')
	return to_ready(P, args, 'held')
end

local function requeue(keys, args)
	local P = prefix(keys)
	need_ids(args, 'relayq_requeue')
	local ids = args
	if args[1] == '--dead' then
		if #args ~= 1 then fail('relayq_requeue --dead takes no ids') end
		ids = call('ZRANGE', P .. ':dead', 0, -1)
	end
	local n = to_ready(P, ids, 'dead', function(id, mk)
		local rk = P .. ':rcpt:' .. id
		local to = try_json(call('HGET', mk, 'to')) or {}
		local pending, rset = {}, {}
		local st = read_hash(rk)
		for _, r in ipairs(to) do
			local s = try_json(st[r]) or {}
			if s.s == nil or s.s == 'pending' or s.s == 'deferred'
				or s.s == 'failed' or s.s == 'expired' then
				pending[#pending + 1] = r
				if s.s ~= nil and s.s ~= 'pending' then
					s.s = 'pending'
					rset[#rset + 1] = r
					rset[#rset + 1] = cjson.encode(s)
				end
			end
		end
		if #rset > 0 then
			chunked('HSET', rk, rset)
		end
		call('HSET', mk, 'attempts', '0', 'failed', '0', 'pending', json_strs(pending))
	end)
	if n > 0 then
		call('HINCRBY', P .. ':stats', 'requeued', n)
	end
	return n
end

local function delete(keys, args)
	local P = prefix(keys)
	need_ids(args, 'relayq_delete')
	local n, done = 0, {}
	for _, id in ipairs(args) do
		local mk = P .. ':msg:' .. id
		local state = call('HGET', mk, 'state')
		if state and not done[id] then
			done[id] = true
			unlink(P, id, state)
			call('DEL', mk, P .. ':rcpt:' .. id)
			n = n + 1
		end
	end
	if n > 0 then
		call('HINCRBY', P .. ':stats', 'deleted', n)
	end
	return n
end

local function flush(keys, args)
	local P = prefix(keys)
	local ids = args
	if #ids == 0 then
		ids = call('ZRANGE', P .. ':scheduled', 0, -1)
	end
	return to_ready(P, ids, 'scheduled')
end

-- Read-only functions ------------------------------------------------------------

local function stats(keys, args)
	local P = prefix(keys)
	if #args ~= 0 then fail('relayq_stats takes no arguments') end
	local out = {
		'ready', call('LLEN', P .. ':ready'),
		'scheduled', call('ZCARD', P .. ':scheduled'),
		'inflight', call('ZCARD', P .. ':inflight'),
		'dead', call('ZCARD', P .. ':dead'),
		'held', call('ZCARD', P .. ':held'),
	}
	local v = call('HMGET', P .. ':stats', unpack(COUNTERS))
	for i, name in ipairs(COUNTERS) do
		out[#out + 1] = name
		out[#out + 1] = tonumber(v[i]) or 0
	end
	return out
end

local NUMERIC = {created = true, attempts = true, next = true, lease = true, failed = true,
	last_code = true}
local SHOW_ORDER = {'from', 'to', 'pending', 'state', 'created', 'attempts', 'next', 'lease',
	'failed', 'last_code', 'last_enhanced', 'last_text', 'last_stage', 'key'}

-- The JSON fields (pre-encoded "key":value parts) of a message hash.
local function msg_parts(id, h)
	local parts = {'"id":' .. cjson.encode(id)}
	for _, f in ipairs(SHOW_ORDER) do
		local v = h[f]
		if v ~= nil then
			local enc
			if f == 'to' or f == 'pending' then
				enc = raw_json(v) -- stored as a JSON array
			elseif NUMERIC[f] then
				enc = (v == '' or not tonumber(v)) and 'null' or v
			else
				enc = cjson.encode(v)
			end
			parts[#parts + 1] = cjson.encode(f) .. ':' .. enc
		end
	end
	parts[#parts + 1] = '"size":' .. istr(h.body and #h.body or 0)
	parts[#parts + 1] = '"meta":' .. (h.meta and raw_json(h.meta) or '{}')
	return parts
end

local function show(keys, args)
	local P = prefix(keys)
	if #args ~= 1 then fail('relayq_show takes 1 argument: the id') end
	local id = args[1]
	local h, found = read_hash(P .. ':msg:' .. id)
	if not found then fail('unknown id: ' .. clean(id)) end
	local parts = msg_parts(id, h)
	local rh = read_hash(P .. ':rcpt:' .. id)
	local to = try_json(h.to) or {}
	local pend = {}
	for _, r in ipairs(try_json(h.pending) or to) do pend[r] = true end
	local rs = {}
	for i, r in ipairs(to) do
		local s = try_json(rh[r]) or {}
		s.to = r
		if s.s == nil then
			s.s = pend[r] and 'pending' or 'unknown'
		end
		rs[i] = cjson.encode(s)
	end
	parts[#parts + 1] = '"rcpts":[' .. table.concat(rs, ',') .. ']'
	return '{' .. table.concat(parts, ',') .. '}'
end

local LIST_STATES = {'ready', 'scheduled', 'inflight', 'held', 'dead'}

local function list(keys, args)
	local P = prefix(keys)
	if #args ~= 3 then fail('relayq_list takes 3 arguments: state, offset and count') end
	local which = args[1]
	local valid = which == 'all'
	for _, s in ipairs(LIST_STATES) do
		if s == which then valid = true end
	end
	if not valid then
		fail('state must be ready, scheduled, inflight, held, dead or all')
	end
	local offset = int_arg(args[2], 'offset', 0, 1e15)
	local count = int_arg(args[3], 'count', 1, MAX_LIST)
	local ids = {}
	for _, s in ipairs(LIST_STATES) do
		if count <= 0 then break end
		if which == 'all' or which == s then
			local key = P .. ':' .. s
			local len = s == 'ready' and call('LLEN', key) or call('ZCARD', key)
			if offset >= len then
				offset = offset - len
			else
				local got
				if s == 'ready' then
					got = call('LRANGE', key, -(offset + count), -(offset + 1))
					local rev = {}
					for i = #got, 1, -1 do rev[#rev + 1] = got[i] end
					got = rev
				else
					got = call('ZRANGE', key, offset, offset + count - 1)
				end
				for _, id in ipairs(got) do ids[#ids + 1] = id end
				count = count - #got
				offset = 0
			end
		end
	end
	local out = {}
	for _, id in ipairs(ids) do
		local h, found = read_hash(P .. ':msg:' .. id)
		if found then
			local parts = msg_parts(id, h)
			local to = try_json(h.to) or {}
			local pending = try_json(h.pending) or to
			parts[#parts + 1] = '"rcpt_count":' .. #to
			parts[#parts + 1] = '"pending_count":' .. #pending
			out[#out + 1] = '{' .. table.concat(parts, ',') .. '}'
		end
	end
	return out
end

local function config_fn(keys, args)
	local P = prefix(keys)
	if #args % 2 ~= 0 then fail('relayq_config takes pairs of field and value') end
	local known = {}
	for _, f in ipairs(CONFIG_FIELDS) do known[f] = true end
	local set = {}
	for i = 1, #args, 2 do
		local f = args[i]
		if not known[f] then
			fail('unknown config field: ' .. clean(f))
		end
		local v = args[i + 1]
		if not v:find('^%d+$') or #v > 15 or tonumber(v) < 1 then
			fail(f .. ' must be a positive integer')
		end
		set[#set + 1] = f
		set[#set + 1] = v
	end
	if #set > 0 then
		call('HSET', P .. ':config', unpack(set))
	end
	local c = config(P)
	local out = {}
	for _, f in ipairs(CONFIG_FIELDS) do
		out[#out + 1] = f
		out[#out + 1] = c[f]
	end
	return out
end

-- Registration ------------------------------------------------------------------

local function reg(name, fn, flags)
	redis.register_function{function_name = name, callback = wrap(fn), flags = flags or {}}
end

redis.register_function{function_name = 'relayq_version',
	callback = function() return VERSION end, flags = {'no-writes'}}
reg('relayq_enqueue', enqueue)
reg('relayq_claim', claim, {'allow-oom'})
reg('relayq_settle', settle, {'allow-oom'})
reg('relayq_renew', renew, {'allow-oom'})
reg('relayq_recover', recover, {'allow-oom'})
reg('relayq_hold', hold)
reg('relayq_release', release)
reg('relayq_requeue', requeue)
reg('relayq_delete', delete, {'allow-oom'})
reg('relayq_flush', flush)
reg('relayq_stats', stats, {'no-writes'})
reg('relayq_show', show, {'no-writes'})
reg('relayq_list', list, {'no-writes'})
reg('relayq_config', config_fn)
