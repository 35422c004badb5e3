"""``fracnode demo``: send a synthetic sample study to a running node and print its result.

Talks to the node like a PACS and a reading room would: C-STORE to its DICOM port, then the HTTP
API (``GET /studies/{uid}``) until the study is processed. The sample is drawn in code
(:mod:`node.demo`); its outcome demonstrates the loop, not diagnostic accuracy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from node.cli import CliError
from node.demo import demo_study
from node.export import ExportError, Peer, send_files
from node.settings import Settings


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("demo", help="send a synthetic sample study to a running node, print the result")
    parser.add_argument("--host", default=None, help="node host (default: dicom.host)")
    parser.add_argument("--port", type=int, default=None, help="node DICOM port (default: dicom.port)")
    parser.add_argument("--ae", default=None, help="node AE title (default: dicom.ae_title)")
    parser.add_argument(
        "--api", default=None, help="node HTTP API base URL (default: from api.host/api.port)"
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the result")
    parser.set_defaults(handler=run_demo)


def _get(url: str, token: str | None, timeout: float = 10.0) -> dict[str, Any] | None:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (our own API)
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise CliError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise CliError(f"the node's HTTP API does not answer at {url}: {exc}") from exc


def run_demo(args: argparse.Namespace, settings: Settings) -> int:
    host = args.host or settings.dicom.host
    port = args.port or settings.dicom.port
    api = (args.api or f"http://{settings.api.host}:{settings.api.port}").rstrip("/")
    token = settings.api.token.get_secret_value() if settings.api.token is not None else None
    _get(f"{api}/healthz", None)

    with tempfile.TemporaryDirectory(prefix="fracnode-demo-") as tmp:
        study_uid, paths = demo_study(Path(tmp))
        peer = Peer(ae_title=args.ae or settings.dicom.ae_title, host=host, port=port)
        try:
            outcomes = send_files(peer, paths, calling_ae="FRACNODE_DEMO")
        except ExportError as exc:
            raise CliError(
                f"cannot send the sample study to {peer.ae_title} at {host}:{port}: {exc}"
            ) from exc
    failed = [o for o in outcomes if not o.delivered]
    if failed:
        raise CliError(
            f"{len(failed)} of {len(outcomes)} images were refused: {failed[0].error or failed[0].status}"
        )
    print(f"sent a synthetic 3-view wrist study ({study_uid}) to {peer.ae_title} at {host}:{port}")

    started = time.monotonic()
    detail: dict[str, Any] | None = None
    state = "not yet known"
    while time.monotonic() - started < args.timeout:
        detail = _get(f"{api}/studies/{study_uid}", token)
        if detail is not None:
            state = str(detail["study"]["state"])
            if state in ("done", "failed"):
                break
        time.sleep(0.5)
    else:
        raise CliError(f"no result within {args.timeout:.0f} s (study is {state}); see the node's log")
    assert detail is not None
    print_result(detail, time.monotonic() - started)
    return 0 if state == "done" else 1


def print_result(detail: dict[str, Any], seconds: float) -> None:
    study = detail["study"]
    outcome = study.get("outcome") or {}
    score = "" if study["score"] is None else f", score {study['score']:.3f}"
    print(f"state {study['state']} after {seconds:.1f} s; priority {study['priority'] or '-'}{score}")
    for group in outcome.get("groups", []):
        probability = "-" if group["probability"] is None else f"{group['probability']:.3f}"
        warning = "  [OUT OF GROUP: model of a neighbouring group]" if group["out_of_group"] else ""
        models = ", ".join(f"{m['name']} {m['version']}" for m in group["models"])
        print(
            f"  {group['group']:<15} {group['outcome']:<12} p={probability} "
            f"at {group['operating_point'] or '-'}"
            f"  {group['images']} images, {group['boxes']} boxes; regions {', '.join(group['regions'])}; "
            f"models {models}{warning}"
        )
    for image in outcome.get("not_analysed", []):
        print(f"  not analysed: {image['region']} ({image['reason']})")
    outputs = detail.get("outputs", [])
    delivered = sum(1 for o in outputs if o["state"] == "delivered")
    print(f"  results queued for the PACS: {len(outputs)}, delivered: {delivered}")
    if study["error"]:
        print(f"  error: {study['error']}")
    print("AI result - not for diagnostic use. The sample is a synthetic drawing, not a radiograph.")
