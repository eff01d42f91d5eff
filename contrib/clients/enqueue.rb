#!/usr/bin/env ruby
# Enqueue mail into relayq from Ruby (redis-rb 4.8 or 5.x) and follow outcomes.
#
#   gem install redis          # or: apt install ruby-redis
#   RELAYQ_REDIS=redis://127.0.0.1:6379/0 ruby enqueue.rb user@example.net
#
# The contract is lua/redis/README.md: one FCALL relayq_enqueue per message.
require "json"
require "redis"
require "securerandom"

QUEUE = "default"
# Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
# them in one Redis Cluster slot. This prefix is the one key FCALL gets.
PREFIX = "relayq:{#{QUEUE}}"
EVENTS = "#{PREFIX}:events"

REDIS = Redis.new(url: ENV.fetch("RELAYQ_REDIS", "redis://127.0.0.1:6379/0"))

# relayq refused the message (bad envelope or message); nothing was written.
class Rejected < StandardError; end

# Queues one message (a String of RFC 5322 text); returns its id.
# Raises Rejected, or Redis::BaseError for trouble with Redis itself.
def enqueue(from, to, message, key: nil, meta: nil, delay: nil)
  envelope = { "from" => from, "to" => to }
  envelope["key"] = key unless key.nil?       # same key again (within 24 h): same id
  envelope["meta"] = meta unless meta.nil?    # any JSON object; comes back in events
  envelope["delay"] = delay unless delay.nil? # seconds before the first attempt
  # redis-rb has no fcall helper: send the command as is.
  REDIS.call("FCALL", "relayq_enqueue", 1, PREFIX, JSON.generate(envelope), message)
rescue Redis::CommandError => e
  # The message is Redis' text, "ERR relayq: <reason>". Other command
  # errors (OOM, the library not loaded yet: relayqd loads it) pass on.
  # (A Redis::BaseConnectionError, not rescued here, means "unknown whether
  # it was queued": calling enqueue again with the same key is safe.)
  raise Rejected, e.message if e.message.start_with?("ERR relayq: ")
  raise
end

# Yields outcome events (Hashes) after stream id start_id, forever. Keep the
# last id you handled and resume from it after a restart; the stream is
# capped (events_cap), so a reader away too long misses entries. Workers
# sharing the events would use a consumer group (xreadgroup + xack).
def each_event(start_id)
  last = start_id
  loop do
    reply = REDIS.xread(EVENTS, last, count: 100, block: 5000) # {} after 5 s of nothing
    (reply[EVENTS] || []).each do |entry_id, fields|
      last = entry_id
      # type: delivered | deferred | failed | expired | dropped | held;
      # id, rcpt, code, enh, text, stage, attempt, next ("" = absent)
      meta = fields["meta"].to_s.empty? ? {} : JSON.parse(fields["meta"])
      yield fields.merge("meta" => meta, "stream_id" => entry_id)
    end
  end
end

rcpt = ARGV[0] || "user@example.net"

# Start at the stream's current end, taken before enqueueing, so that no
# event of our message is missed.
newest = REDIS.xrevrange(EVENTS, "+", "-", count: 1)
start = newest.empty? ? "0-0" : newest[0][0]

body = "From: app@example.com\r\nTo: #{rcpt}\r\nSubject: hello from relayq\r\n\r\nIt works.\r\n"
key = "demo:#{SecureRandom.uuid}" # name what is sent, e.g. "welcome:user-42"
id = enqueue("app@example.com", [rcpt], body, key: key, meta: { "order" => 42 })
again = enqueue("app@example.com", [rcpt], body, key: key, meta: { "order" => 42 })
puts "queued #{id} (same key again gives #{again})"

begin
  enqueue("app@example.com", ["no-at-sign"], body)
rescue Rejected => e
  puts "rejected: #{e.message}"
end

pending = [rcpt]
each_event(start) do |ev|
  next unless ev["id"] == id
  puts [ev["type"], ev["rcpt"], ev["code"], ev["text"], "meta:", ev["meta"].inspect].join(" ")
  # deferred means: it will be retried
  pending.delete(ev["rcpt"]) if %w[delivered failed expired dropped].include?(ev["type"])
  break if pending.empty?
end
