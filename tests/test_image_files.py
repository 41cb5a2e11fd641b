"""sample.imagefiles: the one list of image extensions and the one reader of an image file's prompt, shared by the
metrics, the human-evaluation store and the shapes judge."""
import pytest
from PIL import Image, PngImagePlugin

import metrics.evaluate
import metrics.human.__main__ as human
from sample.images import ImageError
from sample.imagefiles import IMAGE_EXTENSIONS, list_images, read_prompt
from shapes.judge import load_prompted_images

INFOTEXT = "a large green star\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1"


def png(path, infotext=None):
    info = None
    if infotext is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(path, pnginfo=info)
    return path


def test_a_caption_file_comes_before_the_infotext_and_either_may_hold_a_whole_infotext(tmp_path):
    assert read_prompt(png(tmp_path / "generated.png", INFOTEXT)) == "a large green star"
    relabelled = png(tmp_path / "relabelled.png", INFOTEXT)
    (tmp_path / "relabelled.txt").write_text("a pink circle above a pink square\n")
    assert read_prompt(relabelled) == "a pink circle above a pink square"
    # A1111's "text file next to every image" holds the whole infotext: its prompt part is the prompt.
    sidecar = png(tmp_path / "sidecar.png")
    (tmp_path / "sidecar.txt").write_text(INFOTEXT.replace("green star", "blue cross"))
    assert read_prompt(sidecar) == "a large blue cross"
    # A caption with colons but no generation parameters is a caption, whole.
    styled = png(tmp_path / "styled.png")
    (tmp_path / "styled.txt").write_text("style: ink, mood: calm, light: dusk")
    assert read_prompt(styled) == "style: ink, mood: calm, light: dusk"
    # A blank caption file says nothing: the infotext speaks; with neither there is no prompt.
    blank = png(tmp_path / "blank.png", INFOTEXT)
    (tmp_path / "blank.txt").write_text("  \n")
    assert read_prompt(blank) == "a large green star"
    assert read_prompt(png(tmp_path / "bare.png")) is None
    with pytest.raises(ImageError, match="not found"):
        read_prompt(tmp_path / "missing.png")


def test_every_folder_reader_lists_the_same_images_and_reads_the_same_prompts(tmp_path):
    for index, suffix in enumerate(IMAGE_EXTENSIONS):
        image = Image.new("RGB", (8, 8), (255, 255, 255))
        image.save(tmp_path / f"{index}{suffix.upper() if index % 2 else suffix}", format="PNG")
        (tmp_path / f"{index}.txt").write_text(f"a red circle number {index}")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    listed = list_images(tmp_path)
    assert [p.stem for p in listed] == [str(i) for i in range(len(IMAGE_EXTENSIONS))]
    # The shapes judge reads a loose folder with the same lister and the same prompt reader; so do the metrics.
    assert load_prompted_images(tmp_path) == [(p, read_prompt(p)) for p in listed]
    for module in (metrics.evaluate, human):
        assert (module.list_images, module.read_prompt) == (list_images, read_prompt)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        list_images(tmp_path / "none")
