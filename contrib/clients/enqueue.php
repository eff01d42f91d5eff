<?php
// Enqueue mail into relayq from PHP (phpredis 5.3 or 6.x) and follow outcomes.
//
//   pecl install redis          # or: apt install php-redis
//   RELAYQ_REDIS=redis://127.0.0.1:6379/0 php enqueue.php user@example.net
//
// The contract is lua/redis/README.md: one FCALL relayq_enqueue per message.

const QUEUE = 'default';
// Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
// them in one Redis Cluster slot. This prefix is the one key FCALL gets.
const PREFIX = 'relayq:{' . QUEUE . '}';
const EVENTS = PREFIX . ':events';

// relayq refused the message (bad envelope or message); nothing was written.
class Rejected extends Exception {}

function connect_redis(): Redis
{
    $u = parse_url(getenv('RELAYQ_REDIS') ?: 'redis://127.0.0.1:6379/0');
    $r = new Redis();
    $r->connect($u['host'], $u['port'] ?? 6379, 5.0); // throws RedisException
    if (isset($u['pass'])) {
        $r->auth(isset($u['user']) ? [urldecode($u['user']), urldecode($u['pass'])] : urldecode($u['pass']));
    }
    $r->select((int) ltrim($u['path'] ?? '/0', '/'));
    return $r;
}

// Queues one message (RFC 5322 text); returns its id. Throws Rejected when
// relayq refused it, RuntimeException for other Redis errors, and
// RedisException for connection trouble (then it is unknown whether it was
// queued: calling enqueue() again with the same key is safe).
function enqueue(Redis $r, string $from, array $to, string $message, array $opt = []): string
{
    $envelope = ['from' => $from, 'to' => array_values($to)];
    if (isset($opt['key'])) $envelope['key'] = $opt['key'];       // same key again (24 h): same id
    if (isset($opt['meta'])) $envelope['meta'] = (object) $opt['meta']; // a JSON object, even when empty
    if (isset($opt['delay'])) $envelope['delay'] = $opt['delay']; // seconds before the first attempt
    $json = json_encode($envelope, JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES);

    // rawCommand works with phpredis 5.3 (no fcall() there) and 6.x.
    // An error reply makes it return false and leaves the text in
    // getLastError(): "ERR relayq: <reason>".
    $r->clearLastError();
    $id = $r->rawCommand('FCALL', 'relayq_enqueue', 1, PREFIX, $json, $message);
    if ($id === false) {
        $err = (string) $r->getLastError();
        if (str_starts_with($err, 'ERR relayq: ')) throw new Rejected($err);
        throw new RuntimeException($err); // OOM, library not loaded (relayqd loads it)...
    }
    return $id;
}

// Calls $handle(array $event) for each outcome event after stream id
// $start, until it returns false. Keep the last id you handled and resume
// from it after a restart; the stream is capped (events_cap), so a reader
// away too long misses entries. Workers sharing the events would use a
// consumer group (xReadGroup + xAck).
function follow_events(Redis $r, string $start, callable $handle): void
{
    $last = $start;
    for (;;) {
        $reply = $r->xRead([EVENTS => $last], 100, 5000); // empty after 5 s of nothing
        foreach ($reply[EVENTS] ?? [] as $entryId => $fields) {
            $last = (string) $entryId;
            // type: delivered | deferred | failed | expired | dropped | held;
            // id, rcpt, code, enh, text, stage, attempt, next ("" = absent)
            $fields['meta'] = ($fields['meta'] ?? '') === '' ? [] : json_decode($fields['meta'], true);
            $fields['stream_id'] = $last;
            if ($handle($fields) === false) return;
        }
    }
}

$r = connect_redis();
$rcpt = $argv[1] ?? 'user@example.net';

// Start at the stream's current end, taken before enqueueing, so that no
// event of our message is missed.
$newest = $r->xRevRange(EVENTS, '+', '-', 1);
$start = $newest ? (string) array_key_first($newest) : '0-0';

$body = "From: app@example.com\r\nTo: $rcpt\r\nSubject: hello from relayq\r\n\r\nIt works.\r\n";
$key = 'demo:' . bin2hex(random_bytes(16)); // name what is sent, e.g. "welcome:user-42"
$id = enqueue($r, 'app@example.com', [$rcpt], $body, ['key' => $key, 'meta' => ['order' => 42]]);
$again = enqueue($r, 'app@example.com', [$rcpt], $body, ['key' => $key, 'meta' => ['order' => 42]]);
echo "queued $id (same key again gives $again)\n";

try {
    enqueue($r, 'app@example.com', ['no-at-sign'], $body);
} catch (Rejected $e) {
    echo 'rejected: ', $e->getMessage(), "\n";
}

$pending = [$rcpt => true];
follow_events($r, $start, function (array $ev) use ($id, &$pending) {
    if ($ev['id'] !== $id) return true;
    echo "{$ev['type']} {$ev['rcpt']} {$ev['code']} {$ev['text']} meta: ", json_encode($ev['meta']), "\n";
    if (in_array($ev['type'], ['delivered', 'failed', 'expired', 'dropped'], true)) {
        unset($pending[$ev['rcpt']]); // deferred means: it will be retried
    }
    return count($pending) > 0;
});
