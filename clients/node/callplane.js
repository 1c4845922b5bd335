'use strict';
// Small promise-based Node.js client for Callplane (callplane.v1), built on @grpc/grpc-js and
// @grpc/proto-loader. It loads the .proto files at runtime from the repository's protos/ directory, so
// there is no code generation step.
//
//   const { connect } = require('./callplane');
//   const cp = connect('127.0.0.1:50051', { token: process.env.CALLPLANE_TOKEN });
//   const { call, created } = await cp.calls.getOrCreateCall({
//     type: 'default', id: 'standup', data: { created_by_id: 'alice', custom: { color: 'red' } },
//   });
//   console.log(call.custom.color); // 'red'
//   cp.close();
//
// Messages use the proto field names (snake_case), 64-bit integers are strings, enums are their names
// (e.g. 'SORT_DIRECTION_DESC'), unset message fields are null and unset scalars have their default.
//
// google.protobuf.Struct fields (custom data, filter_conditions, set_custom, ...) take and return plain
// JS objects by default (option `structs: 'plain'`); pass `structs: 'raw'` to work with proto-loader's
// `{fields: {k: {stringValue: ...}}}` shape instead. Numbers in a Struct are doubles: integers above
// 2^53 lose precision. Timestamp fields in requests also accept a JS Date.
//
// Errors reject with grpc-js's ServiceError (`code`, `details`, `metadata`) extended with the decoded
// google.rpc.Status from the `grpc-status-details-bin` trailer: `err.status` ({code, message, details}
// with each detail expanded and tagged by '@type'), `err.errorInfo` ({reason, domain, metadata}),
// `err.reason` and `err.badRequest` ({field_violations: [{field, description, reason}]}).
//
// The channel retries idempotent RPCs (reads, GetOrCreateCall, UpsertUsers, KeepAlive) that fail with
// UNAVAILABLE, with exponential backoff, as protos/callplane/v1/callplane_grpc_service_config.json says
// (exported as SERVICE_CONFIG). `channelOptions` win: {'grpc.enable_retries': 0} turns retries off.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

/** Directory holding callplane/v1/*.proto (the repository's top-level protos/). */
const PROTO_DIR = path.resolve(__dirname, '..', '..', 'protos');
/** Client-only protos: a google.rpc.Status codec (google/rpc/*.proto themselves are in PROTO_DIR). */
const VENDORED_PROTO_DIR = path.resolve(__dirname, 'protos');

/** The gRPC service config (JSON string): retries on UNAVAILABLE for the idempotent RPCs. */
const SERVICE_CONFIG = fs.readFileSync(
  path.join(PROTO_DIR, 'callplane', 'v1', 'callplane_grpc_service_config.json'),
  'utf8',
);

const API_FILES = [
  'callplane/v1/call_type_service.proto',
  'callplane/v1/user.proto',
  'callplane/v1/call_service.proto',
];

/** Options required by this module (see the header comment for what they mean). */
const LOADER_OPTIONS = Object.freeze({
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR, VENDORED_PROTO_DIR],
});

const SERVICES = Object.freeze({
  callTypes: 'callplane.v1.CallTypeService',
  users: 'callplane.v1.UserService',
  calls: 'callplane.v1.CallService',
});

const STRUCT = 'google.protobuf.Struct';
const TIMESTAMP = 'google.protobuf.Timestamp';
const STRUCT_MARK = Symbol('callplane.struct');
const STATUS_DETAILS_KEY = 'grpc-status-details-bin';

// ---------------------------------------------------------------------------------------------------
// google.protobuf.Struct <-> plain JS

/** Converts a JS value (null, boolean, number, string, array, plain object) to a google.protobuf.Value. */
function toValue(value) {
  if (value === null || value === undefined) return { nullValue: 'NULL_VALUE' };
  switch (typeof value) {
    case 'boolean':
      return { boolValue: value };
    case 'number':
      if (!Number.isFinite(value)) throw new TypeError(`Struct numbers must be finite, got ${value}`);
      return { numberValue: value };
    case 'bigint':
      return { numberValue: Number(value) };
    case 'string':
      return { stringValue: value };
    case 'object':
      if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
      if (value instanceof Date) return { stringValue: value.toISOString() };
      return { structValue: toStruct(value) };
    default:
      throw new TypeError(`cannot put a ${typeof value} in a google.protobuf.Struct`);
  }
}

/** Converts a plain JS object to a google.protobuf.Struct in proto-loader's shape. */
function toStruct(object) {
  if (object === null || typeof object !== 'object' || Array.isArray(object)) {
    throw new TypeError('a google.protobuf.Struct is made from a plain object');
  }
  if (isMarkedStruct(object)) return object;
  const fields = {};
  for (const [key, value] of Object.entries(object)) {
    if (value !== undefined) fields[key] = toValue(value);
  }
  const struct = { fields };
  Object.defineProperty(struct, STRUCT_MARK, { value: true });
  return struct;
}

/** Converts a google.protobuf.Value (as decoded by proto-loader, or built by toValue) to JS. */
function fromValue(value) {
  if (value === null || value === undefined) return null;
  const kind = value.kind || VALUE_KINDS.find((k) => value[k] !== undefined && value[k] !== null);
  switch (kind) {
    case 'nullValue':
      return null;
    case 'numberValue':
      return Number(value.numberValue);
    case 'stringValue':
      return value.stringValue;
    case 'boolValue':
      return Boolean(value.boolValue);
    case 'structValue':
      return fromStruct(value.structValue) ?? {};
    case 'listValue':
      return ((value.listValue && value.listValue.values) || []).map(fromValue);
    default:
      return null; // a Value with no kind set
  }
}
const VALUE_KINDS = ['nullValue', 'numberValue', 'stringValue', 'boolValue', 'structValue', 'listValue'];

/** Converts a google.protobuf.Struct to a plain JS object; an unset Struct (null) stays null. */
function fromStruct(struct) {
  if (struct === null || struct === undefined) return null;
  const out = {};
  for (const [key, value] of Object.entries(struct.fields || {})) out[key] = fromValue(value);
  return out;
}

function isMarkedStruct(object) {
  return Boolean(object && object[STRUCT_MARK]);
}

// ---------------------------------------------------------------------------------------------------
// Timestamps

/** Converts a Date (or epoch milliseconds) to a google.protobuf.Timestamp. */
function toTimestamp(date) {
  const ms = date instanceof Date ? date.getTime() : Number(date);
  if (!Number.isFinite(ms)) throw new TypeError('invalid date');
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: Math.round((ms - seconds * 1000) * 1e6) };
}

/** Converts a google.protobuf.Timestamp to a Date (null stays null). */
function fromTimestamp(ts) {
  if (ts === null || ts === undefined) return null;
  return new Date(Number(ts.seconds) * 1000 + Math.floor((ts.nanos || 0) / 1e6));
}

// ---------------------------------------------------------------------------------------------------
// Loading

let cached = null;

/** Loads (once) and returns {packageDefinition, grpcObject, statusCodec}. */
function load() {
  if (cached) return cached;
  const packageDefinition = protoLoader.loadSync(API_FILES, LOADER_OPTIONS);
  const grpcObject = grpc.loadPackageDefinition(packageDefinition);
  // `json: true` makes protobufjs expand google.protobuf.Any into the packed message plus '@type'.
  const statusDefinition = protoLoader.loadSync(['callplane_client/status_codec.proto'], {
    ...LOADER_OPTIONS,
    json: true,
  });
  const statusCodec = statusDefinition['callplane_client.StatusCodec'].Decode;
  cached = { packageDefinition, grpcObject, statusCodec, messages: indexMessages(packageDefinition) };
  return cached;
}

/** Full message name -> DescriptorProto, including nested (map entry) types. */
function indexMessages(packageDefinition) {
  const messages = new Map();
  const add = (fullName, descriptor) => {
    messages.set(fullName, descriptor);
    for (const nested of descriptor.nestedType || []) add(`${fullName}.${nested.name}`, nested);
  };
  for (const [name, entry] of Object.entries(packageDefinition)) {
    if (entry && entry.format === 'Protocol Buffer 3 DescriptorProto') add(name, entry.type);
  }
  return messages;
}

/** Resolves a (possibly relative) field type name the way protoc does: innermost scope first. */
function resolveType(messages, scope, typeName) {
  if (typeName.startsWith('.')) return typeName.slice(1);
  const parts = scope.split('.');
  for (let i = parts.length; i >= 0; i--) {
    const candidate = [...parts.slice(0, i), typeName].join('.');
    if (messages.has(candidate) || candidate === STRUCT || candidate === TIMESTAMP) return candidate;
  }
  return typeName;
}

/**
 * Walks `message` of type `typeName` and replaces Struct (and, for requests, Timestamp) fields using
 * `convert(fieldTypeName, value)`. Returns a new object; the input is not modified.
 */
function transform(messages, typeName, message, convert) {
  if (message === null || message === undefined || typeof message !== 'object') return message;
  const descriptor = messages.get(typeName);
  if (!descriptor) return message;
  const out = { ...message };
  for (const field of descriptor.field || []) {
    if (field.type !== 'TYPE_MESSAGE' || out[field.name] === undefined || out[field.name] === null) continue;
    const fieldType = resolveType(messages, typeName, field.typeName);
    const entry = messages.get(fieldType);
    const mapEntry = entry && entry.options && entry.options.mapEntry;
    const one = (value) => {
      if (fieldType === STRUCT || fieldType === TIMESTAMP) return convert(fieldType, value);
      if (mapEntry) {
        const valueField = entry.field.find((f) => f.name === 'value');
        if (valueField.type !== 'TYPE_MESSAGE') return value;
        const valueType = resolveType(messages, fieldType, valueField.typeName);
        const mapped = {};
        for (const [k, v] of Object.entries(value)) {
          mapped[k] =
            valueType === STRUCT || valueType === TIMESTAMP
              ? convert(valueType, v)
              : transform(messages, valueType, v, convert);
        }
        return mapped;
      }
      return transform(messages, fieldType, value, convert);
    };
    const value = out[field.name];
    out[field.name] = field.label === 'LABEL_REPEATED' && !mapEntry ? value.map(one) : one(value);
  }
  return out;
}

function requestConverter(typeName, value) {
  if (typeName === STRUCT) return toStruct(value);
  if (typeName === TIMESTAMP && (value instanceof Date || typeof value === 'number')) return toTimestamp(value);
  return value;
}

function responseConverter(typeName, value) {
  return typeName === STRUCT ? fromStruct(value) : value;
}

// ---------------------------------------------------------------------------------------------------
// Errors

/** Decodes a google.rpc.Status (bytes), expanding details into {'@type': ..., ...fields}. */
function decodeStatus(bytes) {
  const { statusCodec } = load();
  return statusCodec.requestDeserialize(Buffer.from(bytes));
}

/**
 * Adds the decoded google.rpc.Status to a grpc-js ServiceError (in place) and returns it:
 * `err.status`, `err.errorInfo`, `err.reason`, `err.badRequest` (the last three may be undefined).
 */
function decorateError(err) {
  if (!err || !err.metadata || typeof err.metadata.get !== 'function') return err;
  const [raw] = err.metadata.get(STATUS_DETAILS_KEY);
  if (!raw) return err;
  try {
    const status = decodeStatus(raw);
    const find = (type) => (status.details || []).find((d) => d['@type'] === `type.googleapis.com/${type}`);
    err.status = status;
    err.errorInfo = find('google.rpc.ErrorInfo');
    err.reason = err.errorInfo && err.errorInfo.reason;
    err.badRequest = find('google.rpc.BadRequest');
  } catch (decodeError) {
    err.statusDecodeError = decodeError;
  }
  return err;
}

// ---------------------------------------------------------------------------------------------------
// Clients

function lowerFirst(name) {
  return name.charAt(0).toLowerCase() + name.slice(1);
}

function toDeadline(timeoutMs, deadline) {
  if (deadline !== undefined) return deadline;
  if (timeoutMs === undefined || timeoutMs === null) return undefined;
  return new Date(Date.now() + timeoutMs);
}

/**
 * Wraps one grpc-js service client: every unary RPC becomes `async rpcName(request, callOptions)`
 * (available both as `getOrCreateCall` and `GetOrCreateCall`). callOptions: `metadata` (a grpc.Metadata
 * or a plain object), `token` (overrides the client's), `deadline` (Date or ms since epoch),
 * `timeoutMs`.
 */
function wrapService(client, serviceName, settings) {
  const { messages, packageDefinition } = load();
  const service = packageDefinition[serviceName];
  const wrapper = { raw: client };
  for (const [rpcName, method] of Object.entries(service)) {
    if (method.requestStream || method.responseStream) continue; // use `.raw` for streaming RPCs
    const pkg = serviceName.slice(0, serviceName.lastIndexOf('.'));
    const requestType = messageName(messages, pkg, method.requestType.type.name);
    const responseType = messageName(messages, pkg, method.responseType.type.name);
    const fn = (request = {}, callOptions = {}) =>
      new Promise((resolve, reject) => {
        const plain = settings.structs !== 'raw';
        const message = plain
          ? transform(messages, requestType, request, requestConverter)
          : request;
        const metadata = buildMetadata(settings, callOptions);
        const options = {};
        const deadline = toDeadline(callOptions.timeoutMs ?? settings.timeoutMs, callOptions.deadline);
        if (deadline !== undefined) options.deadline = deadline;
        client[rpcName](message, metadata, options, (err, response) => {
          if (err) {
            reject(decorateError(err));
            return;
          }
          resolve(plain ? transform(messages, responseType, response, responseConverter) : response);
        });
      });
    wrapper[rpcName] = fn;
    wrapper[lowerFirst(rpcName)] = fn;
  }
  return wrapper;
}

/** Full name of an RPC's message type: same package as the service, else the unique match by name. */
function messageName(messages, pkg, name) {
  if (messages.has(`${pkg}.${name}`)) return `${pkg}.${name}`;
  const matches = [...messages.keys()].filter((full) => full.endsWith(`.${name}`));
  return matches.length === 1 ? matches[0] : `${pkg}.${name}`;
}

function buildMetadata(settings, callOptions) {
  const metadata = new grpc.Metadata();
  for (const source of [settings.metadata, callOptions.metadata]) {
    if (!source) continue;
    if (source instanceof grpc.Metadata) {
      for (const [key, values] of Object.entries(source.getMap())) metadata.set(key, values);
    } else {
      for (const [key, value] of Object.entries(source)) metadata.set(key, value);
    }
  }
  const token = callOptions.token !== undefined ? callOptions.token : settings.token;
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

/**
 * Connects to a Callplane server.
 *
 * @param {string} target host:port, e.g. '127.0.0.1:50051'.
 * @param {object} [options]
 * @param {string} [options.token] JWT sent as `authorization: Bearer <token>` on every call.
 * @param {object|grpc.Metadata} [options.metadata] Extra metadata sent on every call.
 * @param {grpc.ChannelCredentials} [options.credentials] Default: insecure (plaintext).
 * @param {number} [options.timeoutMs] Default per-call deadline.
 * @param {'plain'|'raw'} [options.structs] How Struct fields look (default 'plain').
 * @param {object} [options.channelOptions] grpc-js channel options (they win over the retry config).
 * @returns {{callTypes: object, users: object, calls: object, waitForReady: Function, close: Function}}
 */
function connect(target, options = {}) {
  const { grpcObject } = load();
  const credentials = options.credentials || grpc.credentials.createInsecure();
  const settings = {
    token: options.token,
    metadata: options.metadata,
    timeoutMs: options.timeoutMs,
    structs: options.structs || 'plain',
  };
  const v1 = grpcObject.callplane.v1;
  // The three clients share one channel.
  const channelOptions = {
    'grpc.service_config': SERVICE_CONFIG,
    'grpc.enable_retries': 1,
    ...(options.channelOptions || {}),
  };
  const first = new v1.CallTypeService(target, credentials, channelOptions);
  const channelOverride = first.getChannel();
  const clients = {
    callTypes: first,
    users: new v1.UserService(target, credentials, { channelOverride }),
    calls: new v1.CallService(target, credentials, { channelOverride }),
  };
  const result = {};
  for (const [key, serviceName] of Object.entries(SERVICES)) {
    result[key] = wrapService(clients[key], serviceName, settings);
  }
  /** Resolves once the channel is connected (rejects after `timeoutMs`, default 5000). */
  result.waitForReady = (timeoutMs = 5000) =>
    new Promise((resolve, reject) => {
      first.waitForReady(new Date(Date.now() + timeoutMs), (err) => (err ? reject(err) : resolve()));
    });
  result.close = () => first.close();
  return result;
}

module.exports = {
  connect,
  load,
  toStruct,
  fromStruct,
  toValue,
  fromValue,
  toTimestamp,
  fromTimestamp,
  decodeStatus,
  decorateError,
  grpc,
  status: grpc.status,
  PROTO_DIR,
  LOADER_OPTIONS,
  SERVICE_CONFIG,
};
