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

The same story on Redis (``--broker redis``): Redis's ``maxmemory`` lowered (``noeviction``) in
place of the watermark, Celery on kombu's Redis transport (no confirms: a send succeeded when
``send_task`` returned), sluice with ``benches/drill/sluice-drill-redis.toml``. Through sluice:

* Redis never refuses a write (no OOM), so no web-login send fails: every send that was tried
  returned OK, and every one of those tasks is in Redis;
* the flood lands in the task list or the overflow list, exactly as sluice counted it, or its
  send failed with a shed that sluice counted: nothing ``send_task`` reported as sent is missing.

As a control the flood then goes straight to Redis until it refuses writes (within 45 s), and
web-login's sends fail with Redis's OOM error.

Both change server-wide state, so they are marked ``broker_wide``: deselected by default and run
alone with ``make test-drill``. The watermark and maxmemory are restored whatever happens (and,
should the run be killed outright, by the next drill from its state file).
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


def test_on_redis_through_sluice_a_celery_flood_never_fills_redis_and_no_login_fails(tmp_path):
    bin_ = os.environ.get("SLUICE_BIN") or drill.default_sluice_bin()
    cfg = drill.DrillConfig(
        broker="redis",
        baseline=10.0,
        flood=15.0,
        # After the control's flood stops at the first OOM, web-login keeps sending into a full
        # Redis for this long: its sends fail with OOM.
        recovery=5.0,
        sluice_bin=bin_,
        workdir=str(tmp_path),
    )
    with drill.Drill(cfg) as d:
        s = d.run_phase("sluice").summary
        # The control floods Redis directly until it refuses writes, for at most 45 s.
        control = d.run_phase("direct", stop_at_alarm=True, flood=45.0).summary
    report = drill.table(d.results)
    (tmp_path / "drill-redis.md").write_text(report + "\n")
    print("\n" + report)

    for phase in (s, control):
        assert not phase["broker"]["alarm_before_flood"] and not phase["broker"]["alarm_set_at_start"], (
            f"Redis refused writes before the {phase['phase']} flood started: something else is "
            f"filling it, the drill must run alone\n{report}"
        )
    # The flood is strong enough to matter: straight at Redis it fills maxmemory, and the critical
    # producer's sends fail with Redis's OOM error.
    assert control["broker"]["alarm_first_after_flood_s"] is not None, (
        f"the direct flood did not fill Redis (peak {control['broker']['memory_peak_mb']:.1f} MB of "
        f"{control['broker']['watermark_mb']:.1f} MB): this run proves nothing\n{report}"
    )
    assert control["critical"]["oom_errors"] > 0, (
        f"web-login never got an OOM error from a full Redis: {control['critical']['errors']}\n{report}"
    )

    crit, flood, b = s["critical"], s["flood"], s["broker"]
    # Through sluice Redis never fills: no OOM reply to anyone, memory stays under maxmemory.
    assert b["alarm_events"] == 0 and b["oom_replies"] == 0, f"Redis refused writes through sluice\n{report}"
    assert b["memory_peak_mb"] < b["watermark_mb"], report
    # No OOM error (nor any other) reaches web-login: every send it tried returned OK...
    assert crit["oom_errors"] == 0 and crit["send_errors"] == 0, (
        f"web-login sends failed through sluice: {crit['errors']}\n{report}"
    )
    assert crit["flood"]["publishes"] >= 100, crit
    assert not s["critical_verdicts"].get("shed") and not s["critical_verdicts"].get("divert"), (
        f"sluice limited web-login: {s['critical_verdicts']}\n{report}"
    )
    # ...and every task it sent is in Redis.
    assert crit["confirmed"] > 0 and crit["lost"] == 0, (
        f"{crit['lost']} web-login tasks whose send returned OK are not in Redis\n{report}"
    )
    # sluice's policies ran throughout.
    assert s["policies"] and not any(h["disabled"] for h in s["policies"].values()), s["policies"]

    # The flood: what Celery reported as sent is in the task list or the overflow list, exactly
    # as sluice counted it; what it did not send failed with a shed that sluice counted.
    assert flood["sent"] > 0 and flood["oom_errors"] == 0, report
    assert flood["lost"] == 0 and flood["in_broker"] == flood["sent"], (
        f"{flood['lost']} flood tasks Celery reported as sent are not in Redis "
        f"({flood['duplicates']} extra)\n{report}"
    )
    assert flood["forwarded"] == flood["in_task_queue"], report
    assert flood["diverted"] > 0 and flood["diverted"] == flood["in_overflow"], (
        f"the flood's excess is not in the overflow list\n{report}"
    )
    assert flood["errors"] == flood["shed_errors"] and flood["shed"] >= flood["shed_errors"], (
        f"flood sends failed other than by a counted shed ({flood['errors']} errors, "
        f"{flood['shed_errors']} sheds seen by Celery, {flood['shed']} counted by sluice)\n{report}"
    )
