"""The try-out page in a real browser: Debian's headless Chromium driven by Playwright clicks a
point on a sample photo; the mask the page shows (its digest) must be what the Python API gives
for that file and click, and PyTorch's what the reference gives. Bad input is a message on the
page and the server goes on. The server is stopped by the test within a bounded time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mobile_targets import load_artifact_runner
from pipeline.datasets import SAMPLE_DIR, list_images, load_rgb
from pipeline.manifest import read_manifest
from pipeline.metrics import mask_iou
from pipeline.predictor import ReferencePredictor, Segmenter
from pipeline.processing import Prompt
from tests.artifact_surgery import keep_only_precisions

pytest.importorskip("gradio", reason="the tryout extra (gradio) is part of the test extra")
playwright = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STOP_SECONDS = 20


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tflite_converted) -> Path:
    """A copy of the session's TFLite files of the checkpoint, as if converted with --precisions
    fp32 (one target, what a user's first convert makes); the last test damages a file."""
    out = tmp_path_factory.mktemp("tryout")
    shutil.copytree(tflite_converted.parent, out / "tflite")
    keep_only_precisions(out / "tflite" / "manifest.json", ("fp32",))
    return out


@pytest.fixture(scope="module")
def server(converted):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "validation.tryout", "--out", str(converted), "--port", str(port)]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        assert process.poll() is None, process.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "the try-out server did not answer within 180 s"
        time.sleep(0.5)
    yield url
    started = time.time()
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_SECONDS)
    assert time.time() - started < 2 * STOP_SECONDS + 1


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield chromium
        chromium.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    outside = []
    page.on("request", lambda request: outside.append(request.url) if "127.0.0.1" not in request.url else None)
    page.goto(url)
    page.wait_for_selector("#photo img", timeout=60_000)
    # the photo's load event has finished: a click during it would be dropped (one event at a time)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Click on it')")
    return page, outside


def _click_photo(page, fx: float, fy: float, previous: str = "") -> dict:
    box = page.locator("#photo img").bounding_box()
    page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
    page.wait_for_function(
        "previous => { const t = document.querySelector('#details textarea'); return t && t.value && "
        "t.value !== previous; }",
        arg=previous,
        timeout=120_000,
    )
    page.wait_for_selector("#file-mask img", timeout=60_000)
    time.sleep(1)  # let the page lay the new images out before the next click aims at the photo
    return json.loads(page.input_value("#details textarea"))


def _same_mask(shown: np.ndarray, expected) -> bool:
    """The page's mask is the API's: pixel for pixel, except where the API's own logit is within
    float rounding of the 0 threshold (two processes' runtimes may round the last bit differently)."""
    logits = expected.mask_logits[expected.selected]
    differing = shown != expected.mask
    return shown.shape == expected.mask.shape and bool(np.all(np.abs(logits[differing]) < 1e-3))


def test_a_click_shows_the_files_mask_as_the_python_api_gives_it(server, browser, converted, our_model):
    from validation.tryout.engine import fit_photo, mask_digest

    page, outside = _open(browser, server)
    details = _click_photo(page, 0.45, 0.55)
    page.wait_for_selector("#file-mask img", timeout=60_000)
    status = page.inner_text("#status")
    assert "Mask IoU files vs PyTorch" in status and "decoder" in status and "encoder" in status
    # the same file and click through the Python API
    photo, _ = fit_photo(load_rgb(list_images(SAMPLE_DIR)[0]))
    manifest_path = converted / "tflite" / "manifest.json"
    manifest = read_manifest(manifest_path)
    runners = {r.part: load_artifact_runner(manifest_path, manifest, r, 2) for r in manifest.artifacts}
    files = Segmenter(runners["prompt_decoder"], runners["image_encoder"])
    files.set_image(photo)
    x, y = details["click"]
    assert details["points"] == [[x, y, 1]], details
    prompt = Prompt(points=np.array([[x, y]], np.float32), labels=np.array([1.0], np.float32))
    expected = files.predict(prompt)
    shown = mask_utils.decode(details["file_mask_rle"]).astype(bool)
    assert details["selected_output"] == expected.selected
    assert _same_mask(shown, expected), details["file_mask_sha256"]
    reference = ReferencePredictor(our_model)  # the checkpoint the files came from
    reference.set_image(photo)
    pytorch = reference.predict(prompt)
    if details["pytorch_mask_sha256"] != mask_digest(pytorch.mask):  # only pixels at the 0 boundary may flip
        assert mask_iou(pytorch.mask, shown) > 0.99
    assert details["mask_iou_file_vs_pytorch"] > 0.99 and details["file_mask_pixels"] > 0
    assert not outside, f"the page fetched from the network: {outside[:3]}"
    page.close()


def test_bad_input_is_a_message_on_the_page(server, browser, converted, tmp_path):
    page, _ = _open(browser, server)
    details = {}
    for index in range(5):  # N = 5 slots: the 6th point is refused, the page goes on
        details = _click_photo(page, 0.2 + 0.1 * index, 0.5, json.dumps(details) if details else "")
    previous = page.input_value("#details textarea")
    box = page.locator("#photo img").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.8, box["y"] + box["height"] * 0.3)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Error')", timeout=60_000)
    time.sleep(1)
    status = page.inner_text("#status")
    assert "takes 5" in status and "Traceback" not in status and page.input_value("#details textarea") == previous
    not_a_photo = tmp_path / "holiday.jpg"
    not_a_photo.write_text("this is not a photo")
    page.locator("input[type=file]").set_input_files(str(not_a_photo))
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('holiday.jpg')", timeout=60_000)
    assert "Error" in page.inner_text("#status") and "Traceback" not in page.inner_text("#status")
    page.get_by_role("button", name="Reset prompts").click()  # the server still answers
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('cleared')", timeout=60_000)
    with (converted / "tflite" / "prompt_decoder_fp32.tflite").open("ab") as handle:
        handle.write(b"changed after conversion")  # the last test of the module: the file is not used again
    time.sleep(1)  # the shorter status line moved the photo up: let the layout settle before aiming
    box = page.locator("#photo img").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('changed since conversion')", timeout=60_000
    )
    assert "Traceback" not in page.inner_text("#status")
    page.close()
