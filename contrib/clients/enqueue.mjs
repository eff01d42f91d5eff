// Enqueue mail into relayq from Node.js (node-redis v4) and follow outcomes.
//
//   npm install redis@4
//   RELAYQ_REDIS=redis://127.0.0.1:6379/0 node enqueue.mjs user@example.net
//
// The contract is lua/redis/README.md: one FCALL relayq_enqueue per message.
import { randomUUID } from 'node:crypto';
import { createClient, ErrorReply } from 'redis';

const QUEUE = 'default';
// Every key of a queue starts with relayq:{<queue>}; the {hash tag} keeps
// them in one Redis Cluster slot. This prefix is the one key FCALL gets.
const PREFIX = `relayq:{${QUEUE}}`;
const EVENTS = `${PREFIX}:events`;

const client = createClient({ url: process.env.RELAYQ_REDIS ?? 'redis://127.0.0.1:6379/0' });
client.on('error', (err) => console.error('redis:', err.message));
await client.connect();

export class Rejected extends Error {}

// Queues one message (string or Buffer); resolves to its id. Rejects with
// Rejected when relayq refused it (nothing was written).
export async function enqueue(from, to, message, { key, meta, delay } = {}) {
  const envelope = { from, to };
  if (key !== undefined) envelope.key = key;       // same key again (within 24 h): same id
  if (meta !== undefined) envelope.meta = meta;    // any JSON object; comes back in events
  if (delay !== undefined) envelope.delay = delay; // seconds before the first attempt
  try {
    return await client.fCall('relayq_enqueue', {
      keys: [PREFIX],
      arguments: [JSON.stringify(envelope), message],
    });
  } catch (err) {
    // node-redis keeps the whole text: "ERR relayq: <reason>". Anything
    // else (OOM, the library not loaded yet: relayqd loads it) passes on.
    if (err instanceof ErrorReply && err.message.startsWith('ERR relayq: ')) {
      throw new Rejected(err.message);
    }
    // A connection error means "unknown whether it was queued": calling
    // enqueue() again with the same key is safe.
    throw err;
  }
}

// Yields outcome events after stream id startId, forever. XREAD BLOCK
// holds its connection, so it gets a connection of its own. Keep the last
// id you handled and resume from it after a restart; the stream is capped
// (events_cap), so a reader away too long misses entries. Workers sharing
// the events would use a consumer group (XREADGROUP + XACK) instead.
export async function* events(startId) {
  const reader = client.duplicate();
  await reader.connect();
  let last = startId;
  try {
    for (;;) {
      const reply = await reader.xRead({ key: EVENTS, id: last }, { COUNT: 100, BLOCK: 5000 });
      for (const stream of reply ?? []) {               // null after 5 s of nothing
        for (const { id, message } of stream.messages) {
          last = id;
          // type: delivered | deferred | failed | expired | dropped | held;
          // id, rcpt, code, enh, text, stage, attempt, next ("" = absent)
          yield { ...message, streamId: id, meta: JSON.parse(message.meta || '{}') };
        }
      }
    }
  } finally {
    await reader.quit();
  }
}

const rcpt = process.argv[2] ?? 'user@example.net';

// Start reading at the stream's current end, taken before enqueueing, so
// that no event of our message is missed.
const newest = await client.xRevRange(EVENTS, '+', '-', { COUNT: 1 });
const start = newest.length ? newest[0].id : '0-0';

const body = `From: app@example.com\r\nTo: ${rcpt}\r\nSubject: hello from relayq\r\n\r\nIt works.\r\n`;
const key = `demo:${randomUUID()}`;   // name what is sent, e.g. "welcome:user-42"
const id = await enqueue('app@example.com', [rcpt], body, { key, meta: { order: 42 } });
const again = await enqueue('app@example.com', [rcpt], body, { key, meta: { order: 42 } });
console.log('queued', id, '(same key again gives', again + ')');

try {
  await enqueue('app@example.com', ['no-at-sign'], body);
} catch (err) {
  if (!(err instanceof Rejected)) throw err;
  console.log('rejected:', err.message);
}

const pending = new Set([rcpt]);
for await (const ev of events(start)) {
  if (ev.id !== id) continue;
  console.log(ev.type, ev.rcpt, ev.code, ev.text, 'meta:', ev.meta);
  if (['delivered', 'failed', 'expired', 'dropped'].includes(ev.type)) pending.delete(ev.rcpt);
  if (pending.size === 0) break;   // deferred means: it will be retried
}
await client.quit();
