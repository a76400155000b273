"""The flood drill, shortened (benches/drill): the promise sluice makes, checked end to end.

A Celery service (``hotfix-svc``, several processes, ~2 KB tasks, as fast as Celery goes) floods
the broker while ``web-login`` publishes login audits at a steady rate with confirms. RabbitMQ's
memory high watermark is lowered to emulate a small hosted broker. Through sluice, with the
config a platform team would ship (``benches/drill/sluice-drill.toml``):

* the broker's memory alarm never fires;
* web-login's p99 publish latency under the flood stays within 1.5x of its p99 without the flood,
  both measured in this run, and no login publish fails;
* every web-login task the broker confirmed is in the broker;
* the flood lands in the task queue or its overflow twin: nothing Celery sent is lost or shed.

As a control, the same flood is then sent straight to the broker until its alarm fires (within
45 s; it must, or the drill proves nothing on this machine).

It changes broker-wide state, so it is marked ``broker_wide``: deselected by default and run
alone with ``make test-drill``. The watermark is restored whatever happens (and, should the run
be killed outright, by the next drill from its state file).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benches" / "drill"))

import drill  # noqa: E402

pytestmark = [pytest.mark.broker_wide, pytest.mark.timeout(600)]


def test_through_sluice_a_celery_flood_neither_trips_the_broker_alarm_nor_slows_logins(tmp_path):
    bin_ = os.environ.get("SLUICE_BIN") or drill.default_sluice_bin()
    cfg = drill.DrillConfig(
        baseline=15.0,
        flood=15.0,
        recovery=3.0,
        sluice_bin=bin_,
        workdir=str(tmp_path),
    )
    with drill.Drill(cfg) as d:
        s = d.run_phase("sluice").summary
        # The control floods until the alarm fires, for at most 45 s.
        control = d.run_phase("direct", stop_at_alarm=True, flood=45.0).summary
    report = drill.table(d.results)
    (tmp_path / "drill.md").write_text(report + "\n")
    print("\n" + report)

    # Nothing else may be filling the broker: the drill must run alone.
    for phase in (s, control):
        assert not phase["broker"]["alarm_before_flood"], (
            f"the broker's alarm fired before the {phase['phase']} flood started: something else is "
            f"using the broker, the drill must run alone\n{report}"
        )
    # The flood is strong enough to matter: straight at the broker, it trips the alarm.
    assert control["broker"]["alarm_first_after_flood_s"] is not None, (
        f"the direct flood did not trip the memory alarm (peak {control['broker']['memory_peak_mb']:.0f} MB "
        f"of {control['broker']['watermark_mb']:.0f} MB): this run proves nothing\n{report}"
    )

    crit, flood, b = s["critical"], s["flood"], s["broker"]
    assert b["alarm_events"] == 0 and b["alarm_seconds"] == 0, (
        f"the broker's memory alarm fired through sluice\n{report}"
    )
    assert crit["lost"] == 0, f"{crit['lost']} confirmed web-login tasks are not in the broker\n{report}"
    assert crit["failed"] == 0, f"web-login publishes failed under the flood: {crit['errors']}\n{report}"
    base, under = crit["baseline"]["p99_ms"], crit["flood"]["p99_ms"]
    assert crit["baseline"]["publishes"] >= 100 and crit["flood"]["publishes"] >= 100, crit
    assert under <= 1.5 * base, (
        f"web-login p99 {under:.1f} ms under the flood vs {base:.1f} ms without it "
        f"({under / base:.2f}x > 1.5x)\n{report}"
    )
    assert flood["sent"] > 0 and flood["shed"] == 0, f"flood tasks were shed\n{report}"
    assert flood["lost"] == 0, f"{flood['lost']} flood tasks Celery sent are not in the broker\n{report}"
    assert flood["in_overflow"] > 0 and flood["in_overflow"] == flood["diverted"], (
        f"the flood's excess is not in the overflow queue\n{report}"
    )
    assert flood["in_broker"] == flood["sent"], report
    assert flood["reconnects"] == 0, f"Celery reconnected {flood['reconnects']} times\n{report}"
