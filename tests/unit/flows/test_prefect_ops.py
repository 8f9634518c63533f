"""flows.prefect_ops without a server: process tags tell live, dead and recycled processes apart,
and the stage run-name template formats the way Prefect formats it (``str.format`` on the
sub-flow's parameters)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from flows import prefect_ops
from flows.tracking.runs import RunContext


def test_process_tag_of_a_live_process_is_not_gone():
    tag = prefect_ops.process_tag()
    assert tag.startswith(f"{prefect_ops.PROC_TAG}{socket.gethostname()}:{os.getpid()}:")
    assert prefect_ops._process_gone(tag) is False


def test_dead_and_recycled_processes_are_gone_other_hosts_unknown():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    tag = prefect_ops.process_tag(child.pid)
    child.wait()
    assert prefect_ops._process_gone(tag) is True
    # same pid as this process, another start time: the pid was reused, the original is gone
    host, pid, started = prefect_ops.process_tag()[len(prefect_ops.PROC_TAG) :].rsplit(":", 2)
    assert prefect_ops._process_gone(f"{prefect_ops.PROC_TAG}{host}:{pid}:{int(started) - 5000}") is True
    assert prefect_ops._process_gone(f"{prefect_ops.PROC_TAG}some-other-host:{pid}:{started}") is None


def test_stage_run_name_uses_the_pipeline_run_prefix():
    ctx = RunContext(home="/h", experiment_id="1", parent_run_id="p", pipeline_run_id="79f965fd-b489-46d7-abb9-68c25283b391")
    assert prefect_ops.stage_run_name("pretrain").format(cfg=None, ctx=ctx) == "pretrain-79f965fd"
