"""The `arbiter` command line of docs/protocol.md §5, run as a real process."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid

import pytest

from arbiter.schemas import FlowRunSpec, OutcomeStatus, ProposedState, StateType, TaskRunSpec
from arbiter.worker.client import ArbiterClient
from arbiter.worker.settings import Settings
from devtools.pool import settings_env

pytestmark = pytest.mark.integration


def arbiter(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "arbiter", *args],
        env={**settings_env(settings), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_is_safe_to_run_twice(settings: Settings) -> None:
    """A second `arbiter migrate` finds the schema current and succeeds."""
    assert arbiter(settings, "migrate").returncode == 0
    second = arbiter(settings, "migrate")
    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout


def test_limits_set_ls_rm(settings: Settings) -> None:
    """A limit can be set, listed as JSON with its slots, resized, and removed."""
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    assert arbiter(settings, "limits", "set", tag, "3").returncode == 0
    assert arbiter(settings, "limits", "set", tag, "5").returncode == 0
    listed = json.loads(arbiter(settings, "limits", "ls", "--json").stdout)
    assert {"tag": tag, "limit": 5, "active_slots": [], "slot_expires": {}} in listed
    assert tag in arbiter(settings, "limits", "ls").stdout
    assert arbiter(settings, "limits", "rm", tag).returncode == 0
    missing = arbiter(settings, "limits", "rm", tag)
    assert missing.returncode == 1
    assert tag in missing.stderr


async def test_global_limits_list_their_holders_and_lease_expiry(
    settings: Settings, client: ArbiterClient
) -> None:
    """`limits set --global tag:<t> 1`: a running task holds its one slot, which `limits ls
    --global --json` shows with the holder and its lease; completing frees it. The V1
    listing does not show global limits."""
    tag = f"gl-{uuid.uuid4().hex[:8]}"
    name = f"tag:{tag}"
    made = arbiter(settings, "limits", "set", "--global", name, "1")
    assert made.returncode == 0, made.stderr
    run_id = uuid.uuid4()
    spec = TaskRunSpec(task_key="t", tags=[tag])
    await client.propose("task_run", run_id, ProposedState(type=StateType.PENDING), run=spec)
    running = await client.propose("task_run", run_id, ProposedState(type=StateType.RUNNING))
    assert running.status is OutcomeStatus.ACCEPT
    other = uuid.uuid4()
    await client.propose("task_run", other, ProposedState(type=StateType.PENDING), run=spec)
    waiting = await client.propose("task_run", other, ProposedState(type=StateType.RUNNING))
    assert waiting.status is OutcomeStatus.WAIT

    listed = json.loads(arbiter(settings, "limits", "ls", "--global", "--json").stdout)
    [limit] = [row for row in listed if row["name"] == name]
    assert (limit["limit"], limit["active_slots"], limit["denied_slots"]) == (1, 1, 1)
    [holder] = limit["holders"]
    assert holder["holder"] == str(run_id)
    assert dt.datetime.fromisoformat(holder["expires"]) > dt.datetime.fromisoformat(
        holder["acquired"]
    )
    assert name not in arbiter(settings, "limits", "ls").stdout

    await client.propose("task_run", run_id, ProposedState(type=StateType.COMPLETED))
    listed = json.loads(arbiter(settings, "limits", "ls", "--global", "--json").stdout)
    [limit] = [row for row in listed if row["name"] == name]
    assert (limit["active_slots"], limit["holders"]) == (0, [])
    assert arbiter(settings, "limits", "rm", "--global", name).returncode == 0
    assert arbiter(settings, "limits", "rm", "--global", name).returncode == 1


def test_a_global_limit_takes_a_decay_and_can_be_switched_off(settings: Settings) -> None:
    name = f"rate-{uuid.uuid4().hex[:8]}"
    made = arbiter(
        settings,
        "limits",
        "set",
        "--global",
        name,
        "4",
        "--inactive",
        "--slot-decay-per-second",
        "0.5",
    )
    assert made.returncode == 0, made.stderr
    listed = json.loads(arbiter(settings, "limits", "ls", "--global", "--json").stdout)
    [limit] = [row for row in listed if row["name"] == name]
    assert (limit["active"], limit["slot_decay_per_second"]) == (False, 0.5)
    bad = arbiter(settings, "limits", "set", "--global", name, "4", "--slot-decay-per-second", "-1")
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr


def test_a_negative_limit_is_refused_by_the_parser(settings: Settings) -> None:
    """`limits set TAG -1` is a usage error, not a database error."""
    result = arbiter(settings, "limits", "set", "x", "-1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


async def test_runs_show_prints_the_history_oldest_first(
    settings: Settings, client: ArbiterClient
) -> None:
    """`runs show --json` prints the run and every state, shaped as in an outcome."""
    run_id = uuid.uuid4()
    await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.PENDING), run=FlowRunSpec(name="shown")
    )
    await client.propose("flow_run", run_id, ProposedState(type=StateType.RUNNING))
    result = arbiter(settings, "runs", "show", str(run_id), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["run"]["name"] == "shown"
    assert [s["type"] for s in document["history"]] == ["PENDING", "RUNNING"]
    assert all("id" in s and "state_details" in s for s in document["history"])
    human = arbiter(settings, "runs", "show", str(run_id))
    assert "RUNNING" in human.stdout


def test_runs_show_of_an_unknown_run_fails_cleanly(settings: Settings) -> None:
    """An unknown run id exits 1 with a message; a non-UUID exits 2."""
    unknown = arbiter(settings, "runs", "show", str(uuid.uuid4()))
    assert unknown.returncode == 1
    assert "no flow run or task run" in unknown.stderr
    garbage = arbiter(settings, "runs", "show", "not-a-uuid")
    assert garbage.returncode == 2
    assert "Traceback" not in garbage.stderr


async def test_proposals_show_prints_the_stored_outcome_and_outbox(
    settings: Settings, client: ArbiterClient
) -> None:
    """`proposals show ID` prints what the proposal got and what a replay would publish;
    an unknown id exits 1, a non-UUID exits 2."""
    run_id = uuid.uuid4()
    outcome = await client.propose(
        "flow_run", run_id, ProposedState(type=StateType.PENDING), run=FlowRunSpec(name="asked")
    )
    result = arbiter(settings, "proposals", "show", str(outcome.proposal_id))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["outcome"]["status"] == "ACCEPT"
    assert document["outcome"]["run_id"] == str(run_id)
    assert [message["routing_key"] for message in document["outbox"]] == [
        "prefect.flow-run.Pending"
    ]
    unknown = arbiter(settings, "proposals", "show", str(uuid.uuid4()))
    assert unknown.returncode == 1
    assert "is not recorded" in unknown.stderr
    garbage = arbiter(settings, "proposals", "show", "nope")
    assert garbage.returncode == 2
    assert "PROPOSAL_ID" in garbage.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param(
            {"ARBITER_DATABASE_URL": "postgresql://a:b@127.0.0.1:1/x"},
            "ARBITER_DATABASE_URL",
            id="unreachable-database",
        ),
        pytest.param(
            {"ARBITER_DATABASE_URL": "mysql://a:b@localhost/x"},
            "ARBITER_DATABASE_URL",
            id="wrong-database-scheme",
        ),
        pytest.param({"ARBITER_PREFETCH": "lots"}, "ARBITER_PREFETCH", id="invalid-setting"),
        pytest.param(
            {"ARBITER_METRICS_PORT": "70000"}, "ARBITER_METRICS_PORT", id="port-out-of-range"
        ),
    ],
)
def test_a_misconfiguration_is_one_clear_line(
    settings: Settings, env: dict[str, str], named: str
) -> None:
    """A bad setting gives exit 2 and one stderr line naming it, never a traceback."""
    result = arbiter(settings, "limits", "ls", **env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "b@" not in lines[0]  # the password is redacted


def test_an_unreachable_broker_is_one_clear_line(settings: Settings) -> None:
    """`arbiter worker` against a closed AMQP port names ARBITER_AMQP_URL and exits 2."""
    result = arbiter(settings, "worker", ARBITER_AMQP_URL="amqp://u:p@127.0.0.1:1/")
    assert result.returncode == 2
    assert "ARBITER_AMQP_URL" in result.stderr
    assert "Traceback" not in result.stderr
