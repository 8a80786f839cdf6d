"""The ``arbiter`` command line (docs/protocol.md §5)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import uuid
from collections.abc import Sequence

from pydantic import ValidationError

from arbiter.worker.logs import configure_logging
from arbiter.worker.runtime import ServiceError, open_database, run, tune_gc
from arbiter.worker.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "ARBITER_" + str(first["loc"][0]).upper() if first["loc"] else "ARBITER_*"
        raise ServiceError(f"{name} is invalid: {first['msg']}") from None


async def _migrate(settings: Settings) -> int:
    from arbiter.worker.db.migrate import upgrade_async

    async with open_database(settings):
        pass
    await upgrade_async(settings.database_url)
    print("database schema is up to date")
    return 0


async def _worker(settings: Settings) -> int:
    from arbiter.worker.service import run_worker

    return await run_worker(settings)


async def _runs_show(settings: Settings, run_id: str, as_json: bool) -> int:
    from arbiter.worker.db.store import PgStore

    try:
        parsed = uuid.UUID(run_id)
    except ValueError:
        raise ServiceError(f"RUN_ID {run_id!r} is not a UUID") from None
    async with open_database(settings) as engine, engine.connect() as conn:
        store = PgStore(conn)
        kind = await store.run_kind_of(parsed)
        if kind is None:
            print(f"arbiter: no flow run or task run {parsed}", file=sys.stderr)
            return 1
        run = (
            await store.read_flow_run(parsed)
            if kind == "flow_run"
            else await store.read_task_run(parsed)
        )
        history = await store.read_history(kind, parsed)
    assert run is not None
    if as_json:
        document = {
            "run": {"kind": kind, **run.model_dump(mode="json", exclude={"state"})},
            "history": [state.model_dump(mode="json") for state in history],
        }
        print(json.dumps(document, indent=2))
        return 0
    summary = run.summary()
    print(f"{kind} {run.id}  {run.name!r}")
    print(
        f"  state {summary.state_type} ({summary.state_name})  run_count {summary.run_count}  "
        f"total_run_time {summary.total_run_time:.3f}s"
    )
    print(f"  start {summary.start_time}  end {summary.end_time}")
    for state in history:
        reason = f"  {state.message}" if state.message else ""
        print(f"  {state.timestamp.isoformat()}  {state.type.value:<10} {state.name}{reason}")
    return 0


async def _proposals_show(settings: Settings, proposal_id: str) -> int:
    """The stored answer to a proposal id: what a replay would publish again."""
    from arbiter.worker.db.store import PgStore

    try:
        parsed = uuid.UUID(proposal_id)
    except ValueError:
        raise ServiceError(f"PROPOSAL_ID {proposal_id!r} is not a UUID") from None
    async with open_database(settings) as engine, engine.connect() as conn:
        known = await PgStore(conn).find_processed(parsed)
    if known is None:
        print(
            f"arbiter: proposal {parsed} is not recorded (never processed, INVALID,"
            " or older than the retention window)",
            file=sys.stderr,
        )
        return 1
    document = {"outcome": json.loads(known.outcome_json), "outbox": json.loads(known.outbox_json)}
    print(json.dumps(document, indent=2))
    return 0


async def _limits(settings: Settings, args: argparse.Namespace) -> int:
    from arbiter.worker.db.store import PgStore

    if args.globally:
        return await _global_limits(settings, args)
    async with open_database(settings) as engine, engine.begin() as conn:
        store = PgStore(conn)
        if args.limits_command == "set":
            await store.upsert_tag_limit(args.name, args.limit)
            print(f"limit on tag {args.name!r} set to {args.limit}")
            return 0
        if args.limits_command == "rm":
            if not await store.delete_tag_limit(args.name):
                print(f"arbiter: no limit on tag {args.name!r}", file=sys.stderr)
                return 1
            print(f"limit on tag {args.name!r} removed")
            return 0
        limits = await store.list_tag_limits()
    if args.json:
        rows = [
            {
                "tag": lim.tag,
                "limit": lim.limit,
                "active_slots": lim.active_slots,
                "slot_expires": {run: at.isoformat() for run, at in sorted(lim.expires.items())},
            }
            for lim in limits
        ]
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'TAG':<30} {'LIMIT':>5} {'ACTIVE':>6}")
        for lim in limits:
            print(f"{lim.tag:<30} {lim.limit:>5} {len(lim.active_slots):>6}")
    return 0


async def _global_limits(settings: Settings, args: argparse.Namespace) -> int:
    """``limits … --global``: the global (V2) limits, their holders and lease expiries."""
    from arbiter.worker.db.store import PgStore

    async with open_database(settings) as engine, engine.begin() as conn:
        store = PgStore(conn)
        if args.limits_command == "set":
            decay = args.slot_decay_per_second
            await store.upsert_global_limit(
                args.name, args.limit, active=not args.inactive, slot_decay_per_second=decay
            )
            print(f"global limit {args.name!r} set to {args.limit}")
            return 0
        if args.limits_command == "rm":
            if not await store.delete_global_limit(args.name):
                print(f"arbiter: no global limit {args.name!r}", file=sys.stderr)
                return 1
            print(f"global limit {args.name!r} removed")
            return 0
        limits = await store.list_global_limits()
    if args.json:
        rows = [
            {
                "name": lim.name,
                "limit": lim.limit,
                "active": lim.active,
                "active_slots": lim.active_slots,
                "denied_slots": lim.denied_slots,
                "slot_decay_per_second": lim.slot_decay_per_second,
                "avg_slot_occupancy_seconds": lim.avg_slot_occupancy_seconds,
                "holders": [
                    {
                        "holder": holder,
                        "acquired": lease.acquired.isoformat(),
                        "expires": lease.expires.isoformat(),
                    }
                    for holder, lease in sorted(lim.holders.items())
                ],
            }
            for lim in limits
        ]
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'NAME':<30} {'LIMIT':>5} {'ACTIVE':>6} {'DENIED':>6}  ON")
        for lim in limits:
            on = "yes" if lim.active else "no"
            print(
                f"{lim.name:<30} {lim.limit:>5} {lim.active_slots:>6} {lim.denied_slots:>6}  {on}"
            )
    return 0


async def _deployments(settings: Settings, args: argparse.Namespace) -> int:
    """Deployments and their concurrency settings (their runs may also name them)."""
    from arbiter.rules.store import Deployment, deployment_limit_name
    from arbiter.worker.db.store import PgStore

    async with open_database(settings) as engine, engine.begin() as conn:
        store = PgStore(conn)
        if args.deployments_command == "set":
            deployment = Deployment(
                args.deployment_id,
                args.name,
                args.limit,
                args.collision_strategy,
                args.grace_period_seconds,
            )
            await store.upsert_deployment(deployment)
            print(f"deployment {args.deployment_id} set")
            return 0
        if args.deployments_command == "rm":
            if not await store.delete_deployment(args.deployment_id):
                print(f"arbiter: no deployment {args.deployment_id}", file=sys.stderr)
                return 1
            print(f"deployment {args.deployment_id} removed")
            return 0
        deployments = await store.list_deployments()
        limits = {limit.name: limit for limit in await store.list_global_limits()}
    rows = []
    for d in deployments:
        limit = limits.get(deployment_limit_name(d.id))
        rows.append(
            {
                "id": str(d.id),
                "name": d.name,
                "concurrency_limit": d.concurrency_limit,
                "collision_strategy": d.collision_strategy,
                "grace_period_seconds": d.grace_period_seconds,
                "active_slots": limit.active_slots if limit else 0,
                "holders": sorted(limit.holders) if limit else [],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'ID':<36} {'NAME':<20} {'LIMIT':>5} {'ACTIVE':>6}  STRATEGY")
        for row in rows:
            shown = "-" if row["concurrency_limit"] is None else row["concurrency_limit"]
            print(
                f"{row['id']:<36} {row['name']:<20} {shown:>5} {row['active_slots']:>6}"
                f"  {row['collision_strategy']}"
            )
    return 0


async def _sweep(settings: Settings) -> int:
    """One pass of the background sweeps by hand; prints what each transitioned, as JSON."""
    from arbiter.worker.runtime import build_runtime
    from arbiter.worker.sweepers import Sweeper
    from arbiter.worker.topology import TopologyMissing

    async with build_runtime(settings) as runtime:
        sweeper = Sweeper(settings, runtime.engine, runtime.orchestrator, runtime.connection)
        try:
            await sweeper.start()
        except TopologyMissing as exc:
            raise ServiceError(str(exc)) from None
        swept = await sweeper.sweep_once()
        swept["purged_proposals"] = await sweeper.purge()
    print(json.dumps(swept))
    return 0


_GLOBAL_HELP = "a global (V2) limit by name; tasks use those named tag:<tag>"
_DECAY_HELP = "global: a rate limit, each slot frees itself 1/decay seconds after it is taken"


def _grace_seconds(text: str) -> int:
    value = int(text)
    if not 60 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be from 60 to 86400: {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arbiter", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="create or upgrade the database schema")
    worker = commands.add_parser("worker", help="run one worker process")
    worker.add_argument(
        "--concurrency", type=int, help="transactions (batches of proposals) run at once"
    )
    worker.add_argument("--prefetch", type=int, help="deliveries the broker may send ahead")
    runs = commands.add_parser("runs", help="inspect runs").add_subparsers(
        dest="runs_command", required=True
    )
    show = runs.add_parser("show", help="a run and its state history, oldest first")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true")
    proposals = commands.add_parser("proposals", help="inspect processed proposals")
    proposal_commands = proposals.add_subparsers(dest="proposals_command", required=True)
    shown = proposal_commands.add_parser(
        "show", help="the stored outcome and outbox of a proposal id, as JSON"
    )
    shown.add_argument("proposal_id")
    commands.add_parser(
        "sweep", help="one pass of the background sweeps (late runs, expired pauses, cleanup)"
    )
    deployments = commands.add_parser(
        "deployments", help="deployments and their concurrency limits"
    ).add_subparsers(dest="deployments_command", required=True)
    dset = deployments.add_parser("set", help="create or change a deployment")
    dset.add_argument("deployment_id", type=uuid.UUID, metavar="ID")
    dset.add_argument("--name", default="")
    dset.add_argument("--limit", type=_non_negative, default=None, help="none: no limit")
    dset.add_argument("--collision-strategy", choices=("ENQUEUE", "CANCEL_NEW"), default="ENQUEUE")
    dset.add_argument("--grace-period-seconds", type=_grace_seconds, default=None)
    dls = deployments.add_parser("ls", help="list deployments and the runs holding their slots")
    dls.add_argument("--json", action="store_true")
    drm = deployments.add_parser("rm", help="remove a deployment (and its limit)")
    drm.add_argument("deployment_id", type=uuid.UUID, metavar="ID")
    limits = commands.add_parser(
        "limits", help="tag concurrency limits (V1), or with --global the global (V2) limits"
    ).add_subparsers(dest="limits_command", required=True)
    set_ = limits.add_parser("set", help="create or resize a limit")
    set_.add_argument("name", metavar="TAG|NAME")
    set_.add_argument("limit", type=_non_negative)
    set_.add_argument("--global", dest="globally", action="store_true", help=_GLOBAL_HELP)
    set_.add_argument("--inactive", action="store_true", help="global: switched off")
    set_.add_argument(
        "--slot-decay-per-second", type=_non_negative_float, default=0.0, help=_DECAY_HELP
    )
    ls = limits.add_parser("ls", help="list limits and the runs holding their slots")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--global", dest="globally", action="store_true", help=_GLOBAL_HELP)
    rm = limits.add_parser("rm", help="remove a limit")
    rm.add_argument("name", metavar="TAG|NAME")
    rm.add_argument("--global", dest="globally", action="store_true", help=_GLOBAL_HELP)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings()
        if args.command == "worker":
            overrides = {
                key: value
                for key, value in {
                    "concurrency": args.concurrency,
                    "prefetch": args.prefetch,
                }.items()
                if value is not None
            }
            settings = settings.model_copy(update=overrides)
        configure_logging(settings.log_level, settings.log_format)
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "worker":
            tune_gc()
            return run(_worker(settings), settings)
        if args.command == "runs":
            return asyncio.run(_runs_show(settings, args.run_id, args.json))
        if args.command == "sweep":
            return asyncio.run(_sweep(settings))
        if args.command == "proposals":
            return asyncio.run(_proposals_show(settings, args.proposal_id))
        if args.command == "deployments":
            return asyncio.run(_deployments(settings, args))
        return asyncio.run(_limits(settings, args))
    except ServiceError as exc:
        print(f"arbiter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
