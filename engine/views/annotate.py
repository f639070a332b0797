"""Every decision the passes made for one graph, as the plain data ``graph.drawing`` draws.

    d = engine.passes.decide(graph, "cupy", streams=3)       # what an Executor would run
    doc = engine.views.annotate.annotate(graph, d, placement=p, device="gpu")

Nothing here decides anything: it reads ``Decisions`` (fusion, streams and events, memory plan)
and a ``Placement`` (where each weight lives and why) and writes them into the dump document's
fields (see ``graph.drawing``): each node's device, stream, launching step, fused group, arena
offset, ring slot and placement cause; the event waits between streams; per layer where its
weights live; and a summary (nodes, streams, events, bytes per device, streamed bytes).
"""

from __future__ import annotations

from typing import Any

from engine.passes.offload import GPU, HOST, STREAMED, Placement
from engine.passes.plans import Decisions
from engine.passes.scheduler import Schedule
from graph.drawing import document
from graph.ir import Graph

__all__ = ["annotate"]


def annotate(
    graph: Graph,
    decisions: Decisions | None = None,
    placement: Placement | None = None,
    device: str = "gpu",
    split: int | None = None,
    title: str = "",
    options: dict[str, Any] | None = None,
    schedule: Schedule | None = None,
) -> dict[str, Any]:
    """The dump document of ``graph`` with the decisions made for it. ``device``: where the
    session's backend computes (gpu or cpu); ``split``: the first layer a split model computes
    on the CPU backend (``Session.split``); ``schedule``: a stream schedule on its own, without
    the other decisions."""
    doc = document(graph, title)
    nodes = doc["nodes"]
    where = {p.layer: p for p in placement.layers} if placement is not None else {}
    for n in nodes:
        layer = n["layer"]
        if n["kind"] == "weight":
            p = where.get(layer)
            if p is None:
                n["device"] = device
            elif p.where == STREAMED and len(n["shape"]) < 2:
                n["device"] = device
                n["cause"] = "norm vector of a streamed layer: stays resident (a few KiB)"
            else:
                n["device"] = {GPU: device, STREAMED: "streamed", HOST: "host"}[p.where]
                n["cause"] = p.cause
                n["slot"] = p.slot
        elif n["kind"] == "input":
            n["device"] = "host"
        else:
            on_host = split is not None and layer is not None and layer >= split
            n["device"] = "cpu" if on_host else device
    arena = 0
    sched = decisions.schedule if decisions is not None else schedule
    if decisions is None and sched is not None:
        for n in nodes:
            if n["id"] in sched.stream:
                n["step"], n["stream"] = n["id"], sched.stream[n["id"]]
    if decisions is not None:
        groups = {i: f.pattern for f in decisions.fusions for i in f.nodes}
        offsets = decisions.plan.offset_of()
        for n in nodes:
            i = n["id"]
            # a view launches nothing: it has a stream only inside a fused group
            if n["kind"] == "compute" or (n["kind"] == "view" and i in groups):
                step = decisions.steps[i]
                n["step"] = step
                n["stream"] = sched.stream.get(step, 0) if sched is not None else 0
            n["fused"] = groups.get(i)
            n["offset"] = offsets.get(i)
    if sched is not None and sched.n_streams > 1:
        doc["waits"] = [
            [w, s, sched.stream[w], sched.stream[s]]
            for s in sched.steps
            for w in sched.waits.get(s, ())
        ]
        doc["summary"].update(
            streams=sched.n_streams, events=len(sched.records), waits=sched.n_waits
        )
    if decisions is not None:
        arena = decisions.plan.arena_bytes
        doc["summary"].update(
            steps=len(set(decisions.steps[n["id"]] for n in nodes if n["kind"] == "compute")),
            fused_groups=len(decisions.fusions),
            arena_bytes=arena,
            arena_max_live_bytes=decisions.plan.max_live_bytes,
        )
    weights_on: dict[str, int] = {}
    for n in nodes:
        if n["kind"] == "weight" and n["device"] in (device, "host"):
            weights_on[n["device"]] = weights_on.get(n["device"], 0) + n["bytes"]
    states = sum(n["bytes"] for n in nodes if n["kind"] == "state")
    on_device = placement.device_bytes if placement is not None else weights_on.get(device, 0)
    peak = {device: on_device + arena + states}
    doc["summary"]["device_bytes"] = {"weights": on_device, "caches": states, "arena": arena}
    if placement is not None:
        doc["layers"] = {
            str(p.layer): {
                "where": device if p.where == GPU else p.where,  # resident: the session's device
                "cause": p.cause,
                "bytes": p.nbytes,
                "slot": p.slot,
            }
            for p in placement.layers
        }
        doc["summary"].update(
            policy=placement.policy,
            streamed_bytes=placement.streamed_bytes,
            predicted_ms=round(placement.predicted_s * 1e3, 4),
            slots=placement.slots,
        )
    if weights_on.get("host"):
        peak["host"] = weights_on["host"]
    doc["summary"]["peak_bytes"] = peak
    doc["options"] = dict(options or {})
    return doc
