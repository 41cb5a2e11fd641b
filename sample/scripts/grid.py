"""Labelled image grids, as A1111's scripts draw them: column labels above, row labels on the left, PIL's default
font.

A label is a string, or a list of (text, active) lines: inactive lines are drawn in grey (the prompt matrix shows
every part of the prompt and greys the ones a cell leaves out).
"""
from PIL import Image, ImageDraw, ImageFont

PADDING = 6  # pixels around the label bands' text
ACTIVE, INACTIVE = (0, 0, 0), (153, 153, 153)


def _lines(label) -> list[tuple[str, bool]]:
    if isinstance(label, str):
        return [(line, True) for line in label.split("\n")] if label else []
    return [(text, active) for text, active in label]


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a single long word stays whole)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line]


def _layout(label, font, width: int, draw) -> list[tuple[str, bool]]:
    return [(piece, active) for text, active in _lines(label) for piece in _wrap(text, font, width, draw)]


def annotated_grid(cells: list[Image.Image], columns: int, column_labels: list, row_labels: list,
                   margin: int = 0) -> Image.Image:
    """`cells` (all of one size, row by row, `columns` per row) on one sheet, `margin` pixels apart, with
    `column_labels` centred above each column and `row_labels` centred left of each row. A band whose labels are
    all empty is left out, so a grid without labels is the plain grid."""
    rows = -(-len(cells) // columns)
    width, height = cells[0].size
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    top = [_layout(label, font, width - 2 * PADDING, measure) for label in column_labels]
    # Row labels get the width of their longest line, up to one cell (or 96 pixels for small cells), then wrap.
    widest = max((measure.textlength(text, font=font) for label in row_labels for text, _ in _lines(label)),
                 default=0)
    left_width = min(int(widest) + 2 * PADDING, max(width, 96)) if widest else 0
    left = [_layout(label, font, max(left_width - 2 * PADDING, 1), measure) for label in row_labels]
    top_height = max((len(lines) for lines in top), default=0) * line_height
    top_height += 2 * PADDING if top_height else 0
    sheet = Image.new("RGB", (left_width + columns * width + (columns - 1) * margin,
                              top_height + rows * height + (rows - 1) * margin), "white")
    for i, cell in enumerate(cells):
        column, row = i % columns, i // columns
        sheet.paste(cell, (left_width + column * (width + margin), top_height + row * (height + margin)))
    draw = ImageDraw.Draw(sheet)

    def write(lines, centre_x: float, centre_y: float) -> None:
        y = centre_y - len(lines) * line_height / 2
        for text, active in lines:
            x = centre_x - draw.textlength(text, font=font) / 2
            draw.text((x, y), text, fill=ACTIVE if active else INACTIVE, font=font)
            y += line_height

    for column, lines in enumerate(top):
        write(lines, left_width + column * (width + margin) + width / 2, top_height / 2)
    for row, lines in enumerate(left):
        write(lines, left_width / 2, top_height + row * (height + margin) + height / 2)
    return sheet
