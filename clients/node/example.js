'use strict';
// Walk-through of the Node client against a running server:
//   node example.js [host:port]        (default: $CALLPLANE_TARGET or 127.0.0.1:50051)

const { connect, status } = require('./callplane');

async function main() {
  const target = process.argv[2] || process.env.CALLPLANE_TARGET || '127.0.0.1:50051';
  const cp = connect(target, { token: process.env.CALLPLANE_TOKEN, timeoutMs: 10_000 });
  try {
    await cp.waitForReady();

    await cp.users.upsertUsers({
      users: [
        { id: 'alice', name: 'Alice', custom: { plan: 'pro' } },
        { id: 'bob', name: 'Bob' },
      ],
    });

    // Struct fields (custom, filter_conditions, set_custom) are plain JS objects.
    const { call, members, created } = await cp.calls.getOrCreateCall({
      type: 'default',
      id: 'standup',
      data: {
        created_by_id: 'alice',
        members: [{ user_id: 'alice', role: 'host' }, { user_id: 'bob' }],
        custom: { color: 'red', topic: 'planning' },
      },
    });
    console.log(created ? 'created' : 'found', call.cid, call.custom, members.map((m) => `${m.user_id}/${m.role}`));

    // Optimistic concurrency: pass back the etag you read.
    const updated = await cp.calls.updateCall({
      type: 'default',
      id: 'standup',
      set_custom: { topic: 'retro', 'agenda.items': 3 },
      etag: call.etag,
    });
    console.log('updated', updated.call.custom, 'etag', updated.call.etag);

    const { calls } = await cp.calls.queryCalls({
      filter_conditions: { 'custom.color': 'red', 'custom.agenda.items': { $gte: 1 } },
      sort: [{ field: 'created_at', direction: 'SORT_DIRECTION_DESC' }],
      limit: 10,
    });
    console.log('query', calls.map((c) => c.call.cid));

    const hosts = await cp.calls.queryMembers({ type: 'default', id: 'standup', filter_conditions: { role: 'host' } });
    console.log('hosts', hosts.members.map((m) => m.user_id));

    // Errors carry the decoded google.rpc.Status.
    try {
      await cp.calls.getOrCreateCall({ type: 'default', id: 'oops', data: { members: [{ user_id: 'nobody' }] } });
    } catch (err) {
      if (err.code !== status.INVALID_ARGUMENT) throw err;
      console.log('error', err.code, err.reason, err.details);
      for (const v of (err.badRequest && err.badRequest.field_violations) || []) {
        console.log('  ', v.field, '-', v.description);
      }
    }
  } finally {
    cp.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
