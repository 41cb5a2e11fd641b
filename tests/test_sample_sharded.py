"""Sharded generation (sample.sharded): `torchrun -m sample.txt2img --from-file` over 2 gloo CPU processes writes,
together, byte for byte the files one process writes."""
import os
import subprocess
import sys
from pathlib import Path

from sample import txt2img
from sample_helpers import one_thread  # noqa: F401  (autouse fixture)

FAST = ["--steps", "2", "--width", "32", "--height", "32", "--no-progress", "--batch-size", "2"]
REPO = Path(__file__).resolve().parent.parent


def test_two_ranks_write_the_one_process_files_byte_for_byte(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n# a comment\na blue square\na green triangle\n")
    assert txt2img.main(["--from-file", str(prompts), *FAST, "--seed", "11", "--outdir", str(tmp_path / "one")]) == 0
    # Job k (line k of the prompts) holds images 2k and 2k+1 with seeds 11 + 2k + i.
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == ["00000-11-a red circle.png", "00001-12-a red circle.png", "00002-13-a blue square.png",
                     "00003-14-a blue square.png", "00004-15-a green triangle.png", "00005-16-a green triangle.png"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "sample.txt2img", "--from-file", str(prompts), *FAST, "--seed", "11", "--threads",
                             "1", "--outdir", str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "two")) == names
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_prompt_file_mistakes_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    assert txt2img.main(["--from-file", str(empty), *FAST, "--outdir", str(tmp_path)]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert txt2img.main(["--from-file", str(tmp_path / "missing.txt"), *FAST, "--outdir", str(tmp_path)]) == 2
    assert "--from-file" in capsys.readouterr().err
    for argv in (["a prompt", "--from-file", str(empty)], [], ["--from-file", str(empty), "--grid"]):
        try:
            txt2img.main([*argv, *FAST])
        except SystemExit as exit_info:
            assert exit_info.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
