'use strict';
// A client written from the protos alone (no callplane.js): the README's "Node.js from the protos" example,
// run against a server. Covers what such a client trips over: google.protobuf.Struct values in
// proto-loader's shape (and the silent empty Struct a plain object becomes), decoding the
// `grpc-status-details-bin` trailer with protobufjs, `user_id` being required, WatchCall refusing
// `snapshot` with `after_seq`, and the response headers that tell a stream is live.
//   CALLPLANE_TARGET=127.0.0.1:50051 CALLPLANE_TOKEN=$(callplane token --server) node --test test/
// Skipped when CALLPLANE_TARGET is not set; tests/test_polyglot.py starts a server and runs it.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');

// ---- README example: begins ------------------------------------------------------------------------
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.resolve(__dirname, '..', '..', '..', 'protos'); // the repository's protos/

const definition = protoLoader.loadSync(
  [
    'callplane/v1/call_service.proto',
    'callplane/v1/session_service.proto',
    'callplane/v1/event_service.proto',
    'callplane/v1/user.proto',
  ],
  { includeDirs: [PROTOS], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).callplane.v1;

// google.protobuf.Struct in proto-loader's shape: every value names its kind.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case 'string': return { stringValue: v };
    case 'number': return { numberValue: v }; // a double: integers above 2^53 lose precision
    case 'boolean': return { boolValue: v };
    case 'object': return { structValue: toStruct(v) };
    default: throw new TypeError(`no Struct value for ${typeof v}`);
  }
}
function toStruct(obj) {
  return { fields: Object.fromEntries(Object.entries(obj).map(([k, v]) => [k, toValue(v)])) };
}
function fromValue(v) {
  switch (v.kind) { // set by the `oneofs: true` loader option
    case 'structValue': return fromStruct(v.structValue);
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    case 'nullValue': return null;
    default: return v[v.kind];
  }
}
function fromStruct(s) {
  return s && Object.fromEntries(Object.entries(s.fields || {}).map(([k, v]) => [k, fromValue(v)]));
}

// google.rpc.Status from the `grpc-status-details-bin` trailer, with each detail (ErrorInfo,
// BadRequest...) decoded and tagged with its type.
const rpcProtos = new protobuf.Root();
rpcProtos.resolvePath = (origin, target) =>
  target.startsWith('google/protobuf/') ? target : path.join(PROTOS, target); // protobufjs has those
rpcProtos.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpcProtos.lookupType('google.rpc.Status');

function statusOf(err) {
  const [bin] = err.metadata ? err.metadata.get('grpc-status-details-bin') : [];
  if (!bin) return null;
  const status = Status.decode(bin);
  const details = status.details.map((any) => {
    const type = rpcProtos.lookupType(any.type_url.slice(any.type_url.lastIndexOf('/') + 1));
    return { '@type': any.type_url, ...type.toObject(type.decode(any.value), { defaults: true }) };
  });
  const find = (name) => details.find((d) => d['@type'] === `type.googleapis.com/google.rpc.${name}`);
  return { code: status.code, message: status.message, details, errorInfo: find('ErrorInfo'), badRequest: find('BadRequest') };
}
// ---- README example: ends --------------------------------------------------------------------------

const TARGET = process.env.CALLPLANE_TARGET;
const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) =>
    client[method](request, metadata, { deadline: Date.now() + 10_000 }, (err, res) => (err ? reject(err) : resolve(res))),
  );
}

describe('Struct helpers', () => {
  it('round-trip JSON values', () => {
    const value = { s: 'x', n: 1.5, b: true, z: null, list: [1, 'two', { three: [false] }], obj: {} };
    const struct = toStruct(value);
    // what fromValue sees from the loader (`oneofs: true` names the kind)
    const withKinds = JSON.parse(JSON.stringify(struct), (key, v) => {
      if (v && typeof v === 'object' && !Array.isArray(v) && key !== 'fields') {
        const kind = Object.keys(v).find((k) => k.endsWith('Value'));
        if (kind && Object.keys(v).length === 1) return { ...v, kind };
      }
      return v;
    });
    assert.deepEqual(fromStruct(withKinds), value);
  });
});

describe('a client from the protos alone', { skip: !TARGET && 'CALLPLANE_TARGET not set' }, () => {
  let calls;
  let sessions;
  let events;
  let users;
  const auth = new grpc.Metadata();
  const callId = `alone-${RUN}`;

  before(() => {
    auth.set('authorization', `Bearer ${process.env.CALLPLANE_TOKEN}`);
    calls = new v1.CallService(TARGET, grpc.credentials.createInsecure());
    sessions = new v1.SessionService(TARGET, grpc.credentials.createInsecure(), { channelOverride: calls.getChannel() });
    events = new v1.EventService(TARGET, grpc.credentials.createInsecure(), { channelOverride: calls.getChannel() });
    users = new v1.UserService(TARGET, grpc.credentials.createInsecure(), { channelOverride: calls.getChannel() });
  });

  after(() => calls && calls.close());

  it('sends and reads custom data as a Struct', async () => {
    const custom = { color: 'red', score: 7, tags: ['a', 'b'], owner: { name: 'alice' }, archived: false };
    const res = await unary(calls, 'GetOrCreateCall', { type: 'default', id: callId, data: { custom: toStruct(custom) } }, auth);
    assert.equal(res.created, true);
    assert.deepEqual(res.call.custom.fields.color, { stringValue: 'red', kind: 'stringValue' });
    assert.deepEqual(fromStruct(res.call.custom), custom);
    const got = await unary(calls, 'GetCall', { type: 'default', id: callId }, auth);
    assert.deepEqual(fromStruct(got.call.custom), custom);
  });

  it('sends a plain object as an empty Struct, without any error', async () => {
    const res = await unary(calls, 'GetOrCreateCall', { type: 'default', id: `${callId}-plain`, data: { custom: { color: 'red' } } }, auth);
    assert.deepEqual(res.call.custom, { fields: {} });
  });

  it('decodes google.rpc.Status: ErrorInfo and BadRequest (JoinCall needs user_id)', async () => {
    await assert.rejects(unary(sessions, 'JoinCall', { type: 'default', id: callId }, auth), (err) => {
      assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
      const status = statusOf(err);
      assert.equal(status.code, grpc.status.INVALID_ARGUMENT);
      assert.equal(status.errorInfo.domain, 'callplane');
      assert.ok(status.errorInfo.reason, 'ErrorInfo.reason');
      const fields = status.badRequest.field_violations.map((v) => v.field);
      assert.ok(fields.includes('user_id'), `field violations: ${fields}`);
      return true;
    });
  });

  it('decodes a NOT_FOUND status', async () => {
    await assert.rejects(unary(calls, 'GetCall', { type: 'default', id: `${callId}-missing` }, auth), (err) => {
      assert.equal(err.code, grpc.status.NOT_FOUND);
      assert.equal(statusOf(err).errorInfo.reason, 'CALL_NOT_FOUND');
      return true;
    });
  });

  it('refuses WatchCall with both snapshot and after_seq (INVALID_ARGUMENT naming after_seq)', async () => {
    const stream = events.WatchCall({ type: 'default', id: callId, snapshot: true, after_seq: '0' }, auth);
    let headers = false;
    stream.on('metadata', () => (headers = true));
    stream.on('data', () => assert.fail('no message expected'));
    const err = await new Promise((resolve) => stream.on('error', resolve));
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.deepEqual(statusOf(err).badRequest.field_violations.map((v) => v.field), ['after_seq']);
    assert.equal(headers, false, 'an error before the stream is live comes without response headers');
  });

  it('sends response headers on their own when a resumed stream has nothing newer (it is live)', async () => {
    // The current seq, from a snapshot.
    const snapshotStream = events.WatchCall({ type: 'default', id: callId, snapshot: true }, auth);
    snapshotStream.on('error', () => {}); // the cancel below
    const first = await new Promise((resolve) => snapshotStream.once('data', resolve));
    snapshotStream.cancel();
    assert.equal(first.message, 'snapshot');

    const stream = events.WatchCall({ type: 'default', id: callId, after_seq: first.snapshot.seq }, auth);
    const messages = [];
    const arrived = new Promise((resolve) => stream.once('data', resolve));
    stream.on('data', (m) => messages.push(m));
    stream.on('error', () => {}); // the cancel below
    await new Promise((resolve) => stream.once('metadata', resolve));
    assert.equal(messages.length, 0, 'headers, no message');
    // Live: a change made now arrives on it.
    await unary(calls, 'UpdateCall', { type: 'default', id: callId, custom: toStruct({ color: 'blue' }) }, auth);
    const next = await arrived;
    assert.equal(next.message, 'event');
    assert.equal(BigInt(next.event.seq), BigInt(first.snapshot.seq) + 1n);
    stream.cancel();
  });

  it('starts WatchUser from now with a Progress message', async () => {
    const userId = `alone-${RUN}`;
    await unary(users, 'UpsertUsers', { users: [{ id: userId }] }, auth);
    const stream = events.WatchUser({ user_id: userId }, auth);
    const first = await new Promise((resolve, reject) => {
      stream.once('data', resolve);
      stream.once('error', reject);
    });
    stream.on('error', () => {}); // the cancel below
    assert.equal(first.message, 'progress');
    stream.cancel();
  });
});
