// An Arbiter protocol v1 client: publish a proposal, await its outcome, follow WAITs,
// and publish unanswered proposals again after a reconnect.
//
// Written from the contract alone (the project README and schemas/jsonschema/): every
// proposal sent and every outcome received is checked against the JSON Schemas.

import { randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import Ajv2020 from 'ajv/dist/2020.js';
import addFormats from 'ajv-formats';
import amqp from 'amqplib';

/** A message that does not match its JSON Schema (ours or the worker's). */
export class SchemaError extends Error {}

/** No outcome arrived in time (the proposal may still be processed later). */
export class OutcomeTimeoutError extends Error {}

/** Validators for the two wire messages, compiled from `schemas/jsonschema/` (draft 2020-12). */
export function loadSchemas(directory) {
  const ajv = new Ajv2020({ allErrors: true, strict: true });
  addFormats(ajv);
  const compile = (file) => {
    const validate = ajv.compile(JSON.parse(readFileSync(join(directory, file), 'utf8')));
    return (document, what) => {
      if (!validate(document)) {
        throw new SchemaError(`${what} does not match ${file}: ${ajv.errorsText(validate.errors)}`);
      }
    };
  };
  return {
    checkProposal: compile('proposal.schema.json'),
    checkOutcome: compile('outcome.schema.json'),
  };
}

export class ArbiterClient {
  // Outcomes come back on the outcomes exchange under this routing key (the proposal's
  // reply_to), bound to a private queue that is declared again on every connection.
  #replyKey = `reply.${randomUUID()}`;
  #connection = null;
  #channel = null; // null while disconnected: publishes wait for the reconnect
  #connected = false;
  #pending = new Map(); // proposal id → { content, properties, settle }

  stats = {
    published: 0,
    republished: 0,
    reconnects: 0,
    lateOutcomes: 0,
    statuses: {},
    tracedOutcomes: 0, // outcomes that came back with their proposal's trace id
  };

  constructor({ topology, schemas, timeoutMs }) {
    this.topology = topology;
    this.schemas = schemas;
    this.timeoutMs = timeoutMs;
  }

  static async connect(url, options) {
    const client = new ArbiterClient(options);
    client.#connection = await amqp.connect(url, {
      recovery: {
        initialDelay: 100,
        maxDelay: 2000,
        initialMaxRetries: 3,
        setup: (connection) => client.#setUp(connection),
      },
    });
    client.#connection.on('error', () => {}); // a lost connection is handled by recovery
    client.#connection.on('disconnect', (error) => {
      client.#channel = null;
      console.error(`arbiter-client: disconnected (${error.message}), reconnecting`);
    });
    return client;
  }

  async close() {
    await this.#connection?.close();
  }

  /** Runs on every (re)connection, before the connection is handed out. */
  async #setUp(connection) {
    const { proposalsExchange, outcomesExchange } = this.topology;
    const channel = await connection.createConfirmChannel();
    channel.on('error', () => {}); // the connection's close drives recovery
    channel.on('close', () => {
      if (this.#channel === channel) this.#channel = null;
    });
    // Proposals are published `mandatory`: one that no queue takes comes back here.
    channel.on('return', ({ properties }) =>
      this.#settle(
        properties.correlationId,
        new Error(`no queue took the proposal: is a worker pool running on ${proposalsExchange}?`),
      ),
    );
    await channel.assertExchange(proposalsExchange, 'direct', { durable: true });
    await channel.assertExchange(outcomesExchange, 'topic', { durable: true });
    const { queue } = await channel.assertQueue('', { exclusive: true, autoDelete: true });
    await channel.bindQueue(queue, outcomesExchange, this.#replyKey);
    await channel.consume(queue, (message) => message && this.#onOutcome(message), {
      noAck: true,
    });
    this.#channel = channel;
    if (!this.#connected) {
      this.#connected = true;
      return;
    }
    // Outcomes published while we were away went to a queue that no longer exists. The
    // same proposal id may be published again at any time: a processed one is replayed.
    this.stats.reconnects += 1;
    for (const entry of this.#pending.values()) {
      this.stats.republished += 1;
      this.#publish(entry);
    }
  }

  /**
   * Propose `state` for a run and return the outcome that is not a WAIT. A WAIT is
   * stored under its proposal id, so after sleeping `delay_seconds` we propose again
   * under a new id (the same id would be answered with the same WAIT).
   */
  async propose(runKind, runId, state, { run, traceId } = {}) {
    for (;;) {
      const proposal = {
        schema_version: 1,
        proposal_id: randomUUID(),
        run_kind: runKind,
        run_id: runId,
        state,
        ...(run && { run }),
      };
      const outcome = await this.#request(proposal, traceId);
      if (outcome.status !== 'WAIT') return outcome;
      await sleep((outcome.details?.delay_seconds ?? 0) * 1000);
      run = undefined; // the first proposal created the run
    }
  }

  /**
   * Publish one proposal and await the outcome whose correlation id is its id. With a
   * `traceId` (32 hex digits) the proposal carries a W3C `traceparent` header, a new span
   * id each time; the worker puts it on the outcome, where it is checked.
   */
  #request(proposal, traceId) {
    this.schemas.checkProposal(proposal, `proposal ${proposal.proposal_id}`);
    const id = proposal.proposal_id;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const message = `no outcome for proposal ${id} within ${this.timeoutMs / 1000} s`;
        this.#settle(id, new OutcomeTimeoutError(message));
      }, this.timeoutMs);
      const entry = {
        content: Buffer.from(JSON.stringify(proposal)),
        properties: {
          contentType: 'application/json',
          persistent: true,
          messageId: id, // must equal proposal_id
          correlationId: id, // echoed by the outcome
          replyTo: this.#replyKey,
          mandatory: true,
          ...(traceId && {
            headers: { traceparent: `00-${traceId}-${randomBytes(8).toString('hex')}-01` },
          }),
        },
        traceId,
        settle: (error, outcome) => {
          clearTimeout(timer);
          if (error) reject(error);
          else resolve(outcome);
        },
      };
      this.#pending.set(id, entry);
      this.stats.published += 1;
      this.#publish(entry);
    });
  }

  #publish({ content, properties }) {
    const channel = this.#channel;
    if (!channel) return; // disconnected: #setUp publishes it after the reconnect
    const { proposalsExchange, proposalsRoutingKey } = this.topology;
    try {
      channel.publish(proposalsExchange, proposalsRoutingKey, content, properties, (error) => {
        // A nack is the broker refusing the proposal (a full queue): fail it. The other
        // error, "channel closed", leaves it pending for the reconnect.
        if (error?.message === 'message nacked') {
          this.#settle(properties.correlationId, new Error('the broker refused the proposal'));
        }
      });
    } catch {
      // The channel closed under us: published again after the reconnect.
    }
  }

  #onOutcome(message) {
    const id = message.properties.correlationId;
    if (!this.#pending.has(id)) {
      // Outcomes are delivered at least once, and a republished proposal is answered
      // twice (the second time by a replay): only the first one counts.
      this.stats.lateOutcomes += 1;
      return;
    }
    let outcome;
    try {
      outcome = JSON.parse(message.content.toString('utf8'));
      this.schemas.checkOutcome(outcome, `outcome of proposal ${id}`);
      if (outcome.proposal_id !== id) {
        throw new SchemaError(`outcome of proposal ${outcome.proposal_id} has correlation id ${id}`);
      }
      const expected = this.#pending.get(id).traceId;
      if (expected) {
        const carried = String(message.properties.headers?.traceparent ?? '').split('-')[1];
        if (carried !== expected) {
          throw new SchemaError(`outcome of proposal ${id} lost its trace (${carried ?? 'none'})`);
        }
        this.stats.tracedOutcomes += 1;
      }
    } catch (error) {
      this.#settle(id, error);
      return;
    }
    this.stats.statuses[outcome.status] = (this.stats.statuses[outcome.status] ?? 0) + 1;
    this.#settle(id, null, outcome);
  }

  #settle(id, error, outcome) {
    const entry = this.#pending.get(id);
    if (!entry) return;
    this.#pending.delete(id);
    entry.settle(error, outcome);
  }
}
