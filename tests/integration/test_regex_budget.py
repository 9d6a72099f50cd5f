"""Catastrophic regex under load: hostile checks are denied 403 policy_timeout within the budget,
and a check on another path still gets its answer (after at most the hostile ones queued ahead)."""

from __future__ import annotations

import asyncio
import time

from authz_service.model import Reason
from authz_service.policy.budget import REGEX_BUDGET
from tests.conftest import StartService
from tests.harness import Answer

HOSTILE = 10  # in flight at once: they run one at a time on the loop, up to HOSTILE x budget


async def test_hostile_checks_are_denied_and_a_probe_stays_answered(start_service: StartService) -> None:
    service = await start_service(
        {
            "introspectors": [],
            "policies": [
                {
                    "id": "tenants",
                    "engine": "matcho",
                    "matcho": {"uri": "#^/t/", "headers": {"x-tenant": "#^(a|aa)+$"}},
                },
                {"id": "public", "engine": "matcho", "matcho": {"uri": "#^/public/"}},
            ],
        }
    )
    hostile = {"x-tenant": "a" * 40 + "b"}
    started = time.monotonic()

    async def probe() -> tuple[Answer, float]:
        await asyncio.sleep(0.01)  # behind the hostile checks
        begun = time.monotonic()
        return await service.check("/public/logo.png"), time.monotonic() - begun

    probing = asyncio.create_task(probe())
    answers = await asyncio.gather(*(service.check("/t/x", headers=hostile) for _ in range(HOSTILE)))
    probed, waited = await probing
    for answer in answers:
        assert answer.http_status == 403
        assert answer.response.status.message == Reason.POLICY_TIMEOUT.label
    assert probed.allowed
    # Honest bound: the probe may wait behind every hostile check (each up to the budget in CPU).
    assert waited < HOSTILE * REGEX_BUDGET * 3 + 2.0
    assert time.monotonic() - started < HOSTILE * REGEX_BUDGET * 3 + 5.0
    # Load gone: the probe path answers at once again.
    begun = time.monotonic()
    assert (await service.check("/public/logo.png")).allowed
    assert time.monotonic() - begun < 1.0
