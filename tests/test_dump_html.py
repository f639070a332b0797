"""``tools.dump_html``: the page carries the dump document intact and cannot be broken out of
by a label, needs nothing from the network, and, drawn by headless Chromium, shows one node
group per node with no script error and a picture that is not blank.

Chromium is a system package: these tests skip without it, except in CI (``CI=true``), which
installs it, so that a missing browser cannot pass for a working page there."""

from __future__ import annotations

import copy
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.options import Options
from tools import graph_dump
from tools.dump_html import HtmlDump, to_html

EMBEDDED = re.compile(r'<script type="application/json" id="dump">(.*?)</script>', re.S)
CPU_FILL = (0xFF, 0xE2, 0xB8)  # graph.drawing.DEVICE_COLOURS["cpu"]


@pytest.fixture(scope="module")
def tiny() -> dict[str, Any]:
    """Three streams (event waits) and fused groups: every mark a session's plan can make
    together (streamed layers run on one stream; ``test_graph_dump`` draws them)."""
    options = Options(backend="numpy", n_ctx=512, streams=3, stack=False)
    return graph_dump.from_model("gemma3-tiny", options, prompt_len=4)


@pytest.fixture(scope="module")
def decode_270m() -> dict[str, Any]:
    """The Gemma 3 270M decode step: 626 nodes, the size the page must stay usable at."""
    return graph_dump.from_model("random:gemma3-270m", Options(backend="numpy", n_ctx=512))


def embedded(page: str) -> Any:
    match = EMBEDDED.search(page)
    assert match is not None, "no embedded dump document"
    return json.loads(match[1])


def test_page_embeds_the_document_intact(tiny: dict[str, Any]) -> None:
    page = to_html(tiny)
    assert embedded(page) == tiny
    assert f'<span id="node-count">{len(tiny["nodes"])}</span>' in page
    assert page.isascii()  # graph_dump writes it with the locale's encoding


def test_graph_dump_writes_the_page(tiny: dict[str, Any], tmp_path: Path) -> None:
    part = graph_dump.select(tiny, layers=(1, 2))
    path = graph_dump.write(part, tmp_path / "part.html")
    assert embedded(path.read_text()) == part


def test_page_needs_no_network(tiny: dict[str, Any]) -> None:
    page = to_html(tiny)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"\b(src|href)\s*=", page, re.I)
    assert "<link" not in page and "@import" not in page


def test_labels_cannot_end_the_script(tiny: dict[str, Any]) -> None:
    doc = copy.deepcopy(tiny)
    doc["nodes"][0]["label"] = "</script><script>alert(1)</script><!--"
    doc["nodes"][1]["name"] = "%DOC% & </SCRIPT>"
    doc["title"] = "</title><b>bold</b> %TITLE%"
    page = to_html(doc)
    assert page.count("</script>") == 2  # the document's and the program's own
    assert "alert(1)</script>" not in page and "</SCRIPT>" not in page
    assert "<b>bold" not in page
    assert embedded(page) == doc


def test_non_finite_numbers_still_parse(tiny: dict[str, Any]) -> None:
    doc = copy.deepcopy(tiny)
    doc["summary"]["predicted_ms"] = float("inf")

    def strict(token: str) -> None:
        raise AssertionError(f"JSON.parse rejects {token}")

    data = json.loads(EMBEDDED.search(to_html(doc))[1], parse_constant=strict)
    assert data["summary"]["predicted_ms"] is None


def test_notebook_shows_the_page_in_an_iframe(tiny: dict[str, Any]) -> None:
    out = HtmlDump(tiny, height=500)._repr_html_()
    assert out.startswith("<iframe") and "height:500px" in out
    srcdoc = re.search(r'srcdoc="([^"]*)"', out)
    assert srcdoc is not None and html.unescape(srcdoc[1]) == to_html(tiny)


# ---- drawn by headless Chromium ----


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        exe = shutil.which(name)
        if exe:
            return exe
    if os.environ.get("CI") == "true":
        pytest.fail("Chromium is missing: CI installs it (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium): the page is not drawn")


def browse(exe: str, tmp: Path, url: str, *args: str) -> str:
    """stdout of headless Chromium on ``url``; the virtual time budget lets the script run."""
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        "--virtual-time-budget=5000",
        *args,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def drawn(exe: str, tmp: Path, doc: dict[str, Any], fragment: str = "") -> str:
    """The page's DOM after its script ran, up to the embedded document."""
    path = tmp / "dump.html"
    path.write_text(to_html(doc))
    dom = browse(exe, tmp, path.as_uri() + fragment, "--dump-dom")
    body = re.search(r"<body[^>]*>", dom)
    assert body is not None, dom[:2000]
    assert "data-error" not in body[0], body[0]
    assert 'data-ready="1"' in body[0], "the script did not finish"
    return dom.split('<script type="application/json"')[0]


@pytest.mark.parametrize("which", ["tiny", "decode_270m"])
def test_chromium_draws_every_node(
    chromium: str, tmp_path: Path, which: str, request: pytest.FixtureRequest
) -> None:
    doc = request.getfixturevalue(which)
    dom = drawn(chromium, tmp_path, doc)
    assert dom.count('<g class="node"') == len(doc["nodes"])
    ids = {int(i) for i in re.findall(r'<g class="node" data-id="(\d+)"', dom)}
    assert ids == {n["id"] for n in doc["nodes"]}
    count = re.search(r'id="node-count">(\d+)<', dom)
    assert count is not None and int(count[1]) == len(doc["nodes"])
    if doc["waits"]:
        assert dom.count('<g class="wait"') > 0


def test_chromium_collapses_every_layer(
    chromium: str, tmp_path: Path, decode_270m: dict[str, Any]
) -> None:
    dom = drawn(chromium, tmp_path, decode_270m, "#collapse=all")
    assert dom.count('<g class="node"') == 0
    assert dom.count('<g class="lbox"') == len({n["layer"] for n in decode_270m["nodes"]})


@pytest.mark.parametrize("which,fragment", [("tiny", ""), ("decode_270m", "#collapse=all")])
def test_chromium_screenshot_is_a_picture(
    chromium: str, tmp_path: Path, which: str, fragment: str, request: pytest.FixtureRequest
) -> None:
    image = pytest.importorskip("matplotlib.image", reason="reads the screenshot (viz extra)")
    path = tmp_path / "dump.html"
    path.write_text(to_html(request.getfixturevalue(which)))
    png = tmp_path / "shot.png"
    browse(chromium, tmp_path, path.as_uri() + fragment, f"--screenshot={png}",
           "--window-size=1400,1000")  # fmt: skip
    pixels = image.imread(png)[..., :3]
    assert pixels.shape[:2] == (1000, 1400)
    colours = np.unique((pixels * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50 and pixels.std() > 0.05
    assert any(tuple(c) == CPU_FILL for c in colours), "no node drawn in the window"


def test_chromium_writes_any_field_only_as_text(
    chromium: str, tmp_path: Path, tiny: dict[str, Any]
) -> None:
    """The page escapes every value it writes into markup, the numeric fields' too: a document
    that skipped ``graph.documents.check_dump`` (``to_html`` takes any) still adds no element.
    Counts in the summary, a stream number and a layer tag went into the page raw."""
    doc = copy.deepcopy(tiny)
    bad = '<i class="pwned">x</i>'
    doc["summary"].update(
        edges=bad, steps=bad, fused_groups=bad, events=bad, predicted_ms=bad, streamed_bytes=bad
    )
    next(n for n in doc["nodes"] if n["stream"] is not None)["stream"] = bad  # the legend
    weight = next(n for n in doc["nodes"] if n["kind"] == "weight")
    weight["layer"] = '"><i class="pwned">'  # an attribute's value
    dom = drawn(chromium, tmp_path, doc)
    assert not re.search(r"<i\b[^>]*pwned", dom), "a document's value became an element"
    assert "&lt;i class=" in dom  # shown, as text
