#!/usr/bin/env node
// Verifies Callplane webhook requests with the Standard Webhooks library (npm `standardwebhooks`).
//
//   node verify-webhook.js --secret whsec_... --headers-file headers.json --body-file body.json
//       checks one captured request: prints {"verified": true, "webhookId", "type", "callCid", "seq"}
//       and exits 0, or prints {"verified": false, "error"} and exits 1.
//       headers.json: a JSON object of header names to values, or `Name: value` lines.
//   node verify-webhook.js --secret whsec_... --listen 8080
//       a minimal receiver: verifies every POST, answers 204 (or 401), prints one JSON line each.
//
// The secret may also come from the WEBHOOK_SECRET environment variable.
'use strict';

const fs = require('node:fs');
const http = require('node:http');
const { Webhook, WebhookVerificationError } = require('standardwebhooks');

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 1) {
    const name = argv[i];
    if (!name.startsWith('--') || i + 1 >= argv.length) {
      throw new Error(`unexpected argument ${name}`);
    }
    args[name.slice(2)] = argv[i + 1];
    i += 1;
  }
  return args;
}

// A JSON object, or `Name: value` lines (as an HTTP request or `curl -D` shows them).
function parseHeaders(text) {
  const trimmed = text.trim();
  const headers = {};
  if (trimmed.startsWith('{')) {
    for (const [name, value] of Object.entries(JSON.parse(trimmed))) {
      headers[name.toLowerCase()] = String(value);
    }
    return headers;
  }
  for (const line of trimmed.split(/\r?\n/)) {
    const colon = line.indexOf(':');
    if (colon > 0) {
      headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
    }
  }
  return headers;
}

// Verifies the exact body bytes as received (never a re-serialized object): returns the event.
function verify(secret, headers, body) {
  return new Webhook(secret).verify(body, headers);
}

function summary(headers, event) {
  return { verified: true, webhookId: headers['webhook-id'], type: event.type, callCid: event.callCid, seq: event.seq };
}

function listen(secret, port) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      try {
        const event = verify(secret, req.headers, Buffer.concat(chunks).toString('utf8'));
        console.log(JSON.stringify(summary(req.headers, event)));
        res.writeHead(204).end(); // any 2xx: delivered
      } catch (error) {
        console.log(JSON.stringify({ verified: false, error: error.message }));
        res.writeHead(401).end(); // retried later with the same webhook-id
      }
    });
  });
  server.listen(port, '127.0.0.1', () => console.error(`listening on http://127.0.0.1:${server.address().port}/`));
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const secret = args.secret ?? process.env.WEBHOOK_SECRET;
  if (!secret) {
    throw new Error('pass --secret whsec_... or set WEBHOOK_SECRET');
  }
  if (args.listen !== undefined) {
    listen(secret, Number(args.listen));
    return;
  }
  if (!args['headers-file'] || !args['body-file']) {
    throw new Error('pass --headers-file and --body-file (or --listen PORT)');
  }
  const headers = parseHeaders(fs.readFileSync(args['headers-file'], 'utf8'));
  const body = fs.readFileSync(args['body-file'], 'utf8');
  try {
    console.log(JSON.stringify(summary(headers, verify(secret, headers, body))));
  } catch (error) {
    if (!(error instanceof WebhookVerificationError)) {
      throw error;
    }
    console.log(JSON.stringify({ verified: false, error: error.message }));
    process.exitCode = 1;
  }
}

try {
  main();
} catch (error) {
  console.error(`verify-webhook: ${error.message}`);
  process.exitCode = 2;
}
