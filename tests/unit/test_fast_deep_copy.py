"""Deep copies of states and runs are equal to the original and share nothing mutable."""

from __future__ import annotations

import copy
import uuid

from arbiter.schemas.runs import TaskRun, TaskRunPolicy
from arbiter.schemas.states import State, StateDetails, StateType


def a_state() -> State:
    return State(
        type=StateType.RUNNING,
        state_details=StateDetails(
            task_run_id=uuid.uuid4(), run_input_keyset={"a": "b"}, cache_key="k"
        ),
        data={"rows": [1, 2, {"x": "y"}]},
    )


def test_a_deep_copy_is_equal_and_its_containers_are_its_own() -> None:
    original = a_state()
    clone = original.model_copy(deep=True)
    assert clone == original
    assert clone.model_fields_set == original.model_fields_set
    assert clone.state_details is not original.state_details
    clone.state_details.run_input_keyset["a"] = "changed"  # type: ignore[index]
    clone.data["rows"][2]["x"] = "changed"  # type: ignore[index, call-overload]
    clone.state_details.cache_key = "other"
    assert original.state_details.run_input_keyset == {"a": "b"}
    assert original.data == {"rows": [1, 2, {"x": "y"}]}
    assert original.state_details.cache_key == "k"


def test_copy_deepcopy_and_an_update_go_the_same_way() -> None:
    original = a_state()
    assert copy.deepcopy(original) == original
    renamed = original.model_copy(deep=True, update={"name": "Renamed"})
    assert renamed.name == "Renamed"
    assert original.name == "Running"


def test_a_run_copies_its_state_and_policy_deeply() -> None:
    run = TaskRun(
        id=uuid.uuid4(),
        task_key="t",
        dynamic_key="0",
        state=a_state(),
        empirical_policy=TaskRunPolicy(retries=2),
        tags=["a"],
    )
    clone = run.model_copy(deep=True)
    assert clone == run
    assert clone.state is not run.state
    assert clone.empirical_policy is not run.empirical_policy
    clone.tags.append("b")
    clone.empirical_policy.retries = 5
    assert run.tags == ["a"]
    assert run.empirical_policy.retries == 2
