"""The trainer CronJob's submitter: start one training RayJob and wait until it finishes.

The CronJob's `concurrencyPolicy: Forbid` only covers its own Jobs; a Job that just
created a RayJob and exited let the next schedule start a second run beside the first.
This Job lives as long as its RayJob, so Forbid covers the run. Runs in the vidsearch
image (Python, PyYAML) with the submitter's ServiceAccount token, against the in-cluster
API; its Role allows get, list and create on rayjobs only.

1. Any unfinished trainer RayJob of the release (this schedule's, the install hook's, one
   made by hand with `kubectl create`) means a run is in progress: the schedule starts
   none (exit 0), unless it is this Job's own (a retried pod), which it waits for.
2. Else it creates the RayJob from the manifest (labelled with this Job's name) and waits.
3. Exit 0 when the run succeeded, 1 with one line when it failed, was deleted or outlived
   --timeout. The RayJobs clean themselves up (their deletionRules).
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from typing import Any

# KubeRay's terminal jobDeploymentStatus values (ValidationFailed: the controller gives up
# on an invalid spec, so nothing will change any more either).
TERMINAL = {"Complete", "Failed", "ValidationFailed"}
SUBMITTED_BY = "vidsearch.io/submitted-by"
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def unfinished(rayjob: dict[str, Any]) -> bool:
    return (rayjob.get("status") or {}).get("jobDeploymentStatus", "") not in TERMINAL


def decide(rayjobs: list[dict[str, Any]], job_name: str) -> tuple[str, str | None]:
    """("wait", name) for this Job's own unfinished RayJob, ("skip", name) for another
    unfinished one, ("create", None) when no run is in progress."""
    running = [r for r in rayjobs if unfinished(r)]
    for rayjob in running:
        if (rayjob["metadata"].get("labels") or {}).get(SUBMITTED_BY) == job_name:
            return "wait", rayjob["metadata"]["name"]
    if running:
        return "skip", running[0]["metadata"]["name"]
    return "create", None


def outcome(rayjob: dict[str, Any] | None, name: str) -> tuple[int, str] | None:
    """(exit code, line) once the run is over (or its RayJob is gone); None while it runs."""
    if rayjob is None:
        return 1, f"RayJob {name} was deleted before it finished"
    status = rayjob.get("status") or {}
    deployment = status.get("jobDeploymentStatus", "")
    if deployment not in TERMINAL:
        return None
    if deployment == "Complete" and status.get("jobStatus") == "SUCCEEDED":
        return 0, f"RayJob {name} succeeded"
    why = status.get("reason") or status.get("jobStatus") or "no reason given"
    message = (status.get("message") or "").splitlines()[:1]
    return 1, f"RayJob {name} {deployment.lower()}: {why}" + (f" ({message[0]})" if message else "")


def with_submitter(manifest: dict[str, Any], job_name: str) -> dict[str, Any]:
    """The manifest labelled with the Job that creates it (a retried pod finds its own run)."""
    labelled = json.loads(json.dumps(manifest))
    labelled.setdefault("metadata", {}).setdefault("labels", {})[SUBMITTED_BY] = job_name
    return labelled


class Api:
    """The few calls this needs, on the in-cluster endpoint with the pod's token."""

    def __init__(self, namespace: str, timeout_s: float) -> None:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = f"https://{host}:{port}/apis/ray.io/v1/namespaces/{namespace}/rayjobs"
        with open(f"{SERVICE_ACCOUNT}/token") as handle:
            self.token = handle.read().strip()
        self.context = ssl.create_default_context(cafile=f"{SERVICE_ACCOUNT}/ca.crt")
        self.timeout_s = timeout_s

    def call(self, method: str, path: str = "", body: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The decoded answer; None for 404 (a RayJob that is gone)."""
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {self.token}",
                                                  "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.context) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET" and path:
                return None
            raise RuntimeError(f"{method} rayjobs{path}: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="the RayJob to create (YAML)")
    parser.add_argument("--selector", required=True, help="label selector of the release's trainer RayJobs")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait for the run at most")
    parser.add_argument("--poll", type=float, default=30.0, help="seconds between status checks")
    return parser


def run(args: argparse.Namespace, api: Api, job_name: str) -> tuple[int, str]:
    import urllib.parse

    import yaml

    listed = api.call("GET", "?labelSelector=" + urllib.parse.quote(args.selector)) or {}
    action, name = decide(listed.get("items", []), job_name)
    if action == "skip":
        return 0, f"a training run is still in progress (RayJob {name}): this schedule starts none"
    if action == "create":
        with open(args.manifest) as handle:
            manifest = yaml.safe_load(handle)
        created = api.call("POST", body=with_submitter(manifest, job_name)) or {}
        name = created["metadata"]["name"]
        print(f"created RayJob {name}; waiting for it to finish", flush=True)
    assert name is not None
    deadline = time.monotonic() + args.timeout
    while True:
        done = outcome(api.call("GET", f"/{name}"), name)
        if done is not None:
            return done
        if time.monotonic() > deadline:
            return 1, f"RayJob {name} still runs after {args.timeout:g}s (it has its own activeDeadlineSeconds)"
        time.sleep(args.poll)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with open(f"{SERVICE_ACCOUNT}/namespace") as handle:
            namespace = handle.read().strip()
        code, line = run(args, Api(namespace, timeout_s=30.0), os.environ["JOB_NAME"])
    except (OSError, KeyError, RuntimeError) as exc:
        code, line = 1, f"train-submit failed: {exc}"
    print(line, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
