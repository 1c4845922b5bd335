'use strict';
// The retry policy (protos/callplane/v1/callplane_grpc_service_config.json) as grpc-js applies it: a small
// grpc-js CallService on loopback answers UNAVAILABLE to the first attempts and counts every attempt.
// Needs no Callplane server. tests/test_client_retries.py proves the same for the Python client.

const { describe, it, before, after, beforeEach } = require('node:test');
const assert = require('node:assert/strict');
const { connect, load, grpc, status, SERVICE_CONFIG } = require('../callplane');

describe('retry policy', () => {
  let server;
  let target;
  const failuresLeft = {};
  const attempts = {};

  const handler = (method) => (call, callback) => {
    attempts[method] = (attempts[method] || 0) + 1;
    if ((failuresLeft[method] || 0) > 0) {
      failuresLeft[method] -= 1;
      callback({ code: status.UNAVAILABLE, details: 'the database is unavailable; retry' });
      return;
    }
    const { type, id } = call.request;
    callback(null, { call: { type, id, cid: `${type}:${id}` } });
  };

  before(async () => {
    const { grpcObject } = load();
    server = new grpc.Server();
    server.addService(grpcObject.callplane.v1.CallService.service, {
      GetCall: handler('GetCall'),
      EndCall: handler('EndCall'),
    });
    const port = await new Promise((resolve, reject) => {
      server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, p) =>
        err ? reject(err) : resolve(p),
      );
    });
    target = `127.0.0.1:${port}`;
  });

  after(() => server && server.forceShutdown());

  beforeEach(() => {
    for (const key of Object.keys(attempts)) delete attempts[key];
    for (const key of Object.keys(failuresLeft)) delete failuresLeft[key];
  });

  it('names only callplane.v1 methods and retries only UNAVAILABLE', () => {
    const config = JSON.parse(SERVICE_CONFIG);
    for (const methodConfig of config.methodConfig) {
      assert.deepEqual(methodConfig.retryPolicy.retryableStatusCodes, ['UNAVAILABLE']);
      for (const name of methodConfig.name) assert.match(name.service, /^callplane\.v1\./);
    }
  });

  it('retries an idempotent RPC (GetCall) that failed with UNAVAILABLE', async () => {
    failuresLeft.GetCall = 2;
    const cp = connect(target, { timeoutMs: 10_000 });
    try {
      const { call } = await cp.calls.getCall({ type: 'default', id: 'retry' });
      assert.equal(call.cid, 'default:retry');
      assert.equal(attempts.GetCall, 3);
    } finally {
      cp.close();
    }
  });

  it('does not retry a non-idempotent RPC (EndCall)', async () => {
    failuresLeft.EndCall = 1;
    const cp = connect(target, { timeoutMs: 10_000 });
    try {
      await assert.rejects(cp.calls.endCall({ type: 'default', id: 'once' }), (err) => {
        assert.equal(err.code, status.UNAVAILABLE);
        return true;
      });
      assert.equal(attempts.EndCall, 1);
    } finally {
      cp.close();
    }
  });

  it('is off with channelOptions {"grpc.enable_retries": 0}', async () => {
    failuresLeft.GetCall = 1;
    const cp = connect(target, { timeoutMs: 10_000, channelOptions: { 'grpc.enable_retries': 0 } });
    try {
      await assert.rejects(cp.calls.getCall({ type: 'default', id: 'off' }), { code: status.UNAVAILABLE });
      assert.equal(attempts.GetCall, 1);
    } finally {
      cp.close();
    }
  });
});
