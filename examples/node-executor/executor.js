#!/usr/bin/env node
// A Node.js executor for Arbiter: drives flow runs and their task runs through their
// lifecycle, asking the worker pool before every state change and obeying the answer.
//
//   flow run PENDING → RUNNING ┬ task run PENDING → RUNNING → COMPLETED ┬ COMPLETED
//                              └ task run …                            ┘
//
// Configuration is by environment variables (see README.md). Exits 0 when every run
// completed, 1 when any did not, 2 when it could not start.

import { randomBytes, randomUUID } from 'node:crypto';
import { dirname, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { ArbiterClient, loadSchemas } from './arbiter-client.js';

const here = dirname(fileURLToPath(import.meta.url));

function readConfig(env) {
  const count = (name, fallback) => {
    const value = Number(env[name] ?? fallback);
    if (!Number.isInteger(value) || value < 0) {
      throw new Error(`${name} must be a whole number, got ${env[name]}`);
    }
    return value;
  };
  const output = env.EXECUTOR_OUTPUT ?? 'text';
  if (!['text', 'json'].includes(output)) {
    throw new Error(`EXECUTOR_OUTPUT must be text or json, got ${output}`);
  }
  return {
    amqpUrl: env.ARBITER_AMQP_URL ?? 'amqp://guest:guest@localhost:5672/',
    topology: {
      proposalsExchange: env.ARBITER_PROPOSALS_EXCHANGE ?? 'arbiter.proposals',
      proposalsRoutingKey: env.ARBITER_PROPOSALS_ROUTING_KEY ?? 'propose',
      outcomesExchange: env.ARBITER_OUTCOMES_EXCHANGE ?? 'arbiter.outcomes',
    },
    flows: count('EXECUTOR_FLOWS', 3),
    tasksPerFlow: count('EXECUTOR_TASKS_PER_FLOW', 3),
    taskTags: (env.EXECUTOR_TASK_TAGS ?? '').split(',').filter(Boolean),
    workMs: count('EXECUTOR_WORK_MS', 20),
    timeoutMs: count('EXECUTOR_TIMEOUT_S', 30) * 1000,
    schemasDir: resolve(env.EXECUTOR_SCHEMAS_DIR ?? resolve(here, '../../schemas/jsonschema')),
    output,
  };
}

class Executor {
  finalStates = { flow_run: new Map(), task_run: new Map() }; // run id → state type
  failures = [];

  constructor(client, config) {
    this.client = client;
    this.config = config;
  }

  /** Propose `type`; anything but an ACCEPT into that state is a failure. */
  async step(runKind, runId, type, traceId, run) {
    let outcome;
    try {
      outcome = await this.client.propose(runKind, runId, { type }, { run, traceId });
    } catch (error) {
      throw new Error(`${runKind} ${runId} → ${type}: ${error.message}`);
    }
    this.finalStates[runKind].set(runId, outcome.run?.state_type ?? outcome.state?.type ?? null);
    if (outcome.status !== 'ACCEPT' || outcome.state?.type !== type) {
      const why = outcome.details?.reason ?? outcome.error?.message ?? 'no reason given';
      throw new Error(`${runKind} ${runId} → ${type}: ${outcome.status} (${why})`);
    }
  }

  async flow(index) {
    const flowRunId = randomUUID();
    const traceId = randomBytes(16).toString('hex'); // one W3C trace per flow run
    const spec = { name: `node-flow-${index}`, flow_name: 'node-executor' };
    await this.step('flow_run', flowRunId, 'PENDING', traceId, spec);
    await this.step('flow_run', flowRunId, 'RUNNING', traceId);
    const tasks = Array.from({ length: this.config.tasksPerFlow }, (_, t) =>
      this.task(flowRunId, t, traceId),
    );
    const failed = (await Promise.allSettled(tasks)).find((task) => task.status === 'rejected');
    await this.step('flow_run', flowRunId, failed ? 'FAILED' : 'COMPLETED', traceId);
    if (failed) throw failed.reason;
  }

  async task(flowRunId, index, traceId) {
    const taskRunId = randomUUID();
    const spec = {
      name: `node-task-${index}`,
      task_key: `node-task-${index}`,
      flow_run_id: flowRunId,
      tags: this.config.taskTags,
    };
    await this.step('task_run', taskRunId, 'PENDING', traceId, spec);
    // WAITs (a full tag limit) are followed
    await this.step('task_run', taskRunId, 'RUNNING', traceId);
    await sleep(this.config.workMs); // the task's "work"
    await this.step('task_run', taskRunId, 'COMPLETED', traceId);
  }

  async run() {
    const flows = Array.from({ length: this.config.flows }, (_, index) => this.flow(index));
    for (const result of await Promise.allSettled(flows)) {
      if (result.status === 'rejected') this.failures.push(result.reason.message);
    }
  }
}

function summarize(executor, client, elapsedS) {
  const states = (runKind) => Object.fromEntries(executor.finalStates[runKind]);
  return {
    flow_runs: states('flow_run'),
    task_runs: states('task_run'),
    proposals: client.stats.published,
    outcomes: client.stats.statuses,
    traced_outcomes: client.stats.tracedOutcomes,
    reconnects: client.stats.reconnects,
    republished: client.stats.republished,
    late_outcomes_dropped: client.stats.lateOutcomes,
    elapsed_s: Number(elapsedS.toFixed(2)),
    failures: executor.failures,
  };
}

function printText(summary) {
  const listed = (counts) =>
    Object.entries(counts)
      .map(([key, n]) => `${n} ${key}`)
      .join(', ') || 'none';
  const runs = (finalStates) => {
    const counts = {};
    for (const state of Object.values(finalStates)) counts[state] = (counts[state] ?? 0) + 1;
    return `${Object.keys(finalStates).length} (${listed(counts)})`;
  };
  console.log(`flow runs    ${runs(summary.flow_runs)}`);
  console.log(`task runs    ${runs(summary.task_runs)}`);
  console.log(`proposals    ${summary.proposals} (outcomes: ${listed(summary.outcomes)})`);
  console.log(`traces       ${summary.traced_outcomes} outcomes carried their trace id`);
  console.log(
    `reconnects   ${summary.reconnects} (${summary.republished} proposals republished,` +
      ` ${summary.late_outcomes_dropped} late outcomes dropped)`,
  );
  console.log(`elapsed      ${summary.elapsed_s} s`);
  for (const failure of summary.failures) console.log(`FAILED       ${failure}`);
  console.log(summary.failures.length ? 'FAILED' : 'OK');
}

async function main() {
  let config, client;
  try {
    config = readConfig(process.env);
    const schemas = loadSchemas(config.schemasDir);
    const { amqpUrl, topology, timeoutMs } = config;
    client = await ArbiterClient.connect(amqpUrl, { topology, schemas, timeoutMs });
  } catch (error) {
    console.error(`node-executor: cannot start: ${error.message}`);
    return 2;
  }
  const started = performance.now();
  const executor = new Executor(client, config);
  try {
    await executor.run();
  } finally {
    await client.close();
  }
  const summary = summarize(executor, client, (performance.now() - started) / 1000);
  if (config.output === 'json') console.log(JSON.stringify(summary, null, 2));
  else printText(summary);
  return summary.failures.length ? 1 : 0;
}

process.exitCode = await main();
