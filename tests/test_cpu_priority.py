"""A reranker replica's lower CPU priority (vidsearch.cpu_priority, serve.reranker_niceness).

Each check runs in a child process: a process cannot take back a priority it gave up,
and the test runner must keep its own. The nice values are read from /proc, per thread,
the way the kernel schedules them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vidsearch.config import ConfigError, load_settings
from vidsearch.cpu_priority import NICENESS_ENV, apply_niceness_from_env, lower_process_priority


def thread_niceness(pid: int | str = "self") -> dict[int, int]:
    """Every thread of ``pid`` and its nice value (field 19 of /proc/PID/task/TID/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue  # the thread ended meanwhile
        out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


def run_child(code: str, env: dict[str, str] | None = None) -> dict:
    child_env = {**os.environ, **(env or {})}
    if NICENESS_ENV not in (env or {}):
        child_env.pop(NICENESS_ENV, None)
    prelude = ("import json, os, sys, threading\n"
               f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
               "from test_cpu_priority import thread_niceness\n")
    done = subprocess.run([sys.executable, "-c", prelude + code], env=child_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_thread_is_lowered_and_threads_started_later_inherit_it():
    out = run_child(
        "from vidsearch.cpu_priority import lower_process_priority\n"
        "stop = threading.Event()\n"
        "early = [threading.Thread(target=stop.wait) for _ in range(3)]\n"
        "[t.start() for t in early]\n"
        "before = thread_niceness()\n"
        "now = lower_process_priority(17)\n"
        "late = threading.Thread(target=stop.wait); late.start()\n"
        "after = thread_niceness()\n"
        "stop.set()\n"
        "print(json.dumps({'before': list(before.values()), 'after': list(after.values()), 'now': now,"
        " 'late': after[late.native_id]}))\n")
    assert len(out["before"]) >= 4 and max(out["before"]) < 17  # the main thread and three others
    assert out["after"] == [17] * len(out["after"]) and len(out["after"]) == len(out["before"]) + 1
    assert out["now"] == 17 and out["late"] == 17


def test_a_priority_given_up_is_never_raised_again():
    out = run_child("from vidsearch.cpu_priority import lower_process_priority\n"
                    "lower_process_priority(18)\n"
                    "print(json.dumps({'now': lower_process_priority(5), 'all': list(thread_niceness().values())}))\n")
    assert out == {"now": 18, "all": [18] * len(out["all"])}


def test_the_stack_s_worker_setup_hook_applies_the_environment_s_niceness_first():
    # What a reranker replica of `vidsearch up` runs when its process starts (Ray's
    # worker_process_setup_hook), before it imports torch and loads a model.
    hook = "from vidsearch.services.stack.bind import setup_worker\nsetup_worker()\n"
    show = "print(json.dumps({'all': list(thread_niceness().values())}))\n"
    lowered = run_child(hook + show, env={NICENESS_ENV: "19"})
    assert set(lowered["all"]) == {19}
    untouched = run_child(hook + show)  # any other worker of the stack: the ingress, the proxy
    assert 19 not in untouched["all"]


@pytest.mark.parametrize("niceness", [-1, 20])
def test_a_niceness_out_of_range_is_refused_with_one_line(niceness):
    with pytest.raises(ValueError, match=r"^niceness must be between 0 and 19 \(got "):
        lower_process_priority(niceness)


def test_a_malformed_niceness_in_the_environment_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv(NICENESS_ENV, "low")
    with pytest.raises(ValueError, match=f"^{NICENESS_ENV} must be an integer between 0 and 19 \\(got 'low'\\)$"):
        apply_niceness_from_env()


def test_the_setting_is_off_by_default_and_refuses_values_out_of_range(tmp_path):
    assert load_settings().serve.reranker_niceness == 0  # off: see the setting's description
    config = tmp_path / "bad.yaml"
    config.write_text("serve:\n  reranker_niceness: 25\n")
    with pytest.raises(ConfigError, match=r"^invalid setting serve\.reranker_niceness: .*less than or equal to 19 \(got 25\)$"):
        load_settings(config)
