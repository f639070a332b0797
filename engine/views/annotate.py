"""Every decision the passes made for one forward pass, as the plain data ``graph.drawing`` draws.

    mp = engine.model.session.plan_for(cfg, options)           # what a session would run
    doc = annotate(plan_step(mp, key), mp, title="...")       # its step plans, drawn

Nothing here decides anything: it reads step plans (``engine.passes.plans.StepPlan``: fusion,
streams and events, memory plan) and a model plan (where each weight lives and why) and writes
them into the dump document's fields (see ``graph.drawing``): each node's device, stream,
launching step, fused group, arena offset, ring slot and placement cause; the event waits
between streams; per layer where its weights live; and a summary (nodes, streams, events, bytes
per device, streamed bytes, the costs the placement was timed with). A split model's segments
(``ngl=N``) are drawn as one document, the hidden states crossing from one to the next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.passes.offload import GPU, HOST, STREAMED
from engine.passes.plans import ModelPlan, StepPlan
from graph.drawing import document

__all__ = ["annotate"]


def annotate(
    plans: StepPlan | Sequence[StepPlan],
    model: ModelPlan | None = None,
    title: str = "",
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The dump document of one forward pass: ``plans`` (one step plan, or one per segment of
    a split model, in order) with ``model``'s placement."""
    parts = [plans] if isinstance(plans, StepPlan) else list(plans)
    docs = [_one(sp, model) for sp in parts]
    doc = docs[0] if len(docs) == 1 else _join(docs, [sp.graph for sp in parts])
    doc["title"] = title
    if model is not None:
        doc["n_layer"] = model.config.n_layer
        _placement(doc, model, parts[0].spec.device)
    peak: dict[str, int] = {}
    for sp, d in zip(parts, docs, strict=True):
        where = sp.spec.device
        states = sum(n["bytes"] for n in d["nodes"] if n["kind"] == "state")
        peak[where] = peak.get(where, 0) + sp.arena_bytes + states
    weights_on: dict[str, int] = {}
    for n in doc["nodes"]:
        if n["kind"] == "weight" and n["device"] in ("gpu", "cpu", "host"):
            weights_on[n["device"]] = weights_on.get(n["device"], 0) + n["bytes"]
    device = parts[0].spec.device
    on_device = weights_on.get(device, 0)
    if model is not None and model.placement is not None:
        on_device = model.device_weight_bytes
    peak[device] = peak.get(device, 0) + on_device
    if weights_on.get("host"):
        peak["host"] = peak.get("host", 0) + weights_on["host"]
    if device != "cpu" and weights_on.get("cpu"):
        peak["cpu"] = peak.get("cpu", 0) + weights_on["cpu"]
    s = doc["summary"]
    s["device_bytes"] = {
        "weights": on_device,
        "caches": sum(n["bytes"] for n in doc["nodes"] if n["kind"] == "state"),
        "arena": sum(sp.arena_bytes for sp in parts),
    }
    s["peak_bytes"] = peak
    if model is not None:
        s["costs"] = model.costs_source
    doc["options"] = dict(options or {})
    return doc


def _one(sp: StepPlan, model: ModelPlan | None) -> dict[str, Any]:
    """One step plan's decisions in its graph's document."""
    doc = document(sp.graph)
    d, device = sp.decisions, sp.spec.device
    sched = d.schedule
    groups = {i: f.pattern for f in d.fusions for i in f.nodes}
    offsets = d.plan.offset_of()
    for n in doc["nodes"]:
        i = n["id"]
        if n["kind"] == "input":
            n["device"] = "host"
        elif n["kind"] == "weight":
            n["device"] = device
        else:
            n["device"] = device
        # a view launches nothing: it has a stream only inside a fused group
        if n["kind"] == "compute" or (n["kind"] == "view" and i in groups):
            step = d.steps[i]
            n["step"] = step
            n["stream"] = sched.stream.get(step, 0) if sched is not None else 0
        n["fused"] = groups.get(i)
        n["offset"] = offsets.get(i)
    if sched is not None:
        sched.draw_into(doc)
    doc["summary"].update(
        steps=len(sp.steps),
        launches=sp.n_launches,
        fused_groups=len(d.fusions),
        arena_bytes=d.plan.arena_bytes,
        arena_max_live_bytes=d.plan.max_live_bytes,
    )
    return doc


def _placement(doc: dict[str, Any], model: ModelPlan, device: str) -> None:
    """Where each weight lives and why, from the model plan."""
    p = model.placement
    if p is None:
        return
    where = {lp.layer: lp for lp in p.layers}
    for n in doc["nodes"]:
        if n["kind"] != "weight":
            continue
        lp = where.get(n["layer"])
        if lp is None:
            continue
        if lp.where == STREAMED and len(n["shape"]) < 2:
            n["cause"] = "norm vector of a streamed layer: stays resident (a few KiB)"
            continue
        n["device"] = {GPU: device, STREAMED: "streamed", HOST: "host"}[lp.where]
        n["cause"], n["slot"] = lp.cause, lp.slot
    doc["layers"] = {
        str(lp.layer): {
            "where": device if lp.where == GPU else lp.where,  # resident: the session's device
            "cause": lp.cause,
            "bytes": lp.nbytes,
            "slot": lp.slot,
        }
        for lp in p.layers
    }
    doc["summary"].update(
        policy=p.policy,
        streamed_bytes=p.streamed_bytes,
        predicted_ms=round(p.predicted_s * 1e3, 4),
        slots=p.slots,
    )


def _join(docs: list[dict[str, Any]], graphs: list[Any]) -> dict[str, Any]:
    """The segments of a split model as one document: each segment's node ids shifted past
    the ones before it, and an edge from each segment's output to the next one's ``hidden``."""
    out = dict(docs[0])
    nodes, edges, waits, outputs = [], [], [], []
    summary: dict[str, Any] = {}
    base = 0
    prev_out: int | None = None
    for doc, graph in zip(docs, graphs, strict=True):
        for n in doc["nodes"]:
            m = dict(n, id=n["id"] + base)
            for key in ("step",):
                if m.get(key) is not None:
                    m[key] += base
            nodes.append(m)
        edges += [[a + base, b + base] for a, b in doc["edges"]]
        waits += [[a + base, b + base, *rest] for a, b, *rest in doc["waits"]]
        hidden = next((n.id for n in graph.inputs if n.name == "hidden"), None)
        if prev_out is not None and hidden is not None:
            edges.append([prev_out, hidden + base])
        outs = [o + base for o in doc["outputs"]]
        prev_out = outs[0] if outs else None
        outputs = outs
        for k, v in doc["summary"].items():
            if isinstance(v, int) and not isinstance(v, bool) and k != "streams":
                summary[k] = summary.get(k, 0) + v
            else:
                summary[k] = max(summary.get(k, v), v) if k == "streams" else v
        base += len(doc["nodes"])
    out.update(nodes=nodes, edges=edges, waits=waits, outputs=outputs, summary=summary)
    return out
