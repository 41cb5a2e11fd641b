"""python -m train.plot OUTPUT [--out loss.png]: draw the loss curve of a run from OUTPUT/metrics.jsonl.

Drawn with Pillow (no plotting library needed): the per-step loss in light grey, its exponential moving average
(smoothing 0.9, bias-corrected) in blue, on a log-scaled y axis when the loss spans more than a decade. A run with the
forgetting monitor (train.retention) gets a panel below for the retention-loss delta and one for the judged accuracy
on the retention prompts, when it logged them.
"""
import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 500, 60


def read_metrics(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def smoothed(values: list[float], smoothing: float = 0.9) -> list[float]:
    """Bias-corrected EMA (as TensorBoard's smoothing), so the first points are not pulled towards 0."""
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = smoothing * average + (1 - smoothing) * value
        out.append(average / (1 - smoothing ** n))
    return out


# The forgetting monitor's series (train.retention), each drawn in a panel under the loss when the run logged it.
RETENTION_PANELS = (("retention_delta", "retention loss - base's (forgetting monitor)"),
                    ("retention_shapes_accuracy", "judged accuracy on retention prompts"))
PANEL_HEIGHT = 300


def _series(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _draw_panel(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], top: int, height: int, title: str,
                smooth: bool, allow_log: bool) -> None:
    """One curve in the box [MARGIN, top + MARGIN] – [WIDTH − MARGIN, top + height − MARGIN]."""
    steps, values = zip(*points)
    log_scale = allow_log and min(values) > 0 and max(values) / min(values) > 10
    transform = math.log10 if log_scale else (lambda v: v)
    ys = [transform(v) for v in values]
    low, high = min(ys), max(ys)
    high = high if high > low else low + 1
    first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

    def xy(step, y):
        return (MARGIN + (step - first) / (last - first) * (WIDTH - 2 * MARGIN),
                top + height - MARGIN - (y - low) / (high - low) * (height - 2 * MARGIN))

    draw.rectangle([MARGIN, top + MARGIN, WIDTH - MARGIN, top + height - MARGIN], outline="black")
    for frac in (0.0, 0.5, 1.0):
        y = low + frac * (high - low)
        label = f"{10 ** y:.3g}" if log_scale else f"{y:.3g}"
        draw.text((5, xy(first, y)[1] - 6), label, fill="black")
        step = first + frac * (last - first)
        draw.text((xy(step, low)[0] - 10, top + height - MARGIN + 8), f"{step:.0f}", fill="black")
    draw.text((WIDTH // 2 - 4 * len(title), top + 20), title + (" (log scale)" if log_scale else ""), fill="black")
    if len(points) > 1:
        draw.line([xy(s, y) for s, y in zip(steps, ys)], fill=(190, 190, 190) if smooth else (30, 90, 200),
                  width=1 if smooth else 2)
        if smooth:
            draw.line([xy(s, y) for s, y in zip(steps, smoothed(ys))], fill=(30, 90, 200), width=2)
    else:
        x, y = xy(steps[0], ys[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))


def draw_loss(records: list[dict], destination: Path) -> None:
    """The loss curve (900×500), with one 300-pixel panel below per forgetting-monitor series the run logged, on
    the same step axis range as its own points."""
    points = _series(records, "loss")
    if not points:
        raise ValueError("no finite loss values to plot")
    panels = [(title, series) for key, title in RETENTION_PANELS if (series := _series(records, key))]
    image = Image.new("RGB", (WIDTH, HEIGHT + PANEL_HEIGHT * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    _draw_panel(draw, points, 0, HEIGHT, "loss", smooth=True, allow_log=True)
    for index, (title, series) in enumerate(panels):
        _draw_panel(draw, series, HEIGHT + index * PANEL_HEIGHT, PANEL_HEIGHT, title, smooth=False, allow_log=False)
    image.save(destination)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plot",
                                     description="Draw a run's loss curve (and its forgetting-monitor curves).")
    parser.add_argument("output", help="training output folder (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default OUTPUT/loss.png)")
    args = parser.parse_args(argv)
    metrics = Path(args.output) / "metrics.jsonl"
    if not metrics.is_file():
        parser.exit(2, f"python -m train.plot: error: {metrics} does not exist\n")
    destination = Path(args.out) if args.out else Path(args.output) / "loss.png"
    try:
        draw_loss(read_metrics(metrics), destination)
    except ValueError as e:
        parser.exit(2, f"python -m train.plot: error: {e}\n")
    print(destination)
    return 0


if __name__ == "__main__":
    sys.exit(main())
