"""The try-out page (Gradio): pick a photo, click points or two box corners, pick an encoder file
and a decoder file, and see PyTorch's mask and the files' side by side.

Every callback is guarded: bad input (an upload that is not an image, a photo over the size
limit, a file that no longer matches its manifest, more clicks than the decoder's N) becomes one
line on the page, never a stack trace or a dead server. Nothing is fetched from the network: the
theme uses system fonts and Gradio's analytics are off.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home

import gradio as gr
import numpy as np
from PIL import Image, ImageDraw

from pipeline.contract import DECODER, ENCODER
from pipeline.datasets import load_rgb
from pipeline.errors import PipelineError, one_line
from pipeline.predictor import Prediction
from validation.segment_everything import overlay as everything_overlay
from validation.tryout.engine import Answer, Clicks, TryoutEngine, fit_photo

MODES = ("foreground point", "background point", "box corner")
MASK_COLOUR = np.array([30, 144, 255], np.float32)
DISAGREE_COLOUR = np.array([255, 0, 0], np.float32)
EVERYTHING_POINTS_PER_SIDE = 16
THEME = gr.themes.Base(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)  # system fonts only: the default theme loads Google Fonts


def blend(image: np.ndarray, mask: np.ndarray, colour: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    picture = image.astype(np.float32)
    picture[mask] = (1 - alpha) * picture[mask] + alpha * colour
    return picture.clip(0, 255).astype(np.uint8)


def mask_view(image: np.ndarray, prediction: Prediction, reference: Prediction | None = None) -> np.ndarray:
    """The mask in blue; with a reference, the pixels where the two disagree in red."""
    picture = blend(image, prediction.mask, MASK_COLOUR)
    if reference is not None:
        picture = blend(picture, prediction.mask != reference.mask, DISAGREE_COLOUR, alpha=0.85)
    return picture


def with_clicks(image: np.ndarray, clicks: Clicks) -> np.ndarray:
    """The photo with the clicks drawn: green foreground, red background, the box in yellow."""
    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    radius = max(4, max(image.shape[:2]) // 120)
    for x, y, label in clicks.points:
        colour = (0, 220, 0) if label == 1 else (230, 0, 0)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour, outline=(255, 255, 255))
    if clicks.box_corner:
        x, y = clicks.box_corner
        draw.rectangle((x - radius, y - radius, x + radius, y + radius), outline=(255, 215, 0), width=3)
    if clicks.box:
        draw.rectangle(clicks.box, outline=(255, 215, 0), width=max(2, radius // 2))
    return np.asarray(picture)


def candidates(image: np.ndarray, answer: Answer) -> list[tuple[np.ndarray, str]]:
    """The file's three multimask outputs with their predicted IoU."""
    scores = answer.file.iou_predictions.reshape(-1)
    return [
        (blend(image, answer.file.mask_logits[i] > 0, MASK_COLOUR), f"output {i}: predicted IoU {scores[i]:.3f}")
        for i in (1, 2, 3)
    ]


def _message(error: Exception) -> str:
    text = str(error) if isinstance(error, PipelineError) else one_line(error)
    return f"**Error:** {text}"


def guarded(outputs: int, status_index: int) -> Callable:
    """Turn any exception into a message in the status output, every other output unchanged."""

    def wrap(function: Callable) -> Callable:
        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> tuple:
            try:
                return function(*args, **kwargs)
            except Exception as error:  # the page reports it; the server goes on
                values = [gr.update() for _ in range(outputs)]
                values[status_index] = _message(error)
                return tuple(values)

        return call

    return wrap


def build_page(engine: TryoutEngine, sample_photos: dict[str, Path]) -> gr.Blocks:
    encoders = engine.labels(ENCODER)
    first_encoder = next((e for e in encoders if " fp32:" in e), encoders[0] if encoders else None)
    first_target = engine.files[first_encoder].record.target if first_encoder else None
    decoders = engine.labels(DECODER, first_target)
    first_decoder = next((d for d in decoders if " fp32:" in d), decoders[0] if decoders else None)

    with gr.Blocks(title="MobileSAM files: try them") as page:
        gr.Markdown(
            "# Try the converted files\nClick on the photo: a point (foreground or background) or two box "
            "corners. PyTorch's mask and the files' mask are shown side by side; red pixels are where the "
            "file disagrees with PyTorch. A second click refines with the previous mask (`mask_input`)."
        )
        photo_state = gr.State(None)
        with gr.Row():
            photo_name = gr.Dropdown(list(sample_photos), value=next(iter(sample_photos), None), label="Sample photo")
            upload = gr.File(label="...or upload a photo", file_count="single", type="filepath")
        with gr.Row():
            encoder = gr.Dropdown(encoders, value=first_encoder, label="Encoder file")
            decoder = gr.Dropdown(decoders, value=first_decoder, label="Decoder file")
            mode = gr.Radio(list(MODES), value=MODES[0], label="Click adds")
        with gr.Row():
            reset = gr.Button("Reset prompts")
            everything = gr.Button("Segment everything")
        status = gr.Markdown("Pick a photo and click on it.", elem_id="status")
        with gr.Row():
            clickable = gr.Image(label="Photo (click here)", interactive=False, type="numpy", elem_id="photo")
            pytorch_view = gr.Image(label="PyTorch", interactive=False, elem_id="pytorch-mask")
            file_view = gr.Image(label="Files (red: disagrees with PyTorch)", interactive=False, elem_id="file-mask")
        gallery = gr.Gallery(label="The files' three multimask candidates", columns=3, height=220)
        details = gr.Textbox(label="Details (JSON)", interactive=False, elem_id="details", lines=4)

        def show_photo(image: np.ndarray, key: str, note: str | None):
            state = {"image": image, "key": key, "clicks": Clicks()}
            message = f"Photo {key} ({image.shape[1]}x{image.shape[0]}). Click on it."
            return state, image, None, None, [], "", message + (f" Note: {note}." if note else "")

        photo_outputs = [photo_state, clickable, pytorch_view, file_view, gallery, details, status]

        @guarded(len(photo_outputs), 6)
        def pick_sample(name: str):
            if name not in sample_photos:
                raise PipelineError("pick a sample photo")
            image, note = fit_photo(load_rgb(sample_photos[name]))
            return show_photo(image, f"sample:{name}", note)

        @guarded(len(photo_outputs), 6)
        def pick_upload(path: str | None):
            if not path:
                return tuple(gr.update() for _ in photo_outputs)
            image, note = fit_photo(load_rgb(Path(path)))
            return show_photo(image, f"upload:{Path(path).name}:{image.shape}", note)

        click_outputs = [clickable, pytorch_view, file_view, gallery, details, status]

        @guarded(len(click_outputs), 5)
        def click(state: dict | None, encoder_label: str, decoder_label: str, click_mode: str, evt: gr.SelectData):
            if state is None:
                raise PipelineError("pick a photo first")
            x, y = float(evt.index[0]), float(evt.index[1])
            clicks: Clicks = state["clicks"]
            if click_mode == "box corner":
                if clicks.box_corner is None:
                    clicks.box_corner = (x, y)
                    return with_clicks(state["image"], clicks), *(gr.update(),) * 4, "Click the opposite corner."
                (x0, y0), clicks.box_corner = clicks.box_corner, None
                clicks.box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
            else:
                clicks.points.append((x, y, 1 if click_mode == MODES[0] else 0))
            try:
                answer = engine.predict(state["image"], state["key"], clicks, encoder_label, decoder_label)
            except Exception:
                if click_mode != "box corner":
                    clicks.points.pop()  # the click that was refused is not kept
                else:
                    clicks.box = None
                raise
            image = state["image"]
            encoded = "embeddings reused" if answer.encoder_ms is None else f"encoder {answer.encoder_ms:.0f} ms"
            scores = ", ".join(f"{v:.3f}" for v in answer.file.iou_predictions.reshape(-1)[1:4])
            message = (
                f"Mask IoU files vs PyTorch **{answer.iou:.4f}**; {encoded}, decoder {answer.decoder_ms:.0f} ms "
                f"(PyTorch decoder {answer.pytorch_decoder_ms:.0f} ms); {clicks.slots} of "
                f"{engine.choice(decoder_label, DECODER).manifest.config.num_points} prompt slots used; "
                f"the files' multimask candidates 1-3 predict IoU {scores} (output {answer.file.selected} shown)."
            )
            info = {"click": [x, y], "points": clicks.points, "box": clicks.box, **answer.details()}
            return (
                with_clicks(image, clicks),
                mask_view(image, answer.pytorch),
                mask_view(image, answer.file, answer.pytorch),
                candidates(image, answer),
                json.dumps(info),
                message,
            )

        @guarded(3, 2)
        def reset_clicks(state: dict | None):
            if state is None:
                return gr.update(), gr.update(), "Pick a photo first."
            state["clicks"] = Clicks()
            return state["image"], "", "Prompts cleared."

        @guarded(3, 2)
        def encoder_changed(encoder_label: str):
            target = engine.choice(encoder_label, ENCODER).record.target
            options = engine.labels(DECODER, target)
            chosen = next((d for d in options if " fp32:" in d), options[0] if options else None)
            return gr.update(choices=options, value=chosen), gr.update(), f"Decoder files of {target}."

        @guarded(2, 1)
        def segment_everything(state: dict | None, encoder_label: str):
            if state is None:
                raise PipelineError("pick a photo first")
            records, used, seconds = engine.segment_everything(
                state["image"], encoder_label, EVERYTHING_POINTS_PER_SIDE
            )
            message = (
                f"Segment everything: {len(records)} masks from a {EVERYTHING_POINTS_PER_SIDE}x"
                f"{EVERYTHING_POINTS_PER_SIDE} grid in {seconds:.1f} s with {Path(used.record.file).name}."
            )
            return everything_overlay(state["image"], records), message

        photo_name.change(pick_sample, [photo_name], photo_outputs)
        upload.change(pick_upload, [upload], photo_outputs)
        page.load(pick_sample, [photo_name], photo_outputs)
        clickable.select(click, [photo_state, encoder, decoder, mode], click_outputs)
        reset.click(reset_clicks, [photo_state], [clickable, details, status])
        encoder.change(encoder_changed, [encoder], [decoder, details, status])
        everything.click(segment_everything, [photo_state, encoder], [file_view, status])
    return page


def serve(engine: TryoutEngine, sample_photos: dict[str, Path], port: int) -> None:
    """On 127.0.0.1 only, never another interface, never a public share link."""
    page = build_page(engine, sample_photos)
    page.queue(default_concurrency_limit=1).launch(
        server_name="127.0.0.1", server_port=port, share=False, theme=THEME, show_error=False
    )
