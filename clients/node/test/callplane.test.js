'use strict';
// End-to-end test of the Node client against a running server:
//   CALLPLANE_TARGET=127.0.0.1:50051 CALLPLANE_TOKEN=$(callplane token --server) npm test
// Skipped when CALLPLANE_TARGET is not set. Every run uses fresh ids, so it can be repeated against
// the same server. tests/test_polyglot.py starts a server and runs this file.

const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { connect, status, toStruct, fromStruct } = require('../callplane');

const TARGET = process.env.CALLPLANE_TARGET;
const RUN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

describe('toStruct / fromStruct', () => {
  it('round-trips nested JSON values', () => {
    const value = { s: 'x', n: 1.5, b: false, z: null, list: [1, 'two', { three: [true] }], obj: { a: {} } };
    const struct = toStruct(value);
    assert.deepEqual(struct.fields.s, { stringValue: 'x' });
    assert.deepEqual(struct.fields.z, { nullValue: 'NULL_VALUE' });
    assert.deepEqual(fromStruct(struct), value);
    assert.equal(fromStruct(null), null);
  });
});

describe('callplane server', { skip: !TARGET && 'CALLPLANE_TARGET (host:port of a running server) not set' }, () => {
  let cp;
  const alice = `alice-${RUN}`;
  const bob = `bob-${RUN}`;
  const callId = `poly-${RUN}`;
  let etag;

  before(async () => {
    cp = connect(TARGET, { timeoutMs: 10_000, token: process.env.CALLPLANE_TOKEN });
    await cp.waitForReady(10_000);
  });

  after(() => cp && cp.close());

  it('lists the built-in call types', async () => {
    const { call_types } = await cp.callTypes.listCallTypes({});
    const names = call_types.map((t) => t.name);
    for (const name of ['default', 'livestream', 'audio_room', 'development']) {
      assert.ok(names.includes(name), `${name} in ${names}`);
    }
  });

  it('upserts users with custom data', async () => {
    const { users } = await cp.users.upsertUsers({
      users: [
        { id: alice, name: 'Alice', custom: { plan: 'pro', langs: ['en', 'fr'] } },
        { id: bob, name: 'Bob', teams: ['blue'] },
      ],
    });
    assert.deepEqual(
      users.map((u) => u.id),
      [alice, bob],
    );
    assert.deepEqual(users[0].custom, { plan: 'pro', langs: ['en', 'fr'] });
    assert.deepEqual(users[1].teams, ['blue']);
    assert.ok(users[0].created_at && Number(users[0].created_at.seconds) > 0);
  });

  it('creates a call with members and custom data (GetOrCreateCall)', async () => {
    const custom = { color: 'red', score: 7, tags: ['a', 'b'], nested: { level: 1 }, run: RUN };
    const res = await cp.calls.getOrCreateCall({
      type: 'default',
      id: callId,
      data: {
        created_by_id: alice,
        custom,
        members: [
          { user_id: alice, role: 'host', custom: { seat: 1 } },
          { user_id: bob, custom: { seat: 2 } },
        ],
      },
    });
    assert.equal(res.created, true);
    assert.equal(res.call.cid, `default:${callId}`);
    assert.equal(res.call.type, 'default');
    assert.equal(res.call.id, callId);
    assert.equal(res.call.created_by_user_id, alice);
    assert.deepEqual(res.call.custom, custom);
    assert.equal(res.call.member_count, 2);
    assert.ok(res.call.etag, 'etag is set');
    const byUser = Object.fromEntries(res.members.map((m) => [m.user_id, m]));
    assert.deepEqual(Object.keys(byUser).sort(), [alice, bob].sort());
    assert.equal(byUser[alice].role, 'host');
    assert.equal(byUser[bob].role, 'user');
    assert.deepEqual(byUser[bob].custom, { seat: 2 });
    etag = res.call.etag;

    const again = await cp.calls.getOrCreateCall({
      type: 'default',
      id: callId,
      data: { custom: { color: 'ignored' } },
    });
    assert.equal(again.created, false);
    assert.deepEqual(again.call.custom, custom, 'an existing call is returned unchanged');
  });

  it('updates custom paths with the current etag (UpdateCall)', async () => {
    const res = await cp.calls.updateCall({
      type: 'default',
      id: callId,
      set_custom: { 'nested.level': 2, 'nested.by': 'alice' },
      unset_custom: ['tags'],
      etag,
    });
    assert.deepEqual(res.call.custom, { color: 'red', score: 7, nested: { level: 2, by: 'alice' }, run: RUN });
    assert.notEqual(res.call.etag, etag, 'etag changes on update');

    // The old etag is now stale: ABORTED, and nothing changes.
    await assert.rejects(
      cp.calls.updateCall({ type: 'default', id: callId, custom: { color: 'green' }, etag }),
      (err) => {
        assert.equal(err.code, status.ABORTED, `${err.code} ${err.details}`);
        assert.ok(err.errorInfo, 'ErrorInfo detail');
        assert.equal(err.errorInfo.domain, 'callplane');
        return true;
      },
    );
    etag = res.call.etag;
  });

  it('replaces custom data (UpdateCall.custom)', async () => {
    const res = await cp.calls.updateCall({
      type: 'default',
      id: callId,
      custom: { color: 'blue', score: 9, run: RUN },
      etag,
    });
    assert.deepEqual(res.call.custom, { color: 'blue', score: 9, run: RUN });
    const got = await cp.calls.getCall({ type: 'default', id: callId });
    assert.deepEqual(got.call.custom, { color: 'blue', score: 9, run: RUN });
    assert.equal(got.call.etag, res.call.etag);
  });

  it('finds the call with custom.* filters (QueryCalls)', async () => {
    const found = await cp.calls.queryCalls({
      filter_conditions: { 'custom.run': RUN, 'custom.color': { $in: ['blue', 'green'] }, 'custom.score': { $gt: 8 } },
      sort: [{ field: 'created_at', direction: 'SORT_DIRECTION_DESC' }],
      limit: 10,
    });
    assert.deepEqual(
      found.calls.map((c) => c.call.cid),
      [`default:${callId}`],
    );
    assert.deepEqual(found.calls[0].call.custom, { color: 'blue', score: 9, run: RUN });
    assert.equal(found.calls[0].members.length, 2);

    const none = await cp.calls.queryCalls({ filter_conditions: { 'custom.run': RUN, 'custom.color': 'red' } });
    assert.deepEqual(none.calls, []);
  });

  it('queries members (QueryMembers)', async () => {
    const all = await cp.calls.queryMembers({
      type: 'default',
      id: callId,
      sort: [{ field: 'user_id', direction: 'SORT_DIRECTION_ASC' }],
    });
    assert.deepEqual(
      all.members.map((m) => m.user_id),
      [alice, bob].sort(),
    );
    const hosts = await cp.calls.queryMembers({ type: 'default', id: callId, filter_conditions: { role: 'host' } });
    assert.deepEqual(
      hosts.members.map((m) => m.user_id),
      [alice],
    );
    const seat2 = await cp.calls.queryMembers({
      type: 'default',
      id: callId,
      filter_conditions: { 'custom.seat': { $gte: 2 } },
    });
    assert.deepEqual(
      seat2.members.map((m) => m.user_id),
      [bob],
    );
  });

  it('rejects unknown members with INVALID_ARGUMENT and google.rpc.Status details', async () => {
    const ghost = `ghost-${RUN}`;
    const badId = `bad-${RUN}`;
    await assert.rejects(
      cp.calls.getOrCreateCall({
        type: 'default',
        id: badId,
        data: { created_by_id: alice, members: [{ user_id: alice }, { user_id: ghost }] },
      }),
      (err) => {
        assert.equal(err.code, status.INVALID_ARGUMENT, `${err.code} ${err.details}`);
        assert.ok(err.status, 'grpc-status-details-bin decoded as google.rpc.Status');
        assert.equal(err.status.code, status.INVALID_ARGUMENT);
        assert.ok(err.errorInfo, 'ErrorInfo detail');
        assert.equal(err.errorInfo.domain, 'callplane');
        assert.match(err.reason, /^[A-Z][A-Z0-9_]*$/);
        const everything = JSON.stringify([err.details, err.status]);
        assert.ok(everything.includes(ghost), `the error names ${ghost}: ${everything}`);
        return true;
      },
    );
    // All-or-nothing: the call was not created.
    await assert.rejects(cp.calls.getCall({ type: 'default', id: badId }), (err) => {
      assert.equal(err.code, status.NOT_FOUND, `${err.code} ${err.details}`);
      return true;
    });
  });
});
