"""Orchestration results (``rules/results.py``): their details decode into the class their
``type`` names.

Part of the port of Prefect's ``test_rules.py`` (see the package docstring).
"""

from __future__ import annotations

import pytest

from arbiter.rules.results import (
    OrchestrationResult,
    SetStateStatus,
    StateAbortDetails,
    StateRejectDetails,
    StateWaitDetails,
)


class TestOrchestrationResult:
    @pytest.mark.parametrize(
        ("details_type", "details"),
        [
            (StateWaitDetails, StateWaitDetails(delay_seconds=20, reason="No!")),
            (StateRejectDetails, StateRejectDetails(reason="I don't want to change!")),
            (StateAbortDetails, StateAbortDetails(reason="I don't need to change!")),
        ],
        ids=["wait", "reject", "abort"],
    )
    def test_details_are_not_improperly_coerced(
        self,
        details_type: type[StateWaitDetails | StateRejectDetails | StateAbortDetails],
        details: StateWaitDetails | StateRejectDetails | StateAbortDetails,
    ) -> None:
        """Details decode into the class named by their ``type``, whatever the status."""
        result = OrchestrationResult.model_validate(
            {"state": None, "status": SetStateStatus.ACCEPT, "details": details.model_dump()}
        )
        assert type(result.details) is details_type
        assert result.details == details
